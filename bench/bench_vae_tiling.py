"""Tiled VAE decode (osp.models.vae.tiling) against the untiled decode of the same model.

Two kinds of rows, all timed against the untiled decode where it fits:

- memory rows (backend "stream"): one per clip size, tiled stream decode (norm "tile", spatial
  and temporal tiles). The note carries the peak memory of the tiled and the untiled decode, the
  part beyond the output, and the work factor (latent positions the tiles cover / latent
  positions: the recomputation the spatial overlap costs; time chunks do not overlap). Peak memory:
  CUDA max_memory_allocated on GPU; on CPU the peak RSS of a fresh subprocess doing one call
  (``python -m bench.bench_vae_tiling --peak CLIP VARIANT``).
- seam rows: on one clip, every variant (stream with norm "tile", "estimate", "global", and
  upstream's "osp-v1.0"), with the PSNR of the tiled output against the untiled output
  (20*log10(2/rmse) on [-1, 1] data) and how far the GroupNorm statistics it used are from the
  untiled ones (``norm_stats_error``).

Random weights (no downloads), with every res block's conv2 scaled by 0.1 so that the residual
path dominates as in a trained model: a fully random decoder is far less local than a trained one
and its PSNRs would say little. Measured PSNRs are therefore indicative, not a trained model's.

GPU: release config (hidden 128, mult 1,2,4,4, 2 res blocks), bf16, tiles of 256 px and 17
frames; clips 17/65/129 frames at 256^2, 512^2, 1024^2 (untiled runs that do not fit are reported
as out of memory), seams on 17x512x512. CPU: small config (hidden 32, mult 1,1,2,2, 1 res block),
fp32, tiles of 32 px and 5 frames; the memory grid scaled down 4x in each axis (64^2 .. 256^2,
9 .. 65 frames); seams on 9x256x256 in 128-px tiles. Both use upstream's frame-mixing attention
(AttnBlock3D), as the v1.0 weights do.
"""
from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import sys
from typing import Dict, List, Optional, Tuple

import torch

from .harness import Case, peak_cuda_mib, peak_rss_in_subprocess, peak_rss_mib

# The release layout's attention (upstream's AttnBlock3D, which mixes frames: the latent-resolution
# head runs over all frames of a tile, the rest streams).
RELEASE_ATTENTION = dict(encoder_attention="AttnBlock3D", decoder_attention="AttnBlock3D")
GPU = dict(config=RELEASE_ATTENTION, dtype=torch.bfloat16, tile=256, frames=17,
           memory=[(17, 256, 256), (17, 512, 512), (17, 1024, 1024), (65, 256, 256), (129, 256, 256),
                   (65, 512, 512), (129, 1024, 1024)],
           seam=(17, 512, 512), seam_tile=256)
CPU = dict(config=dict(RELEASE_ATTENTION, hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1),
           dtype=torch.float32,
           tile=32, frames=5, memory=[(9, 64, 64), (9, 128, 128), (9, 256, 256), (33, 64, 64), (65, 64, 64)],
           seam=(9, 256, 256), seam_tile=128)
VARIANTS: Dict[str, dict] = {
    "stream-tile": dict(mode="stream", norm="tile", temporal=True),
    "stream-estimate": dict(mode="stream", norm="estimate", temporal=True),
    "stream-global": dict(mode="stream", norm="global", temporal=True),
    "osp-v1.0": dict(mode="osp-v1.0", norm="tile", temporal=False),
}


def spec_for(device: str) -> dict:
    return GPU if device.startswith("cuda") else CPU


def seam_spec(spec: dict) -> dict:
    """The spec of the seam rows: their tile size (on CPU larger than the memory rows' 32 px, whose
    4-latent tiles are mostly border: 16 latents, overlapping by 4)."""
    return dict(spec, tile=spec["seam_tile"])


def model(spec, device):
    from osp.models import CausalVideoVAE
    from osp.models.vae.blocks import ResnetBlock3D

    torch.manual_seed(0)
    vae = CausalVideoVAE(**spec["config"]).to(device=device, dtype=spec["dtype"]).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock3D):
                m.conv2.conv.weight.mul_(0.1)
    return vae


def latent(vae, spec, clip, device):
    g = torch.Generator().manual_seed(1)
    return torch.randn(vae.latent_shape((1, 3) + tuple(clip)), generator=g).to(device=device, dtype=spec["dtype"])


def configure(vae, spec, variant: str) -> None:
    if variant == "untiled":
        vae.disable_tiling()
        return
    v = VARIANTS[variant]
    vae.enable_tiling(mode=v["mode"], tile_sample_size=spec["tile"], norm=v["norm"], progress=False,
                      tile_frames=spec["frames"] if v["temporal"] else None)


def decode(vae, spec, z, variant):
    configure(vae, spec, variant)
    try:
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        vae.disable_tiling()


def work_factor(vae, spec, z, variant) -> float:
    """Latent positions the variant's tiles cover / latent positions (1 = no recomputation)."""
    from osp.models.vae import tiling

    if variant == "untiled":
        return 1.0
    v = VARIANTS[variant]
    T, h, w = z.shape[2:]
    L = spec["tile"] // vae.spatial_compression
    if v["mode"] == "osp-v1.0":  # upstream: tiles at every stride, clipped at the border
        stride = int(L * 0.75)  # the default overlap 0.25
        cover = [sum(min(L, n - a) for a in range(0, n, stride)) for n in (h, w)]
        return cover[0] * cover[1] / (h * w)
    cfg = tiling.make_config(vae, tile_sample_size=spec["tile"], tile_frames=spec["frames"], norm=v["norm"])
    return tiling.plan(cfg, (T, h, w), vae.spatial_compression, vae.temporal_compression, "decode").work


def decode_recording(vae, spec, z, variant) -> Tuple[torch.Tensor, Dict[str, list]]:
    """Decode, recording the GroupNorm statistics (mean, std) per (sample, group) that every decoder
    norm call normalizes with: its input's own, or the fixed (global / estimated) ones."""
    from osp.models.vae.tiling import group_partial_stats
    from osp.nn import GroupNorm

    norms = {name: m for name, m in vae.decoder.named_modules() if isinstance(m, GroupNorm)}
    seen: Dict[str, list] = {name: [] for name in norms}
    # A statistics pass of norm="global" runs each norm once on its own input before fixing it:
    # record own statistics only where the variant normalizes with them.
    own = variant in ("untiled", "osp-v1.0") or VARIANTS[variant]["norm"] == "tile"

    def hook(name, module, args):
        if module.fixed_stats is not None:
            mean, rstd = module.fixed_stats
            seen[name].append((mean.double(), 1 / rstd.double()))
        elif own:
            n, mean, m2 = group_partial_stats(args[0], module.num_groups)
            seen[name].append((mean, (m2 / n + module.eps).sqrt()))

    handles = [m.register_forward_pre_hook(functools.partial(hook, name)) for name, m in norms.items()]
    try:
        y = decode(vae, spec, z, variant)
    finally:
        for h in handles:
            h.remove()
    return y, seen


def norm_stats_error(ref: Dict[str, list], seen: Dict[str, list]) -> float:
    """How far the statistics a variant normalized with (``seen``) are from the untiled decode's
    (``ref``): the mean over norm layers, calls (tile-chunks) and groups of
    (|mean - mean_ref| + |std - std_ref|) / std_ref. Per-tile statistics are what upstream blames
    for the "gridding effect"; this isolates them from the convs' tile-border effects, which the PSNR
    mixes in."""
    errs = [((mean - ref[name][0][0]).abs() + (std - ref[name][0][1]).abs()) / ref[name][0][1]
            for name, calls in seen.items() for mean, std in calls]
    return torch.cat([e.flatten() for e in errs]).mean().item()


def psnr(out, ref) -> float:
    mse = (out.double() - ref.double()).square().mean().item()
    return 20 * math.log10(2 / math.sqrt(mse)) if mse > 0 else math.inf


def clip_name(clip) -> str:
    return "x".join(map(str, clip))


def peak_mib(vae, spec, clip, variant, device) -> Tuple[Optional[float], Optional[torch.Tensor]]:
    """(peak MiB of one decode, its output on the CPU) or (None, None) when it runs out of memory.
    On CPU the peak comes from a fresh subprocess and the output from this process."""
    z = latent(vae, spec, clip, device)
    if device.startswith("cuda"):
        holder = {}
        try:
            peak = peak_cuda_mib(lambda: holder.setdefault("y", decode(vae, spec, z, variant)))
        except torch.cuda.OutOfMemoryError:
            holder.clear()
            gc.collect()
            torch.cuda.empty_cache()
            return None, None
        y = holder.pop("y").float().cpu()
        torch.cuda.empty_cache()
        return peak, y
    return peak_rss_in_subprocess("bench.bench_vae_tiling", clip_name(clip), variant), None


def output_mib(spec, clip) -> float:
    return 3 * clip[0] * clip[1] * clip[2] * torch.finfo(spec["dtype"]).bits / 8 / 2**20


def memory_note(spec, clip, tiled: Optional[float], untiled: Optional[float], work: float) -> str:
    out_mib = output_mib(spec, clip)

    def fmt(p):
        return "out of memory" if p is None else f"{p:.0f} MiB (beyond the output {p - out_mib:.0f})"

    return (f"tiles {spec['tile']} px x {spec['frames']} frames, work {work:.2f}x; output {out_mib:.0f} MiB; "
            f"peak tiled {fmt(tiled)}, untiled {fmt(untiled)}")


def cases(device: str, quick: bool) -> List[Case]:
    spec = spec_for(device)
    vae = model(spec, device)
    dtype = str(spec["dtype"]).replace("torch.", "")
    out: List[Case] = []
    for clip in spec["memory"][:2] if quick else spec["memory"]:
        z = latent(vae, spec, clip, device)
        untiled, _ = peak_mib(vae, spec, clip, "untiled", device)
        tiled, _ = peak_mib(vae, spec, clip, "stream-tile", device)
        fits = untiled is not None
        work = work_factor(vae, spec, z, "stream-tile")
        out.append(Case(
            op="vae_tiling", shape=clip_name(clip), dtype=dtype, layout="ncdhw", backend="stream", mode="decode",
            run=(lambda z=z: decode(vae, spec, z, "stream-tile")),
            baseline=(lambda z=z: decode(vae, spec, z, "untiled")) if fits else None,
            baseline_name="untiled decode", bytes=2 * z.numel() * z.element_size(),
            note=memory_note(spec, clip, tiled, untiled, work),
            data=dict(clip=list(clip), output_mib=output_mib(spec, clip), peak_tiled_mib=tiled,
                      peak_untiled_mib=untiled, work=work, tile=spec["tile"], tile_frames=spec["frames"])))
    clip, spec = spec["seam"], seam_spec(spec)
    z = latent(vae, spec, clip, device)
    ref, ref_stats = decode_recording(vae, spec, z, "untiled")
    ref = ref.float().cpu()
    for variant, v in VARIANTS.items():
        y, stats = decode_recording(vae, spec, z, variant)
        y = y.float().cpu()
        tiles = f"tiles {spec['tile']} px" + (f" x {spec['frames']} frames" if v["temporal"] else "")
        out.append(Case(
            op="vae_tiling", shape=clip_name(clip), dtype=dtype, layout="ncdhw", backend=variant, mode="decode",
            run=(lambda v=variant: decode(vae, spec, z, v)), baseline=(lambda: decode(vae, spec, z, "untiled")),
            baseline_name="untiled decode", bytes=2 * z.numel() * z.element_size(),
            note=(f"{tiles}; PSNR vs untiled {psnr(y, ref):.2f} dB; GroupNorm statistics off by "
                  f"{100 * norm_stats_error(ref_stats, stats):.2f}% of std; "
                  f"work {work_factor(vae, spec, z, variant):.2f}x")))
        del y
    return out


def figure(results, out_png) -> bool:
    """Peak memory beyond the output against the clip, tiled and untiled, for the newest memory rows
    of each device in a results file; False if matplotlib is missing or there are no such rows."""
    from .harness import load_rows

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figure: matplotlib is not installed (the osp[plot] extra)", file=sys.stderr)
        return False
    latest: Dict[str, Dict[str, dict]] = {}
    for r in load_rows(results):
        if r.get("op") == "vae_tiling" and "data" in r and "peak_tiled_mib" in r["data"]:
            latest.setdefault(r["device"], {})[r["shape"]] = r
    if not latest:
        print(f"figure: {results} holds no vae_tiling memory rows", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, len(latest), figsize=(6.5 * len(latest), 4), squeeze=False)
    for ax, (device, rows) in zip(axes[0], latest.items()):
        names = list(rows)
        for key, label in (("peak_untiled_mib", "untiled"), ("peak_tiled_mib", "tiled (stream)")):
            vals = [(rows[n]["data"][key] or float("nan")) - rows[n]["data"]["output_mib"] for n in names]
            ax.plot(names, vals, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("clip (frames x H x W)")
        ax.set_ylabel("peak memory beyond the output (MiB)")
        ax.set_title(f"tiled decode: {device}\n({next(iter(rows.values()))['dtype']}, "
                     f"{next(iter(rows.values()))['data']['tile']}-px tiles)", fontsize=9)
        ax.tick_params(axis="x", rotation=30)
        ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return True


def _peak_main(clip: str, variant: str) -> None:
    vae = model(CPU, "cpu")
    z = latent(vae, CPU, tuple(int(v) for v in clip.split("x")), "cpu")
    print(json.dumps({"peak_mib": peak_rss_mib(lambda: decode(vae, CPU, z, variant))}))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_vae_tiling")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--peak", nargs=2, metavar=("CLIP", "VARIANT"),
                       help="print the peak RSS of one CPU decode: CLIP as TxHxW (e.g. 9x64x64), VARIANT untiled "
                            "or one of " + ", ".join(VARIANTS))
    group.add_argument("--figure", metavar="PNG", help="draw the memory rows of bench/results/results.jsonl")
    a = parser.parse_args()
    if a.peak:
        _peak_main(*a.peak)
    else:
        from .harness import RESULTS

        sys.exit(0 if figure(RESULTS, a.figure) else 1)
