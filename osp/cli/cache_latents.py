"""``osp cache-latents``: encode a dataset's clips (VAE posteriors) and captions (text states) once.

Takes ``osp train-t2v``'s data and encoder flags (upstream train_t2v.py's names and the 17x256x256
run script's values) and writes a cache folder that ``osp train-t2v --cache_dir`` reads without
loading the VAE or the text encoder. Per clip, --cache_windows fixed temporal windows, each unflipped
and flipped; training draws among them, and samples z = mean + std * noise afresh every epoch.

The cache records the data transform, the data, the VAE (config and weights fingerprint) and the text
encoder; a --cache_dir holding another cache is refused. Rerun the same command after an interruption:
finished entries are kept. An osp command with no upstream counterpart.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import UsageError, device_arg

PRECISIONS = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def register(subparsers) -> None:
    p = subparsers.add_parser("cache-latents", help="store VAE posteriors and caption states for train-t2v --cache_dir",
                              description=__doc__)
    p.add_argument("--data_path", required=True, help="upstream's caption JSON: [{\"path\": ..., \"cap\": [...]}, ...]")
    p.add_argument("--video_folder", default=None, help="folder that relative clip paths are looked up in first")
    p.add_argument("--image_data_path", default=None,
                   help="image-caption JSON (same schema) for --use_image_num with --no-use_img_from_vid")
    p.add_argument("--num_frames", type=int, default=17)
    p.add_argument("--max_image_size", type=int, default=256)
    p.add_argument("--sample_rate", type=int, default=1)
    p.add_argument("--use_image_num", type=int, default=4)
    p.add_argument("--use_img_from_vid", action=argparse.BooleanOptionalAction, default=True,
                   help="the images are frames of the clip (default, as upstream's scripts); "
                        "--no-use_img_from_vid draws them from --image_data_path")
    p.add_argument("--ae_path", required=True, help="CausalVideoVAE folder (config.json and weights)")
    p.add_argument("--text_encoder_name", default="DeepFloyd/t5-v1_1-xxl",
                   help="local folder of a T5 v1.1 XXL encoder, or 'tiny' for osp's built-in offline encoder")
    p.add_argument("--model_max_length", type=int, default=300, help="caption tokens (default 300)")
    p.add_argument("--cache_dir", required=True, help="the cache folder to write (or to finish)")
    p.add_argument("--cache_windows", type=int, default=4, help="temporal windows stored per clip (default 4)")
    # osp's additions
    p.add_argument("--caption_channels", type=int, default=4096,
                   help="width of the 'tiny' encoder's states: the transformer's caption_channels (default 4096)")
    p.add_argument("--mixed_precision", choices=sorted(PRECISIONS), default="bf16",
                   help="the T5 encoder's dtype, as train-t2v loads it (default bf16; the VAE runs in float32)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default cuda when available)")
    p.add_argument("--batch_size", type=int, default=4, help="clips per VAE call (default 4)")
    p.add_argument("--dataloader_num_workers", type=int, default=0, help="processes decoding clips (default 0)")
    p.set_defaults(run=run)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def run(args) -> int:
    from ..data import (
        CacheError,
        CacheMismatchError,
        NoValidSampleError,
        VideoCaptionDataset,
    )
    from ..train.latent_cache import cache_latents

    for flag, value, low in (("--num_frames", args.num_frames, 1), ("--max_image_size", args.max_image_size, 8),
                             ("--sample_rate", args.sample_rate, 1), ("--use_image_num", args.use_image_num, 0),
                             ("--model_max_length", args.model_max_length, 1), ("--cache_windows", args.cache_windows, 1),
                             ("--caption_channels", args.caption_channels, 1), ("--batch_size", args.batch_size, 1),
                             ("--dataloader_num_workers", args.dataloader_num_workers, 0)):
        if value < low:
            raise UsageError(f"{flag} {value}: expected an integer >= {low}")
    if not os.path.isdir(args.ae_path):
        raise UsageError(f"--ae_path {args.ae_path!r} is not a folder; expected a CausalVideoVAE folder "
                         "(config.json and weights; for example the vae/ folder of Open-Sora-Plan-v1.0.0)")
    if args.text_encoder_name != "tiny" and not os.path.isdir(args.text_encoder_name):
        raise UsageError(f"--text_encoder_name {args.text_encoder_name!r} is not a folder; expected the local folder "
                         "of a T5 v1.1 XXL encoder (osp never downloads it), or 'tiny'")
    if os.path.exists(args.cache_dir) and not os.path.isdir(args.cache_dir):
        raise UsageError(f"--cache_dir {args.cache_dir!r} is a file; expected a folder")
    try:
        dataset = VideoCaptionDataset(args.data_path, video_folder=args.video_folder, num_frames=args.num_frames,
                                      max_image_size=args.max_image_size, sample_rate=args.sample_rate,
                                      use_image_num=args.use_image_num, use_img_from_vid=args.use_img_from_vid,
                                      image_data_path=args.image_data_path)
    except ValueError as exc:
        raise UsageError(_first_line(exc).replace("image_data_path=", "--image_data_path ")
                         .replace("data_path=", "--data_path ")) from None
    device = device_arg(args.device)

    from ..models import CausalVideoVAE

    try:
        vae = CausalVideoVAE.from_pretrained(args.ae_path, torch_dtype=torch.float32, device=device)
    except (ValueError, OSError) as exc:
        raise UsageError(f"cannot load the VAE from {args.ae_path!r}: {_first_line(exc)}") from None
    vae.eval()
    tc, sc = vae.temporal_compression, vae.spatial_compression
    if (args.num_frames - 1) % tc:
        raise UsageError(f"--num_frames {args.num_frames}: this VAE takes 1 + {tc}k frames (e.g. 17 or 65)")
    if args.max_image_size % sc:
        raise UsageError(f"--max_image_size {args.max_image_size}: expected a multiple of {sc}")
    try:
        if args.text_encoder_name == "tiny":
            from ..models.text import TinyTextEncoder

            text_encoder = TinyTextEncoder(out_channels=args.caption_channels,
                                           max_length=args.model_max_length).to(device)
            text_source = "tiny"
        else:
            from ..models.text import T5TextEncoder

            text_encoder = T5TextEncoder(args.text_encoder_name, max_length=args.model_max_length,
                                         dtype=PRECISIONS[args.mixed_precision], device=device)
            text_source = os.path.abspath(args.text_encoder_name)
    except (ValueError, ImportError) as exc:  # MissingWeightsError is a ValueError
        raise UsageError(f"cannot load the text encoder {args.text_encoder_name!r}: {_first_line(exc)}") from None

    try:
        summary = cache_latents(dataset, vae, text_encoder, args.cache_dir, windows=args.cache_windows,
                                vae_source=os.path.abspath(args.ae_path), text_encoder_source=text_source,
                                batch_size=args.batch_size, num_workers=args.dataloader_num_workers)
    except (CacheMismatchError, CacheError, NoValidSampleError) as exc:
        raise UsageError(_first_line(exc)) from None
    print(f"cached {summary['clips']} clips in {args.cache_dir}: {summary['written']} written, "
          f"{summary['reused']} already there, {summary['skipped']} skipped (bad files, named in "
          f"{os.path.join(args.cache_dir, 'cache_log.jsonl')})")
    if summary["images"]:
        print(f"cached {summary['images']} images: {summary['images_written']} written, "
              f"{summary['images_reused']} already there, {summary['images_skipped']} skipped")
    print(f"{summary['captions']} captions ({summary['captions_encoded']} encoded now); manifest {summary['manifest']}")
    print(f"train with: osp train-t2v --cache_dir {args.cache_dir} ...", file=sys.stdout)
    return 0
