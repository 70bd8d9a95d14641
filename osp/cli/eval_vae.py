"""``osp eval-vae``: reconstruction metrics of generated videos against real ones (upstream's
eval_common_metric.py flags, spec F.2).

Real and generated videos are paired by file name (stem; the extension may differ), not by the
position in two sorted listings as upstream pairs them (which silently mis-pairs once one side misses a
file). Names present on one side only are reported. Each video's frames follow upstream's rule: the
first sample_rate * num_frames frames by linspace; a shorter video gives int(total / window *
num_frames) frames, and is reported. When the two videos of a pair give different frame counts, the
first min(T) frames of both are compared (aligned for sample_rate 1), and the pair is reported.
Preprocessing: /255, short side to --resolution (bilinear, align_corners=False, no antialias), center
crop --crop_size (round offsets).

Metrics (osp.eval, per video the mean over its frames): ssim, psnr, lpips (AlexNet, the spatial mean:
needs the LPIPS weights, --lpips_weights or $OSP_WEIGHTS_DIR), flolpips (also the PWC-Net weights,
--flow_weights), fvd (StyleGAN-V's i3d_torchscript.pt, --i3d_path). Each metric is reported as
"mean" (every (video, frame) value weighted equally) and "upstream" (upstream's aggregation: the mean
over batches of --batch_size videos of their per-frame means; equal to "mean" when every batch is
full). fvd reports the dataset-level FVD over all clips and upstream's per-batch prefix-averaged value
(clips of >= 10 frames; it depends on --batch_size).

The table goes to stdout; the JSON (aggregates, per-video values, reports) to --json (default
GENERATED_VIDEO_DIR/eval_metrics.json), written atomically.

Added by osp: several --metric values at once, --json, --lpips_weights, --lpips_backbone_weights,
--flow_weights, --i3d_path, --device. --sample_fps is accepted and unused, as upstream.
"""
from __future__ import annotations

import os
import sys
import time
from typing import Dict, List, Optional

import torch

from .._utils import write_json_atomic
from . import UsageError, check_clip_flags, device_arg

METRICS = ("ssim", "psnr", "lpips", "flolpips", "fvd")
DEFAULT_METRICS = ["ssim", "psnr"]
JSON_NAME = "eval_metrics.json"


def register(subparsers) -> None:
    p = subparsers.add_parser("eval-vae", help="reconstruction metrics of generated vs real videos "
                              "(upstream's eval_common_metric.py flags)", description=__doc__)
    p.add_argument("--real_video_dir", required=True, help="folder of the real videos")
    p.add_argument("--generated_video_dir", required=True, help="folder of the generated videos (same file names)")
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--sample_rate", type=int, default=1)
    p.add_argument("--resolution", type=int, default=256, help="short side after resizing")
    p.add_argument("--crop_size", type=int, default=256, help="center crop side (<= --resolution)")
    p.add_argument("--batch_size", type=int, default=2, help="videos per batch (upstream's aggregation and FVD)")
    p.add_argument("--subset_size", type=int, default=100,
                   help="evaluate the first N pairs in name order (upstream's eval.sh: 100); 0: all")
    p.add_argument("--metric", nargs="+", choices=METRICS, default=DEFAULT_METRICS,
                   help="one or more metrics (default: ssim psnr)")
    p.add_argument("--sample_fps", type=int, default=None, help="accepted and unused, as upstream")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default cuda when available)")
    p.add_argument("--json", default=None, help=f"JSON output (default GENERATED_VIDEO_DIR/{JSON_NAME})")
    p.add_argument("--lpips_weights", default=None, help="LPIPS v0.1 AlexNet lin weights (or a full LPIPS state dict)")
    p.add_argument("--lpips_backbone_weights", default=None, help="AlexNet backbone weights (torchvision's file)")
    p.add_argument("--flow_weights", default=None, help="PWC-Net weights for flolpips")
    p.add_argument("--i3d_path", default=None, help="StyleGAN-V's i3d_torchscript.pt for fvd")
    p.set_defaults(run=run)


def _check(args) -> None:
    check_clip_flags(args, ("num_frames", "sample_rate", "resolution", "crop_size", "batch_size"))
    if "ssim" in args.metric and args.crop_size < 11:
        raise UsageError(f"--crop_size {args.crop_size}: ssim needs frames of at least 11x11")
    for flag in ("real_video_dir", "generated_video_dir"):
        path = getattr(args, flag)
        if not os.path.isdir(path):
            raise UsageError(f"--{flag} {path!r}: no such folder; expected a folder of videos")


def _prepare(args, device):
    """The metric callables, their weights loaded now so that a missing file stops before any work."""
    import osp.eval as E
    from osp.eval import frechet

    fns, detector = {}, None
    try:
        if "lpips" in args.metric or "flolpips" in args.metric:
            from osp.eval.lpips_net import cached_lpips

            model = cached_lpips("alex", args.lpips_weights, args.lpips_backbone_weights, device)
        if "flolpips" in args.metric:
            from osp.eval.flow import PWCNet

            flow = PWCNet.from_file(args.flow_weights).to(device).eval()
        if "fvd" in args.metric:
            detector = frechet.load_i3d(args.i3d_path, device)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc).splitlines()[0]) from exc
    for metric in dict.fromkeys(args.metric):  # the order asked for, once each
        if metric == "ssim":
            fns[metric] = E.ssim
        elif metric == "psnr":
            fns[metric] = E.psnr
        elif metric == "lpips":
            fns[metric] = lambda a, b: E.lpips(a, b, model=model)
        elif metric == "flolpips":
            fns[metric] = lambda a, b: E.flolpips(a, b, model=model, flow=flow)
    return fns, detector


def _load_pair(name: str, real_path: str, gen_path: str, args, notes: Dict[str, list]):
    from osp.data.eval_video import eval_transform, read_clip
    from osp.data.video import DecodeError

    clips = []
    for side, path in (("real", real_path), ("generated", gen_path)):
        try:
            clip = read_clip(path, args.num_frames, args.sample_rate)
        except (DecodeError, ValueError) as exc:
            notes["unreadable"].append({"name": name, "side": side, "path": path, "error": str(exc)})
            return None
        if clip.short:
            notes["short"].append({"name": name, "side": side, "frames_in_file": clip.total,
                                   "frames_used": len(clip.indices)})
        try:
            clips.append(eval_transform(clip.frames, args.resolution, args.crop_size))
        except ValueError as exc:
            notes["unreadable"].append({"name": name, "side": side, "path": path, "error": str(exc)})
            return None
    real, gen = clips
    if real.shape[0] != gen.shape[0]:
        t = min(real.shape[0], gen.shape[0])
        notes["frame_mismatch"].append({"name": name, "real_frames": real.shape[0], "generated_frames": gen.shape[0],
                                        "compared": t})
        real, gen = real[:t], gen[:t]
    return real, gen


def _aggregate(per_video: Dict[str, dict], batches: List[List[str]], metric: str) -> Dict[str, Optional[float]]:
    """"mean": every (video, value) weighted equally; "upstream": per batch the per-frame means over
    its videos, concatenated over batches, averaged (each video weighted count / batch size)."""
    num = den = unum = uden = 0.0
    n = 0
    for batch in batches:
        rows = [per_video[v] for v in batch if metric in per_video[v]]
        for row in rows:
            value, count = row[metric], row["counts"][metric]
            num += value * count
            den += count
            unum += value * count / len(rows)
            uden += count / len(rows)
            n += 1
    if not n:
        return {"mean": None, "upstream": None, "videos": 0}
    return {"mean": num / den, "upstream": unum / uden, "videos": n}


def run(args) -> int:
    from tqdm import tqdm

    from osp.data.eval_video import pair_videos
    from osp.eval import frechet

    _check(args)
    device = device_arg(args.device)
    try:
        pairing = pair_videos(args.real_video_dir, args.generated_video_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    for name in pairing.only_real:
        print(f"only in --real_video_dir: {name}", file=sys.stderr)
    for name in pairing.only_generated:
        print(f"only in --generated_video_dir: {name}", file=sys.stderr)
    pairs = pairing.pairs[:args.subset_size] if args.subset_size else pairing.pairs
    if not pairs:
        raise UsageError(f"no video name is in both --real_video_dir {args.real_video_dir!r} and "
                         f"--generated_video_dir {args.generated_video_dir!r}; expected videos paired by file name")
    if len(pairs) < len(pairing.pairs):
        print(f"--subset_size {args.subset_size}: the first {len(pairs)} of {len(pairing.pairs)} pairs", file=sys.stderr)
    fns, detector = _prepare(args, device)

    start = time.time()
    notes: Dict[str, list] = {"short": [], "frame_mismatch": [], "unreadable": [], "fvd_upstream_skipped": []}
    per_video: Dict[str, dict] = {}
    batches: List[List[str]] = []
    feats_real, feats_gen, fvd_up_values = [], [], []
    bar = tqdm(total=len(pairs), unit="video", disable=not sys.stderr.isatty())
    for b0 in range(0, len(pairs), args.batch_size):
        loaded = []
        for name, real_path, gen_path in pairs[b0:b0 + args.batch_size]:
            pair = _load_pair(name, real_path, gen_path, args, notes)
            if pair is not None:
                loaded.append((name, *pair))
            bar.update(1)
        if not loaded:
            continue
        batches.append([name for name, _, _ in loaded])
        # Videos of one frame count go through the metrics together (short videos make groups).
        groups: Dict[int, list] = {}
        for item in loaded:
            groups.setdefault(item[1].shape[0], []).append(item)
        for T, items in groups.items():
            names = [n for n, _, _ in items]
            real = torch.stack([r for _, r, _ in items]).to(device)
            gen = torch.stack([g for _, _, g in items]).to(device)
            for n in names:
                per_video.setdefault(n, {"frames": T, "counts": {}})
            for metric, fn in fns.items():
                if metric == "flolpips" and T < 2:
                    continue
                values = fn(real, gen).double().cpu().tolist()
                for n, v in zip(names, values):
                    per_video[n][metric] = v
                    per_video[n]["counts"][metric] = T - 1 if metric == "flolpips" else T
            if detector is not None:
                feats_real.append(frechet.video_features(real, detector, device=device))
                feats_gen.append(frechet.video_features(gen, detector, device=device))
                if T >= frechet.MIN_FRAMES and len(groups) == 1:
                    fvd_up_values += frechet.fvd_upstream_values(real, gen, detector, batch_size=len(names),
                                                                 device=device)
                else:
                    notes["fvd_upstream_skipped"].append({"videos": names, "frames": T, "why": (
                        f"fewer than {frechet.MIN_FRAMES} frames" if T < frechet.MIN_FRAMES
                        else "the batch mixes frame counts")})
    bar.close()
    if not per_video:
        raise UsageError("no pair could be read; see the unreadable videos above" if not notes["unreadable"] else
                         f"no pair could be read: {notes['unreadable'][0]['path']!r}: {notes['unreadable'][0]['error']}")

    results = {m: _aggregate(per_video, batches, m) for m in fns}
    if detector is not None:
        fr, fg = torch.cat(feats_real), torch.cat(feats_gen)
        results["fvd"] = {"mean": frechet.frechet_distance_features(fg, fr),
                          "upstream": sum(fvd_up_values) / len(fvd_up_values) if fvd_up_values else None,
                          "videos": fr.shape[0]}

    for item in notes["short"]:
        print(f"short video: {item['name']} ({item['side']}): {item['frames_in_file']} frames in the file, "
              f"{item['frames_used']} used (window {args.sample_rate * args.num_frames})", file=sys.stderr)
    for item in notes["frame_mismatch"]:
        print(f"frame counts differ: {item['name']}: real {item['real_frames']}, generated "
              f"{item['generated_frames']}; the first {item['compared']} compared", file=sys.stderr)
    for item in notes["unreadable"]:
        print(f"skipped: {item['name']} ({item['side']}): {item['error']}", file=sys.stderr)
    for item in notes["fvd_upstream_skipped"]:
        print(f"fvd upstream form skipped for {', '.join(item['videos'])}: {item['why']}", file=sys.stderr)

    print(f"{'metric':<10} {'mean':>12} {'upstream':>12} {'videos':>7}")
    for metric, r in results.items():
        cells = [f"{v:12.4f}" if v is not None else f"{'-':>12}" for v in (r["mean"], r["upstream"])]
        print(f"{metric:<10} {cells[0]} {cells[1]} {r['videos']:7d}")

    record = {
        "real_video_dir": os.path.abspath(args.real_video_dir),
        "generated_video_dir": os.path.abspath(args.generated_video_dir),
        "settings": {k: getattr(args, k) for k in ("num_frames", "sample_rate", "resolution", "crop_size",
                                                    "batch_size", "subset_size", "metric")},
        "device": str(device),
        "results": results,
        "pairs": len(per_video),
        "only_real": pairing.only_real,
        "only_generated": pairing.only_generated,
        **notes,
        "videos": {n: {k: v for k, v in row.items() if k != "counts"} for n, row in per_video.items()},
        "seconds": round(time.time() - start, 3),
    }
    path = args.json or os.path.join(args.generated_video_dir, JSON_NAME)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_json_atomic(path, record, indent=2)
    print(f"results written to {path}")
    return 0
