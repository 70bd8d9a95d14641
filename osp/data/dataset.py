"""The video-caption dataset: upstream's JSON, temporal window, crop, resize, flip and joint images.

Item contract (a dict; ``torch.utils.data.default_collate`` works, ``osp.data.collate`` keeps the
captions per sample):

- ``"video"``: float32 (3, num_frames, S, S) in [-1, 1], S = max_image_size.
- ``"images"``: float32 (3, use_image_num, S, S) in [-1, 1]; present only when use_image_num > 0.
- ``"captions"``: list of 1 + use_image_num str: the video's caption, then one per image (raw
  ``cap`` text; the text encoder's side applies upstream's caption cleaning).
- ``"index"``: int, the dataset index whose clip was used (not the one asked for when that one was
  skipped).
- ``"skipped"``: str, the samples skipped to produce this item as "path: reason" lines joined by
  "\\n" ("" when none).

Randomness (window start, flip, caption choice, image choice and flips) is a function of (seed,
epoch, index asked for) only, so any worker layout and any resume gives the same items.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from . import transforms
from .video import DecodeError, VideoReader

logger = logging.getLogger("osp.data")


class SampleError(Exception):
    """A sample that cannot be used; the message is the reason (the path is added by the caller)."""


class NoValidSampleError(RuntimeError):
    """Every sample of a dataset was skipped."""


class Entry(NamedTuple):
    path: str
    caps: Tuple[str, ...]


def _json_dir(data_path: str) -> str:
    return os.path.dirname(os.path.abspath(data_path))


def read_entries(data_path: Union[str, os.PathLike], what: str = "data_path") -> List[Entry]:
    """Upstream's caption JSON: a list of {"path": str, "cap": [str, ...]} (a single str "cap" is
    taken as one caption; other keys are ignored). ValueError naming the file, and the index of the
    first bad entry, for anything else."""
    data_path = os.fspath(data_path)
    if not os.path.isfile(data_path):
        raise ValueError(f"{what}={data_path!r}: no such file; expected upstream's caption JSON "
                         '([{"path": ..., "cap": [...]}, ...])')
    try:
        with open(data_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{what}={data_path!r} is not valid JSON ({exc})") from None
    if not isinstance(raw, list):
        raise ValueError(f"{what}={data_path!r} holds a {type(raw).__name__}; expected a list of "
                         '{"path": ..., "cap": [...]} entries')
    if not raw:
        raise ValueError(f"{what}={data_path!r} holds no entries")
    entries = []
    for i, e in enumerate(raw):
        where = f"{what}={data_path!r}: entry {i}"
        if not isinstance(e, dict):
            raise ValueError(f"{where} is a {type(e).__name__}; expected an object with 'path' and 'cap'")
        path, cap = e.get("path"), e.get("cap")
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where} has path={path!r}; expected a non-empty string")
        if isinstance(cap, str):
            cap = [cap]
        if not isinstance(cap, list) or not cap or not all(isinstance(c, str) for c in cap):
            raise ValueError(f"{where} ({path!r}) has cap={cap!r:.80}; expected a non-empty list of strings")
        entries.append(Entry(path, tuple(cap)))
    return entries


def entries_fingerprint(entries: Sequence[Entry]) -> str:
    """SHA-256 of the entries' paths and captions (what a cache's identity records of the data)."""
    h = hashlib.sha256()
    for e in entries:
        h.update(json.dumps([e.path, list(e.caps)], ensure_ascii=False).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one item's random choices, a function of (seed, epoch, index) only."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, index]))


def draw_image_choices(rng: np.random.Generator, m: int, n: int) -> Tuple[List[int], List[float], List[float]]:
    """(image indices, flip draws, caption draws) of one item's n images out of m: without replacement
    (with replacement when m < n), each with its own uniform flip and caption draw."""
    chosen = rng.choice(m, size=n, replace=m < n).tolist()
    u = rng.random((2, n))
    return chosen, u[0].tolist(), u[1].tolist()


def _check_int(owner: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{owner}: {name}={value!r}; expected an int >= {low}")
    return int(value)


def _pick(u: float, n: int) -> int:
    """Uniform choice in range(n) from a uniform u in [0, 1)."""
    return min(int(u * n), n - 1)


class VideoCaptionDataset(Dataset):
    """Upstream's t2v dataset (spec D) over a caption JSON, with bad files skipped, not fatal.

    Args:
        data_path: upstream's JSON, ``[{"path": ..., "cap": [...]}, ...]``. A relative path is looked
            up under ``video_folder`` first, then as is (relative to the working directory, as
            upstream reads it), then next to the JSON file.
        num_frames, sample_rate: the temporal window (upstream's TemporalRandomCrop and linspace).
        max_image_size: S of the square center crop and resize.
        use_image_num: N images appended to each clip (0: none).
        use_img_from_vid: the N images are frames linspace(0, num_frames - 1, N) of the same augmented
            clip, each with the clip's caption (upstream). False: N images drawn from
            ``image_data_path`` (same JSON schema; its relative paths looked up under
            ``image_folder``, then as is, then next to that JSON), each with its own caption and flip.
        seed: with the epoch (``set_epoch``) and the index, fixes every random choice.
        flip: upstream's horizontal flip with probability 0.5 (of the whole clip, after the resize).
        random_caption: pick one of an entry's captions at random (upstream always takes cap[0]).
        min_frames: clips with fewer frames are skipped as too short (default num_frames - 1, so the
            65-frame stage still reads 64-frame clips with frame 0 repeated, as upstream; upstream
            itself stretches any length: pass 1 for that).

    A missing, unreadable, truncated, frameless or too-short file is skipped: its place goes to the
    next valid sample in index order (index + 1, + 2, ... wrapping around), the item's "skipped"
    field and the ``osp.data`` logger name it and the reason, and batches keep their size. If no
    sample is valid, ``NoValidSampleError``. See the module docstring for the item contract.
    """

    def __init__(self, data_path: Union[str, os.PathLike], video_folder: Optional[str] = None, num_frames: int = 17,
                 max_image_size: int = 256, sample_rate: int = 1, use_image_num: int = 0,
                 use_img_from_vid: bool = True, image_data_path: Optional[Union[str, os.PathLike]] = None,
                 seed: int = 0, flip: bool = True, image_folder: Optional[str] = None,
                 random_caption: bool = False, min_frames: Optional[int] = None):
        owner = type(self).__name__
        self.num_frames = _check_int(owner, "num_frames", num_frames, 1)
        self.max_image_size = _check_int(owner, "max_image_size", max_image_size, 1)
        self.sample_rate = _check_int(owner, "sample_rate", sample_rate, 1)
        self.use_image_num = _check_int(owner, "use_image_num", use_image_num, 0)
        self.seed = _check_int(owner, "seed", seed, 0)
        self.min_frames = _check_int(owner, "min_frames",
                                     max(1, self.num_frames - 1) if min_frames is None else min_frames, 1)
        self.flip, self.random_caption = bool(flip), bool(random_caption)
        self.use_img_from_vid = bool(use_img_from_vid)
        for name, folder in (("video_folder", video_folder), ("image_folder", image_folder)):
            if folder is not None and not os.path.isdir(folder):
                raise ValueError(f"{owner}: {name}={folder!r} is not a folder")
        self.data_path, self.video_folder, self.image_folder = os.fspath(data_path), video_folder, image_folder
        self.entries = read_entries(self.data_path)
        self.image_data_path = None if image_data_path is None else os.fspath(image_data_path)
        self.image_entries: Optional[List[Entry]] = None
        if self.use_image_num:
            if self.use_img_from_vid and self.image_data_path is not None:
                raise ValueError(f"{owner}: image_data_path={self.image_data_path!r} with use_img_from_vid=True; "
                                 "images come from one source: pass use_img_from_vid=False (--no-use_img_from_vid) "
                                 "to draw them from image_data_path")
            if not self.use_img_from_vid:
                if self.image_data_path is None:
                    raise ValueError(f"{owner}: use_image_num={use_image_num} with use_img_from_vid=False needs "
                                     "image_data_path (an image-caption JSON); upstream raises NotImplementedError here")
                self.image_entries = read_entries(self.image_data_path, "image_data_path")
        self.epoch = 0
        self._bad: Dict[Tuple[str, int], str] = {}  # (kind, index) -> reason, for window-independent failures
        self._logged: set = set()
        self.skip_count = 0  # samples skipped by this process (workers count their own)

    # --- configuration -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.entries)

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch that, with the seed and the index, fixes each item's random choices."""
        self.epoch = _check_int(type(self).__name__, "epoch", epoch, 0)

    @property
    def image_source(self) -> str:
        """"none", "video" (use_img_from_vid) or "image_data" (image_data_path)."""
        if not self.use_image_num:
            return "none"
        return "video" if self.use_img_from_vid else "image_data"

    @property
    def identity(self) -> dict:
        """What the data and its transform are: the fields a latent cache records and checks."""
        return {
            "num_frames": self.num_frames, "sample_rate": self.sample_rate, "max_image_size": self.max_image_size,
            "use_image_num": self.use_image_num, "image_source": self.image_source, "flip": self.flip,
            "random_caption": self.random_caption, "min_frames": self.min_frames,
            "data_fingerprint": entries_fingerprint(self.entries),
            "image_data_fingerprint": (entries_fingerprint(self.image_entries)
                                       if self.image_entries is not None else None),
        }

    # --- files ---------------------------------------------------------------------------------------

    @staticmethod
    def _resolve(path: str, folder: Optional[str], json_path: str) -> Optional[str]:
        if os.path.isabs(path):
            return path if os.path.exists(path) else None
        candidates = ([os.path.join(folder, path)] if folder else []) + [path, os.path.join(_json_dir(json_path), path)]
        return next((c for c in candidates if os.path.exists(c)), None)

    def video_path(self, index: int) -> Optional[str]:
        """The file of entry ``index`` (None when it is nowhere to be found)."""
        return self._resolve(self.entries[index].path, self.video_folder, self.data_path)

    def image_path(self, index: int) -> Optional[str]:
        return self._resolve(self.image_entries[index].path, self.image_folder, self.image_data_path)

    def _open(self, index: int) -> VideoReader:
        """The clip's reader, or SampleError for a missing, unreadable, frameless or too-short file."""
        reason = self._bad.get(("video", index))
        if reason is None:
            path = self.video_path(index)
            if path is None:
                where = ", ".join(([f"video_folder {self.video_folder!r}"] if self.video_folder else [])
                                  + ["the working directory", f"beside {self.data_path!r}"])
                reason = f"file not found (looked in {where})"
            else:
                try:
                    reader = VideoReader(path)
                except DecodeError as exc:
                    reason = str(exc)
                else:
                    if reader.frames == 0:
                        reason = "no frames"
                    elif reader.frames < self.min_frames:
                        reason = f"too short: {reader.frames} frames, need at least {self.min_frames}"
                    else:
                        return reader
                    reader.close()
            self._bad[("video", index)] = reason
        raise SampleError(reason)

    def read_frames(self, index: int, begins: Union[Sequence[int], Callable[[int], Sequence[int]]]
                    ) -> Tuple[int, List[torch.Tensor]]:
        """(total frames, [uint8 frames (num_frames, H, W, 3) per window start]) of clip ``index``,
        decoding the union of the windows once. ``begins``: the window starts, or a function of the
        clip's frame count giving them. SampleError when the file fails."""
        with self._open(index) as reader:
            total = reader.frames
            starts = begins(total) if callable(begins) else begins
            windows = [transforms.frame_indices(total, b, self.num_frames, self.sample_rate) for b in starts]
            union = sorted(set(i for w in windows for i in w))
            try:
                frames = reader.read(union)
            except DecodeError as exc:
                raise SampleError(str(exc)) from None
        pos = {i: k for k, i in enumerate(union)}
        frames = torch.from_numpy(frames)
        return total, [frames[[pos[i] for i in w]] for w in windows]

    def read_image(self, index: int) -> torch.Tensor:
        """uint8 (1, H, W, 3) of image ``index`` of image_data_path; SampleError when it fails."""
        reason = self._bad.get(("image", index))
        if reason is None:
            path = self.image_path(index)
            if path is None:
                reason = "file not found"
            else:
                try:
                    from PIL import Image

                    with Image.open(path) as im:
                        array = np.asarray(im.convert("RGB"))
                    return torch.from_numpy(array.copy())[None]
                except Exception as exc:  # PIL raises OSError, ValueError, DecompressionBombError, ...
                    reason = f"cannot read the image ({type(exc).__name__}: {exc})"
            self._bad[("image", index)] = reason
        raise SampleError(reason)

    # --- items -----------------------------------------------------------------------------------------

    def window_begin(self, total: int, u: float) -> int:
        """The window start for a uniform draw u in [0, 1): uniform over upstream's [0, last_begin]."""
        return _pick(u, transforms.last_begin(total, transforms.window_size(self.num_frames, self.sample_rate)) + 1)

    def window_begins(self, total: int, count: int) -> List[int]:
        """``count`` fixed window starts spread over upstream's range (the middles of ``count`` equal
        parts of [0, last_begin]; fewer when the range is shorter): what a latent cache stores."""
        n = transforms.last_begin(total, transforms.window_size(self.num_frames, self.sample_rate)) + 1
        return sorted(set(int((k + 0.5) * n / count) for k in range(count)))

    def caption_index(self, index: int, u: float) -> int:
        return _pick(u, len(self.entries[index].caps)) if self.random_caption else 0

    def _note_skip(self, kind: str, path: str, reason: str, skipped: List[str]) -> None:
        line = f"{path}: {reason}"
        skipped.append(line)
        self.skip_count += 1
        if line not in self._logged:
            self._logged.add(line)
            logger.warning("skipped %s %s", kind, line)

    def next_valid(self, index: int, load, kind: str = "video", entries: Optional[List[Entry]] = None):
        """``load(i)`` for i = index, index + 1, ... (mod len) until one does not raise SampleError;
        returns (i, result, skipped lines)."""
        entries = self.entries if entries is None else entries
        skipped: List[str] = []
        n = len(entries)
        for step in range(n):
            i = (index + step) % n
            try:
                return i, load(i), skipped
            except SampleError as exc:
                self._note_skip(kind, entries[i].path, str(exc), skipped)
        what = self.data_path if kind == "video" else self.image_data_path
        raise NoValidSampleError(f"no valid {kind} in {what!r}: all {n} entries were skipped; first: "
                                 + "; ".join(skipped[:3]))

    def __getitem__(self, key) -> dict:
        epoch, index = (key if isinstance(key, tuple) else (self.epoch, key))
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} clips")
        rng = sample_rng(self.seed, int(epoch), index)
        u_begin, u_flip, u_cap = rng.random(3)
        flip = self.flip and u_flip < 0.5

        def load(i: int) -> torch.Tensor:
            return self.read_frames(i, lambda total: [self.window_begin(total, u_begin)])[1][0]

        used, frames, skipped = self.next_valid(index, load)
        video = transforms.video_transform(frames, self.max_image_size, flip)
        caps = self.entries[used].caps
        caption = caps[self.caption_index(used, u_cap)]
        item = {"video": video, "captions": [caption], "index": used}
        if self.use_image_num:
            if self.use_img_from_vid:
                item["images"] = video[:, transforms.image_frame_indices(self.num_frames, self.use_image_num)].contiguous()
                item["captions"] += [caption] * self.use_image_num
            else:
                images, image_caps = self._draw_images(rng, skipped)
                item["images"] = images
                item["captions"] += image_caps
        item["skipped"] = "\n".join(skipped)
        return item

    def _draw_images(self, rng: np.random.Generator, skipped: List[str]) -> Tuple[torch.Tensor, List[str]]:
        chosen, u_flips, u_caps = draw_image_choices(rng, len(self.image_entries), self.use_image_num)
        images, caps = [], []
        for j, uf, uc in zip(chosen, u_flips, u_caps):
            used, image, lines = self.next_valid(j, self.read_image, "image", self.image_entries)
            skipped += lines
            images.append(transforms.video_transform(image, self.max_image_size, self.flip and uf < 0.5))
            image_caps = self.image_entries[used].caps
            caps.append(image_caps[_pick(uc, len(image_caps)) if self.random_caption else 0])
        return torch.cat(images, 1), caps


def skipped_lines(skipped: Union[str, Sequence[str]]) -> List[str]:
    """The "path: reason" lines of an item's or a collated batch's "skipped" field."""
    if isinstance(skipped, str):
        return [line for line in skipped.split("\n") if line]
    return [line for s in skipped for line in skipped_lines(s)]


def collate(batch: List[dict]) -> dict:
    """Batch items as default_collate does, except "captions": a list of B lists of 1 + N str (per
    sample, where default_collate gives 1 + N lists of B str), and "skipped": a list of B str."""
    keep = {k: [item[k] for item in batch] for k in ("captions", "skipped") if k in batch[0]}
    out = default_collate([{k: v for k, v in item.items() if k not in keep} for item in batch])
    out.update(keep)
    return out
