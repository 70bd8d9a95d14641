"""The adaLN-single pieces of a video DiT block, fused.

``layer_norm_modulate(x, shift, scale)`` = LayerNorm(x, no affine) * (1 + scale) + shift and
``gated_residual(x, gate, y)`` = x + gate * y, with x, y of shape (B, L, D) and the modulation
tensors one D-vector per batch entry ((B, D), (B, 1, D)) or one for all ((D,), (1, D), (1, 1, D)).
Backends: ``triton`` (kernels/modulation.py), ``ext`` (the compiled ``osp_C::layer_norm_modulate``
and ``osp_C::gated_residual``, CPU; gated_residual's only when x, gate and y share one dtype, and
chosen automatically only with grad mode on: forward alone, torch.addcmul is faster),
``torch`` (F.layer_norm / torch.addcmul, eager).
Both ops form the dispatch group ``modulation`` (``OSP_BACKEND=modulation=torch``).

Dtypes: layer_norm_modulate follows F.layer_norm (shift and scale in x's dtype, or float32 next to
a float16/bfloat16 x; output in x's dtype, statistics fp32; float32 under CUDA autocast, untouched
by CPU autocast). gated_residual follows ``x + gate * y``: the output dtype is the promotion of
the three inputs' dtypes, and autocast does not touch it.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, records_grad
from . import _ext
from ._dispatch import Backend, Op
from ._dtypes import check_param_dtype, float32_except_cpu
from ._triton import triton_why_not


def _check_x(fn: str, name: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{fn}: {name} has shape {shape}; expected (B, L, D)")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: {name} has dtype {x.dtype}; expected float32, float16, bfloat16 or float64")


def _check_mod(fn: str, name: str, m, x: torch.Tensor) -> None:
    B, _, D = x.shape
    if not isinstance(m, torch.Tensor):
        raise ValueError(f"{fn}: {name} must be a tensor, got {type(m).__name__}")
    rows = m.shape[0] if m.dim() >= 2 else 1
    ok = (m.dim() in (1, 2, 3) and m.shape[-1] == D and rows in (1, B)
          and (m.dim() != 3 or m.shape[1] == 1))
    if not ok:
        raise ValueError(f"{fn}: {name} has shape {tuple(m.shape)}; expected ({B}, {D}), ({B}, 1, {D}) "
                         f"or one row for all: ({D},), (1, {D}), (1, 1, {D})")
    if m.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{fn}: {name} has dtype {m.dtype}; expected a floating dtype")
    if m.device != x.device:
        raise ValueError(f"{fn}: {name} is on {m.device} but x is on {x.device}")


def _rows(m: torch.Tensor) -> torch.Tensor:
    """A modulation tensor as a contiguous (Bm, D) matrix."""
    return m.reshape(-1, m.shape[-1]).contiguous()


def _as3(m: torch.Tensor) -> torch.Tensor:
    """A modulation tensor as (Bm, 1, D) for broadcasting against (B, L, D)."""
    return m.reshape(-1, 1, m.shape[-1])


# ----------------------------------------------------------------------------- layer_norm_modulate

def layer_norm_modulate_reference(x, shift, scale, eps=1e-6) -> torch.Tensor:
    """Ground truth in float64."""
    xd = x.detach().double()
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    xhat = (xd - mean) / torch.sqrt(var + eps)
    return xhat * (1 + _as3(scale.detach().double())) + _as3(shift.detach().double())


def _lnm_torch(x, shift, scale, eps):
    # Modulation tensors in another dtype (fp32 next to bf16 tokens) must not promote the result.
    shift, scale = _as3(shift).to(x.dtype), _as3(scale).to(x.dtype)
    return torch.addcmul(shift, F.layer_norm(x, (x.shape[-1],), eps=eps), 1 + scale)


def _reduce_like(g: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A (B, D) fp32 per-entry gradient summed to the broadcast shape of ``like``."""
    if like.numel() == g.shape[-1] and g.shape[0] != 1:
        g = g.sum(0, keepdim=True)
    return g.reshape(like.shape).to(like.dtype)


class _LayerNormModulate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        from osp.kernels import modulation as k

        x3 = x if x.stride(-1) == 1 else x.contiguous()
        y, mean, rstd = k.layer_norm_modulate_forward(x3, _rows(shift), _rows(scale), eps)
        ctx.save_for_backward(x3, shift, scale, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        from osp.kernels import modulation as k

        x, shift, scale, mean, rstd = ctx.saved_tensors
        dx, dshift, dscale = k.layer_norm_modulate_backward(dy.contiguous(), x, _rows(scale), mean, rstd)
        return dx, _reduce_like(dshift, shift), _reduce_like(dscale, scale), None


def _triton_why_not(x, *rest, forced):
    if x.dtype == torch.float64:
        return "float64 is computed in fp32 by the kernel; the torch backend keeps float64"
    if x.numel() == 0:
        return "empty tensor"
    if x.shape[-1] > 16384:
        return f"D={x.shape[-1]} > 16384 does not fit one row in registers"
    return triton_why_not(x, forced=forced)


class _LayerNormModulateExt(torch.autograd.Function):
    """The ext op in eager mode: its kernels called below the Autograd key (osp.ops._ext.below_autograd)."""

    @staticmethod
    def forward(ctx, x, shift, scale, eps):
        with _ext.below_autograd():
            y, mean, rstd = torch.ops.osp_C.layer_norm_modulate(x, shift, scale, eps)
        ctx.save_for_backward(x, scale, mean, rstd)
        ctx.shift_rows, ctx.shift_dtype = shift.shape[0], shift.dtype
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        saved = ctx.saved_tensors  # outside below_autograd: unpacking may run a checkpoint's recomputation
        with _ext.below_autograd():
            return _ext.layer_norm_modulate_grads(dy, *saved, ctx.shift_rows, ctx.shift_dtype) + (None,)


def _lnm_ext_run(x, shift, scale, eps):
    x = x if x.is_contiguous() else x.contiguous()
    if torch.compiler.is_compiling():  # the registered op, with its torch.library autograd and fake kernels
        return torch.ops.osp_C.layer_norm_modulate(x, _rows(shift), _rows(scale), float(eps))[0]
    if not records_grad(x, shift, scale):  # inference: the kernel alone
        with _ext.below_autograd():
            return torch.ops.osp_C.layer_norm_modulate(x, _rows(shift), _rows(scale), float(eps))[0]
    return _LayerNormModulateExt.apply(x, _rows(shift), _rows(scale), float(eps))


def _lnm_ext_why_not(x, shift, scale, eps, *, forced):
    reason = _ext.why_not("layer_norm_modulate", x.device.type)
    if reason is None and x.dtype == torch.float64:
        reason = "float64 is not compiled in (fp32/fp16/bf16 only); the torch backend keeps float64"
    if reason is None and x.numel() == 0:
        reason = "empty tensor"
    return reason


LAYER_NORM_MODULATE = Op(
    "layer_norm_modulate",
    [
        Backend("triton", lambda x, shift, scale, eps: _LayerNormModulate.apply(x, shift, scale, float(eps)),
                _triton_why_not),
        Backend("ext", _lnm_ext_run, _lnm_ext_why_not),
        Backend("torch", _lnm_torch, lambda *a, forced: None),
    ],
    probe=lambda device, dtype: ((torch.randn(2, 16, 72, device=device, dtype=dtype),
                                  torch.randn(2, 72, device=device, dtype=dtype),
                                  torch.randn(2, 72, device=device, dtype=dtype), 1e-6), {}),
    group="modulation",
    autocast=float32_except_cpu,
)


def layer_norm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6, *,
                        backend: Optional[str] = None) -> torch.Tensor:
    """LayerNorm over the last dim without affine, then the adaLN modulation.

    Args:
        x: (B, L, D) tokens (rows must be contiguous in D; other layouts are copied once).
        shift, scale: (B, D) or (B, 1, D) per batch entry, or (D,), (1, D), (1, 1, D) for all; x's
            dtype, or float32 next to a float16/bfloat16 x (as F.layer_norm's weight and bias).
        eps: added to the variance (1e-6 in Latte / PixArt).
        backend: force "triton", "ext" or "torch".

    Returns:
        (B, L, D) contiguous, x's dtype (float32 under CUDA autocast, as F.layer_norm):
        (x - mean) / sqrt(var + eps) * (1 + scale) + shift. Differentiable in x, shift and scale.
    """
    fn = "layer_norm_modulate"
    x, shift, scale = LAYER_NORM_MODULATE.autocast(x, shift, scale)
    _check_x(fn, "x", x)
    _check_mod(fn, "shift", shift, x)
    _check_mod(fn, "scale", scale, x)
    check_param_dtype(fn, x, shift=shift, scale=scale)
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"{fn}: eps={eps!r}; expected a positive float")
    return LAYER_NORM_MODULATE.dispatch((x, shift, scale, eps), {}, backend)


# ----------------------------------------------------------------------------- gated_residual

def gated_residual_reference(x, gate, y) -> torch.Tensor:
    """Ground truth in float64."""
    return x.detach().double() + _as3(gate.detach().double()) * y.detach().double()


class _GatedResidual(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, gate, y):
        from osp.kernels import modulation as k

        x3 = x if x.stride(-1) == 1 else x.contiguous()
        y3 = y if y.stride(-1) == 1 else y.contiguous()
        ctx.save_for_backward(gate, y3)
        return k.gated_residual_forward(x3, _rows(gate), y3)

    @staticmethod
    def backward(ctx, dout):
        from osp.kernels import modulation as k

        gate, y = ctx.saved_tensors
        dy, dgate = k.gated_residual_backward(dout.contiguous(), _rows(gate), y)
        return dout, _reduce_like(dgate, gate), dy


class _GatedResidualExt(torch.autograd.Function):
    """The ext op in eager mode: its kernels called below the Autograd key (osp.ops._ext.below_autograd)."""

    @staticmethod
    def forward(ctx, x, gate, y):
        with _ext.below_autograd():
            out = torch.ops.osp_C.gated_residual(x, gate, y)
        ctx.save_for_backward(gate, y)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        saved = ctx.saved_tensors  # outside below_autograd: unpacking may run a checkpoint's recomputation
        with _ext.below_autograd():
            return _ext.gated_residual_grads(dout, *saved)


def _gated_ext_run(x, gate, y):
    x = x if x.is_contiguous() else x.contiguous()
    y = y if y.is_contiguous() else y.contiguous()
    if torch.compiler.is_compiling():
        return torch.ops.osp_C.gated_residual(x, _rows(gate), y)
    if not records_grad(x, gate, y):
        with _ext.below_autograd():
            return torch.ops.osp_C.gated_residual(x, _rows(gate), y)
    return _GatedResidualExt.apply(x, _rows(gate), y)


def _gated_ext_why_not(x, gate, y, *, forced):
    reason = _ext.why_not("gated_residual", x.device.type)
    if reason is None and not (x.dtype == gate.dtype == y.dtype and x.dtype != torch.float64):
        reason = (f"x {x.dtype}, gate {gate.dtype}, y {y.dtype}: the kernel takes one dtype, float32, float16 "
                  "or bfloat16 (the torch backend promotes)")
    if reason is None and x.numel() == 0:
        reason = "empty tensor"
    if reason is None and not forced and x.device.type == "cpu" and not torch.is_grad_enabled():
        # bench_modulation (2-core CPU, fp32): forward alone, torch.addcmul runs 1.1-1.6x faster than
        # the ext kernel; forward and backward, the ext pair is 1.05-1.3x faster. Grad mode decides,
        # not requires_grad: a checkpointed block's recomputation must choose as its forward did.
        reason = "grad mode is off (forward only) on CPU, where torch.addcmul measured faster; force backend='ext' to use it"
    return reason


GATED_RESIDUAL = Op(
    "gated_residual",
    [
        Backend("triton", _GatedResidual.apply, _triton_why_not),
        Backend("ext", _gated_ext_run, _gated_ext_why_not),
        Backend("torch", lambda x, gate, y: torch.addcmul(x, _as3(gate), y), lambda *a, forced: None),
    ],
    probe=lambda device, dtype: ((torch.randn(2, 16, 72, device=device, dtype=dtype),
                                  torch.randn(2, 72, device=device, dtype=dtype),
                                  torch.randn(2, 16, 72, device=device, dtype=dtype)), {}),
    group="modulation",
)


def gated_residual(x: torch.Tensor, gate: torch.Tensor, y: torch.Tensor, *,
                   backend: Optional[str] = None) -> torch.Tensor:
    """The gated residual add of an adaLN block: x + gate * y.

    Args:
        x, y: (B, L, D), same shape and device.
        gate: (B, D) or (B, 1, D) per batch entry, or (D,), (1, D), (1, 1, D) for all.
        backend: force "triton", "ext" or "torch".

    Returns:
        (B, L, D) in the promoted dtype of x, gate and y (as ``x + gate * y``; autocast does not
        change it), differentiable in x, gate and y.
    """
    fn = "gated_residual"
    _check_x(fn, "x", x)
    _check_x(fn, "y", y)
    if y.shape != x.shape or y.device != x.device:
        raise ValueError(f"gated_residual: y is {tuple(y.shape)} on {y.device}; "
                         f"expected x's {tuple(x.shape)} on {x.device}")
    _check_mod(fn, "gate", gate, x)
    dtype = torch.promote_types(torch.promote_types(x.dtype, gate.dtype), y.dtype)
    return GATED_RESIDUAL.dispatch((x.to(dtype), gate.to(dtype), y.to(dtype)), {}, backend)
