"""GroupNorm with a fused activation: ``act(group_norm(x))``.

Backends, in automatic order: ``triton`` (kernels/group_norm.py, CUDA; CPU only through the
interpreter when forced), ``torch`` (F.group_norm then the activation, eager). The float64
reference ``group_norm_reference`` is the ground truth the tests compare against.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ._dispatch import Backend, Op
from ._triton import triton_why_not

ACTIVATIONS = (None, "silu")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check(x, num_groups, weight, bias, eps, act) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"group_norm: x must be a tensor, got {type(x).__name__}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"group_norm: x has shape {tuple(x.shape)} (rank {x.dim()}); expected (N, C, *spatial) with 1 to 3 spatial dims"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"group_norm: x has dtype {x.dtype}; expected one of float32, float16, bfloat16, float64")
    C = x.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"group_norm: num_groups={num_groups!r}; expected a positive int")
    if C % num_groups:
        raise ValueError(f"group_norm: channels C={C} are not divisible by num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (C,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"group_norm: {name} has shape {shape}; expected ({C},) for C={C} channels")
        if p.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"group_norm: {name} has dtype {p.dtype}; expected a floating dtype")
        if p.device != x.device:
            raise ValueError(f"group_norm: {name} is on {p.device} but x is on {x.device}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"group_norm: eps={eps!r}; expected a positive float")
    if act not in ACTIVATIONS:
        raise ValueError(f"group_norm: act={act!r}; expected one of {ACTIVATIONS}")


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-6, act=None) -> torch.Tensor:
    """Ground truth in float64: returns a float64 tensor of x's shape (contiguous)."""
    N, C = x.shape[:2]
    xd = x.detach().to(torch.float64).reshape(N, num_groups, -1)
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(N, C, -1)
    if weight is not None:
        y = y * weight.detach().to(torch.float64)[None, :, None]
    if bias is not None:
        y = y + bias.detach().to(torch.float64)[None, :, None]
    if act == "silu":
        y = y * torch.sigmoid(y)
    return y.reshape(x.shape)


def _torch_run(x, num_groups, weight, bias, eps, act):
    w = weight.to(x.dtype) if weight is not None else None
    b = bias.to(x.dtype) if bias is not None else None
    y = F.group_norm(x, num_groups, w, b, eps)
    return F.silu(y) if act == "silu" else y


def _torch_why_not(x, num_groups, weight, bias, eps, act, *, forced):
    return None


def _dense(x: torch.Tensor) -> torch.Tensor:
    """x itself when dense channel-major or channel-last, else one copy that is (keeping its format)."""
    if x.is_contiguous() or x.movedim(1, -1).is_contiguous():
        return x
    x = x.clone(memory_format=torch.preserve_format)
    return x if x.movedim(1, -1).is_contiguous() else x.contiguous()


class _GroupNormAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps, act):
        from osp.kernels import group_norm as kernel

        x = _dense(x)
        y, mean, rstd = kernel.forward(x, weight, bias, num_groups, eps, act)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.num_groups, ctx.act = num_groups, act
        return y

    @staticmethod
    def backward(ctx, dy):
        from osp.kernels import group_norm as kernel

        x, weight, bias, mean, rstd = ctx.saved_tensors
        if dy.stride() != x.stride():
            dy = torch.empty_like(x).copy_(dy)
        dx, dweight, dbias = kernel.backward(
            dy, x, weight, bias, mean, rstd, ctx.num_groups, ctx.act, needs_dx=ctx.needs_input_grad[0]
        )
        return dx, dweight, dbias, None, None, None


def _triton_run(x, num_groups, weight, bias, eps, act):
    return _GroupNormAct.apply(x, weight, bias, num_groups, float(eps), act)


def _triton_why_not(x, num_groups, weight, bias, eps, act, *, forced):
    if x.dtype == torch.float64:
        return "float64 is computed in fp32 by the kernel; the torch backend keeps float64"
    if x.numel() == 0:
        return "empty tensor"
    return triton_why_not(x, forced=forced)


GROUP_NORM = Op(
    "group_norm",
    [
        Backend("triton", _triton_run, _triton_why_not),
        Backend("torch", _torch_run, _torch_why_not),
    ],
    probe=lambda device, dtype: ((torch.randn(1, 64, 5, 8, 8, device=device, dtype=dtype), 32, None, None, 1e-6, "silu"), {}),
)


def group_norm(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
               bias: Optional[torch.Tensor] = None, eps: float = 1e-6, *, act: Optional[str] = None,
               backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm followed by an optional activation, fused.

    Args:
        x: (N, C, *spatial) with 1 to 3 spatial dims; a video is (N, C, T, H, W). Contiguous or
            channels_last(_3d); other strided views are copied once. float32, float16, bfloat16
            (statistics always in fp32) or float64 (torch backend).
        num_groups: G, dividing C. Statistics are per (sample, group) over C/G x spatial elements.
        weight, bias: optional (C,) affine parameters.
        eps: added to the variance.
        act: None or "silu" (x * sigmoid(x)), applied after the affine.
        backend: force "triton" or "torch"; None chooses (see osp.ops.use_backend, OSP_BACKEND).

    Returns:
        act(group_norm(x)) with x's shape, dtype and memory format. Differentiable in x, weight, bias.
    """
    _check(x, num_groups, weight, bias, eps, act)
    return GROUP_NORM.dispatch((x, num_groups, weight, bias, eps, act), {}, backend)
