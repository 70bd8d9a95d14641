"""GroupNorm with a fused activation, a drop-in for torch.nn.GroupNorm."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .. import ops
from .._utils import ACTIVATIONS, records_grad
from ..ops.group_norm import group_norm_, group_norm_in_place_why_not


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm (same arguments, parameters and state-dict keys ``weight``/``bias``)
    plus ``act``: None or "silu", fused into the same kernel. Input (N, C, *spatial), 1 to 3
    spatial dims; output keeps its memory format. Routed through ``osp.ops.group_norm``.

    ``fixed_stats``: None (normal behaviour), or (mean, rstd), each (N, G) of any float dtype, to
    normalize with those statistics instead of the input's own, applied in fp32 (float64 for float64
    input). Set by tiled VAE inference, which normalizes every tile with statistics of the whole
    input (``osp.models.vae.tiling``), through ``osp.ops.group_norm_fixed_stats``. Not saved in
    state dicts.

    ``forward(x, inplace=True)`` writes the result into x when that is safe and saves memory (see
    ``forward``): inference code that owns x (the second norm of a VAE ResnetBlock3D) asks for it.
    """

    fixed_stats: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: Optional[str] = None, device=None, dtype=None):
        if act not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: act={act!r}; expected one of {ACTIVATIONS}")
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace=True``: the caller owns x and needs it no more, so the result may be written
        into x (returned) instead of a second video-sized buffer. Taken only when nothing records
        gradients (no_grad, or neither x nor the parameters need them) and the compiled in-place op
        runs the call (``osp.ops.group_norm_in_place_why_not``); otherwise x is left alone and a new
        tensor is returned, exactly as with ``inplace=False``."""
        if self.fixed_stats is not None:
            return ops.group_norm_fixed_stats(x, self.num_groups, *self.fixed_stats, self.weight, self.bias,
                                              act=self.act)
        if inplace and self._may_write(x):
            return group_norm_(x, self.num_groups, self.weight, self.bias, self.eps, act=self.act)
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act=self.act)

    def _may_write(self, x: torch.Tensor) -> bool:
        if records_grad(x, self.weight, self.bias):
            return False
        return group_norm_in_place_why_not(x, self.num_groups, self.weight, self.bias, self.eps, act=self.act) is None

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act else "")
