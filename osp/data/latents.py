"""Reading a latent cache: VAE posteriors and caption states stored once, sampled every epoch.

A cache folder (written by ``osp.train.latent_cache.cache_latents`` / ``osp cache-latents``)::

    manifest.json                    identity, encoders, counts, skipped clips, complete or not
    clips/<index:08d>.safetensors    "mean", "std": float32 (V, C, F + Nv, h, w) for V variants of clip
                                     <index>: K fixed windows x (unflipped, flipped); Nv = use_image_num
                                     when the images are frames of the clip (each its own 1-frame clip)
    images/<index:08d>.safetensors   "mean", "std": float32 (V, C, 1, h, w), V = (unflipped, flipped), of
                                     image <index> of image_data_path (images drawn at read time)
    text/<key[:2]>/<key>.safetensors caption states at the caption's tokens, osp.models.text's
                                     TextEmbeddingCache format (key: SHA-256 of encoder identity and text)

Item contract of ``CachedLatentDataset`` (default_collate works):

- ``"latents_mean"``, ``"latents_std"``: float32 (C, F + N, h, w): the video's latent frames, then one
  latent frame per image. The training loop samples z = (mean + std * randn) * scaling_factor
  (``dataset.scaling_factor``, 0.18215), so every epoch still draws a fresh posterior sample.
- ``"text_states"``: (1 + N, L, C_text) in the text encoder's dtype, zero at padding; the video's
  caption first, then one row per image. ``"text_mask"``: int64 (1 + N, L).
- ``"index"``: int, the clip used; ``"skipped"``: str, "path: reason" lines of the clips skipped for
  this item ("" when none).

Which window, flip, caption and images an item gets is a function of (seed, epoch, index asked for).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Tuple, Union

import torch
from torch.utils.data import Dataset

from .dataset import (
    NoValidSampleError,
    SampleError,
    _check_int,
    _pick,
    draw_image_choices,
    sample_rng,
)

logger = logging.getLogger("osp.data")

FORMAT, VERSION = "osp-latent-cache", 1
MANIFEST, CLIPS, IMAGES, TEXT, LOG = "manifest.json", "clips", "images", "text", "cache_log.jsonl"
# Identity fields, in the order error messages list them.
IDENTITY_FIELDS = (
    "format_version", "num_frames", "sample_rate", "max_image_size", "use_image_num", "image_source", "flip",
    "random_caption", "min_frames", "cache_windows", "data_fingerprint", "image_data_fingerprint",
    "vae_fingerprint", "text_encoder_identity", "text_dtype", "model_max_length", "caption_cleaning",
)


class CacheError(RuntimeError):
    """A cache folder that cannot be used (missing, incomplete, damaged)."""


class CacheMismatchError(ValueError):
    """A cache made for another encoder or data transform than the one asked for."""


def clip_entry_path(cache_dir: str, index: int) -> str:
    return os.path.join(cache_dir, CLIPS, f"{index:08d}.safetensors")


def image_entry_path(cache_dir: str, index: int) -> str:
    return os.path.join(cache_dir, IMAGES, f"{index:08d}.safetensors")


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode("utf-8")).hexdigest()


def read_manifest(cache_dir: str) -> Optional[dict]:
    """The cache's manifest, or None when the folder has none; CacheError when it is unreadable."""
    path = os.path.join(cache_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            manifest = json.load(f)
    except (OSError, ValueError) as exc:
        raise CacheError(f"cache manifest {path!r} is unreadable ({exc}); delete the folder and cache again") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path!r} is not an osp latent cache manifest")
    if manifest.get("version") != VERSION:
        raise CacheMismatchError(f"cache {cache_dir!r} has format version {manifest.get('version')}; this osp reads "
                                 f"version {VERSION}: cache the data again")
    return manifest


def identity_differences(have: dict, want: dict) -> List[str]:
    """Fields where ``want`` (any subset of the identity fields; ``use_img_from_vid`` is accepted and
    compared through ``image_source``) differs from the cache's ``have``: "field: cache X, expected Y"."""
    want = dict(want)
    if "use_img_from_vid" in want:
        from_vid = bool(want.pop("use_img_from_vid"))
        n = want.get("use_image_num", have.get("use_image_num"))
        want.setdefault("image_source", "none" if not n else ("video" if from_vid else "image_data"))
    unknown = [k for k in want if k not in IDENTITY_FIELDS]
    if unknown:
        raise ValueError(f"expect_identity has unknown fields {unknown}; expected some of {list(IDENTITY_FIELDS)} "
                         "(and use_img_from_vid)")
    return [f"{k}: cache {have.get(k)!r}, expected {want[k]!r}" for k in IDENTITY_FIELDS
            if k in want and have.get(k) != want[k]]


def text_key(identity: str, caption: str) -> str:
    """The TextEmbeddingCache file key of ``caption`` under an encoder ``identity`` (the same rule as
    osp.models.text.TextEmbeddingCache, read here without importing a model package)."""
    return hashlib.sha256(f"{identity}\x00{caption}".encode()).hexdigest()


def read_text_states(root: str, identity: str, caption: str) -> Optional[torch.Tensor]:
    """The (n_tokens, C) states of ``caption`` in a TextEmbeddingCache folder, or None."""
    from safetensors import safe_open

    key = text_key(identity, caption)
    path = os.path.join(root, key[:2], key + ".safetensors")
    if not os.path.isfile(path):
        return None
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("identity") != identity or meta.get("caption") != caption:
            return None
        return f.get_tensor("states")


def read_entry(path: str, variant: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, str]]:
    """(mean, std, metadata) of a cache entry file, only ``variant`` when given."""
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if variant is None:
            return f.get_tensor("mean"), f.get_tensor("std"), meta
        return f.get_slice("mean")[variant], f.get_slice("std")[variant], meta


class CachedLatentDataset(Dataset):
    """Items of a latent cache folder (see the module docstring for the item contract).

    Args:
        cache_dir: a folder written by ``osp cache-latents`` to completion.
        expect_identity: None, the cache's identity hash (str), or a dict with any of
            ``IDENTITY_FIELDS`` (plus ``use_img_from_vid``), e.g. {"num_frames": 17, "max_image_size":
            256, "sample_rate": 1, "use_image_num": 4, "use_img_from_vid": True}; a difference raises
            CacheMismatchError naming each differing field.
        seed: with the epoch and the index, fixes each item's window, flip, caption and images.

    Clips that were skipped while caching (bad files) are skipped here too: an item's place goes to
    the next cached clip in index order, as in VideoCaptionDataset. ``manifest`` holds the identity
    and the encoders' records (``manifest["vae"]``, ``manifest["text_encoder"]``: paths and
    fingerprints), ``scaling_factor`` the VAE's latent scale.
    """

    def __init__(self, cache_dir: Union[str, os.PathLike], expect_identity: Optional[Union[str, dict]] = None,
                 seed: int = 0):
        self.cache_dir = os.fspath(cache_dir)
        self.seed = _check_int(type(self).__name__, "seed", seed, 0)
        if not os.path.isdir(self.cache_dir):
            raise CacheError(f"cache_dir={self.cache_dir!r} is not a folder; expected the output of osp cache-latents")
        manifest = read_manifest(self.cache_dir)
        if manifest is None:
            raise CacheError(f"cache_dir={self.cache_dir!r} has no {MANIFEST}; expected the output of osp cache-latents")
        if not manifest.get("complete"):
            raise CacheError(f"cache {self.cache_dir!r} is incomplete (caching was interrupted); run osp cache-latents "
                             "again with the same arguments to finish it")
        self.manifest = manifest
        self.identity: dict = manifest["identity"]
        self.identity_hash: str = manifest["identity_hash"]
        if isinstance(expect_identity, str):
            if expect_identity != self.identity_hash:
                raise CacheMismatchError(f"cache {self.cache_dir!r} has identity {self.identity_hash[:16]}..., "
                                         f"expected {expect_identity[:16]}...")
        elif expect_identity is not None:
            diff = identity_differences(self.identity, expect_identity)
            if diff:
                raise CacheMismatchError(f"cache {self.cache_dir!r} was made for other settings ({'; '.join(diff)}); "
                                         "cache again into another --cache_dir")
        self.num_clips: int = manifest["num_clips"]
        self.num_images: int = manifest.get("num_images", 0)
        self.use_image_num: int = self.identity["use_image_num"]
        self.image_source: str = self.identity["image_source"]
        self.random_caption: bool = self.identity["random_caption"]
        self.scaling_factor: float = manifest["scaling_factor"]
        self.model_max_length: int = self.identity["model_max_length"]
        self.text_identity: str = self.identity["text_encoder_identity"]
        self.text_channels: int = manifest["text_encoder"]["out_channels"]
        self.skipped: Dict[int, str] = {int(k): v for k, v in manifest.get("skipped", {}).items()}
        self.skipped_images: Dict[int, str] = {int(k): v for k, v in manifest.get("skipped_images", {}).items()}
        self.epoch = 0
        self._logged: set = set()
        self.skip_count = 0

    def __len__(self) -> int:
        return self.num_clips

    def set_epoch(self, epoch: int) -> None:
        self.epoch = _check_int(type(self).__name__, "epoch", epoch, 0)

    def _note_skip(self, line: str, skipped: List[str]) -> None:
        skipped.append(line)
        self.skip_count += 1
        if line not in self._logged:
            self._logged.add(line)
            logger.warning("skipped cached %s", line)

    def _entry(self, path: str, variant_of, skipped_reason: Optional[str], what: str):
        if skipped_reason is not None:
            raise SampleError(skipped_reason)
        if not os.path.isfile(path):
            raise SampleError(f"cache entry {os.path.relpath(path, self.cache_dir)} missing")
        from safetensors import safe_open

        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("identity_hash") != self.identity_hash:
                raise CacheMismatchError(f"cache entry {path!r} belongs to another cache (identity "
                                         f"{meta.get('identity_hash', '?')[:16]}..., the manifest's "
                                         f"{self.identity_hash[:16]}...); cache again into an empty --cache_dir")
            variant = variant_of(meta)
            return f.get_slice("mean")[variant], f.get_slice("std")[variant], meta

    def _next_valid(self, index: int, n: int, load, skipped_map: Dict[int, str], kind: str):
        skipped: List[str] = []
        for step in range(n):
            i = (index + step) % n
            try:
                return i, load(i), skipped
            except SampleError as exc:
                reason = str(exc)
                self._note_skip(reason if i in skipped_map else f"{kind} {i}: {reason}", skipped)
        raise NoValidSampleError(f"cache {self.cache_dir!r}: every {kind} was skipped")

    def _text(self, caption: str) -> torch.Tensor:
        states = read_text_states(os.path.join(self.cache_dir, TEXT), self.text_identity, caption)
        if states is None:
            raise CacheError(f"cache {self.cache_dir!r} has no text states for caption {caption!r:.60}; "
                             "run osp cache-latents again to complete it")
        return states

    def __getitem__(self, key) -> dict:
        epoch, index = (key if isinstance(key, tuple) else (self.epoch, key))
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} clips")
        rng = sample_rng(self.seed, int(epoch), index)
        u_window, u_flip, u_cap = rng.random(3)

        def variant_of(meta: Dict[str, str]) -> int:
            windows, flips = len(json.loads(meta["begins"])), len(json.loads(meta["flips"]))
            return _pick(u_window, windows) * flips + (1 if flips == 2 and u_flip < 0.5 else 0)

        def load(i: int):
            return self._entry(clip_entry_path(self.cache_dir, i), variant_of, self.skipped.get(i), "clip")

        used, (mean, std, meta), skipped = self._next_valid(index, self.num_clips, load, self.skipped, "clip")
        captions = json.loads(meta["captions"])
        caption = captions[_pick(u_cap, len(captions)) if self.random_caption else 0]
        texts = [caption]
        means, stds = [mean], [std]
        if self.use_image_num:
            if self.image_source == "video":
                texts += [caption] * self.use_image_num
            else:
                chosen, u_flips, u_caps = draw_image_choices(rng, self.num_images, self.use_image_num)
                for j, uf, uc in zip(chosen, u_flips, u_caps):
                    def image_variant(meta: Dict[str, str], uf=uf) -> int:
                        return 1 if len(json.loads(meta["flips"])) == 2 and uf < 0.5 else 0

                    def load_image(i: int, image_variant=image_variant):
                        return self._entry(image_entry_path(self.cache_dir, i), image_variant,
                                           self.skipped_images.get(i), "image")

                    _, (m, s, imeta), lines = self._next_valid(j, self.num_images, load_image, self.skipped_images,
                                                               "image")
                    skipped += lines
                    means.append(m)
                    stds.append(s)
                    image_caps = json.loads(imeta["captions"])
                    texts.append(image_caps[_pick(uc, len(image_caps)) if self.random_caption else 0])
        L = self.model_max_length
        states_rows, mask_rows = [], []
        found: Dict[str, torch.Tensor] = {}
        for text in texts:
            s = found[text] = found[text] if text in found else self._text(text)
            row = torch.zeros(L, s.shape[1], dtype=s.dtype)
            row[: s.shape[0]] = s
            mask = torch.zeros(L, dtype=torch.long)
            mask[: s.shape[0]] = 1
            states_rows.append(row)
            mask_rows.append(mask)
        return {
            "latents_mean": torch.cat(means, 1).float().contiguous(),
            "latents_std": torch.cat(stds, 1).float().contiguous(),
            "text_states": torch.stack(states_rows),
            "text_mask": torch.stack(mask_rows),
            "index": used,
            "skipped": "\n".join(skipped),
        }
