"""Building blocks of the causal video VAE (spec: open-sora-plan-v1.0-numerics.md, B.1).

Every tensor is a video (B, C, T, H, W). Every convolution is an ``osp.nn.CausalConv3d`` and every
norm an ``osp.nn.GroupNorm`` (32 groups, eps 1e-6, SiLU fused where one follows), so each osp
backend applies to the whole model. Module and parameter names follow upstream's state dict.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ...nn import CausalConv3d, GroupNorm

NORM_GROUPS = 32
NORM_EPS = 1e-6


def normalize(channels: int, act: Optional[str] = None) -> GroupNorm:
    """Upstream's Normalize: GroupNorm(32, C, eps=1e-6, affine) over the whole clip, plus ``act``."""
    return GroupNorm(NORM_GROUPS, channels, eps=NORM_EPS, affine=True, act=act)


class ResnetBlock3D(nn.Module):
    """norm1+SiLU -> conv1 (k3) -> norm2+SiLU -> dropout -> conv2 (k3), plus the shortcut
    (``nin_shortcut``, a 1x1x1 conv, only when the channel count changes), added inside conv2."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = normalize(in_channels, act="silu")
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, padding=1)
        self.norm2 = normalize(out_channels, act="silu")
        self.dropout = nn.Dropout(dropout)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = CausalConv3d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        # h is conv1's fresh output, needed by nothing else: in inference the norm may overwrite it
        # (x stays untouched, the shortcut reads it). With gradients recorded this is out of place.
        h = self.dropout(self.norm2(h, inplace=True))
        shortcut = self.nin_shortcut(x) if self.in_channels != self.out_channels else x
        return self.conv2(h, residual=shortcut)


class SpatialDownsample2x(nn.Module):
    """Zero-pad H and W by one at the bottom/right, then a (1,3,3) conv with stride (1,2,2):
    H -> H//2, W -> W//2, T unchanged. Parameters ``conv.conv.*``."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.conv = CausalConv3d(in_channels, out_channels, (1, 3, 3), stride=(1, 2, 2), padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class SpatialUpsample2x(nn.Module):
    """Nearest x2 in H and W (per frame), then a (1,3,3) conv with padding 1. Parameters ``conv.conv.*``.

    The upsampling is folded into the conv (``upsample=(1, 2, 2)`` of osp.ops.causal_conv3d): the
    4x-sized upsampled tensor is never built, and the result equals interpolate-then-conv."""

    def __init__(self, in_channels: int, out_channels: Optional[int] = None):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.conv = CausalConv3d(in_channels, out_channels, (1, 3, 3), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x, upsample=(1, 2, 2))


class TimeDownsample2x(nn.Module):
    """Causal 2x temporal average pooling, no parameters: T -> (T-1)//2 + 1.

    out[0] = x[0] and out[k] = (x[2k-2] + x[2k-1] + x[2k]) / 3, which is upstream's "replicate frame 0
    twice in front, then AvgPool3d((3,1,1), stride (2,1,1))" without building the padded copy
    (and with frame 0 passed through exactly instead of as (3*x0)/3).

    ``stream_state``: None, or a dict while a clip is fed in consecutive time chunks (see
    ``osp.nn.CausalConv3d``): each call then returns the outputs whose windows end in this chunk
    (out[k] for 2k in the chunk's frame range), using the previous chunk's last two frames.
    """

    stream_state: Optional[dict] = None

    @staticmethod
    def _pool(x: torch.Tensor, first: int, n: int) -> torch.Tensor:
        """(x[first+2j] + x[first+2j+1] + x[first+2j+2]) / 3 for j < n."""
        # Strided slices instead of F.avg_pool3d, which has no CPU float16 kernel; same sum, same order.
        stop = first + 2 * n
        rest = x[:, :, first:stop - 1:2] + x[:, :, first + 1:stop:2]
        return rest.add_(x[:, :, first + 2:stop + 1:2]).div_(3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream_state is not None:
            return self._stream(x, self.stream_state)
        T = x.shape[2]
        if T < 3:
            return x[:, :, :1]
        n = (T - 3) // 2 + 1  # windows (2k-2, 2k-1, 2k) that lie inside the clip
        return torch.cat([x[:, :, :1], self._pool(x, 0, n)], dim=2)

    def _stream(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        start = state.get("seen", 0)  # index of x's first frame in the whole clip
        end = start + x.shape[2]
        prev = state.get("tail")  # the clip's frames [start - len(prev), start)
        seq = x if prev is None else torch.cat([prev, x], dim=2)
        base = start - (0 if prev is None else prev.shape[2])
        k0, k1 = max(1, -(-start // 2)), (end - 1) // 2  # outputs k >= 1 with start <= 2k < end
        parts = [x[:, :, :1]] if start == 0 else []
        if k1 >= k0:
            parts.append(self._pool(seq, 2 * k0 - 2 - base, k1 - k0 + 1))
        state["seen"], state["tail"] = end, seq[:, :, -2:].clone()
        if not parts:  # no window ends in this chunk
            return x[:, :, :0]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


class TimeUpsample2x(nn.Module):
    """Causal 2x temporal upsampling, no parameters: T -> 2T - 1 (T = 1 stays 1).

    Frame 0 is kept; frames 1.. are interpolated linearly x2 in time (PyTorch "trilinear" with
    align_corners=False, spatial factors 1), as upstream does. Output 2j+1 of the interpolated part
    (0.75 x[j] + 0.25 x[j+1]) looks one frame ahead; the last one repeats the last frame.

    ``stream_state``: None, or a dict while a clip is fed in consecutive time chunks (see
    ``osp.nn.CausalConv3d``): each call returns the outputs that the frames so far determine, so the
    last frame's second output waits for the next chunk, unless ``stream_state["ctx"].final`` says
    this chunk ends the clip. The interpolation runs on [previous last frame, chunk], whose interior
    outputs are the whole clip's, bit for bit (the same per-frame weights).
    """

    stream_state: Optional[dict] = None

    @staticmethod
    def _interp(x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(2.0, 1.0, 1.0), mode="trilinear", align_corners=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stream_state is not None:
            return self._stream(x, self.stream_state)
        if x.shape[2] == 1:
            return x
        return torch.cat([x[:, :, :1], self._interp(x[:, :, 1:])], dim=2)

    def _stream(self, x: torch.Tensor, state: dict) -> torch.Tensor:
        parts = []
        if not state.get("started"):  # the clip's frame 0 passes through
            parts.append(x[:, :, :1])
            x = x[:, :, 1:]
            state["started"] = True
        if x.shape[2]:
            prev = state.get("prev")  # the last frame of the previous chunks' interpolated part
            y = self._interp(x if prev is None else torch.cat([prev, x], dim=2))
            first = 0 if prev is None else 1  # prev's first output went out with its chunk
            last = y.shape[2] if state["ctx"].final else y.shape[2] - 1
            parts.append(y[:, :, first:last])
            state["prev"] = x[:, :, -1:].clone()
        elif state["ctx"].final and state.get("prev") is not None:
            parts.append(state["prev"])  # an empty final chunk: release the held output (the clamped last)
        if not parts:
            return x
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)
