"""``osp train-t2v``: train LatteT2V with upstream's train_t2v.py flags (osp.train.t2v).

Upstream's flags keep their names, and their defaults are the values of upstream's released run
script scripts/text_condition/train_videoae_17x256x256.sh (LatteT2V-XL/122, 17x256x256 with 4
images per clip, batch 4 per process, lr 2e-5 constant, bf16, gradient checkpointing, TF32,
checkpoints every 500 steps, 300 caption tokens), not its argparse defaults. Boolean flags that the
script turns on are on by default here and have --no-... forms.

Added by osp: --use_ema/--ema_decay (an EMA stepped every optimizer step), --cfg_dropout (caption
dropout to the learned null caption), --cache_dir (a latent cache from osp cache-latents: neither the
VAE nor T5 is loaded), --text_encoder_name tiny (the built-in offline encoder), --image_data_path
(images from their own JSON), --validation_prompts/--validation_steps (samples of the EMA weights in
output_dir/samples/), --max_grad_norm (applied on every launcher), --log_sample_indices. Upstream's
--cache_dir was the Hugging Face download folder; osp never downloads, so the name now means the
latent cache. --attention_mode, --use_deepspeed, --report_to, --logging_dir and --enable_tracker are
accepted so upstream's scripts run: osp picks its attention kernels itself, the launcher decides
DeepSpeed, and the log is always output_dir/train_log.jsonl.

Launch with python / osp on one device, ``torchrun --nproc_per_node N -m osp train-t2v ...`` for DDP,
or ``accelerate launch --config_file configs/accelerate/{deepspeed_zero2,fsdp}.yaml -m osp train-t2v
...``.
"""
from __future__ import annotations

import argparse

from . import UsageError

UPSTREAM_AE = "CausalVAEModel_4x8x8"
# Flags whose values a latent cache fixes (the cache was made with them).
DATA_FLAGS = {"num_frames": 17, "max_image_size": 256, "sample_rate": 1, "use_image_num": 4}


def register(subparsers) -> None:
    from ..train.t2v import LR_SCHEDULERS, MIXED_PRECISION

    p = subparsers.add_parser("train-t2v", help="train LatteT2V (upstream's train_t2v.py flags)", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("upstream's flags (defaults of its 17x256x256 run script)")
    g.add_argument("--model", default="LatteT2V-XL/122",
                   help="a preset (LatteT2V-XL/122, LatteT2V-tiny, ...) or a folder with a LatteT2V config.json and "
                        "optionally weights (no weights: random init)")
    g.add_argument("--pretrained", default=None,
                   help="weights loaded non-strictly as upstream does: upstream's .pt (under 'model'), a state dict, "
                        ".safetensors or a model folder (default: none; upstream's scripts pass a placeholder t2v.pt)")
    g.add_argument("--ae", default=UPSTREAM_AE, help=f"upstream's VAE name; only {UPSTREAM_AE} exists in v1.0")
    g.add_argument("--ae_path", default=None, help="local CausalVideoVAE folder (config.json and weights)")
    g.add_argument("--text_encoder_name", default="DeepFloyd/t5-v1_1-xxl",
                   help="local folder of the T5 v1.1 XXL encoder, or 'tiny' (osp's built-in offline encoder)")
    g.add_argument("--dataset", default="t2v", choices=("t2v",), help="upstream's dataset name (only t2v)")
    g.add_argument("--data_path", default=None, help='upstream\'s JSON list of {"path": ..., "cap": [...]}')
    g.add_argument("--video_folder", default=None, help="where relative paths are looked up first")
    g.add_argument("--num_frames", type=int, default=None, help="frames per clip, 1 + 4k (default 17)")
    g.add_argument("--max_image_size", type=int, default=None, help="square frame size (default 256)")
    g.add_argument("--sample_rate", type=int, default=None, help="temporal stride (default 1)")
    g.add_argument("--use_image_num", type=int, default=None, help="images per clip for joint training (default 4)")
    g.add_argument("--use_img_from_vid", action=argparse.BooleanOptionalAction, default=True,
                   help="the images are frames of the clip (default on)")
    g.add_argument("--model_max_length", type=int, default=300, help="caption tokens (default 300)")
    g.add_argument("--train_batch_size", type=int, default=4, help="clips per process and micro-batch (default 4)")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--max_train_steps", type=int, default=1_000_000)
    g.add_argument("--num_train_epochs", type=int, default=100, help="used when --max_train_steps is 0")
    g.add_argument("--learning_rate", type=float, default=2e-5)
    g.add_argument("--scale_lr", action="store_true",
                   help="multiply the lr by accumulation x batch x processes")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="in optimizer steps")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0,
                   help="gradient clipping, applied on every launcher (default 1.0)")
    g.add_argument("--mixed_precision", default="bf16", choices=MIXED_PRECISION,
                   help="bf16: autocast over fp32 weights (default); fp16: accelerate's GradScaler; no: fp32")
    g.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--allow_tf32", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--enable_tiling", action="store_true", help="tiled VAE encode (upstream's 65x512x512 stage)")
    g.add_argument("--tile_overlap_factor", type=float, default=0.25)
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep this many checkpoints (default all)")
    g.add_argument("--output_dir", default="t2v-f17-256-img4-videovae488-bf16-ckpt-xformers-bs4-lr2e-5-t5")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (a fresh start when there is none) or a checkpoint-<step> folder")
    g.add_argument("--seed", type=int, default=None,
                   help="default: a random seed, recorded in the checkpoints (a resumed run keeps it)")
    g.add_argument("--dataloader_num_workers", type=int, default=10)
    g.add_argument("--attention_mode", default="xformers", choices=("xformers", "math", "flash"),
                   help="accepted for upstream's scripts; osp dispatches attention itself")
    g.add_argument("--use_deepspeed", action="store_true", help="accepted for upstream's scripts; the launcher decides")
    g.add_argument("--report_to", default=None, help="accepted; the log is output_dir/train_log.jsonl")
    g.add_argument("--logging_dir", default=None, help="accepted and unused")
    g.add_argument("--enable_tracker", action="store_true", help="accepted; see --validation_prompts")
    o = p.add_argument_group("added by osp")
    o.add_argument("--cache_dir", default=None,
                   help="latent cache from osp cache-latents (its clips, sizes and encoders replace --data_path, "
                        "--num_frames, --max_image_size, --sample_rate, --use_image_num, --ae_path and "
                        "--text_encoder_name)")
    o.add_argument("--image_data_path", default=None,
                   help="JSON of images with captions (the --data_path schema) for --use_image_num without "
                        "--use_img_from_vid")
    o.add_argument("--use_ema", action="store_true", help="keep an EMA of the weights, stepped every optimizer step")
    o.add_argument("--ema_decay", type=float, default=0.9999,
                   help="the EMA's decay (reached through diffusers' (1+n)/(10+n) warm-up; default 0.9999)")
    o.add_argument("--cfg_dropout", type=float, default=0.0,
                   help="probability of replacing a clip's caption by the learned null caption (default 0 as "
                        "upstream; 0.1 makes classifier-free guidance sample what was trained)")
    o.add_argument("--validation_prompts", nargs="+", default=None,
                   help="prompts (or one .txt file, a prompt per line) sampled with the EMA weights into "
                        "output_dir/samples/step-<N>/")
    o.add_argument("--validation_steps", type=int, default=None, help="default: --checkpointing_steps")
    o.add_argument("--validation_sample_method", default="IDDPM", help="sampler (default IDDPM, as upstream)")
    o.add_argument("--validation_num_sampling_steps", type=int, default=250)
    o.add_argument("--validation_guidance_scale", type=float, default=1.0,
                   help="1 = no guidance (upstream's validation); try 7.5 with --cfg_dropout")
    o.add_argument("--log_sample_indices", action="store_true",
                   help="write every step's dataset indices into train_log.jsonl")
    p.set_defaults(run=run)


def to_config(args):
    """A TrainConfig from parsed flags; UsageError for a mistake."""
    from ..train.t2v import TrainConfig

    if args.ae != UPSTREAM_AE:
        raise UsageError(f"--ae {args.ae!r}: expected {UPSTREAM_AE} (the only v1.0 VAE); use --ae_path for its folder")
    values = {k: getattr(args, k) for k in DATA_FLAGS}
    if args.cache_dir is not None:
        given = [f"--{k}" for k, v in values.items() if v is not None]
        given += [f"--{k}" for k in ("data_path", "video_folder", "image_data_path") if getattr(args, k) is not None]
        if given:
            print(f"osp train-t2v: note: {', '.join(given)} ignored: the latent cache {args.cache_dir} fixes the "
                  "clips, sizes and encoders")
    values = {k: (DATA_FLAGS[k] if v is None else v) for k, v in values.items()}
    if args.enable_tiling and not 0 <= args.tile_overlap_factor < 1:
        raise UsageError(f"--tile_overlap_factor {args.tile_overlap_factor}: expected a number in [0, 1)")
    return TrainConfig(
        output_dir=args.output_dir, model=args.model, pretrained=args.pretrained, ae_path=args.ae_path,
        text_encoder_name=args.text_encoder_name, data_path=args.data_path, video_folder=args.video_folder,
        image_data_path=args.image_data_path, cache_dir=args.cache_dir, use_img_from_vid=args.use_img_from_vid,
        model_max_length=args.model_max_length, train_batch_size=args.train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps, max_train_steps=args.max_train_steps or None,
        num_train_epochs=args.num_train_epochs, learning_rate=args.learning_rate, scale_lr=args.scale_lr,
        lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_weight_decay=args.adam_weight_decay, adam_epsilon=args.adam_epsilon,
        max_grad_norm=args.max_grad_norm, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, allow_tf32=args.allow_tf32,
        enable_tiling=args.enable_tiling, tile_overlap_factor=args.tile_overlap_factor,
        checkpointing_steps=args.checkpointing_steps, checkpoints_total_limit=args.checkpoints_total_limit,
        resume_from_checkpoint=args.resume_from_checkpoint, seed=args.seed,
        dataloader_num_workers=args.dataloader_num_workers, use_ema=args.use_ema, ema_decay=args.ema_decay,
        cfg_dropout=args.cfg_dropout, validation_prompts=list(args.validation_prompts or []),
        validation_steps=args.validation_steps, validation_sample_method=args.validation_sample_method,
        validation_num_sampling_steps=args.validation_num_sampling_steps,
        validation_guidance_scale=args.validation_guidance_scale, log_sample_indices=args.log_sample_indices,
        **values)


def run(args) -> int:
    from ..train.t2v import ConfigError, check_config, train

    cfg = to_config(args)
    try:
        check_config(cfg)
    except ConfigError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    try:
        result = train(cfg)
    except ConfigError as exc:
        # mistakes train can only see once models and data are open (a cache of another width, a bad
        # --pretrained); any other exception is a bug and keeps its traceback
        raise UsageError(str(exc).splitlines()[0]) from None
    if result["model"]:
        print(f"trained model: {result['model']}" + (f"; EMA: {result['model_ema']}" if result["model_ema"] else ""))
    if result["stopped"]:
        print(f"stopped at step {result['step']}: continue with --resume_from_checkpoint latest "
              f"--output_dir {result['output_dir']}")
    return 0
