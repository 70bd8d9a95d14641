"""Whether the Triton backend can run a call, without importing triton until a kernel runs."""
from __future__ import annotations

import functools
import importlib.util
import os
from typing import Optional

import torch


def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_missing() -> Optional[str]:
    """None when triton can be imported, else why not."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton, or the osp[triton] extra)"
    try:
        import triton  # noqa: F401
    except Exception as exc:  # a broken install must cost a fallback, not an import error
        return f"triton failed to import: {exc}"
    return None


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
