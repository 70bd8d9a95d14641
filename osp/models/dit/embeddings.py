"""Embeddings of a Latte video transformer (spec: open-sora-plan-v1.0-numerics.md, A.1-A.3, A.5).

Module and parameter names follow upstream LatteT2V's state dict: ``pos_embed.proj``,
``adaln_single.emb.timestep_embedder.linear_{1,2}``, ``adaln_single.linear``,
``caption_projection.{y_embedding,linear_1,linear_2}``. The sin-cos tables are computed exactly
as the spec says (float32 grid coordinates, float64 frequencies and products, cast to float32).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

TIMESTEP_CHANNELS = 256
CAPTION_EMBED_ROWS = 120  # rows of upstream's unused caption_projection.y_embedding buffer


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(n, dim) float32 table: [sin(p * w_k)]_k || [cos(p * w_k)]_k with w_k = 10000^(-k/(dim/2)).

    ``positions`` (any shape, flattened to n) is used at its own precision (float32 upstream); the
    frequencies and products are float64, cast to float32 at the end.
    """
    if dim % 2:
        raise ValueError(f"sincos_1d: dim={dim}; expected an even width")
    omega = torch.arange(dim // 2, dtype=torch.float64, device=positions.device) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = torch.outer(positions.reshape(-1).to(torch.float64), omega)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1).float()


def sincos_2d(dim: int, grid_h: int, grid_w: int, base_size: int, interpolation_scale: int,
              device: Optional[torch.device] = None) -> torch.Tensor:
    """(grid_h * grid_w, dim) float32 2-D sin-cos embedding of a patch grid, token n = i * grid_w + j.

    Each axis is stretched to span [0, base_size / interpolation_scale) with two successive float32
    divisions; the first half of the width encodes the column coordinate u_j, the second half the
    row coordinate v_i (spec A.1).
    """
    if dim % 4:
        raise ValueError(f"sincos_2d: dim={dim}; expected a multiple of 4")
    v = torch.arange(grid_h, dtype=torch.float32, device=device) / (grid_h / base_size) / interpolation_scale
    u = torch.arange(grid_w, dtype=torch.float32, device=device) / (grid_w / base_size) / interpolation_scale
    cols = u[None, :].expand(grid_h, grid_w)
    rows = v[:, None].expand(grid_h, grid_w)
    return torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)


def temporal_scale(video_length: int) -> int:
    """Open-Sora-Plan's temporal interpolation scale s_t = max(video_length // 5, 1) (spec A.5)."""
    return max(video_length // 5, 1)


def temporal_sincos(dim: int, video_length: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(1, video_length, dim) float32 temporal embedding: row f encodes f / s_t (spec A.5)."""
    positions = torch.arange(video_length, device=device) / temporal_scale(video_length)
    return sincos_1d(dim, positions.to(torch.float32)).unsqueeze(0)


class PatchEmbed(nn.Module):
    """Conv patchify (p x p, stride p) of frames plus the 2-D sin-cos embedding (spec A.1).

    ``pos_embed`` is a non-persistent float32 buffer for the configured grid
    (sample_size // p); other grids get their table computed from scratch with the same base size
    and interpolation scale (kept in a small per-grid cache; the values are not interpolated).
    For a non-square sample_size the buffer covers the configured (Hp0, Wp0) grid, where upstream's
    has g = int(sqrt(Hp0 * Wp0))**2 rows and crashes at that input size; the buffer is not saved,
    so checkpoints are unaffected.
    """

    def __init__(self, sample_size: Tuple[int, int], patch_size: int, in_channels: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.grid = (sample_size[0] // patch_size, sample_size[1] // patch_size)
        self.base_size = sample_size[0] // patch_size
        self.interpolation_scale = max(sample_size[0] // 64, 1)
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)
        self.register_buffer("pos_embed", self._table(*self.grid), persistent=False)
        self._tables: Dict[tuple, torch.Tensor] = {}

    def _table(self, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
        return sincos_2d(self.embed_dim, grid_h, grid_w, self.base_size, self.interpolation_scale, device).unsqueeze(0)

    def reset_buffers(self, device=None) -> None:
        """Recompute the buffer (float32) on ``device``, e.g. after loading onto the meta device."""
        self.pos_embed = self._table(*self.grid, device=device)
        self._tables.clear()

    def table(self, grid_h: int, grid_w: int, device: torch.device) -> torch.Tensor:
        """(1, grid_h * grid_w, D) embedding for a grid: the buffer for the configured grid, else a
        float32 table computed for this grid."""
        if (grid_h, grid_w) == self.grid:
            return self.pos_embed
        key = (grid_h, grid_w, str(device))
        if key not in self._tables:
            if len(self._tables) >= 8:
                self._tables.clear()
            self._tables[key] = self._table(grid_h, grid_w, device=device)
        return self._tables[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, C_in, H, W) -> tokens (N, (H/p)*(W/p), D) in x's dtype, row-major over patches."""
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        pos = self.table(x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size, x.device)
        return (tokens + pos).to(tokens.dtype)


def timestep_sinusoid(timestep: torch.Tensor, channels: int = TIMESTEP_CHANNELS) -> torch.Tensor:
    """(b, channels) float32 [cos(t*l_k)]_k || [sin(t*l_k)]_k, l_k = exp(-ln(10000) k / (channels/2))."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    args = timestep[:, None].float() * torch.exp(exponent)[None, :]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 (256 -> D), SiLU, linear_2 (D -> D) over the 256-channel timestep sinusoid."""

    def __init__(self, dim: int, in_channels: int = TIMESTEP_CHANNELS):
        super().__init__()
        self.in_channels = in_channels
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """timestep (b,) int or float -> (b, D) in ``dtype``; the sinusoid is cast to ``dtype``
        before the MLP, as upstream does with the hidden dtype."""
        h = timestep_sinusoid(timestep, self.in_channels).to(dtype)
        return self.linear_2(F.silu(self.linear_1(h)))


class _TimestepEmbedder(nn.Module):
    """Holder giving upstream's key path ``adaln_single.emb.timestep_embedder``."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.timestep_embedder(timestep, dtype)


class AdaLNSingle(nn.Module):
    """PixArt-alpha's adaLN-single (spec A.2): one timestep MLP for the whole network.

    ``forward(t, dtype, extra=None)`` returns (tau (b, 6D), e (b, D)): e is the MLP output (plus
    ``extra``, a class embedding in the class-conditional variant) and tau = linear(SiLU(e)).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.emb = _TimestepEmbedder(dim)
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype,
                extra: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        e = self.emb(timestep, dtype)
        if extra is not None:
            e = e + extra.to(e.dtype)
        return self.linear(F.silu(e)), e


class CaptionProjection(nn.Module):
    """linear_1 (C_cap -> D), GELU (tanh), linear_2 (D -> D) (spec A.3).

    ``y_embedding`` (120, C_cap) is the null caption of PixArt's classifier-free dropout. Upstream
    registers it as a persistent buffer of random values that nothing reads or trains; it is kept so
    upstream checkpoints load strictly and round-trip. With ``learned=True`` (models trained with
    caption dropout, osp's ``--cfg_dropout``) it is a trainable parameter under the same state-dict
    key, so checkpoints stay interchangeable. ``null_caption(L)`` gives it at a caption length L.
    """

    def __init__(self, in_features: int, dim: int, learned: bool = False):
        super().__init__()
        table = torch.randn(CAPTION_EMBED_ROWS, in_features) / in_features**0.5
        if learned:
            self.y_embedding = nn.Parameter(table)
        else:
            self.register_buffer("y_embedding", table)
        self.linear_1 = nn.Linear(in_features, dim)
        self.linear_2 = nn.Linear(dim, dim)

    @property
    def learned(self) -> bool:
        return isinstance(self.y_embedding, nn.Parameter)

    def make_learned(self) -> None:
        """Turn the ``y_embedding`` buffer into a trainable parameter (same values, same key)."""
        if not self.learned:
            table = self.y_embedding
            del self.y_embedding
            self.y_embedding = nn.Parameter(table)

    def null_caption(self, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The null caption at ``length`` tokens: (states (length, C_cap), mask (length,) int64).

        The 120 rows of ``y_embedding`` come first, with mask 1; the remaining length - 120 positions
        are zero states with mask 0 (captions hold up to 300 tokens). For length < 120 the first
        ``length`` rows are used. The states keep autograd to ``y_embedding``.
        """
        if not (isinstance(length, int) and length > 0):
            raise ValueError(f"null_caption: length={length!r}; expected a positive int (caption tokens)")
        rows = min(length, self.y_embedding.shape[0])
        states = self.y_embedding[:rows]
        if length > rows:
            states = torch.cat([states, states.new_zeros(length - rows, states.shape[1])])
        mask = torch.zeros(length, dtype=torch.long, device=states.device)
        mask[:rows] = 1
        return states, mask

    def forward(self, caption: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(caption), approximate="tanh"))


class LabelEmbedding(nn.Module):
    """Class-label embedding with classifier-free-guidance dropout (DiT / Latte class models).

    The table has ``num_classes + 1`` rows when ``dropout_prob > 0``: the last row is the "no label"
    embedding, used for labels dropped in training and for labels equal to ``num_classes``.
    """

    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)

    def forward(self, labels: torch.Tensor, force_drop_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        """labels (b,) int in [0, num_classes] -> (b, D). In training each label is replaced by the
        "no label" row with probability dropout_prob; ``force_drop_ids`` (b,) (1 = drop) decides
        instead when given, in any mode."""
        if self.dropout_prob > 0 and (self.training or force_drop_ids is not None):
            if force_drop_ids is not None:
                drop = force_drop_ids.to(labels.device).bool()
            else:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)
