"""Whole CausalVideoVAE encode and decode: osp against an upstream-style eager path, same weights.

The upstream-style path is the same model with osp.ops.causal_conv3d swapped for upstream's
CausalConv3d arithmetic (replicate the first frame kt-1 times, torch.cat, F.conv3d, then the
residual add) and GroupNorm and SiLU as two eager torch ops: what upstream runs, every conv copying
its whole input to pad it. Peak memory goes in each row's note: CUDA max_memory_allocated on GPU,
and on CPU the peak RSS of a fresh subprocess doing one call (``python -m bench.bench_vae --peak``);
the 17x128x128 rows give it twice: with glibc's mmap threshold fixed (memory in use, see
osp.testing.memory) and with glibc's defaults (which also count freed blocks kept in its heap).

GPU: release config (hidden 128, mult 1,2,4,4, 2 res blocks), bf16, 17x256x256. CPU: a small
config (hidden 32, mult 1,1,2,2, 1 res block), fp32, encode and decode of 9x64x64 and, outside
--quick, encode+decode of 17x128x128 twice: osp's default backends (the compiled ext GroupNorm+SiLU,
in place in inference, and the folded upsampling) and osp with every op forced to its torch backend
(no extension), each against the upstream-style path. Random weights (no downloads).
"""
from __future__ import annotations

import argparse
import contextlib
import json
from typing import List

import torch
import torch.nn.functional as F

import osp
from osp.ops.causal_conv3d import normalize_padding, normalize_stride
from osp.testing.memory import FIXED_MMAP_THRESHOLD

from .harness import Case, peak_cuda_mib, peak_rss_in_subprocess, peak_rss_mib

GPU = dict(config={}, clip=(1, 3, 17, 256, 256), dtype=torch.bfloat16)
CPU = dict(config=dict(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1), clip=(1, 3, 9, 64, 64),
           dtype=torch.float32)
CPU_ROUND_TRIP_CLIP = (1, 3, 17, 128, 128)
# Variants: osp's automatic choice, osp forced to its torch backends, upstream's arithmetic.
VARIANT_NAMES = {"osp": "osp (auto)", "osp-torch": "osp (torch backends, no ext)"}


def _upstream_conv(x, weight, bias=None, *, stride=1, padding=0, residual=None, history=None, upsample=None,
                   backend=None):
    if upsample is not None:  # SpatialUpsample2x: upstream interpolates, then convolves the 4x tensor
        x = F.interpolate(x, scale_factor=tuple(float(u) for u in upsample), mode="nearest")
        history = None if history is None else F.interpolate(history, scale_factor=tuple(float(u) for u in upsample),
                                                             mode="nearest")
    kt = weight.shape[2]
    if kt > 1:
        x = torch.cat(([history] if history is not None else [x[:, :, :1]] * (kt - 1)) + [x], dim=2)
    y = F.conv3d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), stride=normalize_stride(stride),
                 padding=(0, *normalize_padding(padding)))
    return y if residual is None else y + residual


@contextlib.contextmanager
def upstream_style():
    """Route the model's convs through upstream's replicate+cat+conv3d, norms through eager torch."""
    real = osp.ops.causal_conv3d
    osp.ops.causal_conv3d = _upstream_conv
    try:
        with osp.ops.use_backend("torch"):
            yield
    finally:
        osp.ops.causal_conv3d = real


def _model(spec, device):
    from osp.models import CausalVideoVAE

    torch.manual_seed(0)
    return CausalVideoVAE(**spec["config"]).to(device=device, dtype=spec["dtype"]).eval()


def _context(variant):
    if variant == "upstream":
        return upstream_style()
    if variant == "osp-torch":
        return osp.ops.use_backend("torch")
    return contextlib.nullcontext()


def _call(vae, clip, mode, variant):
    with torch.no_grad(), _context(variant):
        if mode == "encode":
            return vae.encode(clip).latent_dist.mode()
        if mode == "decode":
            return vae.decode(clip).sample
        return vae.decode(vae.encode(clip).latent_dist.mode()).sample


def _round_trip_cases() -> List[Case]:
    """CPU encode+decode of 17x128x128: osp (auto) and osp (torch backends) vs upstream-style."""
    vae = _model(CPU, "cpu")
    clip = torch.rand(CPU_ROUND_TRIP_CLIP, generator=torch.Generator().manual_seed(1)) * 2 - 1
    shape = "x".join(map(str, CPU_ROUND_TRIP_CLIP))
    variants = ("osp", "osp-torch", "upstream")
    peaks = {v: peak_rss_in_subprocess("bench.bench_vae", "encode+decode", v, shape) for v in variants}
    in_use = {v: peak_rss_in_subprocess("bench.bench_vae", "encode+decode", v, shape, env=FIXED_MMAP_THRESHOLD)
              for v in variants}
    out = []
    for variant in ("osp", "osp-torch"):
        out.append(Case(
            op="vae", shape=shape, dtype="float32", layout="ncdhw", backend=VARIANT_NAMES[variant],
            mode="encode+decode", run=(lambda v=variant: _call(vae, clip, "encode+decode", v)),
            baseline=lambda: _call(vae, clip, "encode+decode", "upstream"),
            baseline_name="upstream-style (replicate+cat+conv3d, eager GroupNorm, SiLU)", bytes=2 * clip.numel() * 4,
            note=f"peak in use {in_use[variant]:.0f} MiB vs upstream-style {in_use['upstream']:.0f} MiB "
                 f"({in_use[variant] / in_use['upstream']:.2f}x); glibc default RSS {peaks[variant]:.0f} vs "
                 f"{peaks['upstream']:.0f} MiB ({peaks[variant] / peaks['upstream']:.2f}x)",
            data={"peak_mib": in_use[variant], "baseline_peak_mib": in_use["upstream"],
                  "peak_rss_default_malloc_mib": peaks[variant], "baseline_peak_rss_default_malloc_mib": peaks["upstream"]},
        ))
    return out


def cases(device: str, quick: bool) -> List[Case]:
    cuda = device.startswith("cuda")
    spec = GPU if cuda else CPU
    vae = _model(spec, device)
    clip = (torch.rand(spec["clip"], device=device) * 2 - 1).to(spec["dtype"])
    latent = _call(vae, clip, "encode", "osp")
    out: List[Case] = []
    for mode, inp in (("encode", clip), ("decode", latent)):
        variants = {}
        for variant in ("osp", "upstream"):
            fn = (lambda v=variant, m=mode, i=inp: _call(vae, i, m, v))
            peak = (peak_cuda_mib(fn) if cuda else
                    peak_rss_in_subprocess("bench.bench_vae", mode, variant, "x".join(map(str, spec["clip"]))))
            variants[variant] = (fn, peak)
        (fn, peak), (base_fn, base_peak) = variants["osp"], variants["upstream"]
        nbytes = (inp.numel() + (latent if mode == "encode" else clip).numel()) * inp.element_size()
        out.append(Case(
            op="vae", shape="x".join(map(str, spec["clip"])), dtype=str(spec["dtype"]).replace("torch.", ""),
            layout="ncdhw", backend="osp (auto)", mode=mode, run=fn, baseline=base_fn,
            baseline_name="upstream-style (replicate+cat+conv3d, eager GroupNorm, SiLU)", bytes=nbytes,
            note=f"peak {peak:.0f} MiB vs upstream-style {base_peak:.0f} MiB ({peak / base_peak:.2f}x)",
        ))
    if not cuda and not quick:
        out.extend(_round_trip_cases())
    return out


def _peak_main(mode: str, variant: str, shape: str) -> None:
    vae = _model(CPU, "cpu")
    torch.manual_seed(1)
    clip = torch.rand(tuple(int(v) for v in shape.split("x"))) * 2 - 1
    inp = _call(vae, clip, "encode", "osp").clone() if mode == "decode" else clip
    # One small call first, so that loading libraries (osp._C, oneDNN's kernels) is not counted.
    small = torch.rand(1, 3, 5, 32, 32) * 2 - 1
    _call(vae, _call(vae, small, "encode", variant) if mode == "decode" else small, mode, variant)
    print(json.dumps({"peak_mib": peak_rss_mib(lambda: _call(vae, inp, mode, variant))}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", nargs=3, metavar=("MODE", "VARIANT", "CLIP"), required=True)
    a = parser.parse_args()
    _peak_main(*a.peak)
