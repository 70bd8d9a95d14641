"""CausalConv3d: Open-Sora-Plan's causal video convolution, state-dict compatible with upstream."""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from torch import nn

from .. import ops
from ..ops.causal_conv3d import normalize_padding, normalize_stride, normalize_upsample, output_shape


def _kernel_size(kernel_size) -> tuple:
    k = (kernel_size,) * 3 if isinstance(kernel_size, int) and not isinstance(kernel_size, bool) else (
        tuple(kernel_size) if isinstance(kernel_size, (tuple, list)) else None)
    if k is None or len(k) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in k):
        raise ValueError(f"CausalConv3d: kernel_size={kernel_size!r}; expected a positive int or 3 positive ints (kt, kh, kw)")
    return k


def _spatial_padding(padding, kt: int) -> tuple:
    """int -> (p, p) for H and W; (ph, pw) as is; (pt, ph, pw) with pt in {0, kt-1} -> (ph, pw)."""
    if isinstance(padding, (tuple, list)) and len(padding) == 3:
        pt = padding[0]
        if pt not in (0, kt - 1):
            raise ValueError(
                f"CausalConv3d: padding={tuple(padding)!r} asks for temporal padding {pt!r}; time is padded by "
                f"replicating frame 0 kt-1={kt - 1} times, so the temporal entry must be 0 or {kt - 1}"
            )
        padding = tuple(padding[1:])
    try:
        return normalize_padding(padding)
    except ValueError as exc:
        raise ValueError(str(exc).replace("causal_conv3d:", "CausalConv3d:")) from None


def _next_history(prev: Optional[torch.Tensor], x: torch.Tensor, k: int) -> torch.Tensor:
    """The last k frames of the stream so far: [prev (or frame 0 replicated, at the start), x].
    A copy, so that it does not keep the whole chunk alive."""
    T = x.shape[2]
    if T >= k:
        return x[:, :, T - k:].clone()
    if prev is None:
        prev = x[:, :, :1].expand(-1, -1, k, -1, -1)
    return torch.cat([prev[:, :, T:], x], dim=2)


class CausalConv3d(nn.Module):
    """Causal 3-D convolution: frame 0 is replicated kt-1 times in front of the clip, so output
    frame t sees input frames <= t and T_out = (T-1)//st + 1; H and W are zero-padded.

    Parameters live in the child ``conv`` (an nn.Conv3d with padding 0), so the state-dict keys are
    ``conv.weight`` and ``conv.bias`` as in Open-Sora-Plan. Upstream turns an int padding p into
    (0, p, p); here ``padding`` is spatial: an int (H and W), (ph, pw), or a 3-tuple (pt, ph, pw)
    whose temporal entry must be 0 or kt-1 (both describe the causal replicate padding this layer
    always applies; any other value would mean zero padding in time, which it never does).

    Input (N, Cin, T, H, W), NCDHW or channels_last_3d; the output keeps the input's memory
    format. forward routes through ``osp.ops.causal_conv3d`` (so every backend applies) and takes
    an optional ``residual`` of the output's shape, added after the bias, and ``upsample=(1, 2, 2)``
    to convolve the input nearest-upsampled x2 in H and W without building it (SpatialUpsample2x;
    needs spatial stride 1 and "same" padding).

    ``stream_state``: None (normal), or a dict while a long clip is fed in consecutive time chunks
    (``osp.models.vae.tiling``): each call then reads the previous chunk's last kt-1 input frames
    (kept in the dict under "history") in place of the replicated frame 0, so the chunks' outputs,
    concatenated, equal the output for the whole clip. Temporal stride must be 1 then.
    """

    stream_state: Optional[dict] = None

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]],
                 stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int]] = 0,
                 bias: bool = True, device=None, dtype=None):
        super().__init__()
        kernel_size = _kernel_size(kernel_size)
        try:
            stride = normalize_stride(stride)
        except ValueError as exc:
            raise ValueError(str(exc).replace("causal_conv3d:", "CausalConv3d:")) from None
        self.padding = _spatial_padding(padding, kernel_size[0])
        self.kernel_size = kernel_size
        self.time_kernel_size = kernel_size[0]
        self.stride = stride
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, padding=0, bias=bias,
                              device=device, dtype=dtype)

    @property
    def in_channels(self) -> int:
        return self.conv.in_channels

    @property
    def out_channels(self) -> int:
        return self.conv.out_channels

    def forward(self, x: torch.Tensor, residual: Optional[torch.Tensor] = None,
                upsample: Optional[Sequence[int]] = None) -> torch.Tensor:
        history = None
        state = self.stream_state
        if state is not None:
            if x.shape[2] == 0:  # a chunk that an upstream layer had no finished frames for
                try:
                    up = normalize_upsample(upsample)
                except ValueError as exc:
                    raise ValueError(str(exc).replace("causal_conv3d:", "CausalConv3d:")) from None
                return x.new_empty(output_shape(x.shape, self.conv.weight.shape, self.stride, self.padding, up))
        if state is not None and self.time_kernel_size > 1:
            if self.stride[0] != 1:
                raise ValueError(f"CausalConv3d: streaming in time needs temporal stride 1, not {self.stride[0]}")
            history = state.get("history")
            state["history"] = _next_history(history, x, self.time_kernel_size - 1)
        return ops.causal_conv3d(x, self.conv.weight, self.conv.bias, stride=self.stride, padding=self.padding,
                                 residual=residual, history=history, upsample=upsample)

    def extra_repr(self) -> str:
        return f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding} (spatial), causal"
