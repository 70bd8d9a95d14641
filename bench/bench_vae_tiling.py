"""Tiled VAE decode (osp.models.vae.tiling) against the untiled decode of the same model.

One row per (clip size, tiling variant): the tiled decode timed against the untiled one; its note
carries the PSNR of the tiled output against the untiled output (20*log10(2/rmse) on [-1, 1]
data) and the peak memory of both: CUDA max_memory_allocated on GPU; on CPU the peak RSS of a
fresh subprocess doing one call (``python -m bench.bench_vae_tiling --peak SIZE VARIANT``), as
bench_vae does. Variants: stream with norm "tile", "estimate", "global" (spatial + temporal tiles)
and upstream's "osp-v1.0" (spatial only).

Random weights (no downloads), with every res block's conv2 scaled by 0.1 so that the residual
path dominates as in a trained model: a fully random decoder is far less local than a trained one
and its PSNRs would say little. Measured PSNRs are therefore indicative, not a trained model's.

GPU: release config (hidden 128, mult 1,2,4,4, 2 res blocks), bf16, tiles of 256 px and 17 frames,
clips 17x256x512 .. 33x512x512. CPU: small config (hidden 32, mult 1,1,2,2, 1 res block), fp32,
tiles of 32 px and 5 frames, clips 9x64x64 and 9x128x128.
"""
from __future__ import annotations

import argparse
import gc
import json
import math
from typing import Dict, List, Tuple

import torch

from .harness import Case, peak_cuda_mib, peak_rss_in_subprocess, peak_rss_mib

GPU = dict(config={}, dtype=torch.bfloat16, tile=256, frames=17,
           clips=[(1, 3, 17, 256, 512), (1, 3, 17, 512, 512), (1, 3, 33, 512, 512)])
CPU = dict(config=dict(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1), dtype=torch.float32,
           tile=32, frames=5, clips=[(1, 3, 9, 64, 64), (1, 3, 9, 128, 128)])
VARIANTS: Dict[str, dict] = {
    "stream-tile": dict(mode="stream", norm="tile", temporal=True),
    "stream-estimate": dict(mode="stream", norm="estimate", temporal=True),
    "stream-global": dict(mode="stream", norm="global", temporal=True),
    "osp-v1.0": dict(mode="osp-v1.0", norm="tile", temporal=False),
}


def _model(spec, device):
    from osp.models import CausalVideoVAE
    from osp.models.vae.blocks import ResnetBlock3D

    torch.manual_seed(0)
    vae = CausalVideoVAE(**spec["config"]).to(device=device, dtype=spec["dtype"]).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock3D):
                m.conv2.conv.weight.mul_(0.1)
    return vae


def _latent(vae, spec, clip, device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(vae.latent_shape(clip), generator=g).to(device=device, dtype=spec["dtype"])


def _decode(vae, spec, z, variant):
    if variant == "untiled":
        vae.disable_tiling()
    else:
        v = VARIANTS[variant]
        vae.enable_tiling(mode=v["mode"], tile_sample_size=spec["tile"], norm=v["norm"], progress=False,
                          tile_frames=spec["frames"] if v["temporal"] else None)
    with torch.no_grad():
        out = vae.decode(z).sample
    vae.disable_tiling()
    return out


def _psnr(out, ref) -> float:
    mse = (out.double() - ref.double()).square().mean().item()
    return 20 * math.log10(2 / math.sqrt(mse)) if mse > 0 else math.inf


def cases(device: str, quick: bool) -> List[Case]:
    cuda = device.startswith("cuda")
    spec = GPU if cuda else CPU
    vae = _model(spec, device)
    out: List[Case] = []
    for size, clip in enumerate(spec["clips"][:1] if quick else spec["clips"]):
        z = _latent(vae, spec, clip, device)
        peaks: Dict[str, float] = {}
        results: Dict[str, Tuple[torch.Tensor, float]] = {}
        for variant in ["untiled"] + list(VARIANTS):
            fn = (lambda v=variant, z=z: _decode(vae, spec, z, v))
            if cuda:
                holder = {}
                peaks[variant] = peak_cuda_mib(lambda holder=holder, fn=fn: holder.setdefault("y", fn()))
                results[variant] = holder["y"].float().cpu()
            else:
                peaks[variant] = peak_rss_in_subprocess("bench.bench_vae_tiling", str(size), variant)
                results[variant] = fn()
        base_fn = (lambda z=z: _decode(vae, spec, z, "untiled"))
        ref = results["untiled"]
        nbytes = (z.numel() + ref.numel()) * z.element_size()
        for variant in VARIANTS:
            v = VARIANTS[variant]
            tiles = f"tiles {spec['tile']} px" + (f" x {spec['frames']} frames" if v["temporal"] else "")
            out.append(Case(
                op="vae_tiling", shape="x".join(map(str, clip)), dtype=str(spec["dtype"]).replace("torch.", ""),
                layout="ncdhw", backend=variant, mode="decode",
                run=(lambda v=variant, z=z: _decode(vae, spec, z, v)), baseline=base_fn,
                baseline_name="untiled decode", bytes=nbytes,
                note=(f"{tiles}; PSNR vs untiled {_psnr(results[variant], ref):.2f} dB; peak {peaks[variant]:.0f} MiB "
                      f"vs untiled {peaks['untiled']:.0f} MiB ({peaks[variant] / max(peaks['untiled'], 1e-9):.2f}x)"),
            ))
        del results, ref
        gc.collect()
    return out


def _peak_main(size: int, variant: str) -> None:
    vae = _model(CPU, "cpu")
    z = _latent(vae, CPU, CPU["clips"][size], "cpu")
    print(json.dumps({"peak_mib": peak_rss_mib(lambda: _decode(vae, CPU, z, variant))}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--peak", nargs=2, metavar=("SIZE", "VARIANT"), required=True)
    a = parser.parse_args()
    _peak_main(int(a.peak[0]), a.peak[1])
