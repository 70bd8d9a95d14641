"""Training LatteT2V (upstream's opensora/train/train_t2v.py, spec C) with accelerate.

One loop runs on one CPU, one GPU, ``torchrun --nproc_per_node N`` (DDP) and ``accelerate launch``
with DeepSpeed ZeRO-2 or FSDP. The step is upstream's (spec C.3): latents = posterior.sample() x
scaling factor (0.18215) from the CausalVideoVAE (images of joint training as separate 1-frame clips,
concatenated on the frame axis), T5 states with their mask passed as ``encoder_attention_mask``, t
uniform in [0, 1000), loss = ``training_losses(...)["loss"].mean()``; AdamW (lr 2e-5, weight decay
0.01), gradient clipping at 1.0. With a latent cache (``cache_dir``) the posterior's mean and std and
the T5 states come from disk and neither the VAE nor T5 is loaded.

What osp fixes or adds (each a choice, documented in the README):

- bf16 is autocast over float32 weights on every launcher (fp32 master weights). Upstream's
  DeepSpeed run cast the whole model to bf16 (spec C.1, G2); the shipped zero2.json leaves
  ``bf16.enabled`` on "auto", which this script resolves to an fp32 engine under autocast.
- Gradient clipping applies everywhere; under DeepSpeed the shipped config sets ``gradient_clipping``
  (upstream's had none, so its clip call was a no-op: spec C.3, G1).
- ``use_ema``: an EMA stepped after every optimizer step (upstream's never updates: G11).
- ``cfg_dropout``: captions replaced by the learned null caption with that probability (G3).
- Exact resume: checkpoints hold model, EMA, optimizer, scheduler, RNG states and the data position
  (epoch, batches done); randomness is a function of (seed, step, micro-batch, process), so a resumed
  run reproduces an uninterrupted one and never repeats a sample within an epoch (upstream replays
  the epoch with a new shuffle: G12). Checkpoints are written atomically.
- Each process reads its own shard through ``osp.data.ResumableSampler``; the DataLoader is not
  handed to accelerate (which would re-shard it).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from . import checkpoint as ckpt
from .ema import EMA
from .rng import INIT, derive_seed, seed_global, step_generator

UPSTREAM_SCALING_FACTOR = 0.18215
MIXED_PRECISION = ("no", "fp16", "bf16")
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
RECORD_NAME = "osp_training.json"
LOG_NAME = "train_log.jsonl"
EMA_NAME = "ema.pt"


class ConfigError(ValueError):
    """A user mistake in the training settings or inputs (a flag's value, a missing folder, a cache
    that does not fit the model); the message names the flag and what was expected."""


@dataclass
class TrainConfig:
    """Settings of one training run. Field names are ``osp train-t2v``'s flag names; defaults are
    upstream's released 17x256x256 run script (scripts/text_condition/train_videoae_17x256x256.sh),
    except where noted."""

    output_dir: str = "t2v-f17-256-img4-videovae488-bf16-ckpt-xformers-bs4-lr2e-5-t5"
    model: str = "LatteT2V-XL/122"
    pretrained: Optional[str] = None  # upstream's scripts pass the placeholder "t2v.pt"
    ae_path: Optional[str] = None  # a local CausalVideoVAE folder (upstream's script: CausalVAEModel_4x8x8)
    text_encoder_name: str = "DeepFloyd/t5-v1_1-xxl"  # a local T5 folder, or "tiny"
    data_path: Optional[str] = None
    video_folder: Optional[str] = None
    image_data_path: Optional[str] = None
    cache_dir: Optional[str] = None
    num_frames: int = 17
    max_image_size: int = 256
    sample_rate: int = 1
    use_image_num: int = 4
    use_img_from_vid: bool = True
    model_max_length: int = 300
    train_batch_size: int = 4
    gradient_accumulation_steps: int = 1
    max_train_steps: Optional[int] = 1_000_000
    num_train_epochs: int = 100
    learning_rate: float = 2e-5
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str = "bf16"
    gradient_checkpointing: bool = True
    allow_tf32: bool = True
    enable_tiling: bool = False  # tiled VAE encode (upstream's 65x512x512 stage)
    tile_overlap_factor: float = 0.25
    checkpointing_steps: int = 500
    checkpoints_total_limit: Optional[int] = None
    resume_from_checkpoint: Optional[str] = None
    seed: Optional[int] = None
    dataloader_num_workers: int = 10
    # osp's additions
    use_ema: bool = False
    ema_decay: float = 0.9999
    cfg_dropout: float = 0.0
    validation_prompts: List[str] = field(default_factory=list)
    validation_steps: Optional[int] = None  # default: checkpointing_steps
    validation_sample_method: str = "IDDPM"
    validation_num_sampling_steps: int = 250
    validation_guidance_scale: float = 1.0
    log_sample_indices: bool = False
    progress: Optional[bool] = None  # tqdm bar; None: when stderr is a terminal


# --- checks -----------------------------------------------------------------------------------------------


def _positive(name: str, v, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ConfigError(f"--{name} {v!r}: expected a positive integer")


def check_config(cfg: TrainConfig, *, have_dataset: bool = False, have_encoders: bool = False) -> None:
    """Checks that need no model or data: ValueError naming the flag and what was expected."""
    from ..models.dit import PRESETS

    if not cfg.output_dir:
        raise ConfigError("--output_dir is empty; expected a folder for checkpoints, logs and the trained model")
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"--output_dir {cfg.output_dir!r} is a file; expected a folder")
    for name in ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps", "num_train_epochs",
                 "max_image_size", "sample_rate", "model_max_length", "validation_num_sampling_steps"):
        _positive(name, getattr(cfg, name))
    _positive("max_train_steps", cfg.max_train_steps, allow_none=True)
    _positive("checkpoints_total_limit", cfg.checkpoints_total_limit, allow_none=True)
    _positive("validation_steps", cfg.validation_steps, allow_none=True)
    for name in ("use_image_num", "dataloader_num_workers", "lr_warmup_steps"):
        v = getattr(cfg, name)
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ConfigError(f"--{name} {v!r}: expected an integer >= 0")
    if not isinstance(cfg.num_frames, int) or cfg.num_frames < 1 or (cfg.num_frames - 1) % 4:
        raise ConfigError(f"--num_frames {cfg.num_frames!r}: expected 1 + 4k frames (17, 65, ...), which the "
                          "causal VAE encodes to 1 + k latent frames")
    if cfg.max_image_size % 16:
        raise ConfigError(f"--max_image_size {cfg.max_image_size}: expected a multiple of 16 (the VAE's 8x "
                          "compression times LatteT2V's 2x2 patches)")
    if not cfg.learning_rate > 0:
        raise ConfigError(f"--learning_rate {cfg.learning_rate}: expected a positive number")
    if cfg.lr_scheduler not in LR_SCHEDULERS:
        raise ConfigError(f"--lr_scheduler {cfg.lr_scheduler!r}: expected one of {', '.join(LR_SCHEDULERS)}")
    if cfg.mixed_precision not in MIXED_PRECISION:
        raise ConfigError(f"--mixed_precision {cfg.mixed_precision!r}: expected one of {', '.join(MIXED_PRECISION)}")
    if cfg.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError("--mixed_precision fp16 needs a CUDA device (its gradient scaler); expected bf16 or no here")
    if not (cfg.max_grad_norm > 0):
        raise ConfigError(f"--max_grad_norm {cfg.max_grad_norm}: expected a positive number (upstream: 1.0)")
    for name in ("adam_beta1", "adam_beta2"):
        if not 0 <= getattr(cfg, name) < 1:
            raise ConfigError(f"--{name} {getattr(cfg, name)}: expected a number in [0, 1)")
    if cfg.adam_weight_decay < 0 or cfg.adam_epsilon <= 0:
        raise ConfigError("--adam_weight_decay must be >= 0 and --adam_epsilon > 0")
    if not 0.0 <= cfg.cfg_dropout <= 1.0:
        raise ConfigError(f"--cfg_dropout {cfg.cfg_dropout}: expected a probability in [0, 1] (0.1 recommended)")
    if not 0.0 <= cfg.ema_decay < 1.0:
        raise ConfigError(f"--ema_decay {cfg.ema_decay}: expected a number in [0, 1) (0.9999 by default)")
    if cfg.seed is not None and (not isinstance(cfg.seed, int) or cfg.seed < 0):
        raise ConfigError(f"--seed {cfg.seed!r}: expected an integer >= 0")
    if cfg.model not in PRESETS and not os.path.isdir(cfg.model):
        raise ConfigError(f"--model {cfg.model!r}: expected a preset ({', '.join(sorted(PRESETS))}) or a folder "
                          "holding a LatteT2V config.json (and optionally weights)")
    if os.path.isdir(cfg.model) and not os.path.isfile(os.path.join(cfg.model, "config.json")):
        raise ConfigError(f"--model {cfg.model!r} has no config.json; expected a LatteT2V folder "
                          "(config.json, optionally diffusion_pytorch_model.safetensors)")
    if cfg.pretrained is not None and not os.path.exists(cfg.pretrained):
        raise ConfigError(f"--pretrained {cfg.pretrained!r} does not exist; expected a checkpoint file (upstream's "
                          "torch file with the weights under 'model', a state dict, or .safetensors) or a model folder")
    if not have_dataset:
        if cfg.cache_dir is None and cfg.data_path is None:
            raise ConfigError("no data: expected --data_path (upstream's JSON of clips and captions) or --cache_dir "
                              "(a latent cache from osp cache-latents)")
        if cfg.cache_dir is not None and not os.path.isdir(cfg.cache_dir):
            raise ConfigError(f"--cache_dir {cfg.cache_dir!r} is not a folder; expected a latent cache written by "
                              "osp cache-latents")
        if cfg.cache_dir is None:
            if not os.path.isfile(cfg.data_path):
                raise ConfigError(f"--data_path {cfg.data_path!r} is not a file; expected upstream's JSON list of "
                                  '{"path": ..., "cap": [...]}')
            if cfg.video_folder and not os.path.isdir(cfg.video_folder):
                raise ConfigError(f"--video_folder {cfg.video_folder!r} is not a folder")
            if cfg.image_data_path is not None and not os.path.isfile(cfg.image_data_path):
                raise ConfigError(f"--image_data_path {cfg.image_data_path!r} is not a file; expected a JSON list "
                                  "of images with captions (the --data_path schema)")
            if cfg.use_image_num > 0 and not cfg.use_img_from_vid and cfg.image_data_path is None:
                raise ConfigError(f"--use_image_num {cfg.use_image_num} without --use_img_from_vid needs "
                                  "--image_data_path (images with captions); expected one of them, or "
                                  "--use_image_num 0")
    needs_encoders = (cfg.cache_dir is None and not have_dataset) or bool(cfg.validation_prompts)
    if needs_encoders and not have_encoders and cfg.cache_dir is None:
        if cfg.text_encoder_name != "tiny" and not os.path.isdir(cfg.text_encoder_name):
            raise ConfigError(f"--text_encoder_name {cfg.text_encoder_name!r} is not a folder; expected the local "
                              "folder of a T5 v1.1 XXL encoder (osp never downloads it), or 'tiny'")
        if cfg.ae_path is None or not os.path.isdir(cfg.ae_path):
            raise ConfigError(f"--ae_path {cfg.ae_path!r}: expected the local folder of a CausalVideoVAE "
                              "(config.json and weights; for example the vae/ folder of Open-Sora-Plan-v1.0.0)")
    if cfg.validation_prompts:
        from ..pipelines import SAMPLE_METHODS

        if cfg.validation_sample_method not in SAMPLE_METHODS:
            raise ConfigError(f"--validation_sample_method {cfg.validation_sample_method!r}: expected one of "
                              f"{', '.join(SAMPLE_METHODS)}")
    if cfg.resume_from_checkpoint not in (None, "", "latest"):
        try:
            ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# --- batches ----------------------------------------------------------------------------------------------


def resumable_loader(dataset, sampler, epoch: int, start_batch: int, batch_size: int, num_workers: int,
                     collate_fn, device: torch.device):
    """A DataLoader over ``dataset`` for ``epoch`` that starts at batch ``start_batch`` of this process's
    shard (osp.data.ResumableSampler's ``set_epoch(start=)``), so a resumed run sees no sample twice."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    sampler.set_epoch(epoch, start=start_batch * batch_size)
    kw = {"prefetch_factor": 2} if num_workers > 0 else {}
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                                       num_workers=num_workers, collate_fn=collate_fn,
                                       pin_memory=device.type == "cuda", persistent_workers=False, **kw)


def collate(items: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """Batch dataset items: tensors stacked, "captions" a list of per-item caption lists, "index" a
    (B,) int64 tensor, "skipped" one flat list of "path: reason" strings (items may carry a list or
    a newline-joined string)."""
    out: Dict[str, Any] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if key == "captions":
            out[key] = [[v] if isinstance(v, str) else list(v) for v in vals]
        elif key == "skipped":
            flat: List[str] = []
            for v in vals:
                if isinstance(v, str):
                    flat.extend(s for s in v.split("\n") if s)
                elif v:
                    flat.extend(str(s) for s in v)
            out[key] = flat
        elif key == "index":
            out[key] = torch.as_tensor([int(v) for v in vals], dtype=torch.long)
        elif isinstance(vals[0], torch.Tensor):
            out[key] = torch.stack(vals)
        else:
            out[key] = vals
    return out


class BatchEncoder:
    """Turns a batch into the model's inputs (upstream's step 2, spec C.3), under no_grad:
    (latents (B, 4, F + n, h, w) x scaling factor, caption states (B, L, C) or (B, 1 + n, L, C),
    mask of the same leading shape, n).

    Raw batches ("video" (B, 3, T, H, W), optionally "images" (B, 3, n, H, W), "captions"): the VAE
    encodes the video as one clip and each image as its own 1-frame clip; latents are posterior
    samples drawn from ``generator``. Cached batches ("latents_mean"/"latents_std" (B, 4, F + n, h, w),
    "text_states" (B, 1 + n, L, C), "text_mask"): z = mean + std * randn from ``generator``.
    """

    def __init__(self, device: torch.device, scaling_factor: float, vae=None, text_encoder=None):
        self.device, self.scaling_factor, self.vae, self.text_encoder = device, scaling_factor, vae, text_encoder

    @torch.no_grad()
    def __call__(self, batch: Dict[str, Any], generator: torch.Generator
                 ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        if "latents_mean" in batch:
            mean = batch["latents_mean"].to(self.device, torch.float32)
            std = batch["latents_std"].to(self.device, torch.float32)
            eps = torch.randn(mean.shape, generator=generator, dtype=torch.float32).to(self.device)
            z = (mean + std * eps) * self.scaling_factor
            states = batch["text_states"].to(self.device)
            mask = batch["text_mask"].to(self.device)
        else:
            from ..data.captions import preprocess_captions

            if self.vae is None or self.text_encoder is None:
                raise RuntimeError("a raw batch (video and captions) but no VAE or text encoder was loaded")
            video = batch["video"].to(self.device, non_blocking=True)
            z = self._encode(video, generator)
            images = batch.get("images")
            if images is not None and images.shape[2] > 0:
                B, C, n, H, W = images.shape
                clips = images.to(self.device, non_blocking=True).transpose(1, 2).reshape(B * n, C, 1, H, W)
                zi = self._encode(clips, generator)  # (B*n, 4, 1, h, w)
                zi = zi.view(B, n, *zi.shape[1:]).squeeze(3).transpose(1, 2)  # (B, 4, n, h, w)
                z = torch.cat([z, zi], dim=2)
            caps = batch["captions"]
            groups = len(caps[0])
            if any(len(c) != groups for c in caps):
                raise RuntimeError(f"items of one batch carry different caption counts {[len(c) for c in caps]}")
            # upstream's caption cleaning (its dataset's text_preprocessing; the cache applies it too)
            flat = preprocess_captions([c for item in caps for c in item], True)
            states, mask = self.text_encoder(flat)
            states = states.to(self.device).view(len(caps), groups, *states.shape[1:])
            mask = mask.to(self.device).view(len(caps), groups, -1)
        n = states.shape[1] - 1
        if n == 0:
            states, mask = states[:, 0], mask[:, 0]
        return z, states, mask, n

    def _encode(self, clips: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        posterior = self.vae.encode(clips).latent_dist
        return posterior.sample(generator).float() * self.scaling_factor


# --- model --------------------------------------------------------------------------------------------


def _read_pretrained(path: str) -> Dict[str, torch.Tensor]:
    """Weights from upstream's torch file (under "model"), a Lightning/plain state dict, a
    .safetensors file or a model folder."""
    from ..models.modeling import read_weights, weights_names

    if os.path.isdir(path):
        for name in weights_names():
            if os.path.isfile(os.path.join(path, name)):
                return read_weights(os.path.join(path, name))
        raise ConfigError(f"--pretrained {path!r}: no weights in this folder; expected one of {list(weights_names())}")
    if path.endswith(".safetensors"):
        return read_weights(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--pretrained {path!r} could not be read as a torch checkpoint ({exc})") from exc
    if isinstance(obj, dict):
        for key in ("model", "state_dict", "module"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"--pretrained {path!r} does not hold a state dict (upstream's files keep it under 'model')")
    return obj


def _model_id(model: str) -> str:
    """A preset name as is, a folder as its absolute path."""
    return os.path.abspath(model) if os.path.isdir(model) else model


def model_caption_channels(cfg: TrainConfig) -> int:
    """The caption width of ``--model`` (a preset's or its config.json's), before building it."""
    from ..models.dit import PRESETS
    from ..models.modeling import read_config

    if cfg.model in PRESETS:
        return int(PRESETS[cfg.model]["caption_channels"])
    return int(read_config(cfg.model).get("caption_channels", 4096))


def build_model(cfg: TrainConfig, video_length: int, sample_size: Tuple[int, int], log: Callable[[str], None]):
    """LatteT2V from a preset or a folder (config.json; its weights when present), with video_length
    and sample_size set for the data (weights move across sizes: the position tables are
    recomputed), then ``--pretrained`` loaded non-strictly as upstream does."""
    from ..models import LatteT2V
    from ..models.dit import PRESETS
    from ..models.modeling import read_config, weights_names

    over = {"video_length": video_length, "sample_size": list(sample_size)}
    if cfg.model in PRESETS:
        model = LatteT2V.from_preset(cfg.model, **over)
    else:
        has_weights = any(os.path.isfile(os.path.join(cfg.model, n)) for n in weights_names())
        if has_weights:
            model = LatteT2V.from_pretrained(cfg.model, **over)
            log(f"model: {cfg.model} (weights loaded)")
        else:
            config = read_config(cfg.model)
            config.update(over)
            model = LatteT2V.from_config(config)
            log(f"model: {cfg.model} (config only: random init)")
    if cfg.pretrained is not None:
        sd = _read_pretrained(cfg.pretrained)
        own = model.state_dict()
        bad = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items()
               if k in own and tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ConfigError(f"--pretrained {cfg.pretrained!r}: shapes differ from the model's: {'; '.join(bad[:5])}")
        result = model.load_state_dict(sd, strict=False)
        log(f"pretrained {cfg.pretrained}: {len(result.missing_keys)} missing keys, "
            f"{len(result.unexpected_keys)} unexpected keys"
            + (f" (missing: {', '.join(result.missing_keys[:5])}{' ...' if len(result.missing_keys) > 5 else ''})"
               if result.missing_keys else ""))
    return model.float()


# --- run-level helpers -------------------------------------------------------------------------------------


class JsonlLog:
    """Append-only JSONL log of the main process (one line per optimizer step, and events)."""

    def __init__(self, path: str, enabled: bool):
        self.path, self.enabled = path, enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines of steps beyond ``step`` (a run that died after its last checkpoint logged them;
        the resumed run logs them again)."""
        if not self.enabled or not os.path.isfile(self.path):
            return
        kept = []
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue  # a line cut by a kill
                if rec.get("step", 0) <= step:
                    kept.append(json.dumps(rec) + "\n")
        with open(self.path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(kept)
        os.replace(self.path + ".tmp", self.path)

    def write(self, record: Dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")


class _StopSignal:
    """SIGTERM/SIGINT ask for a clean stop: the step in flight finishes, a checkpoint is written, and
    the run returns. A second signal acts as usual."""

    def __init__(self):
        self.requested = False
        self._old: Dict[int, Any] = {}

    def __enter__(self):
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True
        signal.signal(signum, self._old.get(signum, signal.SIG_DFL))

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _save_model_dir(path: str, model, state_dict: Dict[str, torch.Tensor], record: Dict[str, Any]) -> None:
    """save_pretrained's layout (config.json + diffusion_pytorch_model.safetensors) plus the training
    record, written to ``path``.tmp and renamed into place."""
    import shutil

    from safetensors.torch import save_file

    tmp = path + ".tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    model.save_config(tmp)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous().clone() for k, v in state_dict.items()}
    save_file(tensors, os.path.join(tmp, "diffusion_pytorch_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(tmp, RECORD_NAME), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2)
        f.write("\n")
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


def _cache_sources(dataset) -> Dict[str, Any]:
    """What a latent cache's manifest says about its encoders: {"ae_path", "text_encoder_name",
    "scaling_factor", "model_max_length"} (None where it does not say)."""
    manifest = getattr(dataset, "manifest", None) or {}
    vae, text = manifest.get("vae") or {}, manifest.get("text_encoder") or {}
    identity = manifest.get("identity") or {}
    return {"ae_path": vae.get("path"), "text_encoder_name": text.get("name"),
            "scaling_factor": getattr(dataset, "scaling_factor", None) or manifest.get("scaling_factor"),
            "model_max_length": identity.get("model_max_length") or text.get("max_length")}


def _default_sampler_factory():
    from ..data import ResumableSampler

    return ResumableSampler


def _load_dataset(cfg: TrainConfig, seed: int):
    """osp.data's dataset for the config; its errors about the inputs become ConfigError."""
    from .. import data

    if cfg.cache_dir is not None:
        try:
            return data.CachedLatentDataset(cfg.cache_dir, seed=seed)
        except (ValueError, data.CacheError) as exc:
            raise ConfigError(f"--cache_dir {cfg.cache_dir!r}: {str(exc).splitlines()[0]}") from None
    try:
        return data.VideoCaptionDataset(cfg.data_path, video_folder=cfg.video_folder, num_frames=cfg.num_frames,
                                        max_image_size=cfg.max_image_size, sample_rate=cfg.sample_rate,
                                        use_image_num=cfg.use_image_num, use_img_from_vid=cfg.use_img_from_vid,
                                        image_data_path=cfg.image_data_path, seed=seed)
    except ValueError as exc:
        raise ConfigError(f"--data_path {cfg.data_path!r}: {str(exc).splitlines()[0]}") from None


def _load_text_encoder(name: str, caption_channels: int, max_length: int, dtype: torch.dtype, device):
    from ..models.text import T5TextEncoder, TinyTextEncoder

    if name == "tiny":
        return TinyTextEncoder(out_channels=caption_channels, max_length=max_length).to(device)
    return T5TextEncoder(name, max_length=max_length, dtype=dtype, device=device)


def _first_item_geometry(dataset) -> Dict[str, int]:
    """Latent or pixel geometry from item 0: {"cached", "frames", "images", "h", "w"} (frames: latent
    frames for a cache, pixel frames otherwise)."""
    item = dataset[0]
    if "latents_mean" in item:
        n = int(item["text_states"].shape[0]) - 1
        _, total, h, w = item["latents_mean"].shape
        return {"cached": 1, "frames": int(total) - n, "images": n, "h": int(h), "w": int(w),
                "caption_channels": int(item["text_states"].shape[-1]), "L": int(item["text_states"].shape[-2])}
    _, T, H, W = item["video"].shape
    n = int(item["images"].shape[1]) if "images" in item else 0
    return {"cached": 0, "frames": int(T), "images": n, "h": int(H), "w": int(W)}


# --- the loop ---------------------------------------------------------------------------------------------


def train(cfg: TrainConfig, *, dataset=None, vae=None, text_encoder=None,
          sampler_factory: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Train LatteT2V as ``cfg`` says; returns {"step", "output_dir", "model", "model_ema", "stopped"}.

    ``dataset`` (optional) replaces the one the config names (same item contract as
    osp.data.VideoCaptionDataset / CachedLatentDataset); ``vae`` / ``text_encoder`` replace the
    ones loaded from ``ae_path`` / ``text_encoder_name``; ``sampler_factory`` replaces
    osp.data.ResumableSampler. User mistakes raise ValueError naming the flag.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, broadcast_object_list

    check_config(cfg, have_dataset=dataset is not None, have_encoders=vae is not None and text_encoder is not None)
    validation_prompts = []
    if cfg.validation_prompts:
        from .validation import read_prompts

        validation_prompts = read_prompts(cfg.validation_prompts)

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        # accelerate keeps its state per process; a second train() in one process starts afresh
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    # bf16 is autocast over fp32 weights (applied below); fp16 goes to accelerate (GradScaler, or
    # DeepSpeed's fp16 engine).
    accelerator = Accelerator(gradient_accumulation_steps=cfg.gradient_accumulation_steps,
                              mixed_precision="fp16" if cfg.mixed_precision == "fp16" else "no",
                              step_scheduler_with_optimizer=False, project_dir=cfg.output_dir,
                              # torchrun without CUDA: accelerate takes several processes as multi-CPU
                              # (gloo) only when told cpu=True
                              cpu=not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1)
    device = accelerator.device
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    def log(msg: str) -> None:
        if main:
            print(f"osp train-t2v: {msg}", flush=True)

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true" and \
            accelerator.distributed_type != DistributedType.FSDP:
        log(f"warning: an FSDP launch config, but accelerate runs {accelerator.distributed_type} (it enables FSDP "
            "on GPUs only; on CPU processes it falls back to DDP over gloo)")
    if cfg.allow_tf32 and device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    # --- resume point and seed -----------------------------------------------------------------------
    os.makedirs(cfg.output_dir, exist_ok=True)
    resume_dir = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    state: Dict[str, Any] = ckpt.read_state(resume_dir) if resume_dir else {}
    if state:
        seed = int(state["seed"])
        if cfg.seed is not None and cfg.seed != seed:
            log(f"--seed {cfg.seed} ignored: the checkpoint's run uses seed {seed}")
    else:
        seed_box = [cfg.seed if cfg.seed is not None else random.SystemRandom().randrange(2**31)]
        if world > 1:
            broadcast_object_list(seed_box)
        seed = int(seed_box[0])

    # --- data --------------------------------------------------------------------------------------------
    if dataset is None:
        dataset = _load_dataset(cfg, seed)
    geo = _first_item_geometry(dataset)
    cached = bool(geo["cached"])
    sources = _cache_sources(dataset) if cached else {}
    # T5 in bf16 as upstream; in float32 otherwise (T5 v1.1 overflows in float16)
    text_dtype = torch.bfloat16 if cfg.mixed_precision == "bf16" else torch.float32
    if cached:
        video_length, latent_hw = geo["frames"], (geo["h"], geo["w"])
        scaling_factor = float(sources.get("scaling_factor") or UPSTREAM_SCALING_FACTOR)
        use_image_num = geo["images"]
    else:
        if vae is None:
            from ..models import CausalVideoVAE

            try:
                vae = CausalVideoVAE.from_pretrained(cfg.ae_path, device=device)
            except ValueError as exc:
                raise ConfigError(f"--ae_path {cfg.ae_path!r}: {str(exc).splitlines()[0]}") from exc
        vae = vae.to(device).eval().requires_grad_(False)
        if cfg.enable_tiling:
            vae.enable_tiling(mode="osp-v1.0", tile_sample_size=256, overlap=cfg.tile_overlap_factor, progress=False)
        tc, sc = vae.temporal_compression, vae.spatial_compression
        video_length = (geo["frames"] - 1) // tc + 1
        latent_hw = (geo["h"] // sc, geo["w"] // sc)
        scaling_factor = float(vae.config.scaling_factor)
        use_image_num = geo["images"]

    caption_channels = model_caption_channels(cfg)
    if cached and geo["caption_channels"] != caption_channels:
        raise ConfigError(f"--cache_dir {cfg.cache_dir!r} holds caption states of width {geo['caption_channels']} but "
                          f"--model {cfg.model!r} takes caption_channels={caption_channels}; expected a cache made "
                          "with the text encoder the model is built for")
    torch.manual_seed(derive_seed(seed, INIT))  # the initial weights follow the seed
    model = build_model(cfg, video_length, latent_hw, log)
    if cached:
        ident = getattr(dataset, "identity", None) or {}
        pixel_frames = ident.get("num_frames") or (video_length - 1) * 4 + 1
        size = ident.get("max_image_size")
        pixel_hw = (size, size) if size else (latent_hw[0] * 8, latent_hw[1] * 8)
    else:
        pixel_frames, pixel_hw = geo["frames"], (geo["h"], geo["w"])
    if not cached:
        if text_encoder is None:
            try:
                text_encoder = _load_text_encoder(cfg.text_encoder_name, caption_channels, cfg.model_max_length,
                                                  text_dtype, device)
            except (ValueError, ImportError) as exc:
                raise ConfigError(f"--text_encoder_name {cfg.text_encoder_name!r}: {str(exc).splitlines()[0]}") from exc
        if text_encoder.out_channels != caption_channels:
            raise ConfigError(f"--text_encoder_name {cfg.text_encoder_name!r} gives {text_encoder.out_channels}-wide "
                              f"states but --model {cfg.model!r} takes caption_channels={caption_channels}")

    # --- trainable parts ------------------------------------------------------------------------------------
    if cfg.cfg_dropout > 0:
        model.enable_learned_null_caption()
    if model.caption_projection.learned:
        # a null caption is trained only when captions are dropped (else nothing would teach it)
        model.caption_projection.y_embedding.requires_grad_(cfg.cfg_dropout > 0)
    if state and state.get("model") and _model_id(state["model"]) != _model_id(cfg.model):
        raise ConfigError(f"--model {cfg.model!r} but {resume_dir} was written training {state['model']!r}; expected "
                          "the same --model to resume (or another --output_dir)")
    if state and bool(state.get("trains_null_caption")) != (cfg.cfg_dropout > 0):
        raise ConfigError(f"--cfg_dropout {cfg.cfg_dropout} changes what trains: the checkpoint's run "
                          f"{'trained' if state.get('trains_null_caption') else 'did not train'} the null caption; "
                          "expected --cfg_dropout > 0 on both sides or on neither")
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.learning_rate
    if cfg.scale_lr:
        lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * world
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2),
                                  weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon)

    per_rank = len(dataset) // world
    batches_per_epoch = per_rank // cfg.train_batch_size
    if batches_per_epoch < 1:
        raise ConfigError(f"the dataset's {len(dataset)} samples give no full batch of --train_batch_size "
                          f"{cfg.train_batch_size} on each of {world} processes; expected at least "
                          f"{cfg.train_batch_size * world} samples")
    steps_per_epoch = math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps)
    max_steps = cfg.max_train_steps or cfg.num_train_epochs * steps_per_epoch

    from diffusers.optimization import get_scheduler

    # Warm-up and length count optimizer steps, on any number of processes (accelerate is told not to
    # step the scheduler per process).
    lr_scheduler = get_scheduler(cfg.lr_scheduler, optimizer=optimizer, num_warmup_steps=cfg.lr_warmup_steps,
                                 num_training_steps=max_steps)

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        ds = accelerator.state.deepspeed_plugin.deepspeed_config
        ds["train_micro_batch_size_per_gpu"] = cfg.train_batch_size
        clip = ds.get("gradient_clipping", "auto")
        if clip in ("auto", None):
            ds["gradient_clipping"] = cfg.max_grad_norm
        elif float(clip) != cfg.max_grad_norm:
            log(f"DeepSpeed config gradient_clipping {clip} differs from --max_grad_norm {cfg.max_grad_norm}; "
                "DeepSpeed's value applies")
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    unwrapped = accelerator.unwrap_model(model)
    trained = [p for p in model.parameters() if p.requires_grad]
    ema = EMA(trained, cfg.ema_decay) if cfg.use_ema else None
    sharded_ema = accelerator.distributed_type == DistributedType.FSDP

    from ..diffusion import create_diffusion

    diffusion = create_diffusion(timestep_respacing="")
    encoder = BatchEncoder(device, scaling_factor, vae=vae, text_encoder=text_encoder)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if cfg.mixed_precision == "bf16" \
        else contextlib.nullcontext

    # --- resume ---------------------------------------------------------------------------------------------
    global_step, epoch, batches_done = 0, 0, 0
    jsonl = JsonlLog(os.path.join(cfg.output_dir, LOG_NAME), main)
    if resume_dir:
        accelerator.load_state(resume_dir)
        if ema is not None:
            name = f"ema_rank{rank}.pt" if sharded_ema else EMA_NAME
            path = os.path.join(resume_dir, name)
            if os.path.isfile(path):
                ema.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            else:
                log(f"{resume_dir} holds no EMA ({name}); the EMA starts from the current weights")
        global_step = int(state["step"])
        epoch, batches_done = int(state["epoch"]), int(state["batches_done"])
        if int(state.get("world_size", world)) != world or int(state.get("train_batch_size", cfg.train_batch_size)) \
                != cfg.train_batch_size:
            log(f"the checkpoint's data position counts batches of {state.get('train_batch_size')} on "
                f"{state.get('world_size')} processes, this run uses {cfg.train_batch_size} on {world}: "
                "data resumes at the start of the next epoch")
            epoch, batches_done = epoch + 1, 0
        jsonl.truncate_after(global_step)
        log(f"resumed from {resume_dir} at step {global_step} (epoch {epoch}, {batches_done} batches into it)")
    elif cfg.resume_from_checkpoint == "latest":
        log(f"no checkpoint in {cfg.output_dir} yet: starting from step 0")
    if main:
        for name in ckpt.remove_stale(cfg.output_dir):
            log(f"removed {name} (left by an interrupted save)")
    accelerator.wait_for_everyone()

    if sampler_factory is None:
        sampler_factory = _default_sampler_factory()
    sampler = sampler_factory(len(dataset), seed=seed, shuffle=True, num_replicas=world, rank=rank, drop_last=True)

    def make_loader(ep: int, start_batch: int):
        return resumable_loader(dataset, sampler, ep, start_batch, cfg.train_batch_size, cfg.dataloader_num_workers,
                                collate, device)

    # --- checkpoints, models, validation --------------------------------------------------------------
    def run_state() -> Dict[str, Any]:
        return {"step": global_step, "epoch": epoch, "batches_done": batches_done, "seed": seed,
                "world_size": world, "train_batch_size": cfg.train_batch_size,
                "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "use_ema": cfg.use_ema,
                "trains_null_caption": cfg.cfg_dropout > 0, "cfg_dropout": cfg.cfg_dropout,
                "model": _model_id(cfg.model), "distributed_type": str(accelerator.distributed_type),
                "time": time.time()}

    def save_ema(tmp: str) -> None:
        if ema is not None and (sharded_ema or main):
            name = f"ema_rank{rank}.pt" if sharded_ema else EMA_NAME
            torch.save(ema.state_dict(), os.path.join(tmp, name))

    def save_checkpoint() -> str:
        return ckpt.save_all(accelerator, cfg.output_dir, global_step, run_state(), save_ema,
                             cfg.checkpoints_total_limit, log)

    def full_state_dict(use_ema: bool) -> Dict[str, torch.Tensor]:
        """The whole model's state dict (a collective under FSDP/ZeRO-3: every process calls it)."""
        with ema.applied() if (use_ema and ema is not None) else contextlib.nullcontext():
            sd = accelerator.get_state_dict(model)
            if sd is not None:
                sd = {k: v.detach().to("cpu", torch.float32, copy=True) for k, v in sd.items()}
        return sd

    def record(weights: str) -> Dict[str, Any]:
        import osp

        ae = sources.get("ae_path") if cached else cfg.ae_path
        te = sources.get("text_encoder_name") if cached else cfg.text_encoder_name

        def absolute(p):
            return os.path.abspath(p) if isinstance(p, str) and p != "tiny" and os.path.exists(p) else p

        return {"weights": weights, "ae_path": absolute(ae), "text_encoder_name": absolute(te),
                "model_max_length": sources.get("model_max_length") or cfg.model_max_length,
                "scaling_factor": scaling_factor, "num_frames": pixel_frames, "height": pixel_hw[0],
                "width": pixel_hw[1], "use_image_num": use_image_num,
                "cache_dir": os.path.abspath(cfg.cache_dir) if cfg.cache_dir else None,
                "cfg_dropout": cfg.cfg_dropout, "ema_decay": cfg.ema_decay if cfg.use_ema else None,
                "step": global_step, "seed": seed, "mixed_precision": cfg.mixed_precision,
                "learning_rate": cfg.learning_rate, "train_batch_size": cfg.train_batch_size,
                "world_size": world, "osp_version": osp.__version__}

    val_models: Dict[str, Any] = {}

    def validate() -> None:
        sd = full_state_dict(use_ema=ema is not None)
        if main:
            from ..models import LatteT2V
            from .validation import sample_validation

            if "vae" not in val_models:
                v, te = vae, text_encoder
                if v is None:
                    from ..models import CausalVideoVAE

                    v = CausalVideoVAE.from_pretrained(record("")["ae_path"], device=device).eval()
                if te is None:
                    te = _load_text_encoder(record("")["text_encoder_name"], caption_channels,
                                            int(record("")["model_max_length"]), text_dtype, device)
                val_models.update(vae=v, text_encoder=te)
            tr = LatteT2V.from_config(unwrapped.config)
            tr.load_state_dict(sd)
            tr = tr.to(device).eval()
            out = os.path.join(cfg.output_dir, "samples", f"step-{global_step}")
            paths = sample_validation(
                tr, val_models["vae"], val_models["text_encoder"], validation_prompts, out, step=global_step,
                seed=seed, num_frames=(video_length - 1) * val_models["vae"].temporal_compression + 1,
                height=latent_hw[0] * val_models["vae"].spatial_compression,
                width=latent_hw[1] * val_models["vae"].spatial_compression,
                sample_method=cfg.validation_sample_method, num_sampling_steps=cfg.validation_num_sampling_steps,
                guidance_scale=cfg.validation_guidance_scale,
                max_sequence_length=int(record("")["model_max_length"]),
                autocast_dtype=torch.bfloat16 if cfg.mixed_precision == "bf16" else None)
            del tr
            log(f"validation samples of step {global_step} in {out} ({len(paths)} videos)")
            jsonl.write({"step": global_step, "event": "validation", "files": paths})
        accelerator.wait_for_everyone()

    if cached and validation_prompts and main:
        rec = record("")
        if not rec["ae_path"] or not rec["text_encoder_name"]:
            raise ConfigError("--validation_prompts with --cache_dir: the cache does not name its VAE and text "
                              "encoder, so validation cannot sample; expected a cache written by osp cache-latents")

    # --- train --------------------------------------------------------------------------------------------
    samples_per_step = cfg.train_batch_size * cfg.gradient_accumulation_steps * world
    validation_steps = cfg.validation_steps or cfg.checkpointing_steps
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = None
    if main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_steps, initial=global_step, desc="train", dynamic_ncols=True)
    log(f"{accelerator.distributed_type} on {world} process(es), device {device}; {len(dataset)} samples, "
        f"{batches_per_epoch} batches of {cfg.train_batch_size} per process and epoch; steps "
        f"{global_step} -> {max_steps}; seed {seed}; output {cfg.output_dir}")
    stopped = False
    last_saved = global_step if resume_dir else -1
    micro = 0
    loss_sum = torch.zeros((), device=device)
    skipped: List[str] = []
    indices: List[torch.Tensor] = []
    t_last = time.time()
    t_start = t_last
    with _StopSignal() as stop:
        while global_step < max_steps and not stopped:
            loader = make_loader(epoch, batches_done)
            exhausted = True
            for batch in loader:
                seed_global(seed, global_step, micro, rank)
                g = step_generator(seed, global_step, micro, rank)
                with accelerator.accumulate(model):
                    z, states, mask, n = encoder(batch, g)
                    B = z.shape[0]
                    t = torch.randint(0, diffusion.num_timesteps, (B,), generator=g).to(device)
                    noise = torch.randn(z.shape, generator=g, dtype=torch.float32).to(device)
                    kwargs: Dict[str, Any] = {"encoder_hidden_states": states, "encoder_attention_mask": mask,
                                              "use_image_num": n}
                    if cfg.cfg_dropout > 0:
                        kwargs["drop_caption"] = (torch.rand(B, generator=g) < cfg.cfg_dropout).to(device)

                    def denoiser(x, tt, **kw):
                        with amp():
                            out = model(x, tt, return_dict=False, **kw)[0]
                        return out.float()

                    loss = diffusion.training_losses(denoiser, z, t, kwargs, noise=noise)["loss"].mean()
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                loss_sum += loss.detach()
                skipped.extend(batch.get("skipped", []))
                if cfg.log_sample_indices:
                    indices.append(batch["index"].to(device))
                batches_done += 1
                micro += 1
                if not accelerator.sync_gradients:
                    continue
                # --- one optimizer step done ---
                global_step += 1
                if ema is not None:
                    ema.step()
                if grad_norm is None and hasattr(model, "get_global_grad_norm"):
                    grad_norm = model.get_global_grad_norm()  # DeepSpeed clips inside its step
                stats = torch.stack([loss_sum / micro, torch.tensor(float(len(skipped)), device=device),
                                     torch.tensor(float(stop.requested), device=device)])
                stats = accelerator.reduce(stats, reduction="sum")
                step_loss = stats[0].item() / world
                all_skipped = skipped
                if world > 1 and stats[1].item() > 0:
                    from accelerate.utils import gather_object

                    all_skipped = gather_object(skipped)
                step_indices = None
                if cfg.log_sample_indices:
                    step_indices = accelerator.gather(torch.cat(indices)).tolist()
                now = time.time()
                rec = {"step": global_step, "epoch": epoch, "loss": step_loss,
                       "lr": lr_scheduler.get_last_lr()[0],
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "samples_per_s": samples_per_step / max(now - t_last, 1e-9), "skipped": all_skipped,
                       "time": round(now - t_start, 3)}
                if step_indices is not None:
                    rec["indices"] = step_indices
                jsonl.write(rec)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{step_loss:.4f}", samples_s=f"{rec['samples_per_s']:.2f}",
                                    skipped=len(all_skipped))
                t_last = now
                micro = 0
                loss_sum = torch.zeros((), device=device)
                skipped, indices = [], []
                if batches_done >= batches_per_epoch:  # the position after the epoch's last batch
                    epoch, batches_done = epoch + 1, 0
                    exhausted = False
                stop_now = stats[2].item() > 0
                if global_step % cfg.checkpointing_steps == 0 or stop_now or global_step >= max_steps:
                    path = save_checkpoint()
                    last_saved = global_step
                    log(f"saved {path}")
                if validation_prompts and global_step % validation_steps == 0:
                    validate()
                if stop_now:
                    stopped = True
                    log(f"stopped by a signal at step {global_step}; continue with --resume_from_checkpoint latest")
                if stopped or global_step >= max_steps or not exhausted:
                    break
            if exhausted and not stopped and global_step < max_steps:
                epoch, batches_done = epoch + 1, 0
    if bar is not None:
        bar.close()

    result = {"step": global_step, "output_dir": cfg.output_dir, "model": None, "model_ema": None,
              "stopped": stopped, "seed": seed}
    if not stopped:
        if last_saved != global_step:
            path = save_checkpoint()
            log(f"saved {path}")
        sd = full_state_dict(use_ema=False)
        sd_ema = full_state_dict(use_ema=True) if ema is not None else None
        if main:
            result["model"] = os.path.join(cfg.output_dir, "model")
            _save_model_dir(result["model"], unwrapped, sd, record("model"))
            log(f"saved {result['model']}")
            if sd_ema is not None:
                result["model_ema"] = os.path.join(cfg.output_dir, "model_ema")
                _save_model_dir(result["model_ema"], unwrapped, sd_ema, record("ema"))
                log(f"saved {result['model_ema']}")
        if validation_prompts and global_step % validation_steps != 0:
            validate()
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result

