"""``osp reconstruct``: VAE reconstructions of a folder of videos (upstream's examples/rec_video_vae.py,
spec F.1), for ``osp eval-vae`` to score.

Videos are taken in name order (--subset_size: the first N). Frames: the first sample_rate * num_frames
by linspace (a shorter video gives fewer frames, reported). Preprocessing: x/255*2-1, short side to
--resolution (bilinear, align_corners=True, antialias=True), center crop --crop_size, then T trimmed to
1 + k * (the VAE's temporal factor) and H, W to multiples of its spatial factor. The VAE and the clip are
cast to --dtype (upstream: bf16); the reconstruction is decode(encode(x).sample()) (stochastic, as
upstream; --seed makes it repeatable, --no-sample_posterior decodes the mode). Tiling on request. Frames
are clamped to [-1, 1], mapped to [0, 255] and truncated to uint8 (as upstream), and written as
GENERATED_VIDEO_DIR/<name>.mp4 at fps = sample_fps / sample_rate (MPEG-4 Part 2 by default, the codec
family of upstream's OpenCV "mp4v"; --codec h264 --crf 0 writes lossless H.264). With --output_origin
the input as the VAE saw it (cast to --dtype) goes to GENERATED_VIDEO_DIR/origin/<name>.mp4: upstream's
"real" side of its table. A record of the settings and videos goes to GENERATED_VIDEO_DIR/reconstruct.json.

Defaults are upstream's gen_video.sh: 17 frames, 512/512, sample_rate 1, sample_fps 10, tiling on.
Added by osp: --seed, --sample_posterior, --dtype, --device, --tiling_mode, --codec, --crf; --ae_path
(alias --model_path) is a CausalVideoVAE folder (upstream's release vae/ or an osp save).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from fractions import Fraction

import torch

from .._utils import write_json_atomic
from . import UsageError, check_clip_flags, device_arg

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
RECORD = "reconstruct.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("reconstruct", help="VAE reconstructions of a folder of videos "
                              "(upstream's examples/rec_video_vae.py)", description=__doc__)
    p.add_argument("--real_video_dir", "--video_path", dest="real_video_dir", required=True,
                   help="folder of videos (or one video file)")
    p.add_argument("--generated_video_dir", "--rec_path", dest="generated_video_dir", required=True,
                   help="output folder (created)")
    p.add_argument("--ae_path", "--model_path", dest="ae_path", required=True, help="CausalVideoVAE folder")
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--sample_rate", type=int, default=1)
    p.add_argument("--resolution", type=int, default=512, help="short side after resizing")
    p.add_argument("--crop_size", type=int, default=512, help="center crop side (<= --resolution)")
    p.add_argument("--sample_fps", type=float, default=10, help="output fps = sample_fps / sample_rate")
    p.add_argument("--subset_size", type=int, default=0, help="reconstruct the first N videos in name order; 0: all")
    p.add_argument("--enable_tiling", action=argparse.BooleanOptionalAction, default=True,
                   help="tiled encode and decode (default on, as gen_video.sh)")
    p.add_argument("--tile_overlap_factor", type=float, default=0.25)
    p.add_argument("--output_origin", action="store_true", help="also write the VAE's input to origin/")
    # osp's additions
    p.add_argument("--tiling_mode", choices=("osp-v1.0", "stream"), default="osp-v1.0",
                   help="osp-v1.0: upstream's tiling; stream: osp's streaming tiles")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="VAE and input dtype (default bfloat16 on CUDA as upstream, float32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default cuda when available)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the posterior sample of video i is seed + i (default: unseeded, as upstream)")
    p.add_argument("--sample_posterior", action=argparse.BooleanOptionalAction, default=True,
                   help="decode a posterior sample (upstream) or, with --no-sample_posterior, its mode")
    p.add_argument("--codec", choices=("mpeg4", "h264"), default="mpeg4")
    p.add_argument("--crf", type=int, default=12, help="H.264 quality (0: lossless)")
    p.set_defaults(run=run)


def _check(args) -> None:
    check_clip_flags(args, ("num_frames", "sample_rate", "resolution", "crop_size"))
    if not args.sample_fps > 0:
        raise UsageError(f"--sample_fps {args.sample_fps}: expected a positive number")
    if not 0 <= args.tile_overlap_factor < 1:
        raise UsageError(f"--tile_overlap_factor {args.tile_overlap_factor}: expected a number in [0, 1)")
    if not os.path.exists(args.real_video_dir):
        raise UsageError(f"--real_video_dir {args.real_video_dir!r}: no such folder or file; expected a folder "
                         "of videos or one video")
    if not os.path.isdir(args.ae_path):
        raise UsageError(f"--ae_path {args.ae_path!r}: no such folder; expected a CausalVideoVAE folder "
                         "(config.json and weights)")


def _inputs(args):
    from osp.data.eval_video import VIDEO_EXTENSIONS, list_videos

    if os.path.isfile(args.real_video_dir):
        stem, ext = os.path.splitext(os.path.basename(args.real_video_dir))
        if ext.lower() not in VIDEO_EXTENSIONS:
            raise UsageError(f"--video_path {args.real_video_dir!r}: expected a video ({', '.join(VIDEO_EXTENSIONS)})")
        return [(stem, args.real_video_dir)]
    try:
        videos = list_videos(args.real_video_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    items = sorted(videos.items())
    if args.subset_size:
        items = items[:args.subset_size]
    if not items:
        raise UsageError(f"--real_video_dir {args.real_video_dir!r} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
    return items


def to_uint8(video: torch.Tensor) -> torch.Tensor:
    """(C, T, H, W) in [-1, 1] -> uint8 (T, H, W, C): clamp, (x + 1) / 2 * 255, truncated (upstream)."""
    x = video.float().clamp(-1, 1)
    return ((x + 1) / 2 * 255).to(torch.uint8).permute(1, 2, 3, 0).contiguous().cpu()


def trim(x: torch.Tensor, temporal: int, spatial: int) -> torch.Tensor:
    """(C, T, H, W) cut to T = 1 + k * temporal frames and H, W multiples of spatial (the first ones)."""
    _, T, H, W = x.shape
    return x[:, :T - (T - 1) % temporal, :H - H % spatial, :W - W % spatial]


def run(args) -> int:
    from osp.data.eval_video import read_clip, rec_transform
    from osp.data.video import DecodeError, write_mp4
    from osp.models import CausalVideoVAE

    _check(args)
    items = _inputs(args)
    device = device_arg(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        vae = CausalVideoVAE.from_pretrained(args.ae_path, torch_dtype=dtype, device=device).eval()
    except (OSError, ValueError, KeyError) as exc:
        raise UsageError(f"cannot load the VAE from --ae_path {args.ae_path!r}: {str(exc).splitlines()[0]}") from exc
    if args.enable_tiling:
        try:
            vae.enable_tiling(mode=args.tiling_mode, tile_sample_size=256, overlap=args.tile_overlap_factor,
                              progress=False)
        except ValueError as exc:
            raise UsageError(str(exc).splitlines()[0]) from exc
    out_dir = args.generated_video_dir
    os.makedirs(out_dir, exist_ok=True)
    if args.output_origin:
        os.makedirs(os.path.join(out_dir, "origin"), exist_ok=True)
    fps = Fraction(args.sample_fps).limit_denominator(1000) / args.sample_rate
    fps = int(fps) if fps.denominator == 1 else fps
    tc, sc = vae.temporal_compression, vae.spatial_compression

    start = time.time()
    done, skipped = [], []
    for i, (name, path) in enumerate(items):
        try:
            clip = read_clip(path, args.num_frames, args.sample_rate, full_if_equal=False)
            x = trim(rec_transform(clip.frames, args.resolution, args.crop_size), tc, sc)
        except (DecodeError, ValueError) as exc:
            print(f"skipped {path}: {exc}", file=sys.stderr)
            skipped.append({"name": name, "path": path, "error": str(exc)})
            continue
        if x.shape[-1] == 0 or x.shape[-2] == 0:
            msg = f"a {args.crop_size}-pixel crop is smaller than the VAE's factor {sc}"
            print(f"skipped {path}: {msg}", file=sys.stderr)
            skipped.append({"name": name, "path": path, "error": msg})
            continue
        if clip.short:
            print(f"short video: {name}: {clip.total} frames in the file, {len(clip.indices)} read, "
                  f"{x.shape[1]} reconstructed", file=sys.stderr)
        x = x.unsqueeze(0).to(device=device, dtype=dtype)
        generator = torch.Generator("cpu").manual_seed(args.seed + i) if args.seed is not None else None
        with torch.no_grad():
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=generator) if args.sample_posterior else posterior.mode()
            rec = vae.decode(z).sample
        out = os.path.join(out_dir, f"{name}.mp4")
        write_mp4(out, to_uint8(rec[0]), fps=fps, codec=args.codec, crf=args.crf)
        if args.output_origin:
            write_mp4(os.path.join(out_dir, "origin", f"{name}.mp4"), to_uint8(x[0]), fps=fps, codec=args.codec,
                      crf=args.crf)
        done.append({"name": name, "source": os.path.abspath(path), "output": os.path.abspath(out),
                     "frames_in_file": clip.total, "frames": int(x.shape[2]), "size": list(x.shape[-2:]),
                     "short": clip.short})
        print(f"{i + 1}/{len(items)} {name}: {x.shape[2]}x{x.shape[3]}x{x.shape[4]} -> {out}", flush=True)
    if not done:
        raise UsageError(f"no video of --real_video_dir {args.real_video_dir!r} could be reconstructed "
                         f"(first: {skipped[0]['path']}: {skipped[0]['error']})")
    record = {"settings": {k: getattr(args, k) for k in (
        "ae_path", "num_frames", "sample_rate", "resolution", "crop_size", "sample_fps", "subset_size",
        "enable_tiling", "tile_overlap_factor", "tiling_mode", "output_origin", "seed", "sample_posterior",
        "codec", "crf")}, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "videos": done, "skipped": skipped, "seconds": round(time.time() - start, 3)}
    path = os.path.join(out_dir, RECORD)
    write_json_atomic(path, record, indent=2)
    print(f"{len(done)} reconstructions written to {out_dir}" + (f" ({len(skipped)} skipped)" if skipped else "")
          + f"; record: {path}")
    return 0
