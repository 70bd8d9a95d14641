"""GroupNorm with a fused activation, a drop-in for torch.nn.GroupNorm."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .. import ops
from ..ops.group_norm import ACTIVATIONS


class GroupNorm(nn.GroupNorm):
    """torch.nn.GroupNorm (same arguments, parameters and state-dict keys ``weight``/``bias``)
    plus ``act``: None or "silu", fused into the same kernel. Input (N, C, *spatial), 1 to 3
    spatial dims; output keeps its memory format. Routed through ``osp.ops.group_norm``.
    """

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 act: Optional[str] = None, device=None, dtype=None):
        if act not in ACTIVATIONS:
            raise ValueError(f"GroupNorm: act={act!r}; expected one of {ACTIVATIONS}")
        if num_channels % num_groups:
            raise ValueError(f"GroupNorm: num_channels={num_channels} is not divisible by num_groups={num_groups}")
        super().__init__(num_groups, num_channels, eps=eps, affine=affine, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.group_norm(x, self.num_groups, self.weight, self.bias, self.eps, act=self.act)

    def extra_repr(self) -> str:
        return super().extra_repr() + (f", act={self.act!r}" if self.act else "")
