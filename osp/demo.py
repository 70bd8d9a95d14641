"""``osp demo`` (``make demo``): what osp does on this machine, with no downloads.

1. ``osp info``; 2. every op on every backend that can run here against its float64 reference,
forward and gradients, as a pass/fail table (on CPU the Triton kernels run in the interpreter);
3. a quick benchmark on the current device.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: on CPU the kernels can only run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from osp import ops  # noqa: E402
from osp.cli import info  # noqa: E402
from osp.testing import parity  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, inputs, dy)


def check_group_norm(backend: str, dtype: torch.dtype) -> List[tuple]:
    """(case, output, Parity) rows for y, dx, dweight, dbias of GroupNorm+SiLU on a small VAE-like clip."""
    torch.manual_seed(0)
    shape, groups = (2, 64, 5, 12, 10), 32
    x = (torch.randn(shape, device=DEVICE) * 2 + 1).to(dtype).to(memory_format=torch.channels_last_3d)
    w = torch.randn(64, device=DEVICE).to(dtype)
    b = torch.randn(64, device=DEVICE).to(dtype)
    leaves = [t.requires_grad_(True) for t in (x, w, b)]
    dy = torch.randn(shape, device=DEVICE).to(dtype)

    out = ops.group_norm(x, groups, w, b, 1e-6, act="silu", backend=backend)
    torch_out = F.silu(F.group_norm(x, groups, w, b, 1e-6))
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = F.silu(F.group_norm(leaves64[0], groups, leaves64[1], leaves64[2], 1e-6))
    case = f"{'x'.join(map(str, shape))} G={groups} silu ndhwc"
    rows = [(case, "y", parity(out, ref.detach(), torch_out))]
    for name, g, tg, rg in zip(("dx", "dweight", "dbias"), _grads(out, leaves, dy), _grads(torch_out, leaves, dy),
                               _grads(ref, leaves64, dy.double())):
        rows.append((case, name, parity(g, rg, tg)))
    return rows


# Per op: check(backend, dtype) -> [(case, output name, Parity)].
CHECKS: Dict[str, Callable[[str, torch.dtype], List[tuple]]] = {"group_norm": check_group_norm}


def parity_table() -> bool:
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    registry = ops.registered_ops()
    print(f"\n## Parity against the float64 reference on {DEVICE}\n")
    print("Each fast backend is held to: max|err| <= 2 x (torch's own error in that dtype) + a small floor.\n")
    print("| op | backend | dtype | case | output | max abs err | torch's err | bound | rel err | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for op_name, check in CHECKS.items():
        op = registry[op_name]
        for backend, b in op.backends.items():
            if backend == "torch":  # the eager torch path sets the bound; it is not checked against itself
                continue
            for dtype in dtypes:
                args, kwargs = op.probe(DEVICE, dtype)
                reason = b.why_not(*args, forced=True, **kwargs)
                dname = str(dtype).replace("torch.", "")
                if reason:
                    print(f"| {op_name} | {backend} | {dname} | - | - | - | - | - | - | not run: {reason} |")
                    continue
                for case, out_name, p in check(backend, dtype):
                    all_ok &= p.ok
                    print(f"| {op_name} | {backend} | {dname} | {case} | {out_name} | {p.err:.2e} | {p.torch_err:.2e} "
                          f"| {p.bound:.2e}"
                          f" | {p.rel:.1e} | {'PASS' if p.ok else 'FAIL'} |")
    return all_ok


def run(bench: bool = True) -> int:
    print("# osp demo\n")
    print(info())
    ok = parity_table()
    print(f"\nparity: {'all PASS' if ok else 'FAILURES above'}")
    rc = 0 if ok else 1
    if bench:
        from osp.cli import _bench_main

        print("\n## Quick benchmark\n")
        rc = max(rc, _bench_main(["--quick", "--no-save"] + ([] if DEVICE == "cuda" else ["--interpret"])))
    return rc


if __name__ == "__main__":
    sys.exit(run())
