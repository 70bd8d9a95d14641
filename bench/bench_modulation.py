"""adaLN-single pieces of LatteT2V blocks: layer_norm_modulate and gated_residual.

Each backend (on CPU: ``ext`` when osp._C is built, and ``torch``) is timed against the upstream-style eager expressions in the same run:
``F.layer_norm(x) * (1 + scale) + shift`` and ``x + gate * y``, forward alone and forward plus
backward (gradients of every input under a random upstream gradient). Shapes are LatteT2V-XL's
(D = 1152) token tensors: spatial blocks (batch x frames, tokens per frame, D) and temporal blocks
(batch x tokens per frame, frames, D), with one modulation row per batch entry (B, 1, D).
"""
from __future__ import annotations

import os
from typing import List

import torch
import torch.nn.functional as F

from osp.ops import _ext, gated_residual, layer_norm_modulate

from .harness import INTERPRETER_NOTE, Case, timed

D = 1152
# 17x256x256 clips (latent 5x32x32, 256 tokens per frame) and 65x512x512 (17x64x64, 1024 tokens), batch 2.
GPU_SHAPES = [("spatial", (10, 256, D)), ("temporal", (512, 5, D)), ("spatial", (34, 1024, D)), ("temporal", (2048, 17, D))]
# CPU: the demo's tiny model (D = 288) and one XL-width spatial block of a 17x256x256 clip.
CPU_SHAPES = [("spatial", (4, 64, 288)), ("temporal", (64, 5, 288)), ("spatial", (2, 256, D))]
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float32: "fp32"}


def _eager_lnm(x, shift, scale):
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale) + shift


def _eager_gated(x, gate, y):
    return x + gate * y


def cases(device: str, quick: bool) -> List[Case]:
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    ext = [] if cuda or _ext.why_not("layer_norm_modulate", "cpu") else ["ext"]
    backends = ["triton", "torch"] if cuda else ext + ["torch"] + (
        ["triton"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
    out: List[Case] = []
    for kind, shape in shapes[:1] if quick else shapes:
        B, L, width = shape
        x = torch.randn(shape, device=device, dtype=dtype)
        y = torch.randn(shape, device=device, dtype=dtype)
        dy = torch.randn(shape, device=device, dtype=dtype)
        mods = [0.1 * torch.randn(B, 1, width, device=device, dtype=dtype) for _ in range(2)]
        elem, n, m = x.element_size(), x.numel(), B * width
        ops = {
            # (op, fn(backend), eager, inputs, fwd bytes, fwd+bwd bytes)
            "layer_norm_modulate": (lambda be: lambda a, b, c: layer_norm_modulate(a, b, c, backend=be),
                                    _eager_lnm, [x] + mods, (2 * n + 2 * m) * elem, (5 * n + 4 * m) * elem),
            "gated_residual": (lambda be: lambda a, b, c: gated_residual(a, b, c, backend=be),
                               _eager_gated, [x, mods[0], y], (3 * n + m) * elem, (6 * n + 2 * m) * elem),
        }
        for op, (make, eager, inputs, fwd_bytes, bwd_bytes) in ops.items():
            grads_in = [t.detach().requires_grad_() for t in inputs]
            for mode, args, grads, nbytes in (("fwd", inputs, [], fwd_bytes),
                                              ("fwd+bwd", grads_in, grads_in, bwd_bytes)):
                d = None if mode == "fwd" else dy
                baseline = timed(eager, args, d)
                for be in backends:
                    out.append(Case(
                        op=op, shape=f"{kind} " + "x".join(map(str, shape)), dtype=DTYPE_NAMES[dtype],
                        layout="bld", backend=be, mode=mode, run=timed(make(be), args, d), baseline=baseline,
                        baseline_name="torch eager (upstream form)", bytes=nbytes, grad_to_none=grads,
                        note=INTERPRETER_NOTE if be == "triton" and not cuda else "",
                    ))
    return out
