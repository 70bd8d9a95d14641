"""Multi-head scaled dot-product attention with an optional key padding mask.

``attention(q, k, v, key_padding_mask=None, scale=None)`` computes, per batch b and head h,
``softmax(q k^T * scale + bias) v`` where bias is 0 for attended keys and -inf for padded ones.
It serves the three attentions of a Latte-style video transformer: spatial self-attention over a
frame's h*w tokens, temporal self-attention over 5 to 17 frames with a batch of B*H*W sequences,
and cross-attention to at most 300 caption tokens under a key padding mask.

Fully masked rows: a batch whose key_padding_mask is all False attends to nothing. Its output rows
are defined as exact zeros (not NaN, and not the mean of all values), and the gradients flowing
through those rows are zero: q's rows get zero gradient and that batch's k and v receive nothing.
Every backend and the float64 reference follow this rule.

Backends, in automatic order (the first one with no reason not to run wins):

- ``flash_attn`` (when the flash-attn package imports; CUDA, fp16/bf16, head dim <= 256 and a
  multiple of 8): FlashAttention-2's hand-tuned CUDA kernels, first because where both run they are
  expected to beat a Triton kernel. A key padding mask is applied by unpadding the keys
  (flash_attn_varlen_func), so padded caption tokens cost nothing.
- ``triton`` (kernels/attention.py; CUDA, or CPU through the interpreter when forced): our flash
  attention. It reads the key padding mask in place (no materialized bias), picks tiles from the
  sequence lengths (short temporal sequences do not pad to 128-wide tiles), handles head dims such
  as 72 and 88 without padding them to 128, and also runs fp32. It comes before xformers and torch
  because it covers every CUDA call up to head dim 256 with one kernel tested here against the
  float64 reference, while SDPA's fast flash kernel rejects masks and falls back to slower ones.
- ``xformers`` (when xformers imports; CUDA): memory_efficient_attention with an additive bias for
  masks; a fallback for what triton declines (head dims above 256, triton missing).
- ``torch``: F.scaled_dot_product_attention with a boolean mask; runs anything valid, any device
  and float64. Its flash kernel rejects masks, so masked calls run its memory-efficient or math
  kernels on an expanded mask.

bench/bench_attention.py times triton, SDPA and flash-attn on the model's shapes; that is where
this order is to be checked on a GPU.

The float64 reference ``attention_reference`` is the ground truth the tests compare against.

Dtypes follow F.scaled_dot_product_attention: q, k and v share one dtype (else ValueError); under
torch.autocast (its lower-precision list on CPU and CUDA) they are cast to the autocast dtype,
which the output has.
"""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, optional_module
from ._dispatch import Backend, Op
from ._dtypes import check_same_dtype, lower_precision
from ._triton import triton_why_not

MAX_TRITON_HEAD_DIM = 256
MAX_FLASH_HEAD_DIM = 256


def _check(q, k, v, key_padding_mask, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"attention: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(
                f"attention: {name} has shape {tuple(t.shape)} (rank {t.dim()}); expected (B, H, L, D), rank 4"
            )
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"attention: {name} has dtype {t.dtype}; expected one of float32, float16, bfloat16, float64")
    check_same_dtype("attention", "q", q, k=k, v=v)
    if k.device != q.device or v.device != q.device:
        raise ValueError(f"attention: q, k, v are on {q.device}, {k.device}, {v.device}; expected one device")
    B, H, _, D = q.shape
    if tuple(k.shape) != tuple(v.shape):
        raise ValueError(f"attention: k has shape {tuple(k.shape)} but v has {tuple(v.shape)}; expected equal shapes")
    if (k.shape[0], k.shape[1], k.shape[3]) != (B, H, D):
        raise ValueError(
            f"attention: k has shape {tuple(k.shape)}; expected ({B}, {H}, Lk, {D}) to match q's (B, H, Lq, D) = {tuple(q.shape)}"
        )
    Lk = k.shape[2]
    if Lk == 0 or D == 0:
        raise ValueError(f"attention: k has shape {tuple(k.shape)}; expected at least one key (Lk >= 1) and head dim D >= 1")
    if key_padding_mask is not None:
        m = key_padding_mask
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"attention: key_padding_mask must be a bool tensor or None, got {type(m).__name__}")
        if m.dtype != torch.bool:
            raise ValueError(f"attention: key_padding_mask has dtype {m.dtype}; expected torch.bool (True = attend)")
        if tuple(m.shape) != (B, Lk):
            raise ValueError(f"attention: key_padding_mask has shape {tuple(m.shape)}; expected (B, Lk) = ({B}, {Lk})")
        if m.device != q.device:
            raise ValueError(f"attention: key_padding_mask is on {m.device} but q is on {q.device}")
    if scale is not None and not (isinstance(scale, (int, float)) and not isinstance(scale, bool) and math.isfinite(scale)):
        raise ValueError(f"attention: scale={scale!r}; expected a finite float or None (1/sqrt(D))")


def _safe_mask(mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(mask with fully masked batches opened to every key, (B,) True where a batch has a key).

    Kernels that would divide by a zero softmax sum on an all-False row get a harmless row instead;
    the caller then zeroes those batches' outputs, which also zeroes their gradients. No host
    synchronization: the fix-up is applied unconditionally.
    """
    has_key = mask.any(dim=1)
    return mask | ~has_key[:, None], has_key


def _zero_empty(out: torch.Tensor, has_key: torch.Tensor) -> torch.Tensor:
    """out (B, H, Lq, D) with the batches that have no attended key set to exact zeros."""
    return out.masked_fill(~has_key[:, None, None, None], 0.0)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        key_padding_mask: Optional[torch.Tensor] = None,
                        scale: Optional[float] = None) -> torch.Tensor:
    """Ground truth in float64: softmax(q k^T * scale, masked keys -> -inf) v, (B, H, Lq, D) float64.

    Differentiable (q, k, v are upcast, not detached), so tests take reference gradients from it.
    Fully masked rows are zeros with zero gradients.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    q64, k64, v64 = (t.to(torch.float64) for t in (q, k, v))
    s = (q64 @ k64.transpose(-1, -2)) * scale
    if key_padding_mask is None:
        return torch.softmax(s, dim=-1) @ v64
    keep = key_padding_mask.to(q.device)[:, None, None, :]
    has_key = keep.any(dim=-1, keepdim=True)
    s = s.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0)
    p = torch.softmax(s, dim=-1).masked_fill(~has_key, 0.0)
    return p @ v64


def _scale(q: torch.Tensor, scale: Optional[float]) -> float:
    return 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)


# --- torch ---------------------------------------------------------------------------------------

def _torch_run(q, k, v, key_padding_mask, scale):
    scale = _scale(q, scale)
    if key_padding_mask is None:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.device.type == "cpu" and not torch.compiler.is_compiling() and bool(key_padding_mask.any(dim=1).all()):
        # On CPU asking the host costs nothing: with no fully masked batch the mask goes to SDPA as is,
        # without the fix-up's passes over the output.
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_padding_mask[:, None, None, :], scale=scale)
    keep, has_key = _safe_mask(key_padding_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], scale=scale)
    return _zero_empty(out, has_key)


def _torch_why_not(q, k, v, key_padding_mask, scale, *, forced):
    return None


# --- triton --------------------------------------------------------------------------------------

class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_padding_mask, scale):
        from osp.kernels import attention as kernel

        o, lse = kernel.forward(q, k, v, key_padding_mask, scale)
        ctx.save_for_backward(q, k, v, o, lse, key_padding_mask)
        ctx.scale = scale
        return o

    @staticmethod
    def backward(ctx, do):
        from osp.kernels import attention as kernel

        q, k, v, o, lse, key_padding_mask = ctx.saved_tensors
        needs_dq = ctx.needs_input_grad[0]
        needs_dkdv = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        dq, dk, dv = kernel.backward(do, q, k, v, o, lse, key_padding_mask, ctx.scale,
                                     needs_dq=needs_dq, needs_dkdv=needs_dkdv)
        return dq, dk, dv, None, None


def _triton_run(q, k, v, key_padding_mask, scale):
    return _TritonAttention.apply(q, k, v, key_padding_mask, _scale(q, scale))


def _triton_why_not(q, k, v, key_padding_mask, scale, *, forced):
    if q.dtype == torch.float64:
        return "float64 is computed in fp32 by the kernel; the torch backend keeps float64"
    if q.shape[-1] > MAX_TRITON_HEAD_DIM:
        return f"head dim {q.shape[-1]} > {MAX_TRITON_HEAD_DIM} (the kernel keeps a row block of q in registers)"
    if q.numel() == 0:
        return "empty tensor"
    return triton_why_not(q, forced=forced)


# --- flash_attn ----------------------------------------------------------------------------------

def _flash_attn():
    return optional_module("flash_attn", "flash-attn", "flash-attn")


def flash_varlen_inputs(q, k, v, key_padding_mask):
    """flash_attn_varlen_func's inputs for a key padding mask.

    Returns (q_flat (B*Lq, H, D), k_unpad (nnz, H, D), v_unpad (nnz, H, D), cu_seqlens_q,
    cu_seqlens_k (B+1,) int32, max_seqlen_q, max_seqlen_k, has_key (B,)): every query row is kept,
    keys are gathered where the mask is True. A fully masked batch keeps all its keys (its output is
    zeroed afterwards); max_seqlen_k is the padded length Lk, an upper bound that needs no host sync.
    """
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    keep, has_key = _safe_mask(key_padding_mask)
    q_flat = q.transpose(1, 2).reshape(B * Lq, H, D)
    k_unpad = k.transpose(1, 2)[keep]
    v_unpad = v.transpose(1, 2)[keep]
    cu_q = torch.arange(0, (B + 1) * Lq, Lq, device=q.device, dtype=torch.int32)
    cu_k = F.pad(keep.sum(dim=1, dtype=torch.int32).cumsum(0, dtype=torch.int32), (1, 0))
    return q_flat, k_unpad, v_unpad, cu_q, cu_k, Lq, Lk, has_key


def _flash_run(q, k, v, key_padding_mask, scale, *, module=None):
    fa = module if module is not None else _flash_attn()[0]
    scale = _scale(q, scale)
    B, H, Lq, D = q.shape
    if key_padding_mask is None:
        out = fa.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale=scale)
        return out.transpose(1, 2)
    q_flat, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, has_key = flash_varlen_inputs(q, k, v, key_padding_mask)
    out = fa.flash_attn_varlen_func(q_flat, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, softmax_scale=scale)
    return _zero_empty(out.view(B, Lq, H, D).transpose(1, 2), has_key)


def _flash_why_not(q, k, v, key_padding_mask, scale, *, forced):
    _, missing = _flash_attn()
    if missing:
        return missing
    if q.device.type != "cuda":
        return f"tensor is on {q.device.type}; flash-attn runs on CUDA only"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"dtype {q.dtype}; flash-attn takes float16 or bfloat16 only"
    D = q.shape[-1]
    if D > MAX_FLASH_HEAD_DIM or D % 8:
        return f"head dim {D}; flash-attn takes a multiple of 8 up to {MAX_FLASH_HEAD_DIM}"
    if q.numel() == 0:
        return "empty tensor"
    return None


# --- xformers ------------------------------------------------------------------------------------

def _xformers():
    return optional_module("xformers.ops", "xformers", "xformers")


def xformers_bias(key_padding_mask: torch.Tensor, H: int, Lq: int, dtype: torch.dtype) -> torch.Tensor:
    """An additive attn_bias (B, H, Lq, Lk) in ``dtype`` for memory_efficient_attention: 0 to attend,
    -inf for padded keys; fully masked batches get an all-zero row (their output is zeroed after).

    It is a stride-0 expansion of one (B, Lk) row per batch, cut from storage whose last dim is
    padded to a multiple of 8 elements (xformers asks for 16-byte aligned bias rows).
    """
    keep, _ = _safe_mask(key_padding_mask)
    B, Lk = keep.shape
    store = torch.zeros((B, 1, 1, (Lk + 7) // 8 * 8), device=keep.device, dtype=dtype)
    bias = store[..., :Lk]
    bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
    return bias.expand(B, H, Lq, Lk)


def _xformers_run(q, k, v, key_padding_mask, scale, *, module=None):
    xops = module if module is not None else _xformers()[0]
    scale = _scale(q, scale)
    _, H, Lq, _ = q.shape
    bias = None if key_padding_mask is None else xformers_bias(key_padding_mask, H, Lq, q.dtype)
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=bias, scale=scale).transpose(1, 2)
    return out if key_padding_mask is None else _zero_empty(out, key_padding_mask.any(dim=1))


def _xformers_why_not(q, k, v, key_padding_mask, scale, *, forced):
    _, missing = _xformers()
    if missing:
        return missing
    if q.device.type != "cuda":
        return f"tensor is on {q.device.type}; xformers' memory_efficient_attention is used on CUDA only"
    if q.dtype == torch.float64:
        return "float64 is not supported by xformers; the torch backend keeps float64"
    if q.numel() == 0:
        return "empty tensor"
    return None


def _probe(device, dtype):
    """A small cross-attention call: 16 heads x 72 dims, 64 queries, 40 caption keys, some padded."""
    q = torch.randn(2, 16, 64, 72, device=device, dtype=dtype)
    k = torch.randn(2, 16, 40, 72, device=device, dtype=dtype)
    mask = torch.arange(40, device=device)[None, :] < torch.tensor([[40], [13]], device=device)
    return (q, k, torch.randn_like(k), mask, None), {}


ATTENTION = Op(
    "attention",
    [
        Backend("flash_attn", _flash_run, _flash_why_not),
        Backend("triton", _triton_run, _triton_why_not),
        Backend("xformers", _xformers_run, _xformers_why_not),
        Backend("torch", _torch_run, _torch_why_not),
    ],
    probe=_probe,
    autocast=lower_precision,
)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
              key_padding_mask: Optional[torch.Tensor] = None, scale: Optional[float] = None,
              backend: Optional[str] = None) -> torch.Tensor:
    """Scaled dot-product attention over heads: softmax(q k^T * scale + mask) v.

    Args:
        q: (B, H, Lq, D) queries. Any strides (a slice of a packed qkv projection is fine).
        k, v: (B, H, Lk, D) keys and values, Lk >= 1, same dtype and device as q.
            float32, float16, bfloat16 (softmax statistics and accumulation in fp32) or float64
            (torch backend). Under torch.autocast q, k, v are cast to the autocast dtype.
        key_padding_mask: optional (B, Lk) bool, True = attend to this key, False = padding.
            A batch whose row is all False attends to nothing: its output rows are zeros and the
            gradients through them are zero (not NaN).
        scale: multiplies q k^T; default 1/sqrt(D).
        backend: force "flash_attn", "triton", "xformers" or "torch"; None chooses (see the module
            docstring, osp.ops.use_backend, OSP_BACKEND).

    Returns:
        (B, H, Lq, D) in q's dtype, the autocast dtype under autocast (its strides depend on the
        backend). Differentiable in q, k, v.
    """
    q, k, v = ATTENTION.autocast(q, k, v)
    _check(q, k, v, key_padding_mask, scale)
    return ATTENTION.dispatch((q, k, v, key_padding_mask, scale), {}, backend)
