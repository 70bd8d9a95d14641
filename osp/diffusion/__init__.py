"""Improved-DDPM diffusion as upstream trains and samples LatteT2V: schedule, losses, respacing, samplers."""

from __future__ import annotations

from typing import Optional, Sequence, Union

from .diffusion_utils import (
    approx_standard_normal_cdf,
    discretized_gaussian_log_likelihood,
    mean_flat,
    normal_kl,
    unwrap_model_output,
)
from .gaussian_diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    get_named_beta_schedule,
)
from .respace import SpacedDiffusion, space_timesteps

__all__ = [
    "create_diffusion",
    "create_diffusion_T",
    "GaussianDiffusion",
    "SpacedDiffusion",
    "space_timesteps",
    "get_named_beta_schedule",
    "ModelMeanType",
    "ModelVarType",
    "LossType",
    "mean_flat",
    "normal_kl",
    "approx_standard_normal_cdf",
    "discretized_gaussian_log_likelihood",
    "unwrap_model_output",
]


def create_diffusion(
    timestep_respacing: Optional[Union[str, int, Sequence[int]]] = "",
    noise_schedule: str = "linear",
    use_kl: bool = False,
    sigma_small: bool = False,
    predict_xstart: bool = False,
    learn_sigma: bool = True,
    rescale_learned_sigmas: bool = False,
    diffusion_steps: int = 1000,
) -> SpacedDiffusion:
    """Upstream's create_diffusion_T: the (B, C, F, h, w) diffusion, learned sigma split on axis 1.

    timestep_respacing: "" or None keeps all steps (training); "250" (validation sampling),
    "ddim50", "10,15,20", an int or a list of section counts respace it (see space_timesteps).
    Defaults give LEARNED_RANGE variance, ε prediction, MSE + VB loss, linear β over 1000 steps.
    """
    betas = get_named_beta_schedule(noise_schedule, diffusion_steps)
    if use_kl:
        loss_type = LossType.RESCALED_KL
    elif rescale_learned_sigmas:
        loss_type = LossType.RESCALED_MSE
    else:
        loss_type = LossType.MSE
    if timestep_respacing is None or timestep_respacing == "":
        timestep_respacing = [diffusion_steps]
    if learn_sigma:
        var_type = ModelVarType.LEARNED_RANGE
    else:
        var_type = ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE
    return SpacedDiffusion(
        use_timesteps=space_timesteps(diffusion_steps, timestep_respacing),
        betas=betas,
        model_mean_type=ModelMeanType.START_X if predict_xstart else ModelMeanType.EPSILON,
        model_var_type=var_type,
        loss_type=loss_type,
    )


# train_t2v.py imports create_diffusion_T under the name create_diffusion; both names work here.
create_diffusion_T = create_diffusion
