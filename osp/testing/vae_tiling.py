"""Measurements of the tiled VAE decode (osp.models.vae.tiling) against the untiled decode.

Shared by ``osp demo`` and bench/bench_vae_tiling.py:

- ``model`` / ``latent``: a random-weight CausalVideoVAE of a spec (``GPU``: the release config in
  bf16; ``CPU``: a small config in fp32) and a seeded latent for a clip (frames, H, W).
- ``VARIANTS``: the tiled decodes compared, each naming its mode and norm (none relies on
  ``enable_tiling``'s defaults); ``decode`` runs one of them or "untiled".
- ``work_factor``: latent positions the tiles cover / latent positions (the overlap's recomputation).
- ``decode_recording`` and ``norm_stats_error``: the GroupNorm statistics every decoder norm used,
  and how far they are from the untiled decode's.
- ``psnr`` on [-1, 1] data; ``peak_mib``: the peak memory of one decode (CUDA allocator on GPU, a
  fresh process's RSS on CPU: ``python -m osp.testing.vae_tiling --peak CLIP VARIANT``).

Random weights (no downloads), with every res block's conv2 scaled by 0.1 so that the residual
path dominates as in a trained model: a fully random decoder is far less local than a trained one
and its PSNRs would say little. Measured PSNRs are therefore indicative, not a trained model's.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import math
import warnings
from typing import Dict, List, Optional, Tuple

import torch

from .memory import peak_cuda_mib, peak_rss_in_subprocess, print_peak

# What a fresh process runs for the CPU peak (``__name__`` is "__main__" there).
MODULE = "osp.testing.vae_tiling"

# The release layout's attention (upstream's AttnBlock3D, which mixes frames: the latent-resolution
# head runs over all frames of a tile, the rest streams).
RELEASE_ATTENTION = dict(encoder_attention="AttnBlock3D", decoder_attention="AttnBlock3D")
# GPU: release config (hidden 128, mult 1,2,4,4, 2 res blocks), bf16, tiles of 256 px x 17 frames;
# clips 17/65/129 frames at 256^2 .. 1024^2, seams on 17x512x512.
GPU = dict(config=RELEASE_ATTENTION, dtype=torch.bfloat16, tile=256, frames=17,
           memory=[(17, 256, 256), (17, 512, 512), (17, 1024, 1024), (65, 256, 256), (129, 256, 256),
                   (65, 512, 512), (129, 1024, 1024)],
           seam=(17, 512, 512), seam_tile=256)
# CPU: small config, fp32, tiles of 32 px x 5 frames; the memory grid scaled down 4x in each axis;
# seams on 9x256x256 in 128-px tiles.
CPU = dict(config=dict(RELEASE_ATTENTION, hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1),
           dtype=torch.float32,
           tile=32, frames=5, memory=[(9, 64, 64), (9, 128, 128), (9, 256, 256), (33, 64, 64), (65, 64, 64)],
           seam=(9, 256, 256), seam_tile=128)
# Every variant names its mode and norm: enable_tiling's defaults may change without moving these.
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


def model(spec: dict, device: str):
    """The spec's CausalVideoVAE with seeded random weights (res blocks' conv2 scaled by 0.1), in eval mode."""
    from osp.models import CausalVideoVAE
    from osp.models.vae.blocks import ResnetBlock3D

    torch.manual_seed(0)
    vae = CausalVideoVAE(**spec["config"]).to(device=device, dtype=spec["dtype"]).eval()
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock3D):
                m.conv2.conv.weight.mul_(0.1)
    return vae


def latent(vae, spec: dict, clip, device: str) -> torch.Tensor:
    """A seeded (1, C, t, h, w) latent of the clip (frames, H, W), in the spec's dtype."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(vae.latent_shape((1, 3) + tuple(clip)), generator=g).to(device=device, dtype=spec["dtype"])


@contextlib.contextmanager
def _small_tiles_on_purpose():
    """Silence enable_tiling's warning about tiles below the receptive field: the CPU spec's tiles
    are small on purpose, so that a small clip spans many of them."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="enable_tiling: tile_sample_size=", category=UserWarning)
        yield


def configure(vae, spec: dict, variant: str) -> None:
    if variant == "untiled":
        vae.disable_tiling()
        return
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r}; expected 'untiled' or one of {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    with _small_tiles_on_purpose():
        vae.enable_tiling(mode=v["mode"], tile_sample_size=spec["tile"], norm=v["norm"], progress=False,
                          tile_frames=spec["frames"] if v["temporal"] else None)


def decode(vae, spec: dict, z: torch.Tensor, variant: str) -> torch.Tensor:
    """``vae.decode(z).sample`` as the variant decodes it (tiling switched off afterwards)."""
    configure(vae, spec, variant)
    try:
        with torch.no_grad():
            return vae.decode(z).sample
    finally:
        vae.disable_tiling()


def work_factor(vae, spec: dict, z: torch.Tensor, variant: str) -> float:
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
    with _small_tiles_on_purpose():
        cfg = tiling.make_config(vae, tile_sample_size=spec["tile"], tile_frames=spec["frames"], norm=v["norm"])
    return tiling.plan(cfg, (T, h, w), vae.spatial_compression, vae.temporal_compression, "decode").work


def decode_recording(vae, spec: dict, z: torch.Tensor, variant: str) -> Tuple[torch.Tensor, Dict[str, list]]:
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


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """20 log10(2 / rmse): PSNR of data in [-1, 1]; inf when equal."""
    mse = (out.double() - ref.double()).square().mean().item()
    return 20 * math.log10(2 / math.sqrt(mse)) if mse > 0 else math.inf


def clip_name(clip) -> str:
    return "x".join(map(str, clip))


def parse_clip(text: str) -> Tuple[int, int, int]:
    """"9x64x64" -> (9, 64, 64)."""
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"clip {text!r}; expected FRAMESxHEIGHTxWIDTH, e.g. 9x64x64")
    return tuple(int(p) for p in parts)


def output_mib(spec: dict, clip) -> float:
    """MiB of the decoded (1, 3, frames, H, W) output in the spec's dtype."""
    return 3 * clip[0] * clip[1] * clip[2] * torch.finfo(spec["dtype"]).bits / 8 / 2**20


def peak_mib(vae, spec: dict, clip, variant: str, device: str) -> Tuple[Optional[float], Optional[torch.Tensor]]:
    """(peak MiB of one decode, its output on the CPU) or (None, None) when it runs out of memory.
    On CPU the peak comes from a fresh process decoding with the ``CPU`` spec (``spec`` must be it,
    up to the seam fields) and the output is not computed: (peak, None)."""
    if device.startswith("cuda"):
        z = latent(vae, spec, clip, device)
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
    return peak_rss_in_subprocess(MODULE, clip_name(clip), variant), None


def _peak_main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="Print the peak RSS of one CPU decode of the CPU spec's VAE.")
    parser.add_argument("--peak", nargs=2, metavar=("CLIP", "VARIANT"), required=True,
                        help="CLIP as TxHxW (e.g. 9x64x64); VARIANT untiled or one of " + ", ".join(VARIANTS))
    clip, variant = parser.parse_args(argv).peak
    try:
        clip = parse_clip(clip)
    except ValueError as exc:
        parser.error(str(exc))
    if variant != "untiled" and variant not in VARIANTS:
        parser.error(f"variant {variant!r}; expected untiled or one of {', '.join(VARIANTS)}")
    vae = model(CPU, "cpu")
    z = latent(vae, CPU, clip, "cpu")
    print_peak(lambda: decode(vae, CPU, z, variant))


if __name__ == "__main__":
    _peak_main()
