"""Blending of overlapping tiles for tiled video decoding and encoding.

A tiled decode allocates the whole output ``out`` (B, C, T, H, W) and a weight sum ``wsum``
(T, H, W) (fp32, zeros), calls ``blend_tile_`` once per decoded tile, then ``blend_normalize_``.
Each tile is weighted by a separable product of linear ramps over its overlaps, so seams fade
linearly and every covered position ends as a convex combination of the tiles covering it:
no per-row Python loops, no concatenation of tiles, no weighted copy of a tile.

Backends of ``blend_tile_``: ``triton`` (kernels/tile_blend.py), ``ext`` (the compiled
``osp_C::blend_tile_``, CPU: one vectorized pass per tile row, no temporary), ``torch`` (in-place
add of the weighted tile, one temporary of the tile's size). ``blend_normalize_``: ``ext`` (CPU,
contiguous fp32/fp16/bf16 out), ``torch`` (``out.div_(wsum)``, a single broadcast pass).
Both ops form the dispatch group ``tile_blend`` (``OSP_BACKEND=tile_blend=torch``).

Dtypes: both write in place in out's dtype (as ``out += ...`` and ``out /= ...`` do; autocast
does not touch in-place ops); the weights and wsum are float32.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch

from .._utils import FLOAT_DTYPES
from . import _ext
from ._dispatch import Backend, Op
from ._triton import triton_why_not


def ramp(n: int, lo: int, hi: int, device=None) -> torch.Tensor:
    """Weights of a tile axis of length n: rising over the first ``lo`` elements, falling over the
    last ``hi``, 1 between: r(i) = min(1, (i + 1) / (lo + 1), (n - i) / (hi + 1)), fp32."""
    i = torch.arange(n, device=device, dtype=torch.float32)
    return torch.minimum(torch.minimum((i + 1) / (lo + 1), (n - i) / (hi + 1)), torch.ones((), device=device))


def tile_weight(shape: Sequence[int], overlap_lo: Sequence[int], overlap_hi: Sequence[int], device=None) -> torch.Tensor:
    """The (t, h, w) weight of a tile: the outer product of the three ramps."""
    rt, rh, rw = (ramp(n, lo, hi, device) for n, lo, hi in zip(shape, overlap_lo, overlap_hi))
    return rt[:, None, None] * rh[None, :, None] * rw[None, None, :]


def _triple(name: str, v) -> Tuple[int, int, int]:
    if not (isinstance(v, (tuple, list)) and len(v) == 3 and all(isinstance(i, int) and i >= 0 for i in v)):
        raise ValueError(f"blend_tile_: {name}={v!r}; expected 3 non-negative ints (t, h, w)")
    return tuple(v)


def _check(out, wsum, tile, offset, overlap_lo, overlap_hi):
    for name, t, rank in (("out", out, 5), ("tile", tile, 5), ("wsum", wsum, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"blend_tile_: {name} has shape {shape}; expected rank {rank}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"blend_tile_: {name} has dtype {t.dtype}; expected a floating dtype")
    if not out.is_contiguous():
        raise ValueError("blend_tile_: out must be contiguous (it is the preallocated full output)")
    if wsum.dtype != torch.float32 or not wsum.is_contiguous() or tuple(wsum.shape) != tuple(out.shape[2:]):
        raise ValueError(f"blend_tile_: wsum is {tuple(wsum.shape)} {wsum.dtype}; expected a contiguous float32 "
                         f"{tuple(out.shape[2:])} (out's T, H, W)")
    if tile.shape[:2] != out.shape[:2] or tile.device != out.device or wsum.device != out.device:
        raise ValueError(f"blend_tile_: tile {tuple(tile.shape)} on {tile.device} does not match out "
                         f"{tuple(out.shape)} on {out.device} in (B, C) and device")
    offset = _triple("offset", offset)
    lo, hi = _triple("overlap_lo", overlap_lo), _triple("overlap_hi", overlap_hi)
    for d, (o, n, full) in enumerate(zip(offset, tile.shape[2:], out.shape[2:])):
        if o + n > full:
            raise ValueError(f"blend_tile_: tile {tuple(tile.shape[2:])} at offset {offset} overruns out's "
                             f"{tuple(out.shape[2:])} along axis {'THW'[d]}")
        if lo[d] + hi[d] > n:
            raise ValueError(f"blend_tile_: overlaps {lo[d]} + {hi[d]} exceed the tile's length {n} along {'THW'[d]}")
    return offset, lo, hi


def blend_tile_reference(out, wsum, tile, offset, overlap_lo, overlap_hi):
    """Float64 result of one accumulation: (new out, new wsum), inputs untouched."""
    out64, ws64 = out.double().clone(), wsum.double().clone()
    t0, h0, w0 = offset
    _, _, t, h, w = tile.shape
    wt = tile_weight(tile.shape[2:], overlap_lo, overlap_hi, out.device).double()
    out64[:, :, t0:t0 + t, h0:h0 + h, w0:w0 + w] += tile.double() * wt
    ws64[t0:t0 + t, h0:h0 + h, w0:w0 + w] += wt
    return out64, ws64


def _torch_run(out, wsum, tile, offset, lo, hi):
    t0, h0, w0 = offset
    _, _, t, h, w = tile.shape
    wt = tile_weight(tile.shape[2:], lo, hi, out.device)
    out[:, :, t0:t0 + t, h0:h0 + h, w0:w0 + w] += (tile * wt).to(out.dtype)
    wsum[t0:t0 + t, h0:h0 + h, w0:w0 + w] += wt


def _triton_run(out, wsum, tile, offset, lo, hi):
    from osp.kernels.tile_blend import blend_tile_ as kernel

    kernel(out, wsum, tile, offset, lo, hi)


def _triton_why_not(out, wsum, tile, offset, lo, hi, *, forced):
    if out.dtype == torch.float64:
        return "float64 is computed in fp32 by the kernel; the torch backend keeps float64"
    if tile.numel() == 0:
        return "empty tile"
    if tile.shape[-1] > 8192:
        return f"tile width {tile.shape[-1]} > 8192 does not fit one row block"
    return triton_why_not(out, forced=forced)


def _probe(device, dtype):
    out = torch.zeros(1, 3, 5, 16, 16, device=device, dtype=dtype)
    return (out, torch.zeros(5, 16, 16, device=device), torch.randn(1, 3, 5, 8, 8, device=device, dtype=dtype),
            (0, 4, 4), (0, 2, 2), (0, 2, 2)), {}


_EXT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _ext_why_not(out, wsum, tile, offset, lo, hi, *, forced):
    reason = _ext.why_not("blend_tile_", out.device.type)
    if reason is None and (out.dtype not in _EXT_DTYPES or tile.dtype not in _EXT_DTYPES):
        reason = f"out {out.dtype} / tile {tile.dtype}: the kernel takes float32, float16 and bfloat16"
    return reason


def _ext_run(out, wsum, tile, offset, lo, hi):
    torch.ops.osp_C.blend_tile_(out, wsum, tile, list(offset), list(lo), list(hi))


BLEND_TILE = Op("blend_tile_", [Backend("triton", _triton_run, _triton_why_not),
                                Backend("ext", _ext_run, _ext_why_not),
                                Backend("torch", _torch_run, lambda *a, forced: None)], probe=_probe,
                group="tile_blend")


def blend_tile_(out: torch.Tensor, wsum: torch.Tensor, tile: torch.Tensor, offset: Sequence[int],
                overlap_lo: Sequence[int], overlap_hi: Sequence[int], *, backend: Optional[str] = None) -> None:
    """Accumulate one tile in place: out[region] += tile * weight, wsum[region] += weight.

    Args:
        out: (B, C, T, H, W) contiguous accumulator (fp32 recommended; any float dtype works).
        wsum: (T, H, W) contiguous float32 weight sum, zeros before the first tile.
        tile: (B, C, t, h, w), any strides and float dtype, placed at ``offset`` = (t0, h0, w0).
        overlap_lo, overlap_hi: (t, h, w) lengths of the ramps at the tile's start and end along each
            axis: the overlap with the previous and the next tile (0 at the output's borders).
        backend: force "triton", "ext" or "torch".
    Tiles may arrive in any order; ``blend_normalize_`` finishes the output.
    """
    offset, lo, hi = _check(out, wsum, tile, offset, overlap_lo, overlap_hi)
    BLEND_TILE.dispatch((out, wsum, tile, offset, lo, hi), {}, backend)


def _check_normalize(out, wsum):
    for name, t, rank in (("out", out, 5), ("wsum", wsum, 3)):
        if not isinstance(t, torch.Tensor) or t.dim() != rank:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"blend_normalize_: {name} has shape {shape}; expected rank {rank}")
        if t.dtype not in FLOAT_DTYPES:
            raise ValueError(f"blend_normalize_: {name} has dtype {t.dtype}; expected a floating dtype")
    if tuple(wsum.shape) != tuple(out.shape[2:]):
        raise ValueError(f"blend_normalize_: wsum {tuple(wsum.shape)} does not match out's {tuple(out.shape[2:])}")
    if wsum.device != out.device:
        raise ValueError(f"blend_normalize_: wsum is on {wsum.device} but out is on {out.device}")
    if not bool((wsum > 0).all()):
        raise ValueError("blend_normalize_: some output positions were covered by no tile (weight sum 0)")


def _normalize_ext_why_not(out, wsum, *, forced):
    reason = _ext.why_not("blend_normalize_", out.device.type)
    if reason is None and (out.dtype not in _EXT_DTYPES or not out.is_contiguous()):
        reason = f"out is {out.dtype}, contiguous={out.is_contiguous()}: the kernel takes contiguous fp32/fp16/bf16"
    if reason is None and (wsum.dtype != torch.float32 or not wsum.is_contiguous()):
        reason = "wsum is not a contiguous float32 tensor"
    return reason


def _normalize_ext_run(out, wsum):
    torch.ops.osp_C.blend_normalize_(out, wsum)
    return out


BLEND_NORMALIZE = Op(
    "blend_normalize_",
    [Backend("ext", _normalize_ext_run, _normalize_ext_why_not),
     Backend("torch", lambda out, wsum: out.div_(wsum), lambda *a, forced: None)],
    probe=lambda device, dtype: ((torch.randn(1, 3, 5, 16, 16, device=device, dtype=dtype),
                                  torch.rand(5, 16, 16, device=device) + 0.5), {}),
    group="tile_blend",
)


def blend_normalize_(out: torch.Tensor, wsum: torch.Tensor, *, backend: Optional[str] = None) -> torch.Tensor:
    """out /= wsum in place, finishing a tiled reconstruction.

    Args:
        out: (B, C, T, H, W) accumulator that ``blend_tile_`` filled, any float dtype.
        wsum: (T, H, W) weight sum (float32 from ``blend_tile_``; any float dtype), > 0 everywhere:
            a position no tile covered is a ValueError.
        backend: force "ext" or "torch".

    Returns:
        out itself, divided in the promoted dtype of out and wsum (fp32 for a 16-bit out) and stored
        in out's dtype.
    """
    _check_normalize(out, wsum)
    return BLEND_NORMALIZE.dispatch((out, wsum), {}, backend)
