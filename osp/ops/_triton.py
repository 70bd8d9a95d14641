"""Whether the Triton backend can run a call, without importing triton until a kernel runs."""
from __future__ import annotations

from typing import Optional

import torch

from .._utils import interpreting, triton_missing



def triton_why_not(x: torch.Tensor, *, forced: bool) -> Optional[str]:
    """Device and dtype checks shared by every Triton backend; ``x`` is the main input."""
    missing = triton_missing()
    if missing:
        return missing
    if x.device.type == "cuda":
        if interpreting():
            return None if forced else "TRITON_INTERPRET=1 runs kernels in the slow interpreter; force backend='triton' to use it"
        return None
    if x.device.type != "cpu":
        return f"tensor is on {x.device.type}; the Triton backend runs on CUDA (or on CPU through its interpreter)"
    if not interpreting():
        return "tensor is on cpu; Triton needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is imported"
    if x.dtype == torch.bfloat16:
        return "the Triton interpreter rounds bfloat16 wrongly; use float32 or float16 on CPU, or a GPU"
    if not forced:
        return "on CPU Triton only runs in its interpreter, which checks kernels but is slow; force backend='triton' to use it"
    return None
