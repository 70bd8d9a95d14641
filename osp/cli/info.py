"""``osp info``: versions, the device, and for every op which backends run here and why not."""
from __future__ import annotations

import importlib.metadata as md
import os
import platform

import torch


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="versions, device, and which backend each op uses here and why",
                              description=__doc__)
    p.set_defaults(run=run)


def run(args) -> int:
    print(info())
    return 0


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def _device_line() -> str:
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        return (f"cuda: {p.name} (sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
                f"{p.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}")
    return f"cpu: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, no CUDA device"


def _extension_lines() -> list:
    """The compiled extension: where it is, its build metadata, the ops it serves, or why it is not used."""
    from osp.ops import _ext

    if not _ext.AVAILABLE:
        return [f"compiled extension osp._C: not used: {_ext.REASON}"]
    meta = _ext.METADATA
    ops = "; ".join(f"{key}: {', '.join(names)}" for key, names in meta.get("ops", {}).items()) or "none"
    return [
        f"compiled extension osp._C: loaded from {_ext.LIBRARY}",
        f"  built against torch {meta.get('torch')} with {meta.get('compiler', '?')}",
        f"  CPU ISA levels built: {', '.join(meta.get('cpu_isas', []))}; usable here: {', '.join(_ext.cpu_isas())}; "
        f"active: {_ext.cpu_isa()} (OSP_CPU_ISA={os.environ.get('OSP_CPU_ISA', '') or 'unset: the best usable'}); "
        + (f"OpenMP, {torch.get_num_threads()} threads (torch.set_num_threads)" if meta.get("openmp")
           else "no OpenMP: its kernels run on one thread (rebuild with this setup.py)"),
        "  CUDA: " + (f"CUDA {meta.get('cuda_version')}, archs {', '.join(meta.get('cuda_archs', []))}" if meta.get("cuda")
                      else meta.get("cuda_reason") or "not built (osp._C_cuda: OSP_BUILD_CUDA with a CUDA torch)"),
        f"  ops served: {ops}",
    ]


def info() -> str:
    """Versions, device, and for every op which backends run here and why not."""
    import osp
    from osp._utils import interpreting
    from osp.ops import registered_ops

    lines = [
        f"osp {osp.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}"
        f" (TRITON_INTERPRET={'1' if interpreting() else '0'})",
        f"optional: diffusers {_version('diffusers')}, flash-attn {_version('flash-attn')}, "
        f"xformers {_version('xformers')}",
        *_extension_lines(),
        f"device: {_device_line()}",
        f"OSP_BACKEND={os.environ.get('OSP_BACKEND', '') or '(unset: automatic choice)'}",
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    lines.append(f"ops (probed with a small {str(dtype).replace('torch.', '')} call on {device}; first usable wins):")
    for name, op in registered_ops().items():
        if op.probe is None:
            lines.append(f"  {name}: no probe")
            continue
        args, kwargs = op.probe(device, dtype)
        for backend, b in op.backends.items():
            auto = b.why_not(*args, forced=False, **kwargs)
            forced = b.why_not(*args, forced=True, **kwargs)
            if auto is None:
                state = "usable"
            elif forced is None:
                state = f"only when forced ({auto})"
            else:
                state = f"unavailable: {forced}"
            lines.append(f"  {name:<22} {backend:<10} {state}")
    return "\n".join(lines)
