"""Elementwise pieces of the IDDPM losses (upstream's diffusion_utils.py) and model-output unwrapping.

All tensors here share one shape, (B, C, F, h, w) for video latents, or broadcast to it.
"""

from __future__ import annotations

import math

import torch

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_BIN = 1.0 / 255.0  # half the width of one 8-bit level on [-1, 1]
_TAIL = 0.999  # beyond this |x0| the bin extends to infinity
_LOG_FLOOR = 1e-12


def mean_flat(x: torch.Tensor) -> torch.Tensor:
    """Mean over every axis but the batch axis: (B, ...) -> (B,). Covers every frame, image frames included."""
    return x.mean(dim=list(range(1, x.dim())))


def normal_kl(mean1, logvar1, mean2, logvar2) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) elementwise, in nats; arguments broadcast."""
    return 0.5 * (
        -1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + ((mean1 - mean2) ** 2) * torch.exp(-logvar2)
    )


def approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    """The tanh approximation of the standard normal CDF that IDDPM uses (not erf: it changes the loss)."""
    return 0.5 * (1.0 + torch.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * torch.pow(x, 3))))


def discretized_gaussian_log_likelihood(
    x: torch.Tensor, *, means: torch.Tensor, log_scales: torch.Tensor
) -> torch.Tensor:
    """log P(x) of data on [-1, 1] quantised to 256 levels under N(means, e^(2 log_scales)), in nats.

    x, means, log_scales: same shape. Bins are 2/255 wide; below -0.999 and above 0.999 the bin runs to
    -inf / +inf. Probabilities are floored at 1e-12 before the log.
    """
    if not (x.shape == means.shape == log_scales.shape):
        raise ValueError(
            f"discretized_gaussian_log_likelihood: shapes x {tuple(x.shape)}, means {tuple(means.shape)}, "
            f"log_scales {tuple(log_scales.shape)}; expected all equal"
        )
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + _BIN))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - _BIN))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=_LOG_FLOOR))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=_LOG_FLOOR))
    log_cdf_delta = torch.log((cdf_plus - cdf_min).clamp(min=_LOG_FLOOR))
    return torch.where(x < -_TAIL, log_cdf_plus, torch.where(x > _TAIL, log_one_minus_cdf_min, log_cdf_delta))


def unwrap_model_output(out) -> torch.Tensor:
    """The prediction tensor inside whatever a denoiser returned.

    A tensor is returned as is: indexing it with [0] would take batch element 0 (spec H). An object
    with a tensor ``.sample`` (diffusers' Transformer3DModelOutput) gives ``.sample``; a tuple or list
    gives its element 0 (``return_dict=False``).
    """
    if isinstance(out, torch.Tensor):
        return out
    sample = getattr(out, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    if isinstance(out, (tuple, list)) and len(out) > 0 and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(
        f"model returned {type(out).__name__}; expected a tensor, an object with a tensor .sample, "
        "or a tuple/list whose element 0 is a tensor"
    )
