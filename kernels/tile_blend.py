"""Triton kernel for tiled decoding: accumulate one decoded tile into the full output with
separable linear-ramp weights, in place, without a weighted copy of the tile.

out (B, C, T, H, W) and wsum (T, H, W) are dense contiguous; the tile (B, C, t, h, w) may have any
strides. For tile index (i, j, k) the weight is r_t(i) * r_h(j) * r_w(k), where along an axis of
tile length n with overlaps lo (start) and hi (end):
    r(i) = min(1, (i + 1) / (lo + 1), (n - i) / (hi + 1)).
out[region] += tile * weight; wsum[region] += weight (by the programs of plane (b, c) = (0, 0)).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from osp._utils import interpreting


@triton.jit
def _ramp(i, n, lo, hi):
    # Float literals, not .to(): an int argument equal to 1 arrives as a compile-time constant.
    up = (i + 1).to(tl.float32) / (lo + 1.0)
    down = (n - i).to(tl.float32) / (hi + 1.0)
    return tl.minimum(tl.minimum(up, down), 1.0)


@triton.jit
def _blend_kernel(OUT, WSUM, TILE, C, T, H, W, t, h, w, t0, h0, w0,
                  lo_t, hi_t, lo_h, hi_h, lo_w, hi_w,
                  s_b, s_c, s_t, s_h, s_w,
                  BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr):
    plane = tl.program_id(0)  # over (b, c, i) of the tile: i fastest
    pid_h = tl.program_id(1)
    i = plane % t
    bc = plane // t
    b = bc // C
    c = bc % C
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_w = tl.arange(0, BLOCK_W)
    mask = (offs_h < h)[:, None] & (offs_w < w)[None, :]
    weight = (_ramp(i, t, lo_t, hi_t) * _ramp(offs_h, h, lo_h, hi_h)[:, None]
              * _ramp(offs_w, w, lo_w, hi_w)[None, :])
    src = (b.to(tl.int64) * s_b + c.to(tl.int64) * s_c + i.to(tl.int64) * s_t
           + offs_h.to(tl.int64)[:, None] * s_h + offs_w.to(tl.int64)[None, :] * s_w)
    v = tl.load(TILE + src, mask=mask, other=0.0).to(tl.float32)
    pos = ((t0 + i).to(tl.int64) * H + (h0 + offs_h).to(tl.int64)[:, None]) * W + (w0 + offs_w)[None, :]
    dst = bc.to(tl.int64) * T * H * W + pos
    acc = tl.load(OUT + dst, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + dst, (acc + v * weight).to(OUT.dtype.element_ty), mask=mask)
    if bc == 0:
        ws = tl.load(WSUM + pos, mask=mask, other=0.0)
        tl.store(WSUM + pos, ws + weight, mask=mask)


def blend_tile_(out: torch.Tensor, wsum: torch.Tensor, tile: torch.Tensor, offset, overlap_lo, overlap_hi) -> None:
    """See the module docstring; offset, overlap_lo, overlap_hi are (t, h, w) int triples."""
    B, C, T, H, W = out.shape
    _, _, t, h, w = tile.shape
    block_w = triton.next_power_of_2(w)
    budget = 16384 if interpreting() else 2048
    block_h = max(1, min(triton.next_power_of_2(h), budget // block_w))
    grid = (B * C * t, triton.cdiv(h, block_h))
    _blend_kernel[grid](out, wsum, tile, C, T, H, W, t, h, w, *offset,
                        overlap_lo[0], overlap_hi[0], overlap_lo[1], overlap_hi[1], overlap_lo[2], overlap_hi[2],
                        *tile.stride(), BLOCK_H=block_h, BLOCK_W=block_w, num_warps=4)
