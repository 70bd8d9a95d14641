"""Attention modules over ``osp.ops.attention``: the causal video VAE's mid-block attention
(``AttnBlock3D``, both upstream's frame-mixing layout and the per-frame fix) and the transformers'
multi-head ``Attention`` (self-attention, and cross-attention to captions by ``CaptionSegment``).
Parameter names follow upstream's state dicts.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from .causal_conv3d import CausalConv3d
from .group_norm import GroupNorm

# Attention scores a math-fallback SDPA call may hold at once (elements), so that a 1024x1024
# clip's mid-block attention does not need tens of GB where no fused kernel runs.
_ATTN_SCORES_BUDGET = 1 << 28


@dataclass
class CaptionSegment:
    """Captions that frames ``start:stop`` of every sample cross-attend to.

    ``context`` is (b * k, Lc, D), projected caption tokens, with k = 1 (every frame of the segment
    attends to its sample's one caption: the video frames) or k = stop - start (one caption per
    frame: the images of joint image-video training). ``keep`` (b * k, Lc) bool marks the keys to
    attend to (None: all).
    """

    start: int
    stop: int
    context: torch.Tensor
    keep: Optional[torch.Tensor] = None


def _merge(t: torch.Tensor) -> torch.Tensor:
    """(B, H, L, Dh) -> (B, L, H*Dh)."""
    B, H, L, Dh = t.shape
    return t.transpose(1, 2).reshape(B, L, H * Dh)


class Attention(nn.Module):
    """Multi-head attention with upstream's names: ``to_q``, ``to_k``, ``to_v``, ``to_out.0``.

    Heads are contiguous slices of the width; scores are scaled by 1/sqrt(head_dim); no residual,
    no norm. The projections of q, k, v (or k, v) run as one matmul over the concatenated weights.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, bias: bool = True, dropout: float = 0.0,
                 context_dim: Optional[int] = None):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim = heads, head_dim
        self.to_q = nn.Linear(dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim or dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim, bias=True), nn.Dropout(dropout)])

    @staticmethod
    def _fused(x: torch.Tensor, layers: Sequence[nn.Linear]) -> torch.Tensor:
        weight = torch.cat([layer.weight for layer in layers])
        bias = None if layers[0].bias is None else torch.cat([layer.bias for layer in layers])
        return F.linear(x, weight, bias)

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        return self.to_out[1](self.to_out[0](o))

    def self_attention(self, h: torch.Tensor) -> torch.Tensor:
        """h (N, L, D) -> (N, L, D): each of the N sequences attends over its own L tokens."""
        N, L, _ = h.shape
        qkv = self._fused(h, (self.to_q, self.to_k, self.to_v)).view(N, L, 3, self.heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return self._out(_merge(ops.attention(q, k, v)))

    def cross_attention(self, x: torch.Tensor, frames: int, segments: Sequence[CaptionSegment]) -> torch.Tensor:
        """x (b * frames, T, D) frame tokens -> (b * frames, T, D) attended to their captions.

        Queries of all frames that share one caption form one sequence against it, so caption keys
        and values are projected once per caption rather than once per frame; per query this is the
        same softmax over the same keys as upstream's per-frame attention.
        """
        N, T, _ = x.shape
        b = N // frames
        q = self.to_q(x).view(b, frames, T, self.heads, self.head_dim)
        outs = []
        for seg in segments:
            k_rows = seg.context.shape[0] // b
            n = seg.stop - seg.start
            qs = q[:, seg.start:seg.stop].reshape(b * k_rows, (n // k_rows) * T, self.heads, self.head_dim)
            Lc = seg.context.shape[1]
            kv = self._fused(seg.context, (self.to_k, self.to_v)).view(-1, Lc, 2, self.heads, self.head_dim)
            k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
            o = ops.attention(qs.transpose(1, 2), k, v, key_padding_mask=seg.keep)
            outs.append(_merge(o).view(b, n, T, -1))
        o = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
        return self._out(o.reshape(N, T, -1))


def _attention_chunked(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(E)) v for (B, G, L, E) inputs through ``osp.ops.attention``, in chunks of
    G so that a backend that materializes the scores (the torch math fallback, which is what runs
    for E = 512 where no fused kernel does) never holds more than _ATTN_SCORES_BUDGET of them."""
    B, G, L, _ = q.shape
    step = max(1, _ATTN_SCORES_BUDGET // max(1, B * L * L))
    if step >= G:
        return ops.attention(q, k, v)
    return torch.cat([ops.attention(q[:, g:g + step], k[:, g:g + step], v[:, g:g + step]) for g in range(0, G, step)],
                     dim=1)


class AttnBlock3D(nn.Module):
    """Single-head self-attention over the H*W positions, scale 1/sqrt(C), with a residual.

    ``norm`` (GroupNorm), then ``q``, ``k``, ``v`` (1x1x1 convs, computed as one fused conv), attention
    (``osp.ops.attention``, one head of C features), ``proj_out`` (1x1x1) with the input added. Two
    behaviours, selected by ``per_frame``:

    - ``per_frame=False`` (upstream's "AttnBlock3D", which the v1.0 weights were trained with): each
      sample's contiguous (C, T, H, W) q/k/v memory is reinterpreted, with no permute, as T groups of
      (C, H*W); group g holds rows c*T + t in [g*C, (g+1)*C) of the (C*T, H*W) matrix, so for T > 1
      a group mixes channels of several frames. The result is written back the same way.
    - ``per_frame=True`` ("AttnBlock3DFix"): attention within each frame over its H*W positions
      with the C channels as features.

    For T = 1 both are the Stable Diffusion VAE's attention block.
    """

    def __init__(self, channels: int, per_frame: bool = True):
        super().__init__()
        self.channels = channels
        self.per_frame = per_frame
        self.norm = GroupNorm(32, channels, eps=1e-6)
        self.q = CausalConv3d(channels, channels, 1)
        self.k = CausalConv3d(channels, channels, 1)
        self.v = CausalConv3d(channels, channels, 1)
        self.proj_out = CausalConv3d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        weight = torch.cat([self.q.conv.weight, self.k.conv.weight, self.v.conv.weight])
        bias = torch.cat([self.q.conv.bias, self.k.conv.bias, self.v.conv.bias])
        qkv = ops.causal_conv3d(self.norm(x), weight, bias).contiguous()
        # Each chunk is one dense (C, T, H, W) block per sample, so the views below copy nothing.
        if self.per_frame:
            q, k, v = (y.permute(0, 2, 3, 4, 1).reshape(b, t, h * w, c) for y in qkv.chunk(3, dim=1))
            out = _attention_chunked(q, k, v)  # (b, t, hw, c)
            del q, k, v, qkv
            out = out.permute(0, 3, 1, 2).reshape(b, c, t, h, w).contiguous()
        else:
            q, k, v = (y.reshape(b, t, c, h * w).transpose(-1, -2) for y in qkv.chunk(3, dim=1))
            out = _attention_chunked(q, k, v)  # (b, t, hw, c): group t, position, pseudo-channel
            del q, k, v, qkv
            out = out.transpose(-1, -2).reshape(b, c, t, h, w)
        return self.proj_out(out, residual=x)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, per_frame={self.per_frame}"
