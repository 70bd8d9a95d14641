"""Whole CausalVideoVAE encode and decode: osp against an upstream-style eager path, same weights.

The upstream-style path is the same model with osp.ops.causal_conv3d swapped for upstream's
CausalConv3d arithmetic (replicate the first frame kt-1 times, torch.cat, F.conv3d, then the
residual add) and GroupNorm and SiLU as two eager torch ops: what upstream runs, every conv copying
its whole input to pad it. Peak memory goes in each row's note: CUDA max_memory_allocated on GPU,
and on CPU the peak RSS of a fresh subprocess doing one call (``python -m bench.bench_vae --peak``).

GPU: release config (hidden 128, mult 1,2,4,4, 2 res blocks), bf16, 17x256x256. CPU: a small
config (hidden 32, mult 1,1,2,2, 1 res block), fp32, 9x64x64. Random weights (no downloads).
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

from .harness import Case, peak_cuda_mib, peak_rss_in_subprocess, peak_rss_mib

GPU = dict(config={}, clip=(1, 3, 17, 256, 256), dtype=torch.bfloat16)
CPU = dict(config=dict(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1), clip=(1, 3, 9, 64, 64),
           dtype=torch.float32)


def _upstream_conv(x, weight, bias=None, *, stride=1, padding=0, residual=None, history=None, backend=None):
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


def _call(vae, clip, mode, variant):
    ctx = upstream_style() if variant == "upstream" else contextlib.nullcontext()
    with torch.no_grad(), ctx:
        if mode == "encode":
            return vae.encode(clip).latent_dist.mode()
        return vae.decode(clip).sample


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
            peak = peak_cuda_mib(fn) if cuda else peak_rss_in_subprocess("bench.bench_vae", mode, variant)
            variants[variant] = (fn, peak)
        (fn, peak), (base_fn, base_peak) = variants["osp"], variants["upstream"]
        nbytes = (inp.numel() + (latent if mode == "encode" else clip).numel()) * inp.element_size()
        out.append(Case(
            op="vae", shape="x".join(map(str, spec["clip"])), dtype=str(spec["dtype"]).replace("torch.", ""),
            layout="ncdhw", backend="osp (auto)", mode=mode, run=fn, baseline=base_fn,
            baseline_name="upstream-style (replicate+cat+conv3d, eager GroupNorm, SiLU)", bytes=nbytes,
            note=f"peak {peak:.0f} MiB vs upstream-style {base_peak:.0f} MiB ({peak / base_peak:.2f}x)",
        ))
    return out


def _peak_main(mode: str, variant: str) -> None:
    vae = _model(CPU, "cpu")
    torch.manual_seed(1)
    clip = torch.rand(CPU["clip"]) * 2 - 1
    inp = clip if mode == "encode" else _call(vae, clip, "encode", "osp").clone()
    print(json.dumps({"peak_mib": peak_rss_mib(lambda: _call(vae, inp, mode, variant))}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", nargs=2, metavar=("MODE", "VARIANT"), required=True)
    a = parser.parse_args()
    _peak_main(*a.peak)
