"""Blending decoded tiles into a video: osp.ops.blend_tile_ over every tile, then blend_normalize_.

Two kinds of rows:
- every backend against the torch backend (an in-place add of the ramp-weighted tile, which builds
  one temporary per tile): tiles of 256 px + 64 px overlap (the VAE's sample tile and 25% overlap),
  17-frame chunks overlapping by 4 frames, fp32 accumulator (GPU; a small grid on CPU);
- on CPU, the ``ext`` and ``torch`` backends against upstream's blend (spec numerics B.6, as
  diffusers' AutoencoderKL tiled decode): the same decoded tiles (256 px, stride 192, all frames)
  blended with their upper and left neighbours one pixel row/column at a time in Python, in place,
  then cropped to 192 px and concatenated. Both produce the whole video from the decoded tiles.
"""
from __future__ import annotations

import os
from typing import List

import torch

from osp.ops import blend_normalize_, blend_tile_

from .harness import Case

GPU_SHAPES = [(1, 3, 33, 512, 512), (1, 3, 65, 1024, 1024)]
CPU_SHAPES = [(1, 3, 9, 96, 96)]
# Upstream's tiled decode on CPU: a 17x512x512 clip from 256 px tiles at stride 192 (9 tiles).
UPSTREAM_CPU_SHAPES = [(1, 3, 17, 512, 512)]
UPSTREAM_TILE, UPSTREAM_OVERLAP = 256, 64


def _grid(full: int, tile: int, overlap: int):
    start, out = 0, []
    while True:
        size = min(tile, full - start)
        out.append((start, size, overlap if start else 0, overlap if start + size < full else 0))
        if start + size >= full:
            return out
        start += tile - overlap


def _upstream_blend(rows, blend: int, keep: int) -> torch.Tensor:
    """Upstream's tiled-decode blend of decoded tiles ``rows[i][j]`` (N, C, T, h, w), in place:
    each tile's first ``e`` rows (then columns) ramp from its upper (left) neighbour, one pixel row
    at a time, then every tile is cropped to keep x keep and the tiles are concatenated."""
    out_rows = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                above = rows[i - 1][j]
                e = min(above.shape[3], tile.shape[3], blend)
                for y in range(e):
                    tile[:, :, :, y, :] = above[:, :, :, -e + y, :] * (1 - y / e) + tile[:, :, :, y, :] * (y / e)
            if j > 0:
                left = row[j - 1]
                e = min(left.shape[4], tile.shape[4], blend)
                for x in range(e):
                    tile[:, :, :, :, x] = left[:, :, :, :, -e + x] * (1 - x / e) + tile[:, :, :, :, x] * (x / e)
            kept.append(tile[:, :, :, :keep, :keep])
        out_rows.append(torch.cat(kept, dim=4))
    return torch.cat(out_rows, dim=3)


def _upstream_cases(quick: bool) -> List[Case]:
    """CPU: the ext and torch backends against upstream's per-row Python blend, same tiles."""
    from osp.ops import _ext

    backends = (["ext"] if _ext.why_not("blend_tile_", "cpu") is None else []) + ["torch"]
    out_cases: List[Case] = []
    for shape in UPSTREAM_CPU_SHAPES:
        B, C, T, H, W = shape
        grid_h, grid_w = _grid(H, UPSTREAM_TILE, UPSTREAM_OVERLAP), _grid(W, UPSTREAM_TILE, UPSTREAM_OVERLAP)
        g = torch.Generator().manual_seed(0)
        rows = [[torch.randn(B, C, T, h, w, generator=g) for _, w, _, _ in grid_w] for _, h, _, _ in grid_h]
        out = torch.zeros(shape)
        wsum = torch.zeros(shape[2:])
        places = [((0, h0, w0), rows[i][j], (0, lh, lw), (0, hh, hw))
                  for i, (h0, _, lh, hh) in enumerate(grid_h) for j, (w0, _, lw, hw) in enumerate(grid_w)]
        keep = UPSTREAM_TILE - UPSTREAM_OVERLAP

        def baseline(rows=rows, keep=keep):
            return _upstream_blend(rows, UPSTREAM_OVERLAP, keep)

        def run(backend, out=out, wsum=wsum, places=places):
            def go():
                out.zero_()
                wsum.zero_()
                for offset, tile, lo, hi in places:
                    blend_tile_(out, wsum, tile, offset, lo, hi, backend=backend)
                blend_normalize_(out, wsum, backend=backend)
            return go

        tile_bytes = sum(t.numel() * 4 for row in rows for t in row)
        for be in backends:
            out_cases.append(Case(
                op="tile_blend", shape="x".join(map(str, shape)) + f" ({len(places)} tiles of {UPSTREAM_TILE} px)",
                dtype="fp32", layout="ncthw", backend=be, mode="fwd", run=run(be), baseline=baseline,
                baseline_name="upstream per-row Python blend + crop + cat", bytes=tile_bytes + 3 * out.numel() * 4))
    return out_cases


def cases(device: str, quick: bool) -> List[Case]:
    cuda = device.startswith("cuda")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    tile_px, overlap_px, tile_t, overlap_t = (320, 64, 17, 4) if cuda else (48, 16, 5, 2)
    backends = ["triton"] if cuda else (["triton"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
    out_cases: List[Case] = []
    for shape in shapes[:1] if quick else shapes:
        B, C, T, H, W = shape
        places = [((t0, h0, w0), (t, h, w), (lt, lh, lw), (ht, hh, hw))
                  for t0, t, lt, ht in _grid(T, tile_t, overlap_t)
                  for h0, h, lh, hh in _grid(H, tile_px, overlap_px)
                  for w0, w, lw, hw in _grid(W, tile_px, overlap_px)]
        # One random tile per distinct size, reused at every place of that size (decoded tiles are bf16).
        sizes = {size for _, size, _, _ in places}
        tiles = {s: torch.randn(B, C, *s, device=device, dtype=torch.bfloat16 if cuda else torch.float32) for s in sizes}
        out = torch.zeros(shape, device=device)
        wsum = torch.zeros(shape[2:], device=device)
        tile_bytes = sum(tiles[s].numel() * tiles[s].element_size() + 2 * B * C * s[0] * s[1] * s[2] * 4
                         for _, s, _, _ in places)
        nbytes = tile_bytes + 2 * out.numel() * 4  # plus the normalize pass

        def run(backend, out=out, wsum=wsum, places=places, tiles=tiles):  # bind this shape's buffers
            def go():
                out.zero_()
                wsum.zero_()
                for offset, size, lo, hi in places:
                    blend_tile_(out, wsum, tiles[size], offset, lo, hi, backend=backend)
                blend_normalize_(out, wsum)
            return go

        baseline = run("torch")
        for be in backends:
            out_cases.append(Case(
                op="tile_blend", shape="x".join(map(str, shape)) + f" ({len(places)} tiles)", dtype="bf16->fp32"
                if cuda else "fp32", layout="ncthw", backend=be, mode="fwd", run=run(be), baseline=baseline,
                baseline_name="torch weighted in-place add", bytes=nbytes,
                note="" if cuda else "Triton interpreter: checks correctness, its timings are not speed"))
    if not cuda:
        out_cases.extend(_upstream_cases(quick))
    return out_cases
