"""Training the CausalVideoVAE (upstream's opensora/train/train_causalvae.py, spec E) with accelerate.

Upstream trains with Lightning; osp runs the same manual two-optimiser step in an accelerate loop
(one CPU, one GPU, torchrun DDP), with ``osp train-t2v``'s machinery: atomic checkpoints, exact
resume, JSONL logs, a clean stop on SIGTERM/SIGINT.

One batch (spec E.3): clips x (B, 3, T, R, R) in [-1, 1] -> posterior = encode(x), z =
posterior.sample() (a generator seeded from (seed, step)), x_hat = decode(z) -> the generator loss
(``LPIPSWithDiscriminator.generator_loss``: L1 + LPIPS-VGG, logvar-weighted NLL, KL x 1e-6, the
adaptive adversarial term) -> backward -> clip the gradient norm at 1.0 -> Adam step of the
autoencoder -> the discriminator's hinge loss on x and x_hat (detached) -> backward -> clip 1.0 ->
Adam step of the discriminator. Both Adams have betas (0.5, 0.9) and no weight decay; autoencoder
parameters whose name contains "time" get ``time_lr`` (1e-4), all others ``lr`` (the model
config's "lr", 1e-5 in the release). ``logvar`` is in no optimiser.

Steps count batches (each one generator and one discriminator update). Upstream's Lightning
counted two per batch, so its ``disc_start`` 2001 means: the generator's adversarial term from batch
1001 on, the discriminator's loss from batch 1000 on. osp's ``disc_start`` is in batches (default
1001) and reproduces both (``vae_loss.disc_start_from_batches``); ``max_steps`` 20000 and
``save_steps`` 50 are upstream's 40000 and 100.

What osp adds (each documented in the README): bf16 autocast over fp32 weights with a guard against
non-finite losses (the batch's updates are skipped and counted; ``max_nonfinite`` in a row abort),
gradient checkpointing, a start from an inflated image VAE (``init_from_image_vae``), held-out
PSNR/SSIM at every checkpoint, and the latent scaling factor measured on the training data and
written into the saved config (``scaling_factor = 1 / std`` of posterior samples).
"""
from __future__ import annotations

import contextlib
import glob
import json
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import torch
from torch import nn

from . import checkpoint as ckpt
from .rng import INIT, derive_seed, seed_global, step_generator
from .t2v import ConfigError, JsonlLog, _save_model_dir, _StopSignal, resumable_loader
from .vae_loss import LPIPSWithDiscriminator, disc_start_from_batches, lightning_step

LOG_NAME = "train_log.jsonl"
LOSS_STATE_NAME = "loss_state.pt"
LOSS_WEIGHTS_NAME = "loss.safetensors"  # beside a saved model: the discriminator and logvar under upstream's keys
PRECISIONS = {"bf16": "bf16", "bf16-mixed": "bf16", "32": "no", "32-true": "no", "fp32": "no", "no": "no"}
INITS = ("tail", "center", "average", "random")
SCALING = 6  # rng domain tag of the scaling-factor measurement (osp.train.rng uses 1-5)
# release.json's loss_params and lr (spec E.2): what a start without an upstream config uses
RELEASE_LOSS = {"disc_start": 2001, "kl_weight": 1e-6, "disc_weight": 0.5, "logvar_init": 0.0}
RELEASE_LR = 1e-5


class NonFiniteLossError(RuntimeError):
    """Training hit ``max_nonfinite`` consecutive batches with a non-finite loss or gradient."""


@dataclass
class VAETrainConfig:
    """Settings of one ``osp train-vae`` run. Field names are train_causalvae.py's flags; defaults are
    its released scripts/causalvae/train.sh (batch 1, bf16, 1 frame at 32 px, sample rate 1, 8
    workers), with max_steps and save_steps in batches (upstream's 40000 and 100 Lightning steps)."""

    exp_name: str = "causalvae"
    output_dir: str = "results/causalvae"
    batch_size: int = 1
    precision: str = "bf16"
    max_steps: int = 20000
    save_steps: int = 50
    video_path: Optional[str] = None
    video_num_frames: int = 1
    sample_rate: int = 1
    dynamic_sample: bool = False
    model_config: Optional[str] = None
    n_nodes: int = 1
    devices: int = 1
    resolution: int = 32
    num_workers: int = 8
    resume_from_checkpoint: Optional[str] = None
    load_from_checkpoint: Optional[str] = None
    # osp's additions
    init_from_image_vae: Optional[str] = None
    init: str = "tail"
    lr: Optional[float] = None  # None: the model config's "lr", else 1e-5
    time_lr: float = 1e-4
    disc_start: Optional[int] = None  # batches; None: the config's loss_params (Lightning units) or 1001
    kl_weight: Optional[float] = None
    disc_weight: Optional[float] = None
    logvar_init: Optional[float] = None
    disc_factor: float = 1.0
    perceptual_weight: float = 1.0
    lpips_weights: Optional[str] = None
    lpips_backbone_weights: Optional[str] = None
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False
    seed: int = 1006
    eval_video_path: Optional[str] = None
    eval_num_clips: int = 8
    eval_steps: Optional[int] = None  # default: save_steps
    scaling_clips: int = 32
    max_nonfinite: int = 20
    checkpoints_total_limit: Optional[int] = None
    device: Optional[str] = None  # None: accelerate's choice (cuda when available)
    progress: Optional[bool] = None


def _int_at_least(name: str, v, low: int, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise ConfigError(f"--{name} {v!r}: expected an integer >= {low}")


def check_config(cfg: VAETrainConfig, *, have_dataset: bool = False, have_model: bool = False) -> None:
    """Checks that need no model or data: ConfigError naming the flag and what was expected."""
    if not cfg.output_dir:
        raise ConfigError("--output_dir is empty; expected a folder for checkpoints, logs and the trained VAE")
    if os.path.exists(cfg.output_dir) and not os.path.isdir(cfg.output_dir):
        raise ConfigError(f"--output_dir {cfg.output_dir!r} is a file; expected a folder")
    for name in ("batch_size", "max_steps", "save_steps", "video_num_frames", "sample_rate", "resolution",
                 "n_nodes", "devices", "eval_num_clips", "scaling_clips", "max_nonfinite"):
        _int_at_least(name, getattr(cfg, name), 1)
    _int_at_least("num_workers", cfg.num_workers, 0)
    _int_at_least("seed", cfg.seed, 0)
    _int_at_least("disc_start", cfg.disc_start, 0, allow_none=True)
    _int_at_least("eval_steps", cfg.eval_steps, 1, allow_none=True)
    _int_at_least("checkpoints_total_limit", cfg.checkpoints_total_limit, 1, allow_none=True)
    if cfg.precision not in PRECISIONS:
        raise ConfigError(f"--precision {cfg.precision!r}: expected one of {', '.join(PRECISIONS)} (16-bit float "
                          "needs a loss scaler that upstream's bf16 run did not use; pass bf16)")
    if cfg.dynamic_sample:
        raise ConfigError("--dynamic_sample: not implemented (upstream's released scripts leave it off); expected "
                          "it off")
    if cfg.init not in INITS:
        raise ConfigError(f"--init {cfg.init!r}: expected one of {', '.join(INITS)}")
    for name in ("lr", "time_lr", "max_grad_norm"):
        v = getattr(cfg, name)
        if v is not None and not v > 0:
            raise ConfigError(f"--{name} {v!r}: expected a positive number")
    for name in ("kl_weight", "disc_weight", "disc_factor", "perceptual_weight"):
        v = getattr(cfg, name)
        if v is not None and not v >= 0:
            raise ConfigError(f"--{name} {v!r}: expected a number >= 0")
    if cfg.device is not None:
        try:
            dev = torch.device(cfg.device)
        except RuntimeError:
            raise ConfigError(f"--device {cfg.device!r}: expected cpu, cuda or cuda:N") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {cfg.device}: CUDA is not available here; expected --device cpu")
        if dev.type not in ("cpu", "cuda"):
            raise ConfigError(f"--device {cfg.device!r}: expected cpu, cuda or cuda:N")
    starts = [n for n in ("load_from_checkpoint", "init_from_image_vae") if getattr(cfg, n)]
    if len(starts) > 1:
        raise ConfigError("--load_from_checkpoint and --init_from_image_vae both given; expected one start (a "
                          "CausalVideoVAE, or an image VAE to inflate)")
    if not have_model:
        if not starts and not cfg.model_config:
            raise ConfigError("no model: expected --load_from_checkpoint (a CausalVideoVAE folder or upstream "
                              ".ckpt), --init_from_image_vae (a diffusers AutoencoderKL folder or a Stable Diffusion "
                              "checkpoint) or --model_config (a config.json: random init)")
        for name in ("load_from_checkpoint", "init_from_image_vae", "model_config"):
            path = getattr(cfg, name)
            if path and not os.path.exists(path):
                raise ConfigError(f"--{name} {path!r} does not exist")
        if cfg.model_config and not os.path.isfile(cfg.model_config) and not os.path.isfile(
                os.path.join(cfg.model_config, "config.json")):
            raise ConfigError(f"--model_config {cfg.model_config!r}: expected a config.json file (or a folder "
                              "holding one)")
    if not have_dataset:
        if not cfg.video_path:
            raise ConfigError("no data: expected --video_path, a folder of .avi/.mp4/.webm videos (searched "
                              "recursively)")
        if not os.path.isdir(cfg.video_path):
            raise ConfigError(f"--video_path {cfg.video_path!r} is not a folder; expected a folder of "
                              ".avi/.mp4/.webm videos")
    if cfg.eval_video_path and not os.path.isdir(cfg.eval_video_path):
        raise ConfigError(f"--eval_video_path {cfg.eval_video_path!r} is not a folder; expected a folder of "
                          "held-out videos")
    for name in ("lpips_weights", "lpips_backbone_weights"):
        path = getattr(cfg, name)
        if path and not os.path.exists(path):
            raise ConfigError(f"--{name} {path!r} does not exist")
    if (cfg.video_num_frames - 1) % 4:
        raise ConfigError(f"--video_num_frames {cfg.video_num_frames}: expected 1 + 4k frames (1, 5, 9, 17, ...), "
                          "what the causal VAE's 4x temporal compression takes")
    if cfg.resolution % 8:
        raise ConfigError(f"--resolution {cfg.resolution}: expected a multiple of 8 (the VAE's spatial compression)")
    if cfg.resume_from_checkpoint not in (None, "", "latest"):
        try:
            ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None


# --- the model ------------------------------------------------------------------------------------------


def read_raw_config(path: str) -> Dict[str, Any]:
    """An upstream/osp config.json as written (with upstream's loss_params and lr), from a file or a folder."""
    from ..models.modeling import read_config

    try:
        return read_config(path)
    except (ValueError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path!r}: {str(exc).splitlines()[0]}") from None


def _ckpt_file(folder: str) -> Optional[str]:
    found = sorted(glob.glob(os.path.join(folder, "*.ckpt")))
    return found[-1] if found else None


def read_image_vae(path: str):
    """The image VAE at ``path``: a diffusers AutoencoderKL folder (loaded with diffusers), or a state
    dict from a .ckpt/.pt/.pth/.bin/.safetensors file (a Stable Diffusion checkpoint in ldm layout,
    optionally under first_stage_model., or an AutoencoderKL state dict)."""
    from ..models.modeling import read_weights

    if os.path.isdir(path):
        try:
            from diffusers import AutoencoderKL
        except ImportError as exc:
            raise ConfigError(f"--init_from_image_vae {path!r}: a diffusers folder needs diffusers ({exc})") from None
        try:
            return AutoencoderKL.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError for a bad folder
            raise ConfigError(f"--init_from_image_vae {path!r}: not a diffusers AutoencoderKL folder "
                              f"({str(exc).splitlines()[0]})") from None
    try:
        return read_weights(path)
    except ValueError as exc:
        raise ConfigError(f"--init_from_image_vae {path!r}: {str(exc).splitlines()[0]}") from None


def build_vae(cfg: VAETrainConfig, log: Callable[[str], None]):
    """(CausalVideoVAE, raw config dict (upstream's loss_params/lr when it has them), the loss's state
    dict found with the weights (upstream's loss.* keys, or osp's loss.safetensors; may be empty))."""
    from ..models import CausalVideoVAE
    from ..models.modeling import read_weights

    raw: Dict[str, Any] = read_raw_config(cfg.model_config) if cfg.model_config else {}
    loss_sd: Dict[str, torch.Tensor] = {}
    torch.manual_seed(derive_seed(cfg.seed, INIT))
    try:
        if cfg.load_from_checkpoint:
            path = cfg.load_from_checkpoint
            weights = path
            if os.path.isdir(path):
                raw = raw or read_raw_config(path)
                ck = _ckpt_file(path)  # upstream's from_pretrained prefers a Lightning .ckpt in the folder
                if ck is not None:
                    vae = CausalVideoVAE.from_pretrained(ck, config=os.path.join(path, "config.json"))
                    weights = ck
                else:
                    vae = CausalVideoVAE.from_pretrained(path)
                    weights = os.path.join(path, LOSS_WEIGHTS_NAME)
            else:
                vae = CausalVideoVAE.from_pretrained(path, config=cfg.model_config)
                raw = raw or read_raw_config(cfg.model_config or os.path.join(os.path.dirname(os.path.abspath(path)),
                                                                              "config.json"))
            if os.path.isfile(weights):
                loss_sd = {k[len("loss."):]: v for k, v in read_weights(weights).items() if k.startswith("loss.")}
            log(f"model: {path}" + (f" ({len(loss_sd)} loss tensors: discriminator/logvar)" if loss_sd else ""))
        elif cfg.init_from_image_vae:
            overrides = {}
            if cfg.model_config:
                known = set(CausalVideoVAE._get_init_keys(CausalVideoVAE)) - {"self"}
                overrides = {k: v for k, v in raw.items() if k in known}
            vae = CausalVideoVAE.from_image_vae(read_image_vae(cfg.init_from_image_vae), init=cfg.init, **overrides)
            log(f"model: {cfg.init_from_image_vae} inflated with {cfg.init} init")
        else:
            vae = CausalVideoVAE.from_config(raw)
            log(f"model: {cfg.model_config} (config only: random init)")
    except ValueError as exc:
        which = next(n for n in ("load_from_checkpoint", "init_from_image_vae", "model_config") if getattr(cfg, n))
        raise ConfigError(f"--{which} {getattr(cfg, which)!r}: {str(exc).splitlines()[0]}") from None
    return vae.float(), raw, loss_sd


def loss_settings(cfg: VAETrainConfig, raw: Dict[str, Any]) -> Dict[str, Any]:
    """The loss's arguments and the learning rate: a flag when given, else the model config's
    loss_params / lr (upstream builds its loss from them), else release.json's values. disc_start is
    returned in Lightning units (the loss's)."""
    params = dict(RELEASE_LOSS)
    params.update({k: v for k, v in (raw.get("loss_params") or {}).items() if k in RELEASE_LOSS})
    for name in ("kl_weight", "disc_weight", "logvar_init"):
        if getattr(cfg, name) is not None:
            params[name] = getattr(cfg, name)
    if cfg.disc_start is not None:
        params["disc_start"] = disc_start_from_batches(cfg.disc_start)
    lr = cfg.lr if cfg.lr is not None else float(raw.get("lr") or RELEASE_LR)
    return {"disc_start": int(params["disc_start"]), "kl_weight": float(params["kl_weight"]),
            "disc_weight": float(params["disc_weight"]), "logvar_init": float(params["logvar_init"]), "lr": lr}


def autoencoder_param_groups(vae: nn.Module, lr: float, time_lr: float) -> List[Dict[str, Any]]:
    """Upstream's opt_ae groups: parameters whose name contains "time" at ``time_lr``, all others at ``lr``."""
    named = [(n, p) for n, p in vae.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if "time" not in n], "lr": lr},
            {"params": [p for n, p in named if "time" in n], "lr": time_lr}]


class Autoencode(nn.Module):
    """encode -> posterior.sample(generator) -> decode, as one module (one DDP forward):
    (reconstruction (B, 3, T, H, W), the posterior's moments (B, 2*E, T', h, w))."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample(generator)
        return self.vae.decode(z).sample, posterior.parameters


class DiscriminatorPair(nn.Module):
    """D on the real frames, then on the reconstructions, as one module (one DDP forward per backward)."""

    def __init__(self, discriminator: nn.Module):
        super().__init__()
        self.discriminator = discriminator

    def forward(self, real: torch.Tensor, fake: torch.Tensor):
        return self.discriminator(real), self.discriminator(fake)


@contextlib.contextmanager
def frozen(module: nn.Module):
    """``module``'s parameters without gradients for the duration (the discriminator inside the
    generator loss: its gradient w.r.t. its input flows, none is stored for its weights)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


# --- one batch --------------------------------------------------------------------------------------------


class TrainStep:
    """One batch of upstream's manual optimisation (spec E.3), shared by the trainer and the benchmark.

    ``autoencoder``: an ``Autoencode`` (or its DDP wrapper); ``vae``: the unwrapped CausalVideoVAE
    (its ``decoder.conv_out.conv.weight`` is the adaptive weight's W); ``loss``: the
    LPIPSWithDiscriminator whose ``discriminator`` is the unwrapped PatchGAN; ``disc_pair``: a
    ``DiscriminatorPair`` over it (or its DDP wrapper). ``backward``/``clip``/``any_rank``: the
    launcher's backward, gradient clipping returning the total norm, and "is this true on any
    process" (defaults: plain torch, one process). ``fused`` (default): the generator loss through
    ``generator_loss_fused`` (LPIPS and the discriminator back-propagated once, not twice; the same
    gradients); False: upstream's order (``generator_loss`` then its backward).

    ``__call__(x, batch_index, generator)`` returns a dict of logged numbers (tensors) plus "ae_skipped"
    and "disc_skipped" (bools: a non-finite loss or gradient norm skipped that optimiser's step).
    """

    def __init__(self, autoencoder: nn.Module, vae: nn.Module, loss: LPIPSWithDiscriminator, disc_pair: nn.Module,
                 opt_ae: torch.optim.Optimizer, opt_disc: torch.optim.Optimizer, *, max_grad_norm: float = 1.0,
                 amp: Callable[[], Any] = contextlib.nullcontext, backward: Optional[Callable] = None,
                 clip: Optional[Callable] = None, any_rank: Optional[Callable[[bool], bool]] = None,
                 fused: bool = True):
        self.fused = fused
        self.autoencoder, self.vae, self.loss, self.disc_pair = autoencoder, vae, loss, disc_pair
        self.opt_ae, self.opt_disc, self.max_grad_norm, self.amp = opt_ae, opt_disc, max_grad_norm, amp
        self.backward = backward or (lambda t: t.backward())
        self.clip = clip or torch.nn.utils.clip_grad_norm_
        self.any_rank = any_rank or (lambda flag: flag)
        self.ae_params = [p for g in opt_ae.param_groups for p in g["params"]]
        self.disc_params = [p for g in opt_disc.param_groups for p in g["params"]]

    def __call__(self, x: torch.Tensor, batch_index: int, generator: Optional[torch.Generator] = None
                 ) -> Dict[str, Any]:
        from ..models.vae.distribution import DiagonalGaussianDistribution

        last_layer = self.vae.decoder.conv_out.conv.weight
        with self.amp():
            recon, moments = self.autoencoder(x, generator)
            posterior = DiagonalGaussianDistribution(moments)
            with frozen(self.loss.discriminator) as disc:
                if self.fused:
                    ae_loss, log, surrogate = self.loss.generator_loss_fused(
                        x, recon, posterior, lightning_step(batch_index, False), last_layer, discriminator=disc)
                else:
                    ae_loss, log = self.loss.generator_loss(x, recon, posterior, lightning_step(batch_index, False),
                                                            last_layer=last_layer, discriminator=disc)
                    surrogate = ae_loss
        out: Dict[str, Any] = dict(log, total_loss=ae_loss.detach())
        if self.any_rank(not bool(torch.isfinite(ae_loss))):
            self.opt_ae.zero_grad(set_to_none=True)
            self.opt_disc.zero_grad(set_to_none=True)
            out.update(ae_skipped=True, disc_skipped=True)
            return out
        self.opt_ae.zero_grad(set_to_none=True)
        self.backward(surrogate)
        del surrogate
        norm = self.clip(self.ae_params, self.max_grad_norm)
        out["grad_norm"] = norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))
        out["ae_skipped"] = self.any_rank(not bool(torch.isfinite(out["grad_norm"])))
        if not out["ae_skipped"]:
            self.opt_ae.step()
        self.opt_ae.zero_grad(set_to_none=True)
        del ae_loss, posterior, moments

        recon = recon.detach()
        with self.amp():
            d_loss, dlog = self.loss.discriminator_loss(x, recon, lightning_step(batch_index, True),
                                                        pair=self.disc_pair)
        out.update(dlog)
        if self.any_rank(not bool(torch.isfinite(d_loss))):
            self.opt_disc.zero_grad(set_to_none=True)
            out["disc_skipped"] = True
            return out
        self.opt_disc.zero_grad(set_to_none=True)
        self.backward(d_loss)
        dnorm = self.clip(self.disc_params, self.max_grad_norm)
        out["disc_grad_norm"] = dnorm.detach() if isinstance(dnorm, torch.Tensor) else torch.tensor(float(dnorm))
        out["disc_skipped"] = self.any_rank(not bool(torch.isfinite(out["disc_grad_norm"])))
        if not out["disc_skipped"]:
            self.opt_disc.step()
        self.opt_disc.zero_grad(set_to_none=True)
        return out


# --- measurements -------------------------------------------------------------------------------------------


def _first_clips(dataset, n: int) -> List[torch.Tensor]:
    """Items 0 .. n-1 of epoch 0 (fewer when the dataset is smaller): (3, T, H, W) clips."""
    return [dataset[(0, i)]["video"] for i in range(min(n, len(dataset)))]


@torch.no_grad()
def measure_latent_std(vae, clips: List[torch.Tensor], generator: torch.Generator, batch_size: int = 1,
                       amp: Callable[[], Any] = contextlib.nullcontext) -> float:
    """The standard deviation (float64, about the mean, unbiased: ldm's ``z.flatten().std()``) of
    posterior samples z = encode(x).latent_dist.sample(generator) over ``clips``, encoded in order in
    batches of ``batch_size``: what ``scaling_factor = 1 / std`` is measured on."""
    device = next(vae.parameters()).device
    zs = []
    for i in range(0, len(clips), batch_size):
        x = torch.stack(clips[i:i + batch_size]).to(device)
        with amp():
            z = vae.encode(x).latent_dist.sample(generator)
        zs.append(z.double().flatten().cpu())
    return float(torch.cat(zs).std())


def _psnr_inline(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Upstream's per-frame PSNR (range 1, 100 dB below mse 1e-10), frame mean per video: (B,)."""
    mse = (a.double() - b.double()).pow(2).mean(dim=(2, 3, 4))
    psnr = torch.where(mse < 1e-10, torch.full_like(mse, 100.0), 20 * torch.log10(1 / mse.sqrt()))
    return psnr.mean(dim=1)


def _metrics():
    """(psnr, ssim or None) from osp.eval, or the inline PSNR when osp.eval has no metrics yet."""
    try:
        from ..eval import psnr, ssim

        return psnr, ssim
    except (ImportError, AttributeError):
        return _psnr_inline, None


@torch.no_grad()
def evaluate(vae, clips: List[torch.Tensor], batch_size: int = 1,
             amp: Callable[[], Any] = contextlib.nullcontext) -> Dict[str, float]:
    """Mean PSNR and SSIM (osp.eval, upstream's definitions) of reconstructions through the posterior's
    mode, on clips (3, T, H, W) in [-1, 1], compared in [0, 1] as (B, T, C, H, W)."""
    psnr, ssim = _metrics()
    device = next(vae.parameters()).device
    was_training = vae.training
    vae.eval()
    vals: Dict[str, List[torch.Tensor]] = {"psnr": [], "ssim": []}
    try:
        for i in range(0, len(clips), batch_size):
            x = torch.stack(clips[i:i + batch_size]).to(device)
            with amp():
                rec = vae.decode(vae.encode(x).latent_dist.mode()).sample
            a = ((x.float() + 1) / 2).clamp(0, 1).transpose(1, 2)
            b = ((rec.float() + 1) / 2).clamp(0, 1).transpose(1, 2)
            vals["psnr"].append(psnr(a, b).double().cpu())
            if ssim is not None:
                vals["ssim"].append(ssim(a, b).double().cpu())
    finally:
        vae.train(was_training)
    return {k: float(torch.cat(v).mean()) for k, v in vals.items() if v}


# --- the loop ---------------------------------------------------------------------------------------------


def _collate():
    from .vae_data import collate

    return collate


def train(cfg: VAETrainConfig, *, dataset=None, eval_dataset=None, vae=None, perceptual: Optional[nn.Module] = None,
          sampler_factory: Optional[Callable[..., Any]] = None) -> Dict[str, Any]:
    """Train the CausalVideoVAE as ``cfg`` says; returns {"step", "output_dir", "model", "stopped",
    "scaling_factor", "nonfinite_skips", "eval"}.

    ``dataset`` / ``eval_dataset`` replace the folders (items {"video": (3, T, H, W) in [-1, 1], ...},
    e.g. ``vae_data.ClipDataset``); ``vae`` replaces the configured start; ``perceptual`` replaces
    LPIPS-VGG (a module (x, y) -> (N, 1, 1, 1)). User mistakes raise ConfigError naming the flag.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    check_config(cfg, have_dataset=dataset is not None, have_model=vae is not None)
    world_env = int(os.environ.get("WORLD_SIZE", "1"))
    if world_env == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state()
        GradientState._reset_state()
    force_cpu = (cfg.device is not None and torch.device(cfg.device).type == "cpu") or (
        not torch.cuda.is_available() and world_env > 1)
    accelerator = Accelerator(mixed_precision="no", project_dir=cfg.output_dir, cpu=force_cpu,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)])
    device = accelerator.device
    main = accelerator.is_main_process
    world, rank = accelerator.num_processes, accelerator.process_index

    def log(msg: str) -> None:
        if main:
            print(f"osp train-vae: {msg}", flush=True)

    if cfg.devices * cfg.n_nodes != world:
        log(f"--devices {cfg.devices} x --n_nodes {cfg.n_nodes} but {world} process(es) run: the launcher decides "
            "(torchrun / accelerate launch)")

    # --- resume point ------------------------------------------------------------------------------------
    os.makedirs(cfg.output_dir, exist_ok=True)
    resume_dir = ckpt.resolve_resume(cfg.resume_from_checkpoint, cfg.output_dir)
    state: Dict[str, Any] = ckpt.read_state(resume_dir) if resume_dir else {}
    seed = int(state.get("seed", cfg.seed))
    if state and seed != cfg.seed:
        log(f"--seed {cfg.seed} ignored: the checkpoint's run uses seed {seed}")
    random.seed(seed)

    # --- data ----------------------------------------------------------------------------------------------
    from .vae_data import VideoFolderDataset

    if dataset is None:
        try:
            dataset = VideoFolderDataset(cfg.video_path, num_frames=cfg.video_num_frames, resolution=cfg.resolution,
                                         sample_rate=cfg.sample_rate, seed=seed)
        except ValueError as exc:
            raise ConfigError(str(exc).splitlines()[0]) from None
    if eval_dataset is None and cfg.eval_video_path:
        try:
            eval_dataset = VideoFolderDataset(cfg.eval_video_path, num_frames=cfg.video_num_frames,
                                              resolution=cfg.resolution, sample_rate=cfg.sample_rate, seed=seed,
                                              window="middle")
        except ValueError as exc:
            raise ConfigError(f"--eval_video_path: {str(exc).splitlines()[0]}") from None
    try:
        first = dataset[(0, 0)]["video"]
    except ValueError as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    per_rank = len(dataset) // world
    batches_per_epoch = per_rank // cfg.batch_size
    if batches_per_epoch < 1:
        raise ConfigError(f"the {len(dataset)} videos give no full batch of --batch_size {cfg.batch_size} on each of "
                          f"{world} processes; expected at least {cfg.batch_size * world} videos")

    # --- model and loss -------------------------------------------------------------------------------------
    raw: Dict[str, Any] = {}
    loss_sd: Dict[str, torch.Tensor] = {}
    if vae is None:
        vae, raw, loss_sd = build_vae(cfg, log)
    settings = loss_settings(cfg, raw)
    tc, sc = vae.temporal_compression, vae.spatial_compression
    _, T, H, W = first.shape
    if (T - 1) % tc or H % sc or W % sc:
        raise ConfigError(f"clips of {T}x{H}x{W} do not fit the VAE: expected 1 + {tc}k frames and sides that are "
                          f"multiples of {sc}")
    torch.manual_seed(derive_seed(seed, INIT, 1))  # the discriminator's init follows the seed
    try:
        loss = LPIPSWithDiscriminator(
            disc_start=settings["disc_start"], logvar_init=settings["logvar_init"], kl_weight=settings["kl_weight"],
            disc_weight=settings["disc_weight"], disc_factor=cfg.disc_factor, perceptual_weight=cfg.perceptual_weight,
            perceptual=perceptual, lpips_weights=cfg.lpips_weights, lpips_backbone_weights=cfg.lpips_backbone_weights,
            disc_in_channels=vae.config.out_channels)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(f"--perceptual_weight {cfg.perceptual_weight}: {str(exc).splitlines()[0]} (or pass "
                          "--perceptual_weight 0 to train without LPIPS)") from None
    if loss_sd:
        own = {k: v for k, v in loss_sd.items() if k == "logvar" or k.startswith("discriminator.")}
        missing = loss.load_state_dict(own, strict=False)
        log(f"loss state from the checkpoint: {len(own)} tensors"
            + (f" ({len(missing.missing_keys)} discriminator tensors missing: fresh)"
               if [k for k in missing.missing_keys if k.startswith("discriminator.")] else ""))
    loss.logvar.requires_grad_(False)  # in no optimiser (spec E.2): it keeps its loaded value
    vae = vae.to(device).train()
    loss = loss.to(device).train()
    if cfg.gradient_checkpointing:
        vae.enable_gradient_checkpointing()
    opt_ae = torch.optim.Adam(autoencoder_param_groups(vae, settings["lr"], cfg.time_lr), betas=(0.5, 0.9))
    opt_disc = torch.optim.Adam(loss.discriminator.parameters(), lr=settings["lr"], betas=(0.5, 0.9))
    autoencoder, disc_pair, opt_ae, opt_disc = accelerator.prepare(
        Autoencode(vae), DiscriminatorPair(loss.discriminator), opt_ae, opt_disc)
    amp = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if PRECISIONS[cfg.precision] == "bf16" \
        else contextlib.nullcontext

    def any_rank(flag: bool) -> bool:
        if world == 1:
            return flag
        t = torch.tensor(float(flag), device=device)
        return bool(accelerator.reduce(t, reduction="sum").item() > 0)

    step_fn = TrainStep(autoencoder, vae, loss, disc_pair, opt_ae, opt_disc, max_grad_norm=cfg.max_grad_norm,
                        amp=amp, backward=accelerator.backward,
                        clip=lambda params, norm: accelerator.clip_grad_norm_(params, norm), any_rank=any_rank)

    # --- resume -----------------------------------------------------------------------------------------------
    global_step, epoch, batches_done = 0, 0, 0
    skips_total, skips_in_row = 0, 0
    jsonl = JsonlLog(os.path.join(cfg.output_dir, LOG_NAME), main)
    if resume_dir:
        accelerator.load_state(resume_dir)
        extra = torch.load(os.path.join(resume_dir, LOSS_STATE_NAME), map_location="cpu", weights_only=True)
        with torch.no_grad():
            loss.logvar.copy_(extra["logvar"])
        global_step, epoch, batches_done = int(state["step"]), int(state["epoch"]), int(state["batches_done"])
        skips_total, skips_in_row = int(state.get("nonfinite_skips", 0)), int(state.get("nonfinite_in_row", 0))
        if int(state.get("world_size", world)) != world or int(state.get("batch_size", cfg.batch_size)) != cfg.batch_size:
            log("the checkpoint's data position counts other batches or processes: data resumes at the next epoch")
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
        from ..data import ResumableSampler as sampler_factory
    sampler = sampler_factory(len(dataset), seed=seed, shuffle=True, num_replicas=world, rank=rank, drop_last=True,
                              yield_epoch=True)

    def make_loader(ep: int, start_batch: int):
        return resumable_loader(dataset, sampler, ep, start_batch, cfg.batch_size, cfg.num_workers, _collate(), device)

    # --- checkpoints, evaluation ------------------------------------------------------------------------------
    def run_state() -> Dict[str, Any]:
        return {"step": global_step, "epoch": epoch, "batches_done": batches_done, "seed": seed, "world_size": world,
                "batch_size": cfg.batch_size, "nonfinite_skips": skips_total, "nonfinite_in_row": skips_in_row,
                "loss": settings, "time": time.time(), "kind": "causal-video-vae"}

    def save_logvar(tmp: str) -> None:
        if main:
            torch.save({"logvar": loss.logvar.detach().cpu()}, os.path.join(tmp, LOSS_STATE_NAME))

    def save_checkpoint() -> str:
        return ckpt.save_all(accelerator, cfg.output_dir, global_step, run_state(), save_logvar,
                             cfg.checkpoints_total_limit, log)

    eval_clips = _first_clips(eval_dataset, cfg.eval_num_clips) if eval_dataset is not None else []
    eval_results: List[Dict[str, Any]] = []

    def run_eval() -> None:
        if main and eval_clips:
            res = evaluate(vae, eval_clips, cfg.batch_size, amp)
            rec = {"step": global_step, "event": "eval", "clips": len(eval_clips), **res}
            eval_results.append(rec)
            jsonl.write(rec)
            log(f"eval at step {global_step} on {len(eval_clips)} held-out clips: "
                + ", ".join(f"{k} {v:.4f}" for k, v in res.items()))
        accelerator.wait_for_everyone()

    if not eval_clips:
        log("no held-out clips (--eval_video_path): no evaluation at checkpoints")

    # --- train ---------------------------------------------------------------------------------------------------
    eval_steps = cfg.eval_steps or cfg.save_steps
    progress = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    bar = None
    if main and progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=global_step, desc="train-vae", dynamic_ncols=True)
    log(f"{accelerator.distributed_type} on {world} process(es), device {device}; {len(dataset)} clips of "
        f"{T}x{H}x{W}, {batches_per_epoch} batches of {cfg.batch_size} per process and epoch; steps {global_step} -> "
        f"{cfg.max_steps}; lr {settings['lr']}, disc_start {settings['disc_start']} (Lightning units: generator from "
        f"batch {(settings['disc_start'] + 1) // 2}, discriminator from batch {settings['disc_start'] // 2}); seed "
        f"{seed}; output {cfg.output_dir}")
    stopped = False
    last_saved = global_step if resume_dir else -1
    t_last = t_start = time.time()
    with _StopSignal() as stop:
        while global_step < cfg.max_steps and not stopped:
            exhausted = True
            for batch in make_loader(epoch, batches_done):
                seed_global(seed, global_step, 0, rank)
                g = step_generator(seed, global_step, 0, rank)
                x = batch["video"].to(device, non_blocking=True)
                out = step_fn(x, global_step, g)
                batches_done += 1
                global_step += 1
                skipped_now = bool(out["ae_skipped"] or out["disc_skipped"])
                skips_total += int(skipped_now)
                skips_in_row = skips_in_row + 1 if skipped_now else 0
                now = time.time()
                rec = {"step": global_step, "epoch": epoch, "aeloss": float(out["total_loss"]),
                       "discloss": float(out.get("disc_loss", float("nan"))), "lr": settings["lr"],
                       **{k: float(v) for k, v in out.items() if isinstance(v, torch.Tensor)},
                       "ae_skipped": bool(out["ae_skipped"]), "disc_skipped": bool(out["disc_skipped"]),
                       "nonfinite_skips": skips_total, "clips_per_s": cfg.batch_size * world / max(now - t_last, 1e-9),
                       "skipped": batch.get("skipped", []), "time": round(now - t_start, 3)}
                jsonl.write(rec)
                t_last = now
                if skipped_now:
                    log(f"step {global_step}: non-finite loss or gradient, update skipped ({skips_in_row} in a row, "
                        f"{skips_total} in all)")
                if skips_in_row >= cfg.max_nonfinite:
                    raise NonFiniteLossError(
                        f"{skips_in_row} consecutive batches with a non-finite loss or gradient (last at step "
                        f"{global_step}, aeloss {rec['aeloss']}, discloss {rec['discloss']}); expected finite losses: "
                        "lower --lr, use --precision 32, or resume from an earlier checkpoint")
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(aeloss=f"{rec['aeloss']:.4f}", discloss=f"{rec['discloss']:.4f}", skips=skips_total)
                if batches_done >= batches_per_epoch:
                    epoch, batches_done = epoch + 1, 0
                    exhausted = False
                stop_now = any_rank(stop.requested)
                if global_step % cfg.save_steps == 0 or stop_now or global_step >= cfg.max_steps:
                    path = save_checkpoint()
                    last_saved = global_step
                    log(f"saved {path}")
                    if global_step % eval_steps != 0:
                        run_eval()
                if global_step % eval_steps == 0:
                    run_eval()
                if stop_now:
                    stopped = True
                    log(f"stopped by a signal at step {global_step}; continue with --resume_from_checkpoint latest")
                if stopped or global_step >= cfg.max_steps or not exhausted:
                    break
            if exhausted and not stopped and global_step < cfg.max_steps:
                epoch, batches_done = epoch + 1, 0
    if bar is not None:
        bar.close()

    result = {"step": global_step, "output_dir": cfg.output_dir, "model": None, "stopped": stopped, "seed": seed,
              "scaling_factor": None, "nonfinite_skips": skips_total, "eval": eval_results}
    if not stopped:
        if last_saved != global_step:
            log(f"saved {save_checkpoint()}")
        if main:
            clips = _first_clips(dataset, cfg.scaling_clips)
            gen = torch.Generator().manual_seed(derive_seed(seed, SCALING))
            std = measure_latent_std(vae, clips, gen, cfg.batch_size, amp)
            sf = 1.0 / std
            vae.register_to_config(scaling_factor=sf)
            result["scaling_factor"] = sf
            jsonl.write({"step": global_step, "event": "scaling_factor", "latent_std": std, "scaling_factor": sf,
                         "clips": len(clips)})
            log(f"latent std {std:.5f} over {len(clips)} training clips (posterior samples): scaling_factor "
                f"{sf:.5f} written into the config")
            import osp

            out_dir = os.path.join(cfg.output_dir, "model")
            sd = {k: v.detach().float().cpu() for k, v in vae.state_dict().items()}
            record = {"exp_name": cfg.exp_name, "step": global_step, "seed": seed, "scaling_factor": sf,
                      "latent_std": std, "scaling_clips": len(clips), "loss": settings, "precision": cfg.precision,
                      "nonfinite_skips": skips_total, "world_size": world, "batch_size": cfg.batch_size,
                      "osp_version": osp.__version__}
            _save_model_dir(out_dir, vae, sd, record)
            _save_loss_weights(out_dir, loss)
            result["model"] = out_dir
            log(f"saved {out_dir}")
        accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def _save_loss_weights(folder: str, loss: LPIPSWithDiscriminator) -> None:
    """The discriminator and logvar under upstream's keys (loss.discriminator.*, loss.logvar), so that
    ``--load_from_checkpoint`` of the saved folder continues the GAN."""
    from safetensors.torch import save_file

    tensors = {f"loss.{k}": v.detach().cpu().contiguous().clone() for k, v in loss.state_dict().items()
               if k == "logvar" or k.startswith("discriminator.")}
    tmp = os.path.join(folder, LOSS_WEIGHTS_NAME + ".tmp")
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, os.path.join(folder, LOSS_WEIGHTS_NAME))
