"""GroupNorm+SiLU (32 groups, eps 1e-6, weight and bias) of video-VAE activations.

Each backend of ``osp.ops.group_norm(..., act="silu")`` is timed against the eager PyTorch pair
``F.silu(F.group_norm(x))`` in the same memory format: contiguous NCDHW ("ncdhw") and
channels_last_3d ("ndhwc"), forward alone ("fwd") and forward plus backward ("fwd+bwd", gradients
of x, weight and bias under a random upstream gradient).

GPU: bf16 activations of the Open-Sora-Plan VAE decoder's stages. CPU: VAE-stage shapes in fp32 and
bf16, the ``ext`` backend (the compiled osp._C, when built) and the ``torch`` backend against the
same eager pair; the Triton rows run only when TRITON_INTERPRET=1 was set before triton was
imported, on small fp32 shapes, and then measure the interpreter, not the kernel.
"""
from __future__ import annotations

import os
from typing import Callable, List

import torch
import torch.nn.functional as F

from osp.ops import _ext, group_norm

from .harness import INTERPRETER_NOTE, Case, timed

GROUPS, EPS = 32, 1e-6
GPU_SHAPES = [(1, 128, 17, 256, 256), (1, 256, 17, 128, 128), (1, 512, 17, 64, 64), (1, 512, 5, 64, 64)]
CPU_SHAPES = [(1, 128, 17, 64, 64), (1, 256, 17, 32, 32), (1, 512, 5, 32, 32)]
INTERPRETER_SHAPES = [(1, 32, 5, 32, 32), (1, 64, 9, 16, 16)]  # the Triton interpreter on CPU
LAYOUTS = {"ncdhw": torch.contiguous_format, "ndhwc": torch.channels_last_3d}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BASELINE_NAME = "torch GroupNorm+SiLU eager"


def _backend(name: str) -> Callable:
    def run(x, w, b):
        return group_norm(x, GROUPS, w, b, EPS, act="silu", backend=name)

    return run


def _eager(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, EPS))


def cases(device: str, quick: bool) -> List[Case]:
    """GroupNorm+SiLU cases for ``device`` ("cuda" or "cpu"); ``quick`` keeps the first shape only.

    Bytes: forward x read + y write; forward+backward adds the backward's x read, dy read and dx
    write. weight/bias reads and their gradients' writes are counted too (C elements each).
    """
    cuda = device.startswith("cuda")
    if cuda:
        # ext: the CUDA half of osp._C when it was built (make gpu-check builds it), against torch
        # and beside the Triton kernel (its target: within 10% of it).
        gpu_ext = ["ext"] if _ext.why_not("group_norm_act", "cuda") is None else []
        plan = [(GPU_SHAPES, torch.bfloat16, ["triton"] + gpu_ext + ["torch"])]
    else:
        cpu_backends = ["torch"] + (["ext"] if _ext.why_not("group_norm_act", "cpu") is None else [])
        plan = [(CPU_SHAPES, dt, cpu_backends) for dt in (torch.float32, torch.bfloat16)]
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            plan.append((INTERPRETER_SHAPES, torch.float32, ["triton"]))
    out: List[Case] = []
    for shapes, dtype, backends in plan:
        out += _cases(device, shapes[:1] if quick else shapes, dtype, backends)
    return out


def _cases(device: str, shapes, dtype: torch.dtype, backends: List[str]) -> List[Case]:
    cuda = device.startswith("cuda")
    out: List[Case] = []
    for shape in shapes:
        C = shape[1]
        for layout, fmt in LAYOUTS.items():
            # One set of random inputs per (shape, layout), shared by every mode and backend.
            x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=fmt)
            dy = torch.randn_like(x)
            w = 1 + 0.1 * torch.randn(C, device=device, dtype=dtype)
            b = 0.1 * torch.randn(C, device=device, dtype=dtype)
            xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
            elem = x.element_size()
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    args, grads, nbytes = (x, w, b, None), [], (2 * x.numel() + 2 * C) * elem
                else:
                    args, grads, nbytes = (xg, wg, bg, dy), [xg, wg, bg], (5 * x.numel() + 6 * C) * elem
                baseline = timed(_eager, args[:3], args[3])
                for name in backends:
                    out.append(Case(
                        op="group_norm", shape="x".join(map(str, shape)), dtype=DTYPE_NAMES[dtype],
                        layout=layout, backend=name, mode=mode, run=timed(_backend(name), args[:3], args[3]),
                        baseline=baseline, baseline_name=BASELINE_NAME, bytes=nbytes, flops=None,
                        grad_to_none=grads, note=INTERPRETER_NOTE if name == "triton" and not cuda else "",
                    ))
    return out
