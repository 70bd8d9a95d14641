"""``osp train-vae``: train the CausalVideoVAE with upstream's train_causalvae.py flags (osp.train.vae).

Upstream's flags keep their names; defaults are its released scripts/causalvae/train.sh (batch 1,
bf16, 1 frame at 32 px, sample rate 1, 8 workers), not its argparse defaults. Steps count batches:
each is one autoencoder and one discriminator update. Upstream's Lightning counted two steps per
batch, so --max_steps 20000 and --save_steps 50 here are its script's 40000 and 100, and
--disc_start 1001 (batches) is its disc_start 2001: the generator's adversarial term from batch 1001
on and the discriminator's loss from batch 1000 on, as upstream. A model config's loss_params (e.g.
upstream's release.json) are read in upstream's units; the flags override them.

Start from --load_from_checkpoint (a CausalVideoVAE folder, or upstream's Lightning .ckpt),
--init_from_image_vae PATH --init tail|center|average|random (a diffusers AutoencoderKL folder or a
Stable Diffusion checkpoint inflated into a causal VAE), or --model_config (random init).

The perceptual term is taming's LPIPS-VGG: its weights are local files (vgg_lpips.pth and
vgg16-397923af.pth in $OSP_WEIGHTS_DIR or ~/.cache/osp/weights, or --lpips_weights /
--lpips_backbone_weights); --perceptual_weight 0 trains without them.

Launch with python / osp on one device, or ``torchrun --nproc_per_node N -m osp train-vae ...``.
"""
from __future__ import annotations

import argparse

from . import UsageError


def register(subparsers) -> None:
    from ..train.vae import INITS, PRECISIONS

    p = subparsers.add_parser("train-vae", help="train the CausalVideoVAE (upstream's train_causalvae.py flags)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("upstream's flags (defaults of scripts/causalvae/train.sh)")
    g.add_argument("--exp_name", default="causalvae", help="run name (recorded with the trained model)")
    g.add_argument("--batch_size", type=int, default=1, help="clips per process and step (default 1)")
    g.add_argument("--precision", default="bf16", choices=tuple(PRECISIONS),
                   help="bf16: autocast over fp32 weights, as Lightning's bf16-mixed (default); 32: fp32")
    g.add_argument("--max_steps", type=int, default=20000,
                   help="batches to train (default 20000 = upstream's 40000 Lightning steps)")
    g.add_argument("--save_steps", type=int, default=50,
                   help="checkpoint every this many batches (default 50 = upstream's 100 Lightning steps)")
    g.add_argument("--output_dir", default="results/causalvae")
    g.add_argument("--video_path", default=None, help="folder of .avi/.mp4/.webm videos (searched recursively)")
    g.add_argument("--video_num_frames", type=int, default=1, help="frames per clip, 1 + 4k (default 1, as train.sh)")
    g.add_argument("--sample_rate", type=int, default=1, help="temporal stride (default 1)")
    g.add_argument("--dynamic_sample", action="store_true", help="accepted for upstream's scripts; not implemented")
    g.add_argument("--model_config", default=None,
                   help="a CausalVideoVAE config.json (upstream's release.json works: its loss_params and lr apply)")
    g.add_argument("--n_nodes", type=int, default=1, help="accepted; the launcher decides (torchrun)")
    g.add_argument("--devices", type=int, default=1, help="accepted; the launcher decides (torchrun)")
    g.add_argument("--resolution", type=int, default=32,
                   help="square center crop of the frames, no resize (default 32, as train.sh)")
    g.add_argument("--num_workers", type=int, default=8, help="DataLoader workers (default 8)")
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest' (a fresh start when there is none) or a checkpoint-<step> folder")
    g.add_argument("--load_from_checkpoint", default=None,
                   help="a CausalVideoVAE folder (its loss.safetensors or upstream .ckpt also restores the "
                        "discriminator and logvar), or upstream's Lightning .ckpt")
    o = p.add_argument_group("added by osp")
    o.add_argument("--init_from_image_vae", default=None,
                   help="a diffusers AutoencoderKL folder or a Stable Diffusion checkpoint (.ckpt/.safetensors) to "
                        "inflate (--model_config, when given, sets the temporal layout)")
    o.add_argument("--init", default="tail", choices=INITS,
                   help="how 2-D kernels fill the temporal taps (default tail: images reproduce the image VAE)")
    o.add_argument("--lr", type=float, default=None,
                   help="learning rate of the autoencoder and the discriminator (default: the config's lr, 1e-5)")
    o.add_argument("--time_lr", type=float, default=1e-4,
                   help="learning rate of parameters whose name contains 'time' (default 1e-4)")
    o.add_argument("--disc_start", type=int, default=None,
                   help="batch from which the generator's adversarial term counts; the discriminator trains from "
                        "the batch before (default 1001, upstream's 2001 Lightning steps)")
    o.add_argument("--kl_weight", type=float, default=None, help="default: the config's loss_params, 1e-6")
    o.add_argument("--disc_weight", type=float, default=None, help="default: the config's loss_params, 0.5")
    o.add_argument("--logvar_init", type=float, default=None, help="default: the config's loss_params, 0.0")
    o.add_argument("--disc_factor", type=float, default=1.0, help="weight of the adversarial terms (default 1)")
    o.add_argument("--perceptual_weight", type=float, default=1.0,
                   help="weight of LPIPS-VGG (default 1; 0 trains without it and needs no weights)")
    o.add_argument("--lpips_weights", default=None, help="LPIPS-VGG linear layers (taming's vgg.pth)")
    o.add_argument("--lpips_backbone_weights", default=None, help="VGG16 backbone (torchvision's vgg16-397923af.pth)")
    o.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping of both optimisers (1.0)")
    o.add_argument("--gradient_checkpointing", action="store_true", help="recompute the VAE's blocks in backward")
    o.add_argument("--seed", type=int, default=1006, help="seed of every random choice (default 1006, upstream's)")
    o.add_argument("--eval_video_path", default=None,
                   help="held-out videos: PSNR/SSIM of their reconstructions at every checkpoint, in the log")
    o.add_argument("--eval_num_clips", type=int, default=8, help="held-out clips evaluated (default 8)")
    o.add_argument("--eval_steps", type=int, default=None, help="evaluate every this many steps (default --save_steps)")
    o.add_argument("--scaling_clips", type=int, default=32,
                   help="training clips whose latent std sets scaling_factor = 1/std in the saved config (32)")
    o.add_argument("--max_nonfinite", type=int, default=20,
                   help="abort after this many consecutive batches with a non-finite loss (default 20)")
    o.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep this many checkpoints")
    o.add_argument("--device", default=None, help="cpu, cuda (default: cuda when available)")
    p.set_defaults(run=run)


def to_config(args):
    from ..train.vae import VAETrainConfig

    return VAETrainConfig(
        exp_name=args.exp_name, output_dir=args.output_dir, batch_size=args.batch_size, precision=args.precision,
        max_steps=args.max_steps, save_steps=args.save_steps, video_path=args.video_path,
        video_num_frames=args.video_num_frames, sample_rate=args.sample_rate, dynamic_sample=args.dynamic_sample,
        model_config=args.model_config, n_nodes=args.n_nodes, devices=args.devices, resolution=args.resolution,
        num_workers=args.num_workers, resume_from_checkpoint=args.resume_from_checkpoint,
        load_from_checkpoint=args.load_from_checkpoint, init_from_image_vae=args.init_from_image_vae, init=args.init,
        lr=args.lr, time_lr=args.time_lr, disc_start=args.disc_start, kl_weight=args.kl_weight,
        disc_weight=args.disc_weight, logvar_init=args.logvar_init, disc_factor=args.disc_factor,
        perceptual_weight=args.perceptual_weight, lpips_weights=args.lpips_weights,
        lpips_backbone_weights=args.lpips_backbone_weights, max_grad_norm=args.max_grad_norm,
        gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, eval_video_path=args.eval_video_path,
        eval_num_clips=args.eval_num_clips, eval_steps=args.eval_steps, scaling_clips=args.scaling_clips,
        max_nonfinite=args.max_nonfinite, checkpoints_total_limit=args.checkpoints_total_limit, device=args.device)


def run(args) -> int:
    import sys

    from ..train.vae import ConfigError, NonFiniteLossError, check_config, train

    cfg = to_config(args)
    try:
        check_config(cfg)
        result = train(cfg)
    except ConfigError as exc:
        raise UsageError(str(exc).splitlines()[0]) from None
    except NonFiniteLossError as exc:
        print(f"osp train-vae: error: {exc}", file=sys.stderr)
        return 1
    if result["model"]:
        print(f"trained VAE: {result['model']} (scaling_factor {result['scaling_factor']:.5f})")
    if result["stopped"]:
        print(f"stopped at step {result['step']}: continue with --resume_from_checkpoint latest "
              f"--output_dir {result['output_dir']}")
    return 0
