"""Transformer blocks of a Latte video transformer (spec: open-sora-plan-v1.0-numerics.md, A.4, A.5).

One block class serves the spatial blocks (self-attention over a frame's tokens, then
cross-attention to the caption) and the temporal blocks (self-attention over the frames of one
token position, no cross-attention). Its modulation comes either from adaLN-single (a learned
``scale_shift_table`` (6, D) plus the network's shared tau, as in LatteT2V) or from adaLN-Zero
(the block's own ``adaLN_modulation`` linear over the conditioning vector, as in DiT).

Every norm and modulation runs through ``osp.ops.layer_norm_modulate``, every gated residual
through ``osp.ops.gated_residual`` and every attention through ``osp.nn.Attention``. Parameter
names follow upstream's state dict (``attn1.to_q``, ``attn2.to_out.0``, ``ff.net.0.proj``,
``ff.net.2``); the parameter-free LayerNorms (norm1, norm2, norm3) hold no keys and are not modules.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from ...nn import Attention, CaptionSegment

MODULATIONS = ("ada_norm_single", "ada_norm_zero")


class _GELUProj(nn.Module):
    """Linear then GELU (tanh approximation): ``ff.net.0`` with its ``proj``."""

    def __init__(self, dim: int, inner: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim, inner, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """``net.0.proj`` (D -> mult*D) + GELU tanh, dropout, ``net.2`` (mult*D -> D)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0, bias: bool = True):
        super().__init__()
        self.net = nn.ModuleList([_GELUProj(dim, mult * dim, bias), nn.Dropout(dropout), nn.Linear(mult * dim, dim, bias=bias)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class LatteBlock(nn.Module):
    """A spatial (``cross_attention=True``) or temporal transformer block (spec A.4, A.5).

    Modulation rows, in order: shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    Computation on x (N = b*G sequences of L tokens, all G sequences of a sample share its
    modulation):

        x += gate_msa * SelfAttn(LN(x) * (1 + scale_msa) + shift_msa)
        x += CrossAttn(x, captions)                       (spatial blocks: no norm, no gate)
        x += gate_mlp * FF(LN(x) * (1 + scale_mlp) + shift_mlp)

    ``modulation="ada_norm_single"``: rows = scale_shift_table + tau.view(b, 6, D), tau shared by
    every block. ``"ada_norm_zero"``: rows = adaLN_modulation(SiLU(c)), zero-initialized, so a new
    block is the identity.
    """

    def __init__(self, dim: int, heads: int, head_dim: int, cross_attention: bool, attention_bias: bool = True,
                 norm_eps: float = 1e-6, dropout: float = 0.0, modulation: str = "ada_norm_single"):
        super().__init__()
        if modulation not in MODULATIONS:
            raise ValueError(f"LatteBlock: modulation={modulation!r}; expected one of {MODULATIONS}")
        self.dim, self.norm_eps, self.modulation = dim, norm_eps, modulation
        if modulation == "ada_norm_single":
            self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)
        self.attn1 = Attention(dim, heads, head_dim, bias=attention_bias, dropout=dropout)
        self.attn2 = Attention(dim, heads, head_dim, bias=attention_bias, dropout=dropout) if cross_attention else None
        self.ff = FeedForward(dim, dropout=dropout)
        if modulation == "ada_norm_zero":
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
            nn.init.zeros_(self.adaLN_modulation[1].weight)
            nn.init.zeros_(self.adaLN_modulation[1].bias)

    def modulation_rows(self, cond: torch.Tensor, dtype: torch.dtype) -> List[torch.Tensor]:
        """Six (b, D) rows from tau (b, 6D) (adaLN-single) or c (b, D) (adaLN-Zero)."""
        b = cond.shape[0]
        if self.modulation == "ada_norm_single":
            rows = self.scale_shift_table[None] + cond.view(b, 6, self.dim)
        else:
            rows = self.adaLN_modulation(cond).view(b, 6, self.dim)
        return list(rows.to(dtype).unbind(1))

    def forward(self, x: torch.Tensor, cond: torch.Tensor, segments: Optional[Sequence[CaptionSegment]] = None,
                frames: int = 1) -> torch.Tensor:
        """x (N, L, D) with N = b*G, cond per sample (b, ...) -> (N, L, D).

        ``segments`` and ``frames`` (= G) describe the captions of a spatial block's frames.
        """
        N, L, D = x.shape
        b = cond.shape[0]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.modulation_rows(cond, x.dtype)
        xs = x.reshape(b, (N // b) * L, D)  # all tokens of a sample in one row of the modulation ops
        h = ops.layer_norm_modulate(xs, shift_msa, scale_msa, self.norm_eps)
        a = self.attn1.self_attention(h.view(N, L, D)).to(x.dtype)
        xs = ops.gated_residual(xs, gate_msa, a.view(b, -1, D))
        if self.attn2 is not None:
            if segments is None:
                raise ValueError("LatteBlock: a spatial block needs caption segments for its cross-attention")
            xs = xs + self.attn2.cross_attention(xs.view(N, L, D), frames, segments).to(x.dtype).view(b, -1, D)
        h = ops.layer_norm_modulate(xs, shift_mlp, scale_mlp, self.norm_eps)
        xs = ops.gated_residual(xs, gate_mlp, self.ff(h).to(x.dtype))
        return xs.view(N, L, D)
