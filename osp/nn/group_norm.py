"""GroupNorm with a fused activation, a drop-in for torch.nn.GroupNorm."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..ops.group_norm import ACTIVATIONS


def group_norm_fixed_stats(x: torch.Tensor, num_groups: int, mean: torch.Tensor, rstd: torch.Tensor,
                          weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
                          act: Optional[str] = None) -> torch.Tensor:
    """GroupNorm of x (N, C, *spatial) with given statistics: (x - mean) * rstd * weight + bias, then
    ``act``. mean, rstd: (N, G); computed in fp32 (float64 for float64 x); the output has x's dtype and shape (contiguous)."""
    N, C = x.shape[:2]
    if tuple(mean.shape) != (N, num_groups) or tuple(rstd.shape) != (N, num_groups):
        raise ValueError(f"group_norm_fixed_stats: mean {tuple(mean.shape)} / rstd {tuple(rstd.shape)}; expected "
                         f"({N}, {num_groups}) for x {tuple(x.shape)}")
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    xg = x.reshape(N, num_groups, -1).to(ct)
    y = (xg - mean.to(ct)[:, :, None]).mul_(rstd.to(ct)[:, :, None]).reshape(N, C, -1)
    if weight is not None:
        y.mul_(weight.to(ct)[None, :, None])
    if bias is not None:
        y.add_(bias.to(ct)[None, :, None])
    if act == "silu":
        y = F.silu(y, inplace=True)
    return y.reshape(x.shape).to(x.dtype)


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm (same arguments, parameters and state-dict keys ``weight``/``bias``)
    plus ``act``: None or "silu", fused into the same kernel. Input (N, C, *spatial), 1 to 3
    spatial dims; output keeps its memory format. Routed through ``osp.ops.group_norm``.

    ``fixed_stats``: None (normal behaviour), or (mean, rstd), each (N, G) of any float dtype, to
    normalize with those statistics instead of the input's own, applied in fp32 (float64 for float64
    input). Set by tiled VAE inference, which normalizes every tile with statistics of the whole
    input (``osp.models.vae.tiling``). Not saved in state dicts.
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed_stats is not None:
            return group_norm_fixed_stats(x, self.num_groups, *self.fixed_stats, self.weight, self.bias, act=self.act)
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act=self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act else "")
