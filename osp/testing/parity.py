"""The parity rule every kernel is held to (DESIGN.md), shared by the test suite and the demo.

A result in dtype d may be off the float64 reference by at most twice what PyTorch's own
computation in dtype d is off, plus a small floor relative to the reference's magnitude.
NaN never passes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

# Floor per dtype, relative to the reference's largest magnitude (at least 1).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-12}


@dataclass
class Parity:
    err: float        # max |out - ref|
    torch_err: float  # max |torch_out - ref|
    bound: float      # 2 * torch_err + ATOL[dtype] * max(1, max|ref|)
    rel: float        # ||out - ref|| / ||ref||
    nan: bool

    @property
    def ok(self) -> bool:
        return not self.nan and self.err <= self.bound


def parity(out: torch.Tensor, ref64: torch.Tensor, torch_out: torch.Tensor) -> Parity:
    """Compare ``out`` (tested dtype) with the float64 reference, ``torch_out`` setting the tolerance."""
    if out.shape != ref64.shape:
        raise ValueError(f"parity: output shape {tuple(out.shape)} != reference shape {tuple(ref64.shape)}")
    ref64 = ref64.to(device=out.device, dtype=torch.float64)
    diff = out.double() - ref64
    err = diff.abs().max().item() if diff.numel() else 0.0
    torch_err = (torch_out.double().to(out.device) - ref64).abs().max().item() if diff.numel() else 0.0
    scale = max(1.0, ref64.abs().max().item() if diff.numel() else 0.0)
    bound = 2 * torch_err + ATOL[out.dtype] * scale
    rel = (diff.norm() / ref64.norm().clamp_min(1e-30)).item()
    return Parity(err, torch_err, bound, rel, bool(torch.isnan(out).any()))
