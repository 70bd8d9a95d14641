"""Peak memory of one call: the CUDA allocator's peak, or on CPU the resident memory of a process.

On CPU the allocator keeps freed pages and other work leaves its own high-water mark, so a
measurement worth reporting runs one call in a fresh interpreter: ``peak_rss_in_subprocess``
starts ``python -m MODULE --peak ARGS...``, whose last stdout line is ``{"peak_mib": ...}``
(as written by ``print_peak``).

glibc's malloc keeps freed blocks below its mmap threshold in its heap, and raises that threshold
each time a larger mmapped block is freed (up to 32 MiB), so the resident peak of a call that
allocates tensors of many sizes counts memory held for reuse, not only memory in use.
``FIXED_MMAP_THRESHOLD`` (an environment for ``peak_rss_in_subprocess``) fixes the threshold at
128 KiB: every large tensor is then mapped and unmapped on its own, and the peak is memory in use.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Dict, Optional, Union

import torch

# The folder holding the osp package: a fresh interpreter finds this osp there even when it is
# not installed (a source checkout run in place).
_OSP_PARENT = Path(__file__).resolve().parents[2]

FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def peak_cuda_mib(fn: Callable[[], object]) -> float:
    """MiB that one call of fn allocates on the current CUDA device at its peak, beyond what was live."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_rss_mib(fn: Callable[[], object]) -> float:
    """MiB by which one call of fn raises this process's resident memory at its peak (Linux: writing
    "5" to /proc/self/clear_refs resets the high-water mark VmHWM to the current RSS)."""
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - before) / 1024


def print_peak(fn: Callable[[], object]) -> None:
    """The ``--peak`` end of ``peak_rss_in_subprocess``: print the peak of one call as its last line."""
    print(json.dumps({"peak_mib": peak_rss_mib(fn)}))


def peak_rss_in_subprocess(module: str, *args: str, cwd: Optional[Union[str, Path]] = None,
                           env: Optional[Dict[str, str]] = None) -> float:
    """Run ``python -m module --peak *args`` in a fresh interpreter (in ``cwd``, this process's by
    default; ``env`` adds environment variables) and return the peak MiB it prints last (see
    ``print_peak``)."""
    env = dict(os.environ, **(env or {}))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_OSP_PARENT), env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-m", module, "--peak", *args], cwd=cwd, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"python -m {module} --peak {' '.join(args)} exited with {proc.returncode}: {last}")
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mib"]
