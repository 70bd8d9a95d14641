"""Tiled VAE decode (osp.models.vae.tiling) against the untiled decode of the same model.

Two kinds of rows, all timed against the untiled decode where it fits:

- memory rows (backend "stream"): one per clip size, tiled stream decode (norm "tile", spatial
  and temporal tiles). The note carries the peak memory of the tiled and the untiled decode, the
  part beyond the output, and the work factor (latent positions the tiles cover / latent
  positions: the recomputation the spatial overlap costs; time chunks do not overlap). Peak memory:
  CUDA max_memory_allocated on GPU; on CPU the peak RSS of a fresh subprocess doing one call
  (``python -m osp.testing.vae_tiling --peak CLIP VARIANT``).
- seam rows: on one clip, every variant (stream with norm "tile", "estimate", "global", and
  upstream's "osp-v1.0"), with the PSNR of the tiled output against the untiled output
  (20*log10(2/rmse) on [-1, 1] data) and how far the GroupNorm statistics it used are from the
  untiled ones (``norm_stats_error``).

The model, the variants and the measurements live in osp.testing.vae_tiling (``osp demo`` runs
them too); this suite turns them into rows. Random weights (no downloads), with every res block's
conv2 scaled by 0.1 so that the residual path dominates as in a trained model: a fully random
decoder is far less local than a trained one and its PSNRs would say little. Measured PSNRs are
therefore indicative, not a trained model's.

GPU: release config (hidden 128, mult 1,2,4,4, 2 res blocks), bf16, tiles of 256 px and 17
frames; clips 17/65/129 frames at 256^2, 512^2, 1024^2 (untiled runs that do not fit are reported
as out of memory), seams on 17x512x512. CPU: small config (hidden 32, mult 1,1,2,2, 1 res block),
fp32, tiles of 32 px and 5 frames; the memory grid scaled down 4x in each axis (64^2 .. 256^2,
9 .. 65 frames); seams on 9x256x256 in 128-px tiles. Both use upstream's frame-mixing attention
(AttnBlock3D), as the v1.0 weights do.
"""
from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

from osp.testing.vae_tiling import (VARIANTS, clip_name, decode, decode_recording, latent, model, norm_stats_error,
                                    output_mib, peak_mib, psnr, seam_spec, spec_for, work_factor)

from .harness import Case


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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m bench.bench_vae_tiling")
    parser.add_argument("--figure", metavar="PNG", required=True,
                        help="draw the memory rows of bench/results/results.jsonl")
    a = parser.parse_args()
    from .harness import RESULTS

    sys.exit(0 if figure(RESULTS, a.figure) else 1)
