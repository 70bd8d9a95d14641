"""Attention of LatteT2V (16 heads x 72): spatial, temporal and masked cross-attention.

Each usable backend of ``osp.ops.attention`` is timed against the upstream form in the same run,
forward alone ("fwd") and forward plus backward ("fwd+bwd": dq, dk, dv under a random upstream
gradient). Upstream runs every attention through torch SDPA and masks captions with an additive
-10000 bias, so on GPU the baseline is ``F.scaled_dot_product_attention`` with that bias (none for
self-attention). On CPU, where SDPA is the torch backend itself, the baseline is the eager
matmul-softmax-matmul formula in the same dtype.

GPU (bf16, B = 2): spatial self-attention over 1024 and 4096 tokens, temporal attention over
17 frames with a batch of 2 x 32 x 32 token positions, cross-attention of 1024 tokens to 300
caption tokens of which 120 and 37 are valid. CPU: tiny fp32 shapes; the Triton rows run only when
TRITON_INTERPRET=1 was set before triton was imported, and then measure the interpreter.

FLOPs are the dense matmul count, 4*B*H*Lq*Lk*D for the forward and 3.5x that for forward plus
backward (the backward is 2.5x the forward), counting padded keys too. Bytes: q, k, v read and o
written once for the forward; the backward adds q, k, v, o, dO reads and dq, dk, dv writes.
"""
from __future__ import annotations

import math
import os
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from osp.ops import attention
from osp.ops.attention import ATTENTION

from .harness import INTERPRETER_NOTE, Case, timed

H, D = 16, 72
# (kind, B, Lq, Lk, valid caption lengths or None)
GPU_SHAPES = [
    ("spatial", 2, 1024, 1024, None),
    ("temporal", 2 * 32 * 32, 17, 17, None),
    ("cross", 2, 1024, 300, (120, 37)),
    ("spatial", 2, 4096, 4096, None),
]
CPU_SHAPES = [
    ("spatial", 1, 64, 64, None),
    ("temporal", 16, 17, 17, None),
    ("cross", 2, 64, 30, (12, 30)),
]
CPU_HEADS = 2
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


def _upstream_sdpa(bias: Optional[torch.Tensor]) -> Callable:
    """Upstream's call: SDPA with the additive -10000 caption bias (B, 1, 1, Lk), if any."""
    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)

    return run


def _eager(bias: Optional[torch.Tensor]) -> Callable:
    def run(q, k, v):
        s = (q @ k.transpose(-1, -2)) * (1.0 / math.sqrt(q.shape[-1]))
        if bias is not None:
            s = s + bias
        return torch.softmax(s, dim=-1) @ v

    return run


def _backend(name: str, mask: Optional[torch.Tensor]) -> Callable:
    def run(q, k, v):
        return attention(q, k, v, key_padding_mask=mask, backend=name)

    return run


def cases(device: str, quick: bool) -> List[Case]:
    """Attention cases for ``device`` ("cuda" or "cpu"); ``quick`` keeps the first shape only."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    heads = H if cuda else CPU_HEADS
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    out: List[Case] = []
    for kind, B, Lq, Lk, valid in shapes[:1] if quick else shapes:
        q = torch.randn(B, heads, Lq, D, device=device, dtype=dtype)
        k = torch.randn(B, heads, Lk, D, device=device, dtype=dtype)
        v = torch.randn(B, heads, Lk, D, device=device, dtype=dtype)
        dy = torch.randn_like(q)
        mask = bias = None
        if valid is not None:
            mask = torch.arange(Lk, device=device)[None, :] < torch.tensor(valid, device=device)[:, None]
            bias = ((~mask).to(dtype) * -10000.0)[:, None, None, :]
        # Which backends can run this call here; forced so that the interpreter counts on CPU.
        backends = [name for name, b in ATTENTION.backends.items()
                    if b.why_not(q, k, v, mask, None, forced=True) is None
                    and (cuda or name != "triton" or interp)]
        baseline_fn = _upstream_sdpa(bias) if cuda else _eager(bias)
        baseline_name = ("torch SDPA, upstream form (additive -10000 caption bias)" if cuda
                         else "eager matmul-softmax-matmul")
        elem = q.element_size()
        per_head = B * heads * D * elem
        shape = f"{kind} B{B} H{heads} {Lq}x{Lk} D{D}" + (f" valid {'/'.join(map(str, valid))}" if valid else "")
        fwd_flops = 4 * B * heads * Lq * Lk * D
        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                args, grads, nbytes, flops = (q, k, v, None), [], (2 * Lq + 2 * Lk) * per_head, fwd_flops
            else:
                args, grads = (qg, kg, vg, dy), [qg, kg, vg]
                nbytes, flops = (6 * Lq + 6 * Lk) * per_head, int(3.5 * fwd_flops)
            baseline = timed(baseline_fn, args[:3], args[3])
            for name in backends:
                out.append(Case(
                    op="attention", shape=shape, dtype=DTYPE_NAMES[dtype], layout="bhld", backend=name,
                    mode=mode, run=timed(_backend(name, mask), args[:3], args[3]), baseline=baseline,
                    baseline_name=baseline_name, bytes=nbytes, flops=flops, grad_to_none=grads,
                    note=INTERPRETER_NOTE if name == "triton" and not cuda else "",
                ))
    return out
