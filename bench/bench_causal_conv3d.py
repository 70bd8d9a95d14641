"""Causal 3-D convolution (kernel 3x3x3, spatial padding 1, stride 1, bias) of video-VAE activations.

Each backend of ``osp.ops.causal_conv3d`` is timed against upstream Open-Sora-Plan's form,
``F.conv3d(cat([x[:, :, :1].repeat(1, 1, kt-1, 1, 1), x], dim=2))``, which copies the whole input
to pad it, forward alone ("fwd") and forward plus backward ("fwd+bwd": gradients of x, weight and
bias under a random upstream gradient). A third row per configuration, backend
"conv3d-prepadded", times F.conv3d on an input padded before the timer starts: the convolution
without the padding copy, a floor for the copy-free torch backend (not a usable op by itself).

GPU: bf16 channels_last_3d ("ndhwc") activations of the Open-Sora-Plan VAE's stages
(17 frames at 256^2 .. 64^2, and a 5-frame latent-sized clip). CPU: small fp32 shapes in both
layouts; the Triton rows run only when TRITON_INTERPRET=1 was set before triton was imported, and
then measure the interpreter, not the kernel.
"""
from __future__ import annotations

import os
from typing import Callable, List

import torch
import torch.nn.functional as F

from osp.ops import causal_conv3d

from .harness import INTERPRETER_NOTE, Case, timed

KERNEL = (3, 3, 3)
PADDING = 1
# (N, Cin, Cout, T, H, W)
GPU_SHAPES = [(1, 128, 128, 17, 256, 256), (1, 256, 256, 17, 128, 128), (1, 512, 512, 17, 64, 64),
              (1, 512, 512, 5, 64, 64)]
CPU_SHAPES = [(1, 16, 16, 5, 32, 32), (1, 32, 32, 9, 16, 16)]
LAYOUTS = {"ncdhw": torch.contiguous_format, "ndhwc": torch.channels_last_3d}
DTYPE_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}
BASELINE_NAME = "upstream replicate+cat+F.conv3d"
PREPADDED_NOTE = "F.conv3d of an input padded before timing: the pad copy left out (a floor, not an op)"


def _upstream(x, w, b):
    kt = w.shape[2]
    xp = torch.cat([x[:, :, :1].repeat(1, 1, kt - 1, 1, 1), x], dim=2)
    return F.conv3d(xp, w, b, 1, (0, PADDING, PADDING))


def _backend(name: str) -> Callable:
    def run(x, w, b):
        return causal_conv3d(x, w, b, padding=PADDING, backend=name)

    return run


def _prepadded(x, w, b):
    return F.conv3d(x, w, b, 1, (0, PADDING, PADDING))


def cases(device: str, quick: bool) -> List[Case]:
    """Causal conv cases for ``device`` ("cuda" or "cpu"); ``quick`` keeps the first shape only.

    Bytes: forward x read, weight and bias read, y write; forward+backward adds the backward's
    x read, dy read, weight read, dx write and dweight/dbias write. FLOPs: 2 * outputs * Cin*kt*kh*kw
    for the forward, three times that with the backward (dx and dweight are each a GEMM as large).
    """
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    layouts = {"ndhwc": LAYOUTS["ndhwc"]} if cuda else LAYOUTS
    if cuda:
        backends = ["triton", "torch"]
    else:
        backends = ["torch"] + (["triton"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else [])
    kt = KERNEL[0]
    out: List[Case] = []
    for N, Cin, Cout, T, H, W in shapes[:1] if quick else shapes:
        for layout, fmt in layouts.items():
            # One set of random inputs per (shape, layout), shared by every mode and backend.
            x = torch.randn(N, Cin, T, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
            fan_in = Cin * KERNEL[0] * KERNEL[1] * KERNEL[2]
            w = (torch.randn(Cout, Cin, *KERNEL, device=device, dtype=dtype) / fan_in ** 0.5)
            b = 0.1 * torch.randn(Cout, device=device, dtype=dtype)
            dy = torch.randn(N, Cout, T, H, W, device=device, dtype=dtype).contiguous(memory_format=fmt)
            x_pad = torch.cat([x[:, :, :1].repeat(1, 1, kt - 1, 1, 1), x], dim=2).contiguous(memory_format=fmt)
            xg, wg, bg, xpg = (t.detach().requires_grad_() for t in (x, w, b, x_pad))
            elem = x.element_size()
            x_n, y_n, p_n = x.numel(), dy.numel(), w.numel() + b.numel()
            flops = 2 * y_n * fan_in
            shape = f"{N}x{Cin}->{Cout}x{T}x{H}x{W} k3"
            for mode in ("fwd", "fwd+bwd"):
                if mode == "fwd":
                    args, pre_args, grads = (x, w, b, None), (x_pad, w, b, None), []
                    nbytes, nflops = (x_n + y_n + p_n) * elem, flops
                else:
                    args, pre_args, grads = (xg, wg, bg, dy), (xpg, wg, bg, dy), [xg, wg, bg, xpg]
                    nbytes, nflops = (3 * x_n + 2 * y_n + 3 * p_n) * elem, 3 * flops
                baseline = timed(_upstream, args[:3], args[3])
                rows = [(name, timed(_backend(name), args[:3], args[3]),
                         INTERPRETER_NOTE if name == "triton" and not cuda else "") for name in backends]
                rows.append(("conv3d-prepadded", timed(_prepadded, pre_args[:3], pre_args[3]), PREPADDED_NOTE))
                for name, run, note in rows:
                    out.append(Case(
                        op="causal_conv3d", shape=shape, dtype=DTYPE_NAMES[dtype], layout=layout, backend=name,
                        mode=mode, run=run, baseline=baseline, baseline_name=BASELINE_NAME, bytes=nbytes,
                        flops=nflops, grad_to_none=grads, note=note,
                    ))
    return out
