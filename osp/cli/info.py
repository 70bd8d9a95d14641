"""``osp info``: versions, the device, and for every op which backends run here and why not."""
from __future__ import annotations

import importlib.metadata as md
import importlib.util
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


def info() -> str:
    """Versions, device, and for every op which backends run here and why not."""
    import osp
    from osp._utils import interpreting
    from osp.ops import registered_ops

    ext = "built" if importlib.util.find_spec("osp._C") else "not built (csrc/ has no sources yet)"
    lines = [
        f"osp {osp.__version__}",
        f"python {platform.python_version()}, torch {torch.__version__}, triton {_version('triton')}"
        f" (TRITON_INTERPRET={'1' if interpreting() else '0'})",
        f"optional: diffusers {_version('diffusers')}, flash-attn {_version('flash-attn')}, "
        f"xformers {_version('xformers')}",
        f"compiled extension osp._C: {ext}",
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
