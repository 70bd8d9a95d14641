"""Writing a latent cache: run the VAE and the text encoder over a dataset once (``osp cache-latents``).

``cache_latents(dataset, vae, text_encoder, cache_dir, windows=K)`` stores, for every clip of a
``VideoCaptionDataset``, the VAE posterior (mean and std) of K fixed temporal windows (the middles of
K equal parts of upstream's window-start range), each unflipped and flipped; with use_img_from_vid the
images (frames linspace(0, F - 1, N) of each variant) are encoded as separate 1-frame clips, as upstream
does, and stored after the video's latent frames. With image_data_path every image is stored
unflipped and flipped, and the reader draws N of them per item. Caption states go to a
TextEmbeddingCache under ``cache_dir/text`` (osp's CachedTextEncoder), after upstream's caption
cleaning. ``osp.data.CachedLatentDataset`` reads the folder (format: ``osp.data.latents``).

The cache records its identity (data transform, data fingerprint, VAE config + weights fingerprint,
text encoder identity, dtype, caption length and cleaning) in ``manifest.json``: caching into a
folder made with another identity is refused (CacheMismatchError), never mixed. Every file is written
to a temporary name and renamed into place; an interrupted run, started again with the same
arguments, keeps the finished entries and does the rest.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

import torch

from ..data import transforms
from ..data.dataset import NoValidSampleError, SampleError, VideoCaptionDataset
from ..data.latents import (
    CLIPS,
    FORMAT,
    IMAGES,
    LOG,
    MANIFEST,
    TEXT,
    VERSION,
    CacheMismatchError,
    clip_entry_path,
    identity_differences,
    identity_hash,
    image_entry_path,
    read_manifest,
)

logger = logging.getLogger(__name__)


def vae_fingerprint(vae) -> str:
    """SHA-256 of the VAE's config (public fields), parameter dtype and every state-dict tensor (name,
    dtype, shape, bytes)."""
    h = hashlib.sha256()
    config = {k: v for k, v in dict(getattr(vae, "config", {}) or {}).items() if not str(k).startswith("_")}
    h.update(json.dumps(config, sort_keys=True, default=list).encode())
    for name, t in sorted(vae.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _atomic_json(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _atomic_entry(path: str, mean: torch.Tensor, std: torch.Tensor, metadata: Dict[str, str]) -> None:
    from safetensors.torch import save_file

    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _entry_identity(path: str) -> Optional[str]:
    """The identity hash an entry file records, or None when it is missing or unreadable."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        return None
    try:
        with safe_open(path, framework="pt") as f:
            return (f.metadata() or {}).get("identity_hash")
    except Exception:  # a damaged file is redone
        return None


def _caption_cleaning(clean: bool) -> str:
    from ..data.captions import cleaning_unavailable

    return "full" if clean and cleaning_unavailable() is None else "lower-strip"


def _clean(captions: List[str], clean: bool) -> List[str]:
    from ..data.captions import preprocess_captions

    return preprocess_captions(captions, clean)


def _module_device_dtype(module) -> tuple:
    p = next(iter(module.parameters()), None) if hasattr(module, "parameters") else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


def _text_dtype(text_encoder) -> str:
    dtype = getattr(text_encoder, "dtype", None)
    if dtype is None:
        dtype = text_encoder.encode(["a"])[0].dtype
    return str(dtype).replace("torch.", "")


def _progress(total: int, desc: str, enabled: Optional[bool]):
    enabled = sys.stderr.isatty() if enabled is None else enabled
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="clip" if desc == "clips" else "item", dynamic_ncols=True)


class _Clips(torch.utils.data.Dataset):
    """Decodes one clip's variants in a DataLoader worker: (index, [video (3, F, S, S) per variant],
    begins, flips, total) or (index, reason)."""

    def __init__(self, dataset: VideoCaptionDataset, windows: int, todo: List[int]):
        self.dataset, self.windows, self.todo = dataset, windows, todo
        self.flips = [False, True] if dataset.flip else [False]

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int):
        ds, i = self.dataset, self.todo[k]
        begins: List[int] = []

        def starts(total: int) -> List[int]:
            begins.extend(ds.window_begins(total, self.windows))
            return begins

        try:
            total, frames = ds.read_frames(i, starts)
        except SampleError as exc:
            return i, str(exc)
        videos = [transforms.video_transform(f, ds.max_image_size, flip) for f in frames for flip in self.flips]
        return i, videos, begins, self.flips, total


class _Images(torch.utils.data.Dataset):
    def __init__(self, dataset: VideoCaptionDataset, todo: List[int]):
        self.dataset, self.todo = dataset, todo
        self.flips = [False, True] if dataset.flip else [False]

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int):
        ds, j = self.dataset, self.todo[k]
        try:
            image = ds.read_image(j)
        except SampleError as exc:
            return j, str(exc)
        return j, [transforms.video_transform(image, ds.max_image_size, flip) for flip in self.flips], self.flips


@torch.no_grad()
def _encode(vae, clips: torch.Tensor, batch_size: int) -> tuple:
    """(mean, std) float32 on CPU of clips (B, 3, T, S, S), encoded ``batch_size`` at a time."""
    device, _ = _module_device_dtype(vae)
    means, stds = [], []
    for chunk in clips.split(batch_size):
        dist = vae.encode(chunk.to(device)).latent_dist
        means.append(dist.mean.float().cpu())
        stds.append(dist.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def cache_latents(dataset: VideoCaptionDataset, vae, text_encoder, cache_dir: str, windows: int = 4, *,
                  vae_source: Optional[str] = None, text_encoder_source: Optional[str] = None,
                  clean_captions: bool = True, batch_size: int = 4, text_batch_size: int = 16,
                  num_workers: int = 0, progress: Optional[bool] = None,
                  vae_identity: Optional[str] = None) -> Dict[str, Any]:
    """Cache ``dataset``'s VAE posteriors and caption states under ``cache_dir``.

    Args:
        dataset: a VideoCaptionDataset (its transform settings become the cache's).
        vae: a CausalVideoVAE (or any module with ``encode(x).latent_dist`` giving ``mean`` and ``std``,
            ``config.scaling_factor``), on the device it should run on; used under no_grad.
        text_encoder: an osp caption encoder (``encode(captions) -> (states, mask)``, ``identity``,
            ``max_length``, ``out_channels``): TinyTextEncoder, T5TextEncoder, CachedTextEncoder.
        cache_dir: the cache folder (created; an existing cache of the same identity is resumed, one
            of another identity refused with CacheMismatchError).
        windows: K, the temporal windows stored per clip (fewer when a clip allows fewer starts).
        vae_source, text_encoder_source: where the encoders came from (recorded in the manifest).
        clean_captions: upstream's caption cleaning (needs beautifulsoup4 and ftfy; without them,
            lower() and strip(), recorded in the identity either way).
        batch_size: clips per VAE call; text_batch_size: captions per text-encoder call.
        num_workers: DataLoader workers decoding clips.
        progress: tqdm bars (None: when stderr is a terminal).
        vae_identity: the VAE's identity string, for a VAE without ``state_dict`` (default: the
            SHA-256 of its config and weights).

    Returns a summary: {"cache_dir", "manifest", "clips", "written", "reused", "skipped", "images",
    "images_written", "images_reused", "images_skipped", "captions", "captions_encoded"}.
    """
    if not isinstance(dataset, VideoCaptionDataset):
        raise ValueError(f"cache_latents: dataset is a {type(dataset).__name__}; expected a VideoCaptionDataset")
    if isinstance(windows, bool) or not isinstance(windows, int) or windows < 1:
        raise ValueError(f"cache_latents: windows={windows!r}; expected a positive int")
    for name, v in (("batch_size", batch_size), ("text_batch_size", text_batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"cache_latents: {name}={v!r}; expected a positive int")
    if not callable(getattr(text_encoder, "encode", None)) or not isinstance(getattr(text_encoder, "identity", None), str):
        raise ValueError(f"cache_latents: text_encoder={text_encoder!r:.60}; expected an osp caption encoder "
                         "(encode(captions), identity, max_length, out_channels)")
    tc, sc = getattr(vae, "temporal_compression", None), getattr(vae, "spatial_compression", None)
    if tc and (dataset.num_frames - 1) % tc:
        raise ValueError(f"cache_latents: num_frames={dataset.num_frames}; this VAE needs 1 + {tc}k frames")
    if sc and dataset.max_image_size % sc:
        raise ValueError(f"cache_latents: max_image_size={dataset.max_image_size}; this VAE needs a multiple of {sc}")
    config = getattr(vae, "config", None)
    scaling_factor = float(getattr(config, "scaling_factor", None) or 0.18215)
    if vae_identity is None:
        if not hasattr(vae, "state_dict"):
            raise ValueError("cache_latents: the VAE has no state_dict; pass vae_identity")
        vae_identity = vae_fingerprint(vae)
    _, vae_dtype = _module_device_dtype(vae)

    from ..models.text import CachedTextEncoder

    cleaning = _caption_cleaning(clean_captions)
    identity = dict(dataset.identity)
    identity.update({
        "format_version": VERSION, "cache_windows": windows, "vae_fingerprint": vae_identity,
        "text_encoder_identity": text_encoder.identity, "text_dtype": _text_dtype(text_encoder),
        "model_max_length": int(text_encoder.max_length), "caption_cleaning": cleaning,
    })
    ihash = identity_hash(identity)
    os.makedirs(cache_dir, exist_ok=True)
    old = read_manifest(cache_dir)
    if old is not None and old.get("identity_hash") != ihash:
        diff = identity_differences(old.get("identity", {}), identity) or ["the identity hash"]
        raise CacheMismatchError(f"cache_dir {cache_dir!r} holds a cache made with other settings ({'; '.join(diff)}); "
                                 "use another --cache_dir or delete this one")
    for sub in (CLIPS, IMAGES, TEXT):
        os.makedirs(os.path.join(cache_dir, sub), exist_ok=True)
    _remove_temporaries(cache_dir)

    import osp

    manifest = {
        "format": FORMAT, "version": VERSION, "identity": identity, "identity_hash": ihash, "complete": False,
        "num_clips": len(dataset), "num_images": len(dataset.image_entries or []), "cache_windows": windows,
        "scaling_factor": scaling_factor, "latent_channels": None,
        "vae": {"path": vae_source, "fingerprint": vae_identity, "scaling_factor": scaling_factor,
                "dtype": str(vae_dtype).replace("torch.", ""),
                "config": {k: v for k, v in dict(config or {}).items() if not str(k).startswith("_")}},
        "text_encoder": {"name": text_encoder_source, "identity": text_encoder.identity,
                         "fingerprint": hashlib.sha256(text_encoder.identity.encode()).hexdigest()[:16],
                         "max_length": int(text_encoder.max_length), "out_channels": int(text_encoder.out_channels),
                         "dtype": identity["text_dtype"], "caption_cleaning": cleaning},
        "data": {"data_path": os.path.abspath(dataset.data_path), "video_folder": dataset.video_folder,
                 "image_data_path": (os.path.abspath(dataset.image_data_path)
                                     if dataset.image_entries is not None else None)},
        "osp_version": osp.__version__, "skipped": {}, "skipped_images": {},
    }
    manifest_path = os.path.join(cache_dir, MANIFEST)
    _atomic_json(manifest_path, manifest)
    log_path = os.path.join(cache_dir, LOG)
    log = open(log_path, "a", encoding="utf-8")

    def record(**kw) -> None:
        log.write(json.dumps(kw) + "\n")
        log.flush()

    try:
        # 1. captions (cheap next to the VAE; a resumed run finds them cached)
        texts = CachedTextEncoder(text_encoder, os.path.join(cache_dir, TEXT))
        clip_caps = [list(e.caps) if dataset.random_caption else [e.caps[0]] for e in dataset.entries]
        image_caps = [list(e.caps) if dataset.random_caption else [e.caps[0]] for e in (dataset.image_entries or [])]
        clean_clip = [_clean(c, clean_captions) for c in clip_caps]
        clean_image = [_clean(c, clean_captions) for c in image_caps]
        unique = list(dict.fromkeys(c for caps in clean_clip + clean_image for c in caps))
        bar = _progress(len(unique), "captions", progress)
        for k in range(0, len(unique), text_batch_size):
            texts.encode(unique[k:k + text_batch_size])
            if bar is not None:
                bar.update(len(unique[k:k + text_batch_size]))
        if bar is not None:
            bar.close()
        record(event="captions", captions=len(unique), encoded=texts.misses, reused=texts.hits)

        # 2. clips
        stats = {"written": 0, "reused": 0, "skipped": 0}
        todo = [i for i in range(len(dataset)) if _entry_identity(clip_entry_path(cache_dir, i)) != ihash]
        stats["reused"] = len(dataset) - len(todo)
        latent_channels = None
        bar = _progress(len(dataset), "clips", progress)
        if bar is not None:
            bar.update(stats["reused"])
        loader = torch.utils.data.DataLoader(_Clips(dataset, windows, todo), batch_size=None, shuffle=False,
                                             num_workers=num_workers)
        image_idx = (transforms.image_frame_indices(dataset.num_frames, dataset.use_image_num)
                     if dataset.image_source == "video" else None)
        for result in loader:
            start = time.time()
            i, path = result[0], dataset.entries[result[0]].path
            if len(result) == 2:
                line = f"{path}: {result[1]}"
                manifest["skipped"][str(i)] = line
                stats["skipped"] += 1
                logger.warning("cache-latents: skipped %s", line)
                record(kind="clip", index=i, path=path, status="skipped", reason=result[1])
            else:
                _, videos, begins, flips, total = result
                clips = torch.stack(videos)  # (V, 3, F, S, S)
                mean, std = _encode(vae, clips, batch_size)
                if image_idx is not None:
                    V, N = clips.shape[0], len(image_idx)
                    frames = clips[:, :, image_idx].permute(0, 2, 1, 3, 4).reshape(V * N, 3, 1, *clips.shape[-2:])
                    im_mean, im_std = _encode(vae, frames, batch_size * N)
                    shape = (V, N) + im_mean.shape[1:]
                    im_mean = im_mean.reshape(shape).squeeze(3).permute(0, 2, 1, 3, 4)
                    im_std = im_std.reshape(shape).squeeze(3).permute(0, 2, 1, 3, 4)
                    mean, std = torch.cat([mean, im_mean], 2), torch.cat([std, im_std], 2)
                latent_channels = mean.shape[1]
                meta = {"identity_hash": ihash, "index": str(i), "path": path, "frames": str(total),
                        "begins": json.dumps(begins), "flips": json.dumps([int(f) for f in flips]),
                        "captions": json.dumps(clean_clip[i]), "raw_captions": json.dumps(clip_caps[i])}
                _atomic_entry(clip_entry_path(cache_dir, i), mean, std, meta)
                stats["written"] += 1
                record(kind="clip", index=i, path=path, status="written", variants=int(mean.shape[0]),
                       seconds=round(time.time() - start, 4))
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        valid = len(dataset) - len(manifest["skipped"])
        if valid == 0:
            raise NoValidSampleError(f"no clip of {dataset.data_path!r} could be cached; first: "
                                     + "; ".join(list(manifest["skipped"].values())[:3]))

        # 3. images of image_data_path
        istats = {"written": 0, "reused": 0, "skipped": 0}
        if dataset.image_source == "image_data":
            todo = [j for j in range(len(dataset.image_entries))
                    if _entry_identity(image_entry_path(cache_dir, j)) != ihash]
            istats["reused"] = len(dataset.image_entries) - len(todo)
            loader = torch.utils.data.DataLoader(_Images(dataset, todo), batch_size=None, shuffle=False,
                                                 num_workers=num_workers)
            for result in loader:
                j, path = result[0], dataset.image_entries[result[0]].path
                if len(result) == 2:
                    line = f"{path}: {result[1]}"
                    manifest["skipped_images"][str(j)] = line
                    istats["skipped"] += 1
                    logger.warning("cache-latents: skipped image %s", line)
                    record(kind="image", index=j, path=path, status="skipped", reason=result[1])
                    continue
                _, images, flips = result
                mean, std = _encode(vae, torch.stack(images), batch_size)
                meta = {"identity_hash": ihash, "index": str(j), "path": path,
                        "flips": json.dumps([int(f) for f in flips]), "captions": json.dumps(clean_image[j]),
                        "raw_captions": json.dumps(image_caps[j])}
                _atomic_entry(image_entry_path(cache_dir, j), mean, std, meta)
                istats["written"] += 1
                record(kind="image", index=j, path=path, status="written")
            if len(dataset.image_entries) == len(manifest["skipped_images"]):
                raise NoValidSampleError(f"no image of {dataset.image_data_path!r} could be cached")

        if latent_channels is None:
            from ..data.latents import read_entry

            first = next(i for i in range(len(dataset)) if str(i) not in manifest["skipped"])
            latent_channels = int(read_entry(clip_entry_path(cache_dir, first), 0)[0].shape[0])
        manifest.update(complete=True, latent_channels=int(latent_channels))
        _atomic_json(manifest_path, manifest)
        summary = {"cache_dir": cache_dir, "manifest": manifest_path, "clips": len(dataset), **stats,
                   "images": len(dataset.image_entries or []), "images_written": istats["written"],
                   "images_reused": istats["reused"], "images_skipped": istats["skipped"],
                   "captions": len(unique), "captions_encoded": texts.misses}
        record(event="done", **{k: v for k, v in summary.items() if k not in ("cache_dir", "manifest")})
        return summary
    finally:
        log.close()


def _remove_temporaries(cache_dir: str) -> None:
    """Delete the temporary files an interrupted run left (never a finished entry)."""
    for sub in ("", CLIPS, IMAGES):
        folder = os.path.join(cache_dir, sub)
        for name in os.listdir(folder):
            if name.startswith(".tmp-"):
                try:
                    os.remove(os.path.join(folder, name))
                except OSError:
                    pass


__all__ = ["cache_latents", "vae_fingerprint"]
