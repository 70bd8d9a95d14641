"""Clips for VAE evaluation: upstream's examples/rec_video_vae.py (spec F.1) and eval_common_metric.py
(spec F.2) loading, and the pairing of real and generated videos by file name.

Frames (both scripts): the window is the first sample_rate * num_frames frames and the indices are
linspace(0, e - 1, n) truncated to int; a video shorter than the window gives e = total and
n = int(total / (sample_rate * num_frames) * num_frames) (fewer frames). The two scripts differ only
in the full-length test: rec_video_vae.py takes the full window when total > window, the metric script
when total >= window (with total == window both give the same frames).

Spatial, metric side (F.2): /255 -> short side to R, long side floor(long / short * R), bilinear,
align_corners=False, no antialias (pytorchvideo's ShortSideScale) -> center crop with offsets
round(delta / 2) (Python's round) -> (T, C, crop, crop) in [0, 1].
Spatial, reconstruction side (F.1): /255 * 2 - 1 -> the same sizes, but bilinear with
align_corners=True and antialias=True -> the same center crop -> (C, T, crop, crop) in [-1, 1].

Pairing: upstream sorts both folders and pairs by index, which silently mis-pairs as soon as one side
misses a file; here videos are paired by file stem, and the names present on one side only are
returned for the report.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .video import VideoReader

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v", ".mpg", ".mpeg", ".gif")


# --- files and pairing --------------------------------------------------------------------------------


def list_videos(folder: str) -> Dict[str, str]:
    """{stem: path} of the video files directly in ``folder`` (regular files with a video extension;
    subfolders such as reconstruct's origin/ are skipped). Two files of one stem are a ValueError."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder!r} is not a folder; expected a folder of video files")
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        stem, ext = os.path.splitext(name)
        if not os.path.isfile(path) or ext.lower() not in VIDEO_EXTENSIONS:
            continue
        if stem in found:
            raise ValueError(f"{folder!r} holds {os.path.basename(found[stem])!r} and {name!r}: two videos named "
                             f"{stem!r}; expected one file per name (videos are paired by name)")
        found[stem] = path
    return found


@dataclass
class Pairing:
    """Videos paired by name: ``pairs`` as (name, real path, generated path) in name order;
    ``only_real`` / ``only_generated``: names found on one side only."""

    pairs: List[Tuple[str, str, str]]
    only_real: List[str]
    only_generated: List[str]


def pair_videos(real_dir: str, generated_dir: str) -> Pairing:
    """Pair the videos of two folders by file stem (the extension may differ)."""
    real, gen = list_videos(real_dir), list_videos(generated_dir)
    names = sorted(set(real) & set(gen))
    return Pairing(pairs=[(n, real[n], gen[n]) for n in names], only_real=sorted(set(real) - set(gen)),
                   only_generated=sorted(set(gen) - set(real)))


# --- frames -------------------------------------------------------------------------------------------------


def clip_indices(total: int, num_frames: int, sample_rate: int, full_if_equal: bool = True) -> List[int]:
    """Upstream's frame indices of the first window: linspace(0, e - 1, n) truncated, with e = window =
    sample_rate * num_frames and n = num_frames when the video is long enough (total >= window, or
    total > window with ``full_if_equal=False``: rec_video_vae.py), else e = total and
    n = int(total / window * num_frames). Empty when that n is 0."""
    if num_frames < 1 or sample_rate < 1:
        raise ValueError(f"clip_indices: num_frames={num_frames}, sample_rate={sample_rate}; expected positive ints")
    window = sample_rate * num_frames
    if total > window or (full_if_equal and total == window):
        end, n = window, num_frames
    else:
        end, n = total, int(total / window * num_frames)
    if n <= 0:
        return []
    return [int(i) for i in np.linspace(0, end - 1, n)]


# --- spatial ---------------------------------------------------------------------------------------------


def short_side_size(height: int, width: int, size: int) -> Tuple[int, int]:
    """(new_h, new_w): the short side ``size``, the long side floor(long / short * size) (upstream's
    ShortSideScale and rec_video_vae.py's resize)."""
    if width < height:
        return int(math.floor(float(height) / width * size)), size
    return size, int(math.floor(float(width) / height * size))


def center_crop(x: torch.Tensor, crop: int) -> torch.Tensor:
    """x (..., H, W) cropped to (..., crop, crop) at offsets int(round((H - crop) / 2)) (torchvision's
    CenterCropVideo; Python's round, ties to even)."""
    H, W = x.shape[-2:]
    if crop > H or crop > W:
        raise ValueError(f"center_crop: crop {crop} of frames {H}x{W}; expected a crop no larger than the frames")
    top, left = int(round((H - crop) / 2.0)), int(round((W - crop) / 2.0))
    return x[..., top:top + crop, left:left + crop]


def eval_transform(frames: torch.Tensor, resolution: int, crop_size: int) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, crop, crop) in [0, 1] (spec F.2)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0
    size = short_side_size(x.shape[-2], x.shape[-1], resolution)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
    return center_crop(x, crop_size).contiguous()


def rec_transform(frames: torch.Tensor, resolution: int, crop_size: int) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (3, T, crop, crop) in [-1, 1] (spec F.1, before the trim to
    the VAE's sizes)."""
    x = frames.permute(0, 3, 1, 2).float() / 255.0 * 2 - 1
    size = short_side_size(x.shape[-2], x.shape[-1], resolution)
    x = F.interpolate(x, size=size, mode="bilinear", align_corners=True, antialias=True)
    return center_crop(x, crop_size).permute(1, 0, 2, 3).contiguous()


# --- reading --------------------------------------------------------------------------------------------------


@dataclass
class Clip:
    """A clip read for evaluation: ``frames`` (its tensor), ``total`` (frames in the file), ``indices``
    (those read); ``short``: the file was shorter than the window."""

    frames: torch.Tensor
    total: int
    indices: List[int]
    short: bool


def read_clip(path: str, num_frames: int, sample_rate: int, *, full_if_equal: bool = True) -> Clip:
    """The uint8 frames (T, H, W, 3) of ``path`` by upstream's frame rule; a video too short for even one
    frame is a ValueError (osp.data.video.DecodeError for a file that cannot be decoded)."""
    with VideoReader(path) as reader:
        total = reader.frames
        indices = clip_indices(total, num_frames, sample_rate, full_if_equal=full_if_equal)
        if not indices:
            raise ValueError(f"{path!r} has {total} frames: too short for one frame at sample_rate {sample_rate} "
                             f"and num_frames {num_frames}")
        frames = torch.from_numpy(reader.read(indices))
    window = sample_rate * num_frames
    short = total < window
    return Clip(frames=frames, total=total, indices=indices, short=short)


__all__ = ["VIDEO_EXTENSIONS", "Clip", "Pairing", "center_crop", "clip_indices", "eval_transform", "list_videos",
           "pair_videos", "read_clip", "rec_transform", "short_side_size"]
