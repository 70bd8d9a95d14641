"""Blending decoded tiles into a video: osp.ops.blend_tile_ over every tile, then blend_normalize_.

The baseline is the torch backend (an in-place add of the ramp-weighted tile, which builds one
temporary per tile). Tiles of 256 px + 64 px overlap (the VAE's sample tile and 25% overlap),
17-frame chunks overlapping by 4 frames; fp32 accumulator.
"""
from __future__ import annotations

import os
from typing import List

import torch

from osp.ops import blend_normalize_, blend_tile_

from .harness import Case

GPU_SHAPES = [(1, 3, 33, 512, 512), (1, 3, 65, 1024, 1024)]
CPU_SHAPES = [(1, 3, 9, 96, 96)]


def _grid(full: int, tile: int, overlap: int):
    start, out = 0, []
    while True:
        size = min(tile, full - start)
        out.append((start, size, overlap if start else 0, overlap if start + size < full else 0))
        if start + size >= full:
            return out
        start += tile - overlap


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
    return out_cases
