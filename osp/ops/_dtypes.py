"""The one dtype rule of osp.ops: every op treats dtypes as its torch counterpart does.

Outside autocast:
- ``causal_conv3d`` (F.conv3d) and ``attention`` (F.scaled_dot_product_attention) take one dtype:
  every floating input has x's (q's) dtype, else ValueError naming both.
- ``group_norm``, ``group_norm_fixed_stats`` (F.group_norm) and ``layer_norm_modulate``
  (F.layer_norm) take parameters (weight, bias; shift, scale) in x's dtype, or in float32 next to a
  float16/bfloat16 x (torch's mixed-dtype norms); the output has x's dtype, statistics are fp32.
- ``gated_residual`` (x + gate * y) promotes: the output dtype is torch.promote_types of its inputs.
- ``blend_tile_`` / ``blend_normalize_`` write in place, in out's dtype (as ``out += ...`` does).

Under ``torch.autocast`` an op casts its floating inputs (all but float64, as torch does) as torch's
autocast op lists cast its counterpart (aten/src/ATen/autocast_mode.cpp), then runs with autocast
off so that every backend sees the same dtypes:
- ``lower_precision``: conv3d and scaled_dot_product_attention are on the lower-precision list of
  CPU and CUDA: inputs go to the autocast dtype, and so does the output.
- ``float32_except_cpu``: group_norm and layer_norm are on CUDA's (and XPU's) float32 list: there
  inputs go to float32 and the output is float32; CPU autocast lists neither, so on CPU they run
  on their inputs as they come (output in x's dtype).
- no policy (gated_residual, the in-place tile blending): autocast does not touch elementwise or
  in-place ops.
"""
from __future__ import annotations

from typing import Optional

import torch

_LOW = (torch.float16, torch.bfloat16)


def lower_precision(device_type: str, autocast_dtype: torch.dtype) -> Optional[torch.dtype]:
    """Autocast policy of conv3d and scaled_dot_product_attention: the autocast dtype."""
    return autocast_dtype


def float32_except_cpu(device_type: str, autocast_dtype: torch.dtype) -> Optional[torch.dtype]:
    """Autocast policy of group_norm and layer_norm: float32, except on CPU (no cast)."""
    return None if device_type == "cpu" else torch.float32


def check_same_dtype(fn: str, x_name: str, x: torch.Tensor, **others: Optional[torch.Tensor]) -> None:
    """ValueError unless every tensor in ``others`` (None skipped) has x's dtype."""
    for name, t in others.items():
        if t is not None and t.dtype != x.dtype:
            raise ValueError(
                f"{fn}: {name} has dtype {t.dtype} but {x_name} has {x.dtype}; expected one dtype "
                "(under torch.autocast both are cast to the autocast dtype)"
            )


def check_param_dtype(fn: str, x: torch.Tensor, **params: Optional[torch.Tensor]) -> None:
    """ValueError unless each parameter (None skipped) has x's dtype, or float32 next to a
    float16/bfloat16 x: the mixed dtypes torch's norms accept."""
    for name, p in params.items():
        if p is None or p.dtype == x.dtype or (p.dtype == torch.float32 and x.dtype in _LOW):
            continue
        raise ValueError(
            f"{fn}: {name} has dtype {p.dtype} but x has {x.dtype}; expected {x.dtype}"
            + (" or torch.float32" if x.dtype in _LOW else "")
        )
