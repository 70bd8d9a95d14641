"""Command line: ``osp info``, ``osp demo``, ``osp bench`` (also ``python -m osp ...``)."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import importlib.metadata as md
import os
import platform
import sys
from pathlib import Path
from typing import List, Optional

import torch


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
    from osp.ops import registered_ops
    from osp.ops._triton import interpreting

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
            lines.append(f"  {name:<16} {backend:<7} {state}")
    return "\n".join(lines)


def _bench_main(argv: List[str]) -> int:
    """Run the benchmark suites of a source checkout (they live in bench/, not in the package)."""
    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "bench" / "__main__.py").exists():
            sys.path.insert(0, str(root))
            return importlib.import_module("bench.__main__").main(argv)
    print("osp bench: the benchmark suites live in a source checkout's bench/ folder; "
          "run it from the repository root", file=sys.stderr)
    return 2


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="osp", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("info", help="versions, device, and which backend each op uses here and why")
    demo = sub.add_parser("demo", help="info, parity of every op and backend, a quick benchmark")
    demo.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    sub.add_parser("bench", help="the benchmark suites (arguments go to python -m bench)", add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.cmd == "bench":
        return _bench_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.cmd == "info":
        print(info())
        return 0
    from osp import demo as demo_mod

    return demo_mod.run(bench=not args.no_bench)


if __name__ == "__main__":
    sys.exit(main())
