"""GroupNorm with a fused activation: ``act(group_norm(x))``, and the same with given statistics.

``group_norm``: backends, in automatic order: ``triton`` (kernels/group_norm.py, CUDA; CPU only
through the interpreter when forced), ``ext`` (the compiled ``osp_C::group_norm_act``: CPU, fp32,
fp16 and bf16, forward and backward in one pass each; see osp.ops._ext), ``torch`` (F.group_norm
then the activation, eager). ``group_norm_`` is the in-place form for inference (``ext``, else
the out-of-place op copied back); ``group_norm_in_place_why_not`` says whether a call would really
run without a second buffer, so that modules (osp.nn.GroupNorm) take the in-place form only then.
``group_norm_fixed_stats`` normalizes with statistics passed in instead of the input's own (tiled
VAE inference normalizes every tile with the statistics of the whole video); one backend,
``torch`` (elementwise in fp32). The float64 references ``group_norm_reference`` and
``group_norm_fixed_stats_reference`` are the ground truth the tests compare against.

Dtypes follow F.group_norm: weight and bias have x's dtype, or float32 next to a float16/bfloat16
x; the output has x's dtype and statistics are fp32. Under CUDA autocast (torch's float32 list)
the inputs are cast to float32 and so is the output; CPU autocast leaves group_norm alone.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._utils import ACTIVATIONS, FLOAT_DTYPES, records_grad
from . import _ext
from ._dispatch import Backend, BackendUnavailable, Op
from ._dtypes import check_param_dtype, float32_except_cpu
from ._triton import triton_why_not


def _check(x, num_groups, weight, bias, act, fn="group_norm") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{fn}: x must be a tensor, got {type(x).__name__}")
    if not 3 <= x.dim() <= 5:
        raise ValueError(
            f"{fn}: x has shape {tuple(x.shape)} (rank {x.dim()}); expected (N, C, *spatial) with 1 to 3 spatial dims"
        )
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: x has dtype {x.dtype}; expected one of float32, float16, bfloat16, float64")
    C = x.shape[1]
    if not isinstance(num_groups, int) or isinstance(num_groups, bool) or num_groups <= 0:
        raise ValueError(f"{fn}: num_groups={num_groups!r}; expected a positive int")
    if C % num_groups:
        raise ValueError(f"{fn}: channels C={C} are not divisible by num_groups={num_groups}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, torch.Tensor) or tuple(p.shape) != (C,):
            shape = tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__
            raise ValueError(f"{fn}: {name} has shape {shape}; expected ({C},) for C={C} channels")
        if p.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{fn}: {name} has dtype {p.dtype}; expected a floating dtype")
        if p.device != x.device:
            raise ValueError(f"{fn}: {name} is on {p.device} but x is on {x.device}")
    check_param_dtype(fn, x, weight=weight, bias=bias)
    if act not in ACTIVATIONS:
        raise ValueError(f"{fn}: act={act!r}; expected one of {ACTIVATIONS}")


def _check_eps(eps) -> None:
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"group_norm: eps={eps!r}; expected a positive float")


def _check_stats(x, num_groups, mean, rstd) -> None:
    expected = (x.shape[0], num_groups)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != expected:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"group_norm_fixed_stats: {name} has shape {shape}; expected (N, G) = {expected} "
                             f"for x {tuple(x.shape)} and num_groups={num_groups}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"group_norm_fixed_stats: {name} has dtype {t.dtype}; expected a floating dtype")
        if t.device != x.device:
            raise ValueError(f"group_norm_fixed_stats: {name} is on {t.device} but x is on {x.device}")


def group_norm_reference(x, num_groups, weight=None, bias=None, eps=1e-6, act=None) -> torch.Tensor:
    """Ground truth in float64: returns a float64 tensor of x's shape (contiguous)."""
    xd = x.detach().to(torch.float64).reshape(x.shape[0], num_groups, -1)
    mean = xd.mean(-1)
    var = ((xd - mean[:, :, None]) ** 2).mean(-1)
    return group_norm_fixed_stats_reference(x, num_groups, mean, torch.rsqrt(var + eps), weight, bias, act)


def _torch_run(x, num_groups, weight, bias, eps, act):
    if x.device.type != "cpu":  # F.group_norm's CPU kernel takes fp32 parameters next to a 16-bit x;
        # the CUDA one reads them in x's dtype.
        weight = weight.to(x.dtype) if weight is not None else None
        bias = bias.to(x.dtype) if bias is not None else None
    y = F.group_norm(x, num_groups, weight, bias, eps)
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


def _ext_run(x, num_groups, weight, bias, eps, act):
    return torch.ops.osp_C.group_norm_act(_dense(x), weight, bias, num_groups, float(eps), act == "silu")[0]


def _ext_why_not(x, num_groups, weight, bias, eps, act, *, forced):
    reason = _ext.why_not("group_norm_act", x.device.type)
    if reason is not None:
        return reason
    if x.dtype == torch.float64:
        return "float64 is not compiled in (fp32/fp16/bf16 only); the torch backend keeps float64"
    if x.numel() == 0:
        return "empty tensor"
    if x.device.type == "cuda" and x.shape[0] * max(num_groups, x.shape[1]) > 65535:
        return f"N*C={x.shape[0] * x.shape[1]} exceeds the CUDA kernels' grid dimension (65535)"
    return None


GROUP_NORM = Op(
    "group_norm",
    [
        Backend("triton", _triton_run, _triton_why_not),
        Backend("ext", _ext_run, _ext_why_not),
        Backend("torch", _torch_run, _torch_why_not),
    ],
    probe=lambda device, dtype: ((torch.randn(1, 64, 5, 8, 8, device=device, dtype=dtype), 32, None, None, 1e-6, "silu"), {}),
    autocast=float32_except_cpu,
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
        weight, bias: optional (C,) affine parameters in x's dtype, or float32 next to a float16 or
            bfloat16 x (as F.group_norm).
        eps: added to the variance.
        act: None or "silu" (x * sigmoid(x)), applied after the affine.
        backend: force "triton", "ext" or "torch"; None chooses (see osp.ops.use_backend, OSP_BACKEND).

    Returns:
        act(group_norm(x)) with x's shape, dtype and memory format; float32 under CUDA autocast
        (torch's float32 list), x's dtype under CPU autocast. Differentiable in x, weight, bias.
    """
    x, weight, bias = GROUP_NORM.autocast(x, weight, bias)
    _check(x, num_groups, weight, bias, act)
    _check_eps(eps)
    return GROUP_NORM.dispatch((x, num_groups, weight, bias, eps, act), {}, backend)


def _inplace_ext_run(x, num_groups, weight, bias, eps, act):
    torch.ops.osp_C.group_norm_act_(x, weight, bias, num_groups, float(eps), act == "silu")
    return x


def _inplace_ext_why_not(x, num_groups, weight, bias, eps, act, *, forced):
    reason = _ext_why_not(x, num_groups, weight, bias, eps, act, forced=forced)
    if reason is None and not (x.is_contiguous() or x.movedim(1, -1).is_contiguous()):
        return "x is neither contiguous nor dense channels-last (the kernel writes it in place)"
    return reason


def _inplace_torch_run(x, num_groups, weight, bias, eps, act):
    return x.copy_(_torch_run(x, num_groups, weight, bias, eps, act))


def _inplace_forced(backend: Optional[str]) -> Optional[str]:
    """The backend asked for by ``backend=`` (only "ext" or "torch"), else by ``use_backend`` /
    OSP_BACKEND for group_norm (any of its backends), else None."""
    if backend not in (None, "ext", "torch"):
        raise ValueError(f"osp.ops.group_norm_: unknown backend {backend!r}; expected one of ('ext', 'torch')")
    return backend if backend is not None else GROUP_NORM._forced(None)


def group_norm_in_place_why_not(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                                bias: Optional[torch.Tensor] = None, eps: float = 1e-6, *,
                                act: Optional[str] = None, backend: Optional[str] = None) -> Optional[str]:
    """Why ``group_norm_`` would not write this call into x without a second buffer (the compiled
    in-place op), or None when it would. A forced backend (``backend=``, ``use_backend``,
    OSP_BACKEND) other than ``ext`` is a reason. Inference code asks this before taking the
    in-place form, which otherwise costs a copy and saves nothing."""
    forced = _inplace_forced(backend)
    if forced not in (None, "ext"):
        return f"group_norm's backend {forced!r} is forced (only 'ext' runs in place)"
    return _inplace_ext_why_not(x, num_groups, weight, bias, eps, act, forced=forced == "ext")


def group_norm_(x: torch.Tensor, num_groups: int, weight: Optional[torch.Tensor] = None,
                bias: Optional[torch.Tensor] = None, eps: float = 1e-6, *, act: Optional[str] = None,
                backend: Optional[str] = None) -> torch.Tensor:
    """``group_norm`` written into x, for inference when the caller owns x (no second video-sized
    buffer). Same arguments and dtype rule as ``group_norm`` (no autocast cast: x is written in its
    own dtype). Not differentiable: call it under torch.no_grad() or on a tensor that needs no grad.
    Backends (``backend=``; not in the registry, since nothing else routes in-place calls): ``ext``
    (the compiled in-place op, dense x on CPU), ``torch`` (out of place, copied back); None takes
    ``ext`` when it can run the call, else ``group_norm``'s own choice copied back. A backend forced
    for group_norm by ``use_backend`` or OSP_BACKEND applies here too (copied back unless ``ext``).

    Returns:
        x, holding act(group_norm(x)).
    """
    _check(x, num_groups, weight, bias, act, fn="group_norm_")
    _check_eps(eps)
    if records_grad(x, weight, bias):
        raise ValueError("group_norm_: writes x in place and records no gradient; call it under torch.no_grad() "
                         "or use group_norm")
    forced = _inplace_forced(backend)
    if forced in (None, "ext"):
        reason = _inplace_ext_why_not(x, num_groups, weight, bias, eps, act, forced=forced == "ext")
        if forced == "ext" and reason is not None:
            raise BackendUnavailable(f"osp.ops.group_norm_: backend 'ext' was forced but cannot run this call: {reason}")
        if reason is None:
            return _inplace_ext_run(x, num_groups, weight, bias, eps, act)
    if forced == "torch":
        return _inplace_torch_run(x, num_groups, weight, bias, eps, act)
    return x.copy_(GROUP_NORM.dispatch((x, num_groups, weight, bias, eps, act), {}, forced))


# ----------------------------------------------------------------------------- fixed statistics

def group_norm_fixed_stats_reference(x, num_groups, mean, rstd, weight=None, bias=None, act=None) -> torch.Tensor:
    """Ground truth in float64: act((x - mean) * rstd * weight + bias), float64 of x's shape (contiguous)."""
    N, C = x.shape[:2]
    xd = x.detach().to(torch.float64).reshape(N, num_groups, -1)
    y = ((xd - mean.detach().to(torch.float64)[:, :, None]) * rstd.detach().to(torch.float64)[:, :, None]).reshape(N, C, -1)
    if weight is not None:
        y = y * weight.detach().to(torch.float64)[None, :, None]
    if bias is not None:
        y = y + bias.detach().to(torch.float64)[None, :, None]
    if act == "silu":
        y = y * torch.sigmoid(y)
    return y.reshape(x.shape)


def _fixed_torch_run(x, num_groups, mean, rstd, weight, bias, act):
    # Per-(sample, channel) scale and shift broadcast over the spatial dims: the elementwise ops
    # keep x's memory format. fp32 arithmetic (float64 for float64 x), as the kernels would.
    N, C = x.shape[:2]
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    per_channel = (N, C) + (1,) * (x.dim() - 2)
    scale = rstd.to(ct).repeat_interleave(C // num_groups, dim=1)
    if weight is not None:
        scale = scale * weight.to(ct)
    y = (x.to(ct) - mean.to(ct).repeat_interleave(C // num_groups, dim=1).view(per_channel)) * scale.view(per_channel)
    if bias is not None:
        y = y + bias.to(ct).view(per_channel[1:])
    if act == "silu":
        y = F.silu(y, inplace=not y.requires_grad)  # in place when nothing is recorded (tiled inference)
    return y.to(x.dtype)


GROUP_NORM_FIXED_STATS = Op(
    "group_norm_fixed_stats",
    [Backend("torch", _fixed_torch_run, lambda *a, forced: None)],
    probe=lambda device, dtype: ((torch.randn(1, 64, 5, 8, 8, device=device, dtype=dtype), 32,
                                  torch.randn(1, 32, device=device), torch.rand(1, 32, device=device) + 0.5,
                                  None, None, "silu"), {}),
    group="group_norm",
    autocast=float32_except_cpu,
)


def group_norm_fixed_stats(x: torch.Tensor, num_groups: int, mean: torch.Tensor, rstd: torch.Tensor,
                           weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, *,
                           act: Optional[str] = None, backend: Optional[str] = None) -> torch.Tensor:
    """GroupNorm with given statistics: act((x - mean) * rstd * weight + bias).

    Args:
        x: (N, C, *spatial) with 1 to 3 spatial dims, any memory format; float32, float16, bfloat16
            or float64.
        num_groups: G, dividing C.
        mean, rstd: (N, G) per (sample, group) mean and 1/std, any floating dtype (applied in fp32,
            float64 for a float64 x), on x's device.
        weight, bias: optional (C,), x's dtype or float32 next to a float16/bfloat16 x (as group_norm).
        act: None or "silu".
        backend: force "torch" (the only backend); None chooses.

    Returns:
        x's shape, dtype and memory format (channels_last_3d in, channels_last_3d out); float32 under
        CUDA autocast, as group_norm. Differentiable in x, mean, rstd, weight and bias.
    """
    x, mean, rstd, weight, bias = GROUP_NORM_FIXED_STATS.autocast(x, mean, rstd, weight, bias)
    _check(x, num_groups, weight, bias, act, fn="group_norm_fixed_stats")
    _check_stats(x, num_groups, mean, rstd)
    return GROUP_NORM_FIXED_STATS.dispatch((x, num_groups, mean, rstd, weight, bias, act), {}, backend)
