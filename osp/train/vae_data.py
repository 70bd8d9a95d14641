"""Data of ``osp train-vae``: upstream's VideoDataset (dataset_videobase.py, spec E.1) over a folder.

Every .avi/.mp4/.webm file under ``video_path`` (recursive, sorted by relative path) is a sample.
Item i of epoch e takes upstream's temporal window (TemporalRandomCrop(num_frames * sample_rate),
indices linspace(begin, end - 1, num_frames) truncated: spec D.2; a clip shorter than the window
repeats frames, as upstream's does) with the window start drawn from (seed, e, i) instead of Python's
global random, then ToTensorVideo, CenterCropVideo(resolution) (a crop only, no resize: offset
round((H - R) / 2), Python's round) and 2x - 1.

Item: {"video": float32 (3, num_frames, R, R) in [-1, 1], "index": the file used, "skipped": "path:
reason" lines}. A file that cannot be decoded, or whose frames are smaller than the crop (upstream
raises there and retries a random index forever), is skipped: the next valid file in index order
takes its place and the item names it.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch.utils.data import Dataset

logger = logging.getLogger("osp.train")

VIDEO_EXTENSIONS = (".avi", ".mp4", ".webm")


def list_videos(video_path: str) -> List[str]:
    """The .avi/.mp4/.webm files under ``video_path`` (recursive), sorted by path relative to it."""
    if not os.path.isdir(video_path):
        raise ValueError(f"--video_path {video_path!r} is not a folder; expected a folder of .avi/.mp4/.webm videos")
    found = []
    for root, dirs, files in os.walk(video_path):
        dirs.sort()
        for name in files:
            if name.lower().endswith(VIDEO_EXTENSIONS):
                found.append(os.path.join(root, name))
    return sorted(found, key=lambda p: os.path.relpath(p, video_path))


def center_crop_offsets(height: int, width: int, size: int) -> Tuple[int, int]:
    """(top, left) of upstream's CenterCropVideo: int(round((H - size) / 2)), int(round((W - size) / 2));
    ValueError when a side is smaller than ``size``."""
    if height < size or width < size:
        raise ValueError(f"frames of {height}x{width} are smaller than the {size}x{size} crop (--resolution "
                         f"{size}); upstream crops without resizing")
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def crop_transform(frames: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (T, H, W, 3) -> float32 (3, T, size, size) in [-1, 1]: ToTensorVideo, CenterCropVideo(size), 2x - 1."""
    if not isinstance(frames, torch.Tensor) or frames.dim() != 4 or frames.shape[-1] != 3 or frames.dtype != torch.uint8:
        desc = f"{tuple(frames.shape)} {frames.dtype}" if isinstance(frames, torch.Tensor) else type(frames).__name__
        raise ValueError(f"crop_transform: frames are {desc}; expected uint8 (T, H, W, 3)")
    _, H, W, _ = frames.shape
    top, left = center_crop_offsets(H, W, size)
    x = frames[:, top:top + size, left:left + size].permute(3, 0, 1, 2).float().div_(255.0)
    return x.mul_(2.0).sub_(1.0).contiguous()


class VideoFolderDataset(Dataset):
    """Upstream's VideoDataset over the videos under ``video_path`` (see the module docstring).

    Keys are an index (epoch from ``set_epoch``) or (epoch, index) pairs (osp.data.ResumableSampler's
    ``yield_epoch``). ``window="random"`` draws each window start from (seed, epoch, index);
    ``"middle"`` takes the middle of upstream's range (held-out evaluation: the same clip every time).
    """

    def __init__(self, video_path: str, num_frames: int = 17, resolution: int = 256, sample_rate: int = 1,
                 seed: int = 0, window: str = "random", files: Optional[Sequence[str]] = None):
        for name, value, low in (("num_frames", num_frames, 1), ("resolution", resolution, 1),
                                 ("sample_rate", sample_rate, 1), ("seed", seed, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"VideoFolderDataset: {name}={value!r}; expected an int >= {low}")
        if window not in ("random", "middle"):
            raise ValueError(f"VideoFolderDataset: window={window!r}; expected 'random' or 'middle'")
        self.video_path = video_path
        self.files = list(files) if files is not None else list_videos(video_path)
        if not self.files:
            raise ValueError(f"--video_path {video_path!r} holds no .avi/.mp4/.webm files (searched recursively)")
        self.num_frames, self.resolution, self.sample_rate = num_frames, resolution, sample_rate
        self.seed, self.window, self.epoch = seed, window, 0
        self._bad: Dict[int, str] = {}
        self._logged: set = set()

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _load(self, index: int, u: float) -> torch.Tensor:
        from ..data import transforms
        from ..data.video import DecodeError, VideoReader

        reason = self._bad.get(index)
        if reason is None:
            try:
                with VideoReader(self.files[index]) as reader:
                    total = reader.frames
                    if total < 1:
                        raise DecodeError("no frames")
                    size = transforms.window_size(self.num_frames, self.sample_rate)
                    n = transforms.last_begin(total, size) + 1
                    begin = n // 2 if self.window == "middle" else min(int(u * n), n - 1)
                    idx = transforms.frame_indices(total, begin, self.num_frames, self.sample_rate)
                    frames = torch.from_numpy(reader.read(idx))
                return crop_transform(frames, self.resolution)
            except (DecodeError, ValueError) as exc:
                reason = str(exc)
                self._bad[index] = reason
        raise _Skip(reason)

    def __getitem__(self, key) -> dict:
        from ..data import sample_rng

        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"VideoFolderDataset: index {index} out of range for {len(self)} videos")
        u = float(sample_rng(self.seed, int(epoch), index).random())
        skipped: List[str] = []
        for step in range(len(self)):
            i = (index + step) % len(self)
            try:
                video = self._load(i, u)
            except _Skip as exc:
                line = f"{self.files[i]}: {exc}"
                skipped.append(line)
                if line not in self._logged:
                    self._logged.add(line)
                    logger.warning("skipped video %s", line)
                continue
            return {"video": video, "index": i, "skipped": "\n".join(skipped)}
        raise ValueError(f"--video_path {self.video_path!r}: no usable video among {len(self)}; first: "
                         + "; ".join(skipped[:3]))


class _Skip(Exception):
    pass


class ClipDataset(Dataset):
    """Clips held in memory: a tensor (N, 3, T, H, W) in [-1, 1] (or a list of (3, T, H, W)), items
    as VideoFolderDataset's. For tests, demos and data made on the fly."""

    def __init__(self, clips):
        if isinstance(clips, torch.Tensor):
            if clips.dim() != 5:
                raise ValueError(f"ClipDataset: clips have shape {tuple(clips.shape)}; expected (N, C, T, H, W)")
            clips = list(clips)
        self.clips = [c.float() for c in clips]
        if not self.clips:
            raise ValueError("ClipDataset: no clips")
        shapes = {tuple(c.shape) for c in self.clips}
        if len(shapes) != 1 or len(next(iter(shapes))) != 4:
            raise ValueError(f"ClipDataset: clips of shapes {sorted(shapes)}; expected one shape (C, T, H, W)")

    def __len__(self) -> int:
        return len(self.clips)

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, key) -> dict:
        index = int(key[1] if isinstance(key, tuple) else key)
        return {"video": self.clips[index], "index": index, "skipped": ""}


def collate(items: Sequence[dict]) -> dict:
    """{"video": (B, 3, T, H, W), "index": (B,) int64, "skipped": [lines]}."""
    skipped: List[str] = []
    for it in items:
        skipped += [s for s in (it.get("skipped") or "").split("\n") if s]
    return {"video": torch.stack([it["video"] for it in items]),
            "index": torch.as_tensor([int(it["index"]) for it in items], dtype=torch.long), "skipped": skipped}
