"""Causal 3-D convolution (kernel 3x3x3, spatial padding 1, stride 1, bias) of video-VAE activations.

Each backend of ``osp.ops.causal_conv3d`` is timed against upstream Open-Sora-Plan's form,
``F.conv3d(cat([x[:, :, :1].repeat(1, 1, kt-1, 1, 1), x], dim=2))``, which copies the whole input
to pad it, forward alone ("fwd") and forward plus backward ("fwd+bwd": gradients of x, weight and
bias under a random upstream gradient). A third row per configuration, backend
"conv3d-prepadded", times F.conv3d on an input padded before the timer starts: the convolution
without the padding copy, a floor for the copy-free torch backend (not a usable op by itself).

Upsample rows (op "causal_conv3d_upsample"): the VAE decoder's SpatialUpsample2x, a (1,3,3) conv
with padding 1 of the input nearest-upsampled x2 in H and W. Baseline: upstream's
``F.conv3d(F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest"))``. Rows: the folded op
(``causal_conv3d(x, ..., upsample=(1, 2, 2))``) per backend ("torch": the sub-pixel form, four
2x2 convs of the un-upsampled input written into the output's phases; "triton": the kernel reading
(h // 2, w // 2)), and "<backend>-unfused", F.interpolate then that backend's conv, which isolates
what folding saves on the same conv engine. Shapes are inputs (N, Cin->Cout, T, H, W); outputs are
2H x 2W. FLOPs are the upsampled conv's (the sub-pixel form does 2.25x fewer: its TFLOP/s are
effective). Each row's note and ``data`` carry the peak memory of one call beyond its inputs: CUDA
max_memory_allocated on GPU; on CPU the peak RSS of a fresh process making that one call
(``python -m bench.bench_causal_conv3d --peak SHAPE VARIANT MODE``, no warm-up call), not taken
for interpreter rows.

GPU: bf16 channels_last_3d ("ndhwc") activations of the Open-Sora-Plan VAE's stages
(17 frames at 256^2 .. 64^2, and a 5-frame latent-sized clip). CPU: small fp32 shapes in both
layouts; the Triton rows run only when TRITON_INTERPRET=1 was set before triton was imported, and
then measure the interpreter, not the kernel.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from osp.ops import causal_conv3d

from .harness import INTERPRETER_NOTE, Case, peak_cuda_mib, peak_rss_in_subprocess, timed

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
    return out + upsample_cases(device, quick)


# Folded nearest x2 upsample (SpatialUpsample2x): input shapes (N, Cin, Cout, T, H, W). GPU: the
# release decoder's up.3, up.2 and up.1 upsamplers for a 17x256x256 clip.
UP_KERNEL = (1, 3, 3)
GPU_UP_SHAPES = [(1, 512, 512, 5, 32, 32), (1, 512, 512, 9, 64, 64), (1, 256, 256, 17, 128, 128)]
CPU_UP_SHAPES = [(1, 64, 64, 5, 64, 64), (1, 128, 128, 3, 32, 32)]
UP_BASELINE_NAME = "upstream F.interpolate(nearest x2)+F.conv3d"
UP_VARIANTS = {"torch": "folded: sub-pixel phases, no upsampled tensor",
               "torch-unfused": "F.interpolate, then the torch backend's conv",
               "triton": "folded: the kernel reads (h//2, w//2)",
               "triton-unfused": "F.interpolate, then the triton kernel"}


def _up_inputs(shape, device, dtype, fmt, grad: bool):
    N, Cin, Cout, T, H, W = shape
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(N, Cin, T, H, W, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)
    w = torch.randn(Cout, Cin, *UP_KERNEL, device=device, dtype=dtype, generator=g) / (Cin * 9) ** 0.5
    b = 0.1 * torch.randn(Cout, device=device, dtype=dtype, generator=g)
    dy = torch.randn(N, Cout, T, 2 * H, 2 * W, device=device, dtype=dtype, generator=g).contiguous(memory_format=fmt)
    if grad:
        x, w, b = (t.requires_grad_() for t in (x, w, b))
    return x, w, b, dy


def _up_fn(variant: str) -> Callable:
    """The callable (x, w, b) -> y of one variant ("upstream" is the baseline)."""
    def interp(x):
        return F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")

    if variant == "upstream":
        return lambda x, w, b: F.conv3d(interp(x), w, b, 1, (0, 1, 1))
    backend, _, unfused = variant.partition("-")
    if unfused:
        return lambda x, w, b: causal_conv3d(interp(x), w, b, padding=1, backend=backend)
    return lambda x, w, b: causal_conv3d(x, w, b, padding=1, upsample=(1, 2, 2), backend=backend)


def _shape_arg(shape) -> str:
    return "x".join(map(str, shape))


def up_peak_mib(shape, variant: str, mode: str, device: str, dtype, fmt) -> Optional[float]:
    """Peak MiB of one call beyond its inputs (see the module docstring)."""
    if device.startswith("cuda"):
        x, w, b, dy = _up_inputs(shape, device, dtype, fmt, mode != "fwd")
        return peak_cuda_mib(timed(_up_fn(variant), (x, w, b), None if mode == "fwd" else dy))
    if variant.startswith("triton"):
        return None  # the interpreter's copies say nothing about the kernel
    layout = "ndhwc" if fmt == torch.channels_last_3d else "ncdhw"
    return peak_rss_in_subprocess("bench.bench_causal_conv3d", _shape_arg(shape), variant, mode, layout)


def upsample_cases(device: str, quick: bool) -> List[Case]:
    """Folded-upsample cases (SpatialUpsample2x): per shape and mode, every variant against upstream's
    interpolate+conv. Bytes: the folded op's minimum (x, weight, bias read, y written; with the
    backward as for the plain conv), the same for every row, so GB/s compare times."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    layout, fmt = ("ndhwc", torch.channels_last_3d) if cuda else ("ncdhw", torch.contiguous_format)
    shapes = GPU_UP_SHAPES if cuda else CPU_UP_SHAPES
    variants = ["triton", "triton-unfused", "torch", "torch-unfused"] if cuda else (
        ["torch", "torch-unfused"] + (["triton", "triton-unfused"] if os.environ.get("TRITON_INTERPRET", "0") == "1" else []))
    out: List[Case] = []
    for shape in shapes[:1] if quick else shapes:
        N, Cin, Cout, T, H, W = shape
        x_n, y_n, p_n = N * Cin * T * H * W, N * Cout * T * 4 * H * W, Cout * Cin * 9 + Cout
        elem = torch.finfo(dtype).bits // 8
        for mode in ("fwd", "fwd+bwd"):
            x, w, b, dy = _up_inputs(shape, device, dtype, fmt, mode != "fwd")
            grads = [] if mode == "fwd" else [x, w, b]
            dyy = None if mode == "fwd" else dy
            nbytes = ((x_n + y_n + p_n) if mode == "fwd" else (3 * x_n + 2 * y_n + 3 * p_n)) * elem
            nflops = 2 * y_n * Cin * 9 * (1 if mode == "fwd" else 3)
            baseline = timed(_up_fn("upstream"), (x, w, b), dyy)
            base_peak = up_peak_mib(shape, "upstream", mode, device, dtype, fmt)
            for variant in variants:
                peak = up_peak_mib(shape, variant, mode, device, dtype, fmt)
                peaks = "" if peak is None else f"; peak {peak:.0f} MiB vs upstream {base_peak:.0f} MiB"
                note = UP_VARIANTS[variant] + peaks
                if variant.startswith("triton") and not cuda:
                    note = INTERPRETER_NOTE + "; " + note
                out.append(Case(
                    op="causal_conv3d_upsample", shape=f"{N}x{Cin}->{Cout}x{T}x{H}x{W} k133 up2", dtype=DTYPE_NAMES[dtype],
                    layout=layout, backend=variant, mode=mode, run=timed(_up_fn(variant), (x, w, b), dyy),
                    baseline=baseline, baseline_name=UP_BASELINE_NAME, bytes=nbytes, flops=nflops, grad_to_none=grads,
                    note=note, data=dict(peak_mib=peak, baseline_peak_mib=base_peak,
                                         output_mib=y_n * elem / 2**20, input_mib=x_n * elem / 2**20)))
    return out


def _peak_main(argv: Optional[List[str]] = None) -> None:
    from osp.testing.memory import print_peak

    parser = argparse.ArgumentParser(prog="python -m bench.bench_causal_conv3d",
                                     description="Print the peak RSS of one CPU call of an upsample variant.")
    parser.add_argument("--peak", nargs=4, metavar=("SHAPE", "VARIANT", "MODE", "LAYOUT"), required=True,
                        help="SHAPE as NxCinxCoutxTxHxW; VARIANT upstream or one of " + ", ".join(UP_VARIANTS)
                        + "; MODE fwd or fwd+bwd; LAYOUT ncdhw or ndhwc")
    shape, variant, mode, layout = parser.parse_args(argv).peak
    try:
        shape = tuple(int(v) for v in shape.split("x"))
        if len(shape) != 6:
            raise ValueError
    except ValueError:
        parser.error(f"SHAPE {shape!r}; expected 6 ints NxCinxCoutxTxHxW")
    if variant != "upstream" and variant not in UP_VARIANTS:
        parser.error(f"VARIANT {variant!r}; expected upstream or one of {', '.join(UP_VARIANTS)}")
    if mode not in ("fwd", "fwd+bwd") or layout not in LAYOUTS:
        parser.error(f"MODE {mode!r} / LAYOUT {layout!r}; expected fwd or fwd+bwd / ncdhw or ndhwc")
    x, w, b, dy = _up_inputs(shape, "cpu", torch.float32, LAYOUTS[layout], mode != "fwd")
    print_peak(timed(_up_fn(variant), (x, w, b), None if mode == "fwd" else dy))


if __name__ == "__main__":
    _peak_main()
