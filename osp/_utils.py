"""Torch-only helpers below both osp.ops and the Triton kernels (osp.kernels).

Nothing here imports triton or any other part of osp, so the ops and the kernels can both import
it without a cycle: whether Triton runs in its CPU interpreter, memory formats, optional imports,
the floating dtypes and activations the ops accept, and the autocast state of a device.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import os
from types import ModuleType
from typing import Callable, Dict, Optional, Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
"""The dtypes every op accepts for its floating tensors."""

ACTIVATIONS = (None, "silu")
"""The activations group_norm fuses (None = identity); a kernel's activation code is the index here."""


def trace_constant(fn: Callable) -> Callable:
    """Mark ``fn`` as ``torch.compiler.assume_constant_result`` does: while torch.compile traces, it
    runs once and its result is a constant (no graph break, no guard). Sets the attribute that
    decorator sets, because calling it imports torch._dynamo (seconds, and triton) at import time."""
    fn._dynamo_marked_constant = True
    return fn


@trace_constant  # read once while torch.compile traces: no graph break
def interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def records_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """True when autograd would record a call on ``tensors`` (grad mode on and one of them, None
    skipped, requires grad): the test for taking an inference-only path (in place, no Function)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def write_json_atomic(path: str, obj, indent: int = 1) -> None:
    """``obj`` as JSON (and a newline) written to a temporary file beside ``path`` and renamed into place:
    a reader sees the old file or the whole new one, never a part; the temporary file is removed when
    writing fails."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last_3d when x is stored that way (and not also plain contiguous), else contiguous."""
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last_3d):
        return torch.channels_last_3d
    return torch.contiguous_format


@functools.lru_cache(maxsize=None)
def optional_module(name: str, pip_name: str, extra: str) -> Tuple[Optional[ModuleType], Optional[str]]:
    """(module, None) when ``name`` imports, else (None, why not): a missing optional part costs a
    fallback with a reason, never an ImportError."""
    if importlib.util.find_spec(name.split(".")[0]) is None:
        return None, f"{pip_name} is not installed (pip install {pip_name}, or the osp[{extra}] extra)"
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # a broken install (ABI mismatch with torch) costs a fallback
        return None, f"{pip_name} failed to import: {type(exc).__name__}: {exc}"


@trace_constant  # a constant while torch.compile traces: no graph break
def triton_missing() -> Optional[str]:
    """None when triton can be imported, else why not."""
    return optional_module("triton", "triton", "triton")[1]


_ANY_AUTOCAST = getattr(torch._C, "_is_any_autocast_enabled", None)


def no_autocast_anywhere() -> bool:
    """True when autocast is off on every device (one C call; the ops' fast path). False when unknown:
    while torch.compile traces (Dynamo need not know this function) or on a torch without it."""
    return _ANY_AUTOCAST is not None and not torch.compiler.is_compiling() and not _ANY_AUTOCAST()


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` casts to on ``device_type`` ("cpu", "cuda"), or None when
    autocast is off there (or the device type has no autocast)."""
    try:
        if not torch.is_autocast_enabled(device_type):
            return None
        return torch.get_autocast_dtype(device_type)
    except TypeError:  # torch < 2.4: no device argument, one function per device type
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None
    except RuntimeError:  # a device type autocast does not know (meta)
        return None


def lazy_exports(package: str, exports: Dict[str, str]) -> Tuple[Callable[[str], object], Callable[[], list]]:
    """``(__getattr__, __dir__)`` for a package whose names ``exports`` maps to the submodule (relative
    name, e.g. ".vae") that defines them: the submodule is imported on first access, so importing the
    package stays cheap and needs none of its submodules' dependencies."""

    def __getattr__(name: str):
        if name in exports:
            return getattr(importlib.import_module(exports[name], package), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    def __dir__() -> list:
        return sorted(set(vars(importlib.import_module(package))) | set(exports))

    return __getattr__, __dir__
