"""``osp make-data``: a synthetic captioned-video dataset (moving coloured shapes) in upstream's format.

Writes ``output_dir/videos/*.mp4`` and ``output_dir/data.json`` (``[{"path": "videos/000000.mp4",
"cap": ["a red circle moving left on a dark background"]}, ...]``, paths relative to output_dir),
and with --num_images ``output_dir/images/*.png`` and ``output_dir/images.json`` (the same schema).
Deterministic under --seed. An osp command with no upstream counterpart.
"""
from __future__ import annotations

import os
import re
import sys

from . import UsageError


def register(subparsers) -> None:
    p = subparsers.add_parser("make-data", help="synthetic captioned videos (moving coloured shapes) as mp4 + JSON",
                              description=__doc__)
    p.add_argument("--output_dir", required=True, help="folder to write (created; existing files are replaced)")
    p.add_argument("--num_videos", type=int, default=64, help="clips to write (default 64)")
    p.add_argument("--num_frames", type=int, default=17, help="frames per clip (default 17)")
    p.add_argument("--size", default="64", help="frame size: N (square) or HxW, even sides >= 16 (default 64)")
    p.add_argument("--fps", type=int, default=24, help="frame rate of the mp4 files (default 24)")
    p.add_argument("--seed", type=int, default=0, help="the dataset is a function of the seed (default 0)")
    p.add_argument("--num_images", type=int, default=0,
                   help="still images (png) with their own caption JSON, images.json (default 0: none)")
    p.add_argument("--codec", choices=("h264", "mpeg4"), default="h264", help="video codec (default h264)")
    p.set_defaults(run=run)


def parse_size(text: str):
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise UsageError(f"--size {text!r}: expected N or HxW (e.g. 64 or 48x80)")
    h = int(m.group(1))
    w = int(m.group(2)) if m.group(2) else h
    if h < 16 or w < 16 or h % 2 or w % 2:
        raise UsageError(f"--size {text!r}: expected even sides of at least 16 pixels")
    return h, w


def run(args) -> int:
    from ..data.synthetic import make_dataset

    size = parse_size(args.size)
    for flag, value, low in (("--num_videos", args.num_videos, 1), ("--num_frames", args.num_frames, 1),
                             ("--fps", args.fps, 1), ("--num_images", args.num_images, 0), ("--seed", args.seed, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: expected an integer >= {low}")
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise UsageError(f"--output_dir {args.output_dir!r} is a file; expected a folder (created if missing)")
    try:
        import av  # noqa: F401
    except ImportError:
        raise UsageError("writing mp4 needs PyAV: pip install av (or pip install 'osp[data]')") from None
    try:
        os.makedirs(args.output_dir, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--output_dir {args.output_dir!r}: cannot create it ({exc.strerror})") from None

    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.num_videos + args.num_images, desc="make-data", unit="file")
    try:
        result = make_dataset(args.output_dir, num_videos=args.num_videos, num_frames=args.num_frames, size=size,
                              fps=args.fps, seed=args.seed, num_images=args.num_images, codec=args.codec,
                              progress=bar.update if bar is not None else None)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    finally:
        if bar is not None:
            bar.close()
    print(f"wrote {result['videos']} clips ({args.num_frames}x{size[0]}x{size[1]}) and {result['data_path']}")
    if result["image_data_path"]:
        print(f"wrote {result['images']} images and {result['image_data_path']}")
    print(f"use: --data_path {result['data_path']} --video_folder {args.output_dir}")
    return 0
