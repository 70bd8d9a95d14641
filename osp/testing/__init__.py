"""What tests, the demo and the benchmark suites share, so that each is written once.

- ``parity``: the rule every kernel is held to (DESIGN.md), ``parity(out, ref64, torch_out)``.
- ``op_cases``: one small parity case per public op (forward and gradients), run by ``osp demo``.
- ``vae_tiling``: tiled-decode measurements (work factor, GroupNorm statistics error, PSNR, peak
  memory), run by ``osp demo`` and bench/bench_vae_tiling.py.
- ``memory``: peak memory of one call (CUDA allocator, or a fresh process's RSS on CPU).

Only ``parity`` is imported here; the others import the models when used.
"""
from .parity import ATOL, Parity, parity

__all__ = ["ATOL", "Parity", "parity"]
