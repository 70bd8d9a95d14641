"""A tiny built-in caption encoder for tests and the offline demo: no download, no extra package.

Byte-level tokenizer (the caption's UTF-8 bytes, then an end token, padded to max_length) and a
small bidirectional transformer whose weights are drawn from a fixed seed, so every instance with
the same arguments (and torch version) gives the same states. Its states mean nothing: it exists so
that the text-to-video path runs end to end without a 4.7B-parameter T5.
"""
from __future__ import annotations

import json
import math
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ... import ops
from .base import Captions, TextEncoder, call_length, caption_list, zero_padding

PAD, EOS = 0, 1
_BYTE_OFFSET = 2
VOCAB_SIZE = 256 + _BYTE_OFFSET


def tokenize_bytes(captions: Captions, max_length: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (b, max_length) int64: UTF-8 bytes + 2, truncated to max_length - 1, then
    EOS (1), then PAD (0). Every caption, the empty one too, has at least the end token."""
    rows: List[List[int]] = []
    for text in caption_list(captions):
        ids = [b + _BYTE_OFFSET for b in text.encode("utf-8")][: max_length - 1] + [EOS]
        rows.append(ids + [PAD] * (max_length - len(ids)))
    ids = torch.tensor(rows, dtype=torch.long).reshape(len(rows), max_length)
    return ids, (ids != PAD).long()


class _Layer(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        b, L, D = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        a = ops.attention(q, k, v, key_padding_mask=keep).transpose(1, 2).reshape(b, L, D)
        x = x + self.out(a)
        return x + self.mlp(self.norm2(x))


class TinyTextEncoder(nn.Module, TextEncoder):
    """Byte tokens -> embedding + sin-cos positions -> ``layers`` pre-LN transformer layers ->
    LayerNorm -> Linear to ``out_channels``; weights from ``torch.manual_seed(seed)`` (the global
    RNG is left as it was).

    ``encoder(captions)`` -> (states (b, max_length, out_channels) float32 on the module's device,
    zero at padding; mask (b, max_length) int64). ``encoder.encode(captions, max_length=L,
    raw=True)``: L tokens for this call, and the network's own states at the padded positions (pad
    tokens attend to the caption tokens, never to other pads, as in T5).
    """

    def __init__(self, out_channels: int = 64, width: int = 64, layers: int = 2, heads: int = 4,
                 max_length: int = 300, seed: int = 0):
        for name, v in (("out_channels", out_channels), ("width", width), ("layers", layers), ("heads", heads),
                        ("max_length", max_length)):
            if not (isinstance(v, int) and v > 0):
                raise ValueError(f"TinyTextEncoder: {name}={v!r}; expected a positive int")
        if width % heads or width % 2:
            raise ValueError(f"TinyTextEncoder: width={width} must be even and divisible by heads={heads}")
        super().__init__()
        self.max_length, self.out_channels, self.width = max_length, out_channels, width
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.embed = nn.Embedding(VOCAB_SIZE, width)
            self.layers = nn.ModuleList([_Layer(width, heads) for _ in range(layers)])
            self.norm = nn.LayerNorm(width)
            self.proj = nn.Linear(width, out_channels)
        self.requires_grad_(False)
        self.eval()
        self.register_buffer("positions", _sincos(max_length, width), persistent=False)
        self.identity = json.dumps({"encoder": "TinyTextEncoder", "version": 1, "out_channels": out_channels,
                                    "width": width, "layers": layers, "heads": heads, "max_length": max_length,
                                    "seed": seed}, sort_keys=True)

    @property
    def dtype(self) -> torch.dtype:
        return self.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.proj.weight.device

    def tokenize(self, captions: Captions, max_length: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = tokenize_bytes(captions, call_length(type(self).__name__, max_length, self.max_length))
        return ids.to(self.device), mask.to(self.device)

    @torch.no_grad()
    def encode(self, captions: Captions, *, max_length: Optional[int] = None,
               raw: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
        ids, mask = self.tokenize(captions, max_length)
        L = ids.shape[1]
        pos = self.positions[:L] if L <= self.positions.shape[0] else _sincos(L, self.width).to(self.device)
        x = self.embed(ids) * math.sqrt(self.width) * 0.1 + pos.to(self.dtype)
        keep = mask.bool()
        for layer in self.layers:
            x = layer(x, keep)
        states = self.proj(F.layer_norm(x, (self.width,), self.norm.weight, self.norm.bias))
        return (states if raw else zero_padding(states, mask)), mask

    def forward(self, captions: Captions, **kwargs) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.encode(captions, **kwargs)


def _sincos(length: int, width: int) -> torch.Tensor:
    """(length, width) float32 sin-cos position table (computed in float64)."""
    pos = torch.arange(length, dtype=torch.float64)[:, None] / 10000 ** (
        torch.arange(width // 2, dtype=torch.float64) / (width // 2))[None]
    return torch.cat([pos.sin(), pos.cos()], 1).float()
