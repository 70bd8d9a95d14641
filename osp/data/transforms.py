"""Upstream's t2v data transform (spec D.2-D.4), as plain functions of explicit inputs.

Temporal: TemporalRandomCrop(num_frames * sample_rate) picks ``begin`` in [0, max(0, total - size - 1)]
(the -1 means a clip never ends on its last frame unless total <= size + 1), ``end = min(begin +
size, total)``, and the frame indices are ``linspace(begin, end - 1, num_frames)`` truncated to int:
on 64-frame clips the 65-frame stage reads [0, 0, 1, 2, ..., 63] (frame 0 twice).

Spatial: uint8 (T, H, W, 3) -> float32 / 255 -> square center crop on the short edge (offset
``round((long - short) / 2)``, Python's round: ties to even) -> ``F.interpolate`` to (S, S), bilinear,
``align_corners=True``, ``antialias=True`` -> optional horizontal flip of the whole clip -> 2x - 1 ->
(3, T, S, S).
"""
from __future__ import annotations

from typing import List, Tuple

import numpy as np
import torch
import torch.nn.functional as F


def window_size(num_frames: int, sample_rate: int) -> int:
    """Frames a window spans before subsampling: TemporalRandomCrop's size, num_frames * sample_rate."""
    return num_frames * sample_rate


def last_begin(total: int, size: int) -> int:
    """The largest window start upstream can draw: max(0, total - size - 1) (both ends inclusive)."""
    return max(0, total - size - 1)


def frame_indices(total: int, begin: int, num_frames: int, sample_rate: int = 1) -> List[int]:
    """Upstream's frame indices of the window starting at ``begin`` in a clip of ``total`` frames:
    end = min(begin + num_frames * sample_rate, total), then linspace(begin, end - 1, num_frames)
    truncated to int (so a window longer than the clip repeats frames, e.g. [0, 0, 1, ..., 63] for
    65 frames of a 64-frame clip)."""
    if total < 1:
        raise ValueError(f"frame_indices: total={total}; expected a clip with at least one frame")
    if not 0 <= begin <= last_begin(total, window_size(num_frames, sample_rate)):
        raise ValueError(f"frame_indices: begin={begin}; expected 0 <= begin <= "
                         f"{last_begin(total, window_size(num_frames, sample_rate))} for a {total}-frame clip")
    end = min(begin + window_size(num_frames, sample_rate), total)
    return np.linspace(begin, end - 1, num_frames).astype(np.int64).tolist()


def image_frame_indices(num_frames: int, n: int) -> List[int]:
    """Frames of the clip appended as images with use_img_from_vid: linspace(0, num_frames - 1, n)
    truncated ([0, 5, 10, 16] for 17 frames and 4 images)."""
    return np.linspace(0, num_frames - 1, n).astype(np.int64).tolist()


def center_crop_box(height: int, width: int) -> Tuple[int, int, int, int]:
    """(top, left, size, size) of upstream's square crop on the short edge (Python round)."""
    if height < width:
        return 0, round((width - height) / 2), height, height
    return round((height - width) / 2), 0, width, width


def center_crop_resize(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (T, 3, size, size) in [0, 1]: upstream's ToTensorVideo
    then CenterCropResizeVideo (the crop is taken on the uint8 frames first, which gives the same
    values as dividing first)."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        desc = f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"center_crop_resize: frames are {desc}; expected uint8 (T, H, W, 3)")
    _, H, W, _ = frames.shape
    top, left, h, w = center_crop_box(H, W)
    x = frames[:, top:top + h, left:left + w].permute(0, 3, 1, 2).float().div_(255.0)
    if (h, w) != (size, size):  # at the crop's own size the interpolation is an exact identity
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=True, antialias=True)
    return x


def video_transform(frames: torch.Tensor, size: int, flip: bool) -> torch.Tensor:
    """uint8 frames (T, H, W, 3) -> float32 (3, T, size, size) in [-1, 1]: crop and resize, the
    horizontal flip of the whole clip when ``flip``, then 2x - 1."""
    x = center_crop_resize(frames, size)
    if flip:
        x = x.flip(-1)
    return x.mul_(2.0).sub_(1.0).permute(1, 0, 2, 3).contiguous()
