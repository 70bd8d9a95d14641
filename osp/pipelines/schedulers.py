"""The samplers of ``osp sample --sample_method`` / ``TextToVideoPipeline(scheduler=...)``.

Upstream's sample_t2v.py builds each diffusers scheduler with no arguments, so it samples with the
defaults of the diffusers it ran (0.27.2, spec B.2). Newer diffusers releases changed some defaults,
so every configuration is written out here in full: the same name samples the same way under any
diffusers that still has those options. ``IDDPM`` is osp.diffusion's ancestral loop (upstream's
training-time validation sampler, spec A.5/A.6) with respacing ``str(num_inference_steps)``.
"""
from __future__ import annotations

import importlib
import inspect
import math
import warnings
from typing import Any, Dict, Tuple

_LINEAR = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
               trained_betas=None, prediction_type="epsilon")
# Heun and KDPM2 default to Stable Diffusion's betas, not the schedule LatteT2V was trained with (G7).
_SD_LINEAR = dict(_LINEAR, beta_start=0.00085, beta_end=0.012)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)

UPSTREAM_SCHEDULERS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "PNDM": ("PNDMScheduler", dict(
        **_LINEAR, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading", steps_offset=0)),
    "DDIM": ("DDIMScheduler", dict(
        **_LINEAR, **_THRESHOLD, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, steps_offset=0,
        timestep_spacing="leading", rescale_betas_zero_snr=False)),
    "EulerDiscrete": ("EulerDiscreteScheduler", dict(
        **_LINEAR, interpolation_type="linear", use_karras_sigmas=False, sigma_min=None, sigma_max=None,
        timestep_spacing="linspace", timestep_type="discrete", steps_offset=0, rescale_betas_zero_snr=False)),
    "DDPM": ("DDPMScheduler", dict(
        **_LINEAR, **_THRESHOLD, variance_type="fixed_small", clip_sample=True, clip_sample_range=1.0,
        timestep_spacing="leading", steps_offset=0, rescale_betas_zero_snr=False)),
    "DPMSolverMultistep": ("DPMSolverMultistepScheduler", dict(
        **_LINEAR, **_THRESHOLD, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=True, euler_at_final=False, use_karras_sigmas=False, use_lu_lambdas=False,
        final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None, timestep_spacing="linspace",
        steps_offset=0, rescale_betas_zero_snr=False)),
    "DPMSolverSinglestep": ("DPMSolverSinglestepScheduler", dict(
        **_LINEAR, **_THRESHOLD, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
        lower_order_final=False, use_karras_sigmas=False, final_sigmas_type="zero", lambda_min_clipped=-math.inf,
        variance_type=None)),
    "HeunDiscrete": ("HeunDiscreteScheduler", dict(
        **_SD_LINEAR, use_karras_sigmas=False, clip_sample=False, clip_sample_range=1.0, timestep_spacing="linspace",
        steps_offset=0)),
    "EulerAncestralDiscrete": ("EulerAncestralDiscreteScheduler", dict(
        **_LINEAR, timestep_spacing="linspace", steps_offset=0, rescale_betas_zero_snr=False)),
    "DEISMultistep": ("DEISMultistepScheduler", dict(
        **_LINEAR, **_THRESHOLD, solver_order=2, algorithm_type="deis", solver_type="logrho", lower_order_final=True,
        use_karras_sigmas=False, timestep_spacing="linspace", steps_offset=0)),
    "KDPM2AncestralDiscrete": ("KDPM2AncestralDiscreteScheduler", dict(
        **_SD_LINEAR, use_karras_sigmas=False, timestep_spacing="linspace", steps_offset=0)),
}
"""``--sample_method`` -> (diffusers class name, its full diffusers 0.27.2 default configuration)."""

SAMPLE_METHODS: Tuple[str, ...] = tuple(UPSTREAM_SCHEDULERS) + ("IDDPM",)
"""Every accepted sampler name: upstream's ten diffusers schedulers, then osp.diffusion's IDDPM."""


class IDDPMSampler:
    """osp.diffusion's ancestral sampler (upstream's improved-DDPM, learned-range variance) as a
    pipeline scheduler choice. ``num_inference_steps`` n respaces the 1000-step process with "n"
    (spec A.5: 250 -> [0, 4, ..., 995, 999]); the model sees the original timestep indices.

    With CFG, guidance applies to the noise half of LatteT2V's output and the variance half is the
    conditional branch's (DiT's forward_with_cfg). Sampling draws from the pipeline's generator.
    """

    init_noise_sigma = 1.0
    order = 1

    def __init__(self, diffusion_steps: int = 1000, noise_schedule: str = "linear"):
        self.config = {"diffusion_steps": diffusion_steps, "noise_schedule": noise_schedule,
                       "timestep_respacing": "str(num_inference_steps)", "clip_denoised": False}

    def make_diffusion(self, num_inference_steps: int, learn_sigma: bool = True):
        """The respaced process for ``num_inference_steps`` steps (learn_sigma False: a model that
        predicts the noise only samples with the fixed-large variance, as upstream's factory does)."""
        from ..diffusion import create_diffusion

        return create_diffusion(str(num_inference_steps), noise_schedule=self.config["noise_schedule"],
                                diffusion_steps=self.config["diffusion_steps"], learn_sigma=learn_sigma)

    def __repr__(self) -> str:
        return f"IDDPMSampler({self.config['diffusion_steps']} steps, {self.config['noise_schedule']} schedule)"


def make_scheduler(name: str):
    """A fresh sampler for ``--sample_method`` ``name`` (one of SAMPLE_METHODS): a diffusers
    scheduler with upstream's configuration written out, or an IDDPMSampler. ValueError for an
    unknown name. Options the installed diffusers no longer has are dropped with a warning."""
    if name == "IDDPM":
        return IDDPMSampler()
    if name not in UPSTREAM_SCHEDULERS:
        raise ValueError(f"sample_method={name!r}; expected one of {', '.join(SAMPLE_METHODS)}")
    cls_name, config = UPSTREAM_SCHEDULERS[name]
    cls = getattr(importlib.import_module("diffusers"), cls_name)
    accepted = inspect.signature(cls.__init__).parameters
    dropped = sorted(k for k in config if k not in accepted)
    if dropped:
        warnings.warn(f"{cls_name}: this diffusers has no option(s) {dropped}; building it without them, so "
                      "it may not sample exactly as upstream's diffusers 0.27.2 did", stacklevel=2)
    return cls(**{k: v for k, v in config.items() if k in accepted})


def scheduler_name(scheduler) -> str:
    """The --sample_method name of a scheduler object (its class name when it is not one of them)."""
    if isinstance(scheduler, IDDPMSampler):
        return "IDDPM"
    cls_name = type(scheduler).__name__
    return next((k for k, (c, _) in UPSTREAM_SCHEDULERS.items() if c == cls_name), cls_name)


def scheduler_config(scheduler) -> Dict[str, Any]:
    """A JSON-ready copy of the scheduler's configuration (non-finite floats as strings)."""
    config = dict(getattr(scheduler, "config", {}) or {})

    def plain(v):
        if isinstance(v, float) and not math.isfinite(v):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        return repr(v)

    return {k: plain(v) for k, v in config.items() if not k.startswith("_")}
