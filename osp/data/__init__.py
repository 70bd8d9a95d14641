"""Data: upstream's video-caption dataset, a resumable sampler, latent-cache reading, synthetic clips.

- ``VideoCaptionDataset``: upstream's caption JSON decoded with PyAV (only the window's frames),
  its temporal window, square center crop and resize, flip and joint images (spec D); bad files
  skipped in a fixed order, reported per item.
- ``ResumableSampler``: order from (seed, epoch), sharded over ranks, starting mid-epoch.
- ``CachedLatentDataset``: VAE posteriors and caption states from an ``osp cache-latents`` folder.
- ``collate``: default_collate with captions kept per sample.
- ``osp.data.synthetic``: moving coloured shapes with captions (``osp make-data``).
- ``osp.data.transforms``: the transform as plain functions; ``osp.data.video``: PyAV decoding.

This package knows no model: the work that runs an encoder over the data (the latent cache writer)
lives in ``osp.train.latent_cache``.
"""
from .dataset import (
    Entry,
    NoValidSampleError,
    SampleError,
    VideoCaptionDataset,
    collate,
    read_entries,
    sample_rng,
    skipped_lines,
)
from .latents import CachedLatentDataset, CacheError, CacheMismatchError, read_manifest
from .sampler import ResumableSampler
from .video import DecodeError, VideoReader

__all__ = ["CacheError", "CacheMismatchError", "CachedLatentDataset", "DecodeError", "Entry", "NoValidSampleError",
           "ResumableSampler", "SampleError", "VideoCaptionDataset", "VideoReader", "collate", "read_entries",
           "read_manifest", "sample_rng", "skipped_lines"]
