"""Causal 3-D convolution of video: the first frame is replicated in front, never zero-padded in time.

Output frame t sees input frames <= t: the input is read as if frame 0 were repeated kt-1 times
before the clip (Open-Sora-Plan's CausalConv3d), spatial borders are zero-padded, and an optional
residual (the ResNet shortcut) is added after the bias.

Streaming: ``history=`` (N, Cin, kt-1, H, W) gives the kt-1 input frames just before x (the end of
the previous chunk of a long video processed chunk by chunk); they replace the replicated frame 0,
so the chunks' outputs concatenate to the output of the whole clip. Temporal stride 1 only.

Nearest 2x upsampling folded in: ``upsample=(1, 2, 2)`` convolves the input as nearest-upsampled x2
in H and W (``F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")``, Open-Sora-Plan's
SpatialUpsample2x) without building the upsampled tensor (4x the input). The triton backend reads
pixel (h // 2, w // 2) by index arithmetic; the torch backend runs the exact sub-pixel form: each
output phase (oh % 2, ow % 2) is a conv of the un-upsampled input with the kernel's taps that land on
the same source pixel summed (3x3 -> 2x2: 2.25x fewer FLOPs), written into its strided view of the
output. Needs spatial stride 1 and "same" spatial padding ((kh-1)/2, (kw-1)/2 with kh, kw odd): the
output is (2H, 2W).

Backends, in automatic order: ``triton`` (kernels/causal_conv3d.py: implicit-GEMM forward,
dx and dweight kernels; CUDA, CPU only through the interpreter when forced), ``torch`` (F.conv3d
of the unpadded clip for the frames whose window lies inside it, plus a small replicated head for
the first frames: no padded copy of the whole input; with history, one F.conv3d of
cat([history, x])). The triton backend runs history= forward-only (its backward kernels know the
replicated head only): when a gradient is wanted it declines and the torch backend runs. The float64 reference
``causal_conv3d_reference`` (replicate + F.conv3d) is the ground truth the tests compare against.

Dtypes follow F.conv3d: x, weight, bias, residual and history share one dtype (else ValueError);
under torch.autocast all of them (but float64) are cast to the autocast dtype, which the output has.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from .._utils import FLOAT_DTYPES, memory_format_of, records_grad
from ._dispatch import Backend, Op
from ._dtypes import check_same_dtype, lower_precision
from ._triton import triton_why_not

IntOr3 = Union[int, Sequence[int]]
IntOr2 = Union[int, Sequence[int]]


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def normalize_stride(stride) -> Tuple[int, int, int]:
    """int or (st, sh, sw) -> (st, sh, sw) of positive ints; ValueError otherwise."""
    s = (stride,) * 3 if _is_int(stride) else tuple(stride) if isinstance(stride, (tuple, list)) else None
    if s is None or len(s) != 3 or not all(_is_int(v) and v > 0 for v in s):
        raise ValueError(f"causal_conv3d: stride={stride!r}; expected a positive int or 3 positive ints (st, sh, sw)")
    return s


def normalize_padding(padding) -> Tuple[int, int]:
    """int or (ph, pw) -> (ph, pw) of non-negative ints (spatial only); ValueError otherwise."""
    p = (padding,) * 2 if _is_int(padding) else tuple(padding) if isinstance(padding, (tuple, list)) else None
    if p is None or len(p) != 2 or not all(_is_int(v) and v >= 0 for v in p):
        raise ValueError(
            f"causal_conv3d: padding={padding!r}; expected a non-negative int or 2 non-negative ints (ph, pw) "
            "of spatial zero padding (time is never zero-padded)"
        )
    return p


def normalize_upsample(upsample) -> Optional[Tuple[int, int]]:
    """None -> None; (1, 2, 2) -> (2, 2), the spatial factors; ValueError for anything else."""
    if upsample is None:
        return None
    u = tuple(upsample) if isinstance(upsample, (tuple, list)) else None
    if u is None or len(u) != 3 or not all(_is_int(v) for v in u) or u != (1, 2, 2):
        raise ValueError(
            f"causal_conv3d: upsample={upsample!r}; expected None or (1, 2, 2) (nearest x2 in H and W, "
            "the only factor folded into the conv)"
        )
    return u[1:]


def output_shape(x_shape, w_shape, stride, padding, upsample=None) -> Tuple[int, int, int, int, int]:
    """(N, Cout, T_out, H_out, W_out); T_out = (T - 1) // st + 1 because kt - 1 frames are prepended.
    ``upsample`` (uh, uw) (normalized) multiplies the input's H and W first."""
    N, _, T, H, W = x_shape
    if upsample is not None:
        H, W = H * upsample[0], W * upsample[1]
    Cout, _, kt, kh, kw = w_shape
    st, sh, sw = stride
    ph, pw = padding
    return (N, Cout, (T - 1) // st + 1 if T > 0 else 0, (H + 2 * ph - kh) // sh + 1, (W + 2 * pw - kw) // sw + 1)


def _check(x, weight, bias, stride, padding, residual, history=None, upsample=None):
    """Validate and return (stride, padding, upsample) normalized."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"causal_conv3d: x must be a tensor, got {type(x).__name__}")
    if x.dim() != 5:
        raise ValueError(f"causal_conv3d: x has shape {tuple(x.shape)} (rank {x.dim()}); expected (N, Cin, T, H, W), rank 5")
    if x.dtype not in FLOAT_DTYPES:
        raise ValueError(f"causal_conv3d: x has dtype {x.dtype}; expected one of float32, float16, bfloat16, float64")
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"causal_conv3d: weight must be a tensor, got {type(weight).__name__}")
    if weight.dim() != 5:
        raise ValueError(
            f"causal_conv3d: weight has shape {tuple(weight.shape)} (rank {weight.dim()}); "
            "expected (Cout, Cin, kt, kh, kw), rank 5"
        )
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"causal_conv3d: weight has dtype {weight.dtype}; expected a floating dtype")
    if weight.device != x.device:
        raise ValueError(f"causal_conv3d: weight is on {weight.device} but x is on {x.device}")
    Cout, Cin = weight.shape[:2]
    if weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"causal_conv3d: x has Cin={x.shape[1]} channels but weight {tuple(weight.shape)} expects Cin={Cin}"
        )
    if min(weight.shape) <= 0:
        raise ValueError(f"causal_conv3d: weight has shape {tuple(weight.shape)}; expected every dim >= 1")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (Cout,):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"causal_conv3d: bias has shape {shape}; expected ({Cout},) for Cout={Cout}")
        if bias.dtype not in FLOAT_DTYPES:
            raise ValueError(f"causal_conv3d: bias has dtype {bias.dtype}; expected a floating dtype")
        if bias.device != x.device:
            raise ValueError(f"causal_conv3d: bias is on {bias.device} but x is on {x.device}")
    stride = normalize_stride(stride)
    padding = normalize_padding(padding)
    upsample = normalize_upsample(upsample)
    if upsample is not None:
        _check_upsample(weight, stride, padding)
    out = output_shape(x.shape, weight.shape, stride, padding, upsample)
    if min(out) <= 0:
        raise ValueError(
            f"causal_conv3d: output size {out} has a dim <= 0 for x {tuple(x.shape)}, kernel "
            f"{tuple(weight.shape[2:])}, stride {stride}, padding {padding}; expected N, T >= 1 and "
            "H + 2*ph >= kh, W + 2*pw >= kw"
        )
    if residual is not None:
        if not isinstance(residual, torch.Tensor) or tuple(residual.shape) != out:
            shape = tuple(residual.shape) if isinstance(residual, torch.Tensor) else type(residual).__name__
            raise ValueError(f"causal_conv3d: residual has shape {shape}; expected the output's shape {out}")
        if residual.dtype not in FLOAT_DTYPES:
            raise ValueError(f"causal_conv3d: residual has dtype {residual.dtype}; expected a floating dtype")
        if residual.device != x.device:
            raise ValueError(f"causal_conv3d: residual is on {residual.device} but x is on {x.device}")
    if history is not None:
        _check_history(x, weight, stride, history)
    check_same_dtype("causal_conv3d", "x", x, weight=weight, bias=bias, residual=residual, history=history)
    return stride, padding, upsample


def _check_upsample(weight, stride, padding):
    """The folded upsample supports what SpatialUpsample2x needs: spatial stride 1, odd kh and kw,
    "same" padding, so the output is (2H, 2W) and every output phase has H x W pixels."""
    kh, kw = weight.shape[3:]
    if stride[1:] != (1, 1):
        raise ValueError(
            f"causal_conv3d: upsample=(1, 2, 2) with stride {stride}; expected spatial stride 1, (st, 1, 1) "
            "(a strided conv of an upsampled input is not folded)"
        )
    if kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(
            f"causal_conv3d: upsample=(1, 2, 2) with an even spatial kernel {(kh, kw)} (weight "
            f"{tuple(weight.shape)}); expected odd kh and kw"
        )
    same = ((kh - 1) // 2, (kw - 1) // 2)
    if padding != same:
        raise ValueError(
            f"causal_conv3d: upsample=(1, 2, 2) with padding {padding}; expected the \"same\" padding {same} "
            f"of the {kh}x{kw} kernel (output 2H x 2W)"
        )


def _check_history(x, weight, stride, history):
    if not isinstance(history, torch.Tensor):
        raise ValueError(f"causal_conv3d: history must be a tensor (N, Cin, kt-1, H, W), got {type(history).__name__}")
    kt = weight.shape[2]
    if kt <= 1:
        raise ValueError(
            f"causal_conv3d: history needs a temporal kernel > 1; weight {tuple(weight.shape)} has kt={kt}, "
            "which reads no earlier frames (pass history=None)"
        )
    if stride[0] != 1:
        raise ValueError(
            f"causal_conv3d: history needs temporal stride 1, got stride {stride}; expected (1, sh, sw) "
            "(a strided conv cannot be chunked at arbitrary frames)"
        )
    N, Cin, _, H, W = x.shape
    expected = (N, Cin, kt - 1, H, W)
    if tuple(history.shape) != expected:
        raise ValueError(
            f"causal_conv3d: history has shape {tuple(history.shape)}; expected (N, Cin, kt-1, H, W) = {expected} "
            f"for x {tuple(x.shape)} and kt={kt}"
        )
    if history.dtype not in FLOAT_DTYPES:
        raise ValueError(f"causal_conv3d: history has dtype {history.dtype}; expected a floating dtype")
    if history.device != x.device:
        raise ValueError(f"causal_conv3d: history is on {history.device} but x is on {x.device}")


def causal_conv3d_reference(x, weight, bias=None, *, stride=1, padding=0, residual=None,
                            history=None, upsample=None) -> torch.Tensor:
    """Ground truth in float64: replicate frame 0 kt-1 times in front (or put history there),
    repeat each pixel 2x2 when upsample=(1, 2, 2), then F.conv3d. Returns float64."""
    stride, padding, upsample = _check(x, weight, bias, stride, padding, residual, history, upsample)
    kt = weight.shape[2]
    xd = x.detach().to(torch.float64)
    head = history.detach().to(torch.float64) if history is not None else xd[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
    xd = torch.cat([head, xd], dim=2)
    if upsample is not None:
        xd = xd.repeat_interleave(upsample[0], dim=3).repeat_interleave(upsample[1], dim=4)
    b = bias.detach().to(torch.float64) if bias is not None else None
    y = F.conv3d(xd, weight.detach().to(torch.float64), b, stride, (0,) + padding)
    if residual is not None:
        y = y + residual.detach().to(torch.float64)
    return y


_SWAP_TW = (0, 1, 4, 3, 2)  # (N, C, T, H, W) <-> (N, C, W, H, T)


class _OneDNNConv3d(torch.autograd.Function):
    """A CPU fp32 conv3d whose forward and backward both run oneDNN.

    PyTorch's CPU heuristic (written for 4-D input: N*C*T*H > 20480, else batch >= 2) sends batch-1
    video convs and their backward to its native kernels, 5x slower here (bench_vae_train: a 32-channel
    9x64x64 conv's dx 53 ms and dweight 47 ms against 5 and 7 ms). The forward calls
    torch.mkldnn_convolution; dx is oneDNN's transposed convolution; dweight and dbias are
    convolution_backward on the input seen with T and W swapped (a view), so that the heuristic's
    product counts W instead of T."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding3):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding3, ctx.has_bias = stride, padding3, bias is not None
        return torch.mkldnn_convolution(x, weight, bias, padding3, stride, (1, 1, 1), 1)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        stride, padding3 = ctx.stride, ctx.padding3
        dx = dw = db = None
        if need_x:
            k = weight.shape[2:]
            out_pad = [x.shape[2 + i] - ((dy.shape[2 + i] - 1) * stride[i] - 2 * padding3[i] + k[i]) for i in range(3)]
            dx = torch.ops.mkldnn._convolution_transpose_pointwise(
                dy.contiguous(memory_format=memory_format_of(x)), weight, None, list(padding3), out_pad, list(stride),
                [1, 1, 1], 1, "none", [], None)
        if need_w or need_b:
            swap = x.shape[0] == 1 and x.shape[4] > x.shape[2]
            if swap:
                _, dw, db = torch.ops.aten.convolution_backward(
                    dy.permute(_SWAP_TW), x.permute(_SWAP_TW), weight.permute(_SWAP_TW), [weight.shape[0]],
                    list(stride[::-1]), list(padding3[::-1]), [1, 1, 1], False, [0, 0, 0], 1, [False, need_w, need_b])
                dw = dw.permute(_SWAP_TW) if dw is not None else None
            else:
                _, dw, db = torch.ops.aten.convolution_backward(
                    dy, x, weight, [weight.shape[0]], list(stride), list(padding3), [1, 1, 1], False, [0, 0, 0], 1,
                    [False, need_w, need_b])
        return dx, dw, db if ctx.has_bias else None, None, None


def _onednn_usable(x) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and torch.backends.mkldnn.enabled)


def _conv3d(x, weight, bias, stride, padding3):
    """F.conv3d, except fp32 on CPU runs oneDNN forward and backward (see _OneDNNConv3d)."""
    if _onednn_usable(x):
        if records_grad(x, weight, bias):
            if hasattr(torch.ops.mkldnn, "_convolution_transpose_pointwise"):
                return _OneDNNConv3d.apply(x, weight, bias, tuple(stride), tuple(padding3))
        return torch.mkldnn_convolution(x, weight, bias, padding3, stride, (1, 1, 1), 1)
    return F.conv3d(x, weight, bias, stride, padding3)


def _phase_taps(k: int, p: int, phase: int) -> Tuple[int, torch.Tensor]:
    """For one spatial axis of a kernel of k taps with padding p, read by output pixel 2q + phase
    of a x2-upsampled input: tap j reads source pixel q + (phase + j - p) // 2. Returns the lowest
    offset d0 and the 0/1 matrix S (n offsets, k taps) with S[d - d0, j] = 1 where tap j reads q + d."""
    offsets = [(phase + j - p) // 2 for j in range(k)]
    d0 = offsets[0]
    s = torch.zeros(offsets[-1] - d0 + 1, k, dtype=torch.float64)
    for j, d in enumerate(offsets):
        s[d - d0, j] = 1.0
    return d0, s


def _torch_upsample_run(x, weight, bias, stride, padding, residual, history, upsample):
    """The sub-pixel form of conv(nearest_x2(x)): output phase (a, b) = out[..., a::2, b::2] is a
    conv of x itself whose kernel sums the taps that read the same source pixel (3x3 -> 2x2),
    written into its strided view of the output; no upsampled tensor, no stacked phases."""
    N, _, _, H, W = x.shape
    kh, kw = weight.shape[3:]
    ph, pw = padding
    fmt = memory_format_of(x)
    out = torch.empty(output_shape(x.shape, weight.shape, stride, padding, upsample), dtype=x.dtype,
                      device=x.device, memory_format=fmt)
    bias_after = (bias is not None and bias.dtype not in (torch.float32, torch.float64) and bias.requires_grad
                  and torch.is_grad_enabled())
    # Summing taps in x's dtype would round each sum to 16 bits: sum in float32 (or float64), then cast.
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    wa = weight.to(acc)
    for a in range(2):
        dh, sh = _phase_taps(kh, ph, a)
        for b in range(2):
            dw, sw = _phase_taps(kw, pw, b)
            w_ab = torch.einsum("oitjl,dj,el->oitde", wa, sh.to(wa.device, acc), sw.to(wa.device, acc)).to(x.dtype)
            # Conv row r with symmetric padding P reads source rows r - P .. r - P + n - 1, so the
            # phase's row q (source rows q + dh ..) is conv row q + dh + P: P covers both ends.
            n_h, n_w = sh.shape[0], sw.shape[0]
            p_h = max(-dh, dh + n_h - 1, 0)
            p_w = max(-dw, dw + n_w - 1, 0)
            y = _torch_run(x, w_ab.contiguous(), None if bias_after else bias, (stride[0], 1, 1), (p_h, p_w), None,
                           history)
            out[:, :, :, a::2, b::2].copy_(y[:, :, :, dh + p_h:dh + p_h + H, dw + p_w:dw + p_w + W])
            del y
    # out is a fresh intermediate that no backward saves: adding in place is safe. A 16-bit bias that
    # needs a gradient is added once (its gradient one reduction of dy, as in F.conv3d, not four
    # halves rounded to 16 bits); otherwise each phase's conv adds it for free.
    if bias_after:
        out = out.add_(bias.view(1, -1, 1, 1, 1))
    if residual is not None:
        out = out.add_(residual)
    return out


def _torch_run(x, weight, bias, stride, padding, residual, history=None, upsample=None):
    if upsample is not None:
        return _torch_upsample_run(x, weight, bias, stride, padding, residual, history, upsample)
    kt = weight.shape[2]
    st = stride[0]
    T = x.shape[2]
    T_out = (T - 1) // st + 1
    fmt = memory_format_of(x)
    if history is not None:  # streaming: the previous chunk's frames stand in front, no replication
        xin = torch.cat([history, x], dim=2).contiguous(memory_format=fmt)
        y = _conv3d(xin, weight, bias, stride, (0,) + padding).contiguous(memory_format=fmt)  # CPU fp16 drops it
        return y if residual is None else y.add_(residual)
    # Output frames t < t_head have windows reaching before frame 0 (t*st < kt-1); only they need
    # replicated frames, and only input frames <= (t_head-1)*st, so the head copy is a few frames.
    t_head = min(-(-(kt - 1) // st), T_out)
    # With two convs and a 16-bit bias that needs a gradient, the bias is added once, after them: its
    # gradient is then one reduction of dy, as in F.conv3d, not the sum of two halves each rounded to
    # 16 bits. Otherwise each conv adds it (free inside the conv; a separate pass costs a full
    # read and write of the output).
    two_parts = 0 < t_head < T_out
    bias_after = (two_parts and bias is not None and bias.dtype not in (torch.float32, torch.float64)
                  and bias.requires_grad and torch.is_grad_enabled())
    conv_bias = None if bias_after else bias
    parts = []
    if t_head > 0:
        head_in = x[:, :, : (t_head - 1) * st + 1]
        head = torch.cat([head_in[:, :, :1].expand(-1, -1, kt - 1, -1, -1), head_in], dim=2)
        parts.append(_conv3d(head.contiguous(memory_format=fmt), weight, conv_bias, stride, (0,) + padding))
    if t_head < T_out:
        # The remaining windows lie inside the clip: start at the first frame output t_head reads.
        parts.append(_conv3d(x[:, :, t_head * st - (kt - 1):], weight, conv_bias, stride, (0,) + padding))
    if len(parts) == 1 and parts[0].is_contiguous(memory_format=fmt):
        y = parts[0]
    else:
        shape = output_shape(x.shape, weight.shape, stride, padding)
        y = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=fmt)
        t = 0
        for p in parts:
            y[:, :, t:t + p.shape[2]] = p
            t += p.shape[2]
    # y is a fresh intermediate that no backward saves: adding in place is safe.
    if bias_after:
        y = y.add_(bias.view(1, -1, 1, 1, 1))
    if residual is not None:
        y = y.add_(residual)
    return y


def _torch_why_not(x, weight, bias, stride, padding, residual, history=None, upsample=None, *, forced):
    return None


class _CausalConv3d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, stride, padding, upsample):
        from osp.kernels import causal_conv3d as kernel

        out_shape = output_shape(x.shape, weight.shape, stride, padding, upsample)
        up = upsample or (1, 1)
        y = kernel.forward(x, weight, bias, stride, padding, residual, out_shape, upsample=up)
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding, ctx.upsample = stride, padding, up
        return y

    @staticmethod
    def backward(ctx, dy):
        from osp.kernels import causal_conv3d as kernel

        x, weight = ctx.saved_tensors
        need_x, need_w, need_b, need_r = ctx.needs_input_grad[:4]
        # Every input has x's dtype (and so has dy); the kernels read any strides, so no layout copy.
        dx = kernel.backward_dx(dy, weight, x, ctx.stride, ctx.padding, ctx.upsample) if need_x else None
        dw = kernel.backward_dw(dy, x, weight.shape, ctx.stride, ctx.padding, ctx.upsample).to(x.dtype) if need_w else None
        db = dy.sum(dim=(0, 2, 3, 4), dtype=torch.float32).to(x.dtype) if need_b else None
        return dx, dw, db, dy if need_r else None, None, None, None


def _triton_run(x, weight, bias, stride, padding, residual, history=None, upsample=None):
    if history is None:
        return _CausalConv3d.apply(x, weight, bias, residual, stride, padding, upsample)
    # Streaming, forward only (_triton_why_not declines when a gradient is wanted): the kernel reads
    # cat([history, x]) with its output frames shifted by T0 = kt-1, so the causal clamp never fires.
    from osp.kernels import causal_conv3d as kernel

    kt = weight.shape[2]
    xin = torch.cat([history, x], dim=2).contiguous(memory_format=memory_format_of(x))
    out_shape = output_shape(x.shape, weight.shape, stride, padding, upsample)
    return kernel.forward(xin, weight, bias, stride, padding, residual, out_shape, t0=kt - 1,
                          upsample=upsample or (1, 1))


def _triton_why_not(x, weight, bias, stride, padding, residual, history=None, upsample=None, *, forced):
    reason = triton_why_not(x, forced=forced)
    if reason:
        return reason
    if x.dtype == torch.float64:
        return "float64 is computed in fp32 by the kernel; the torch backend keeps float64"
    if history is not None and records_grad(x, weight, bias, residual, history):
        return "history= (streaming) is forward-only on the triton backend; gradients go through torch"
    return None


CAUSAL_CONV3D = Op(
    "causal_conv3d",
    [
        Backend("triton", _triton_run, _triton_why_not),
        Backend("torch", _torch_run, _torch_why_not),
    ],
    probe=lambda device, dtype: ((torch.randn(1, 8, 5, 8, 8, device=device, dtype=dtype),
                                  torch.randn(8, 8, 3, 3, 3, device=device, dtype=dtype), None,
                                  (1, 1, 1), (1, 1), None, None), {}),
    autocast=lower_precision,
)


def causal_conv3d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, *,
                  stride: IntOr3 = 1, padding: IntOr2 = 0, residual: Optional[torch.Tensor] = None,
                  history: Optional[torch.Tensor] = None, upsample: Optional[Sequence[int]] = None,
                  backend: Optional[str] = None) -> torch.Tensor:
    """Causal 3-D convolution: frame 0 replicated kt-1 times in front, spatial zero padding.

    Equals ``F.conv3d(cat([x[:, :, :1]] * (kt-1) + [x], dim=2), weight, bias, stride, (0, ph, pw))
    + residual`` without building the padded copy. With ``history`` it equals
    ``F.conv3d(cat([history, x], dim=2), weight, bias, stride, (0, ph, pw)) + residual``: run a long
    video chunk by chunk, passing each chunk the last kt-1 frames of the previous one, and the
    outputs concatenate to the output of the whole video.

    Args:
        x: (N, Cin, T, H, W), NCDHW-contiguous or channels_last_3d (any strides are accepted).
            float32, float16, bfloat16 (fp32 accumulation) or float64 (torch backend).
        weight: (Cout, Cin, kt, kh, kw), x's dtype (as F.conv3d: under torch.autocast every input
            is cast to the autocast dtype; outside it mixed dtypes are a ValueError).
        bias: optional (Cout,), x's dtype.
        stride: int or (st, sh, sw).
        padding: spatial zero padding, int or (ph, pw). Time is never zero-padded.
        residual: optional tensor of the output's shape and x's dtype, added after the bias (a ResNet
            shortcut); under autocast it is cast too, so the output stays in the autocast dtype.
        history: optional (N, Cin, kt-1, H, W), the kt-1 input frames just before x (x's device
            and dtype); they replace the replicated frame 0. Needs kt > 1 and temporal stride 1.
            Forward-only on the triton backend: with a gradient wanted, automatic choice runs torch
            (and forcing triton raises BackendUnavailable).
        upsample: None, or (1, 2, 2) to convolve x nearest-upsampled x2 in H and W (Open-Sora-Plan's
            SpatialUpsample2x: ``F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")`` then the
            conv) without building the upsampled tensor. Needs spatial stride 1 and the "same"
            padding ((kh-1)/2, (kw-1)/2), kh and kw odd; the output is (2H, 2W); history, when
            given, is at x's (un-upsampled) size.
        backend: force "triton" or "torch"; None chooses (see osp.ops.use_backend, OSP_BACKEND).

    Returns:
        (N, Cout, (T-1)//st + 1, (H+2ph-kh)//sh + 1, (W+2pw-kw)//sw + 1) (H, W doubled first with
        upsample) in x's dtype (the autocast
        dtype under autocast) and memory format (T_out = T with history). Differentiable in x,
        weight, bias, residual and history.
    """
    x, weight, bias, residual, history = CAUSAL_CONV3D.autocast(x, weight, bias, residual, history)
    stride, padding, upsample = _check(x, weight, bias, stride, padding, residual, history, upsample)
    return CAUSAL_CONV3D.dispatch((x, weight, bias, stride, padding, residual, history, upsample), {}, backend)
