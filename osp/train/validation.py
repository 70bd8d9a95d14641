"""Validation sampling during training: fixed prompts and seeds, sampled with the EMA weights (the
live weights without --use_ema) through TextToVideoPipeline into ``output_dir/samples/step-<N>/``.

Upstream meant to do this (spec B.7) but samples only with --enable_tracker, which no script passes,
and copies the EMA into the live model without restoring it. Here the weights go into a separate
copy of the model, so training is untouched. Defaults follow upstream's validation: the IDDPM
sampler respaced to 250 steps, no classifier-free guidance, the caption mask passed.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from typing import List, Optional, Sequence

import torch


def read_prompts(prompts: Sequence[str]) -> List[str]:
    """The prompts themselves, or (one argument ending in .txt) a file with one prompt per line."""
    prompts = list(prompts)
    if len(prompts) == 1 and prompts[0].endswith(".txt"):
        path = prompts[0]
        if not os.path.isfile(path):
            raise ValueError(f"--validation_prompts {path!r}: no such file; expected a .txt file with one prompt "
                             "per line, or the prompts themselves")
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        if not prompts:
            raise ValueError(f"--validation_prompts {path!r} holds no prompts; expected one prompt per line")
    return prompts


def _slug(prompt: str, limit: int = 60) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", prompt).strip("_")[:limit] or "prompt"


def write_video(path_stem: str, frames: torch.Tensor, fps: int) -> str:
    """frames (T, H, W, 3) uint8 -> ``path_stem``.mp4 through PyAV (H.264 when available), or
    ``path_stem``.pt when PyAV is missing; written to a temporary name and renamed. Returns the path."""
    try:
        import av
    except ImportError:
        av = None
    if av is None:
        path = path_stem + ".pt"
        torch.save(frames.cpu(), path + ".tmp")
        os.replace(path + ".tmp", path)
        return path
    from ..data.video import write_mp4

    path = path_stem + ".mp4"
    write_mp4(path, frames, fps, crf=5)
    return path


def sample_validation(transformer, vae, text_encoder, prompts: Sequence[str], out_dir: str, *, step: int,
                      seed: int, num_frames: int, height: int, width: int, sample_method: str = "IDDPM",
                      num_sampling_steps: int = 250, guidance_scale: float = 1.0, max_sequence_length: int = 300,
                      autocast_dtype: Optional[torch.dtype] = None, fps: int = 8) -> List[str]:
    """Sample every prompt (prompt i with a generator seeded seed + i) and write the videos and one
    JSON record per video (plus records.jsonl) into ``out_dir``; returns the video paths.

    ``transformer`` is a LatteT2V holding the weights to sample (already on its device, eval).
    """
    from ..pipelines import TextToVideoPipeline

    pipe = TextToVideoPipeline(vae, transformer, text_encoder, sample_method, default_size=(height, width),
                               max_sequence_length=max_sequence_length)
    os.makedirs(out_dir, exist_ok=True)
    device = pipe.device
    amp = (torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype is not None
           else contextlib.nullcontext())
    paths = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for i, prompt in enumerate(prompts):
            start = time.time()
            generator = torch.Generator("cpu").manual_seed(seed + i)
            with amp:
                video = pipe(prompt, num_frames=num_frames, height=height, width=width,
                             num_inference_steps=num_sampling_steps, guidance_scale=guidance_scale,
                             generator=generator, text_mask="mask", progress=False).video  # (1, T, H, W, 3)
            stem = os.path.join(out_dir, f"{i:02d}-{_slug(prompt)}")
            path = write_video(stem, video[0], fps)
            record = {"file": os.path.basename(path), "prompt": prompt, "seed": seed + i, "step": step,
                      "sample_method": sample_method, "num_sampling_steps": num_sampling_steps,
                      "guidance_scale": guidance_scale, "text_mask": "mask", "num_frames": num_frames,
                      "height": height, "width": width, "seconds": round(time.time() - start, 3)}
            with open(stem + ".json", "w", encoding="utf-8") as f:
                json.dump(record, f, indent=2)
            with open(os.path.join(out_dir, "records.jsonl"), "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            paths.append(path)
    return paths
