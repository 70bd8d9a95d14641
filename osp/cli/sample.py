"""``osp sample``: text-to-video (and text-to-image) sampling with upstream's sample_t2v.py flags.

Upstream's flags keep their names and the values of its released run script
(scripts/text_condition/sample_video.sh: 65x512x512, PNDM, 250 steps, guidance 7.5, 24 fps, tiled
decode). Files are named as upstream names them: the prompt with spaces as '_' cut to 100
characters, then ``{method}_gs{scale}_s{steps}.mp4`` (``.jpg`` with --force_images), plus the grid
of all prompts under ``{method}_gs{scale}_s{steps}``. Each file gets a JSON record beside it
(prompt, seed, scheduler and its configuration, steps, guidance, dtype, tiling, model folders, osp
version), and samples.jsonl in the output folder collects them.

Added by osp: --seed, --negative_prompt, --dtype, --device, --text_mask, --tiling_mode,
--tiling_norm, --num_frames/--height/--width (upstream derives them from --version),
--transformer_path, --ae_path (model folders without upstream's layout), --text_encoder_name tiny
(the built-in offline encoder), --offload_text_encoder, and --no-enable_tiling. --ae, --cache_dir
and --run_time are accepted so upstream's scripts run; osp never downloads, so every path is a
local folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import sys
import time
from typing import List

import torch

from .._utils import write_json_atomic
from ..data.video import write_mp4
from . import UsageError, device_arg

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
UPSTREAM_AE = "CausalVAEModel_4x8x8"


def register(subparsers) -> None:
    from ..pipelines.schedulers import SAMPLE_METHODS

    p = subparsers.add_parser("sample", help="text-to-video sampling (upstream's sample_t2v.py flags)",
                              description=__doc__)
    p.add_argument("--model_path", default="LanguageBind/Open-Sora-Plan-v1.0.0",
                   help="local folder of upstream's release, holding vae/ and the version folders")
    p.add_argument("--version", default=None,
                   help="transformer subfolder FRAMESxHEIGHTxWIDTH (17x256x256, 65x256x256, 65x512x512); height and "
                        "width come from it, frames from the transformer's video_length (default 65x512x512, or "
                        "the training size of a --transformer_path written by osp train-t2v)")
    p.add_argument("--text_encoder_name", default=None,
                   help="local folder of the T5 v1.1 XXL encoder, or 'tiny' for osp's built-in offline encoder "
                        "(default DeepFloyd/t5-v1_1-xxl, or the encoder a --transformer_path written by osp "
                        "train-t2v was trained with)")
    p.add_argument("--text_prompt", nargs="+", required=True,
                   help="prompts, or one .txt file with a prompt per line (blank lines skipped)")
    p.add_argument("--save_img_path", default="./sample_videos/t2v", help="output folder")
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--sample_method", default="PNDM", choices=SAMPLE_METHODS,
                   help="a diffusers scheduler with upstream's configuration, or IDDPM (osp.diffusion)")
    p.add_argument("--num_sampling_steps", type=int, default=250)
    p.add_argument("--fps", type=int, default=24)
    p.add_argument("--force_images", action="store_true", help="text-to-image: one frame, saved as .jpg")
    p.add_argument("--enable_tiling", action=argparse.BooleanOptionalAction, default=True,
                   help="tiled VAE decode (default on, as upstream's script; --no-enable_tiling turns it off)")
    p.add_argument("--tile_overlap_factor", type=float, default=0.25)
    # osp's additions
    p.add_argument("--seed", type=int, default=None,
                   help="seed of prompt i is seed + i (default: a random seed, recorded in the JSON)")
    p.add_argument("--negative_prompt", default="")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="every model's dtype (default float16 on CUDA as upstream, float32 on CPU)")
    p.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default cuda when available)")
    p.add_argument("--text_mask", choices=("upstream", "mask"), default="upstream",
                   help="upstream: upstream's caption handling exactly; mask: the caption mask reaches both CFG branches")
    p.add_argument("--tiling_mode", choices=("osp-v1.0", "stream"), default="osp-v1.0",
                   help="osp-v1.0: upstream's tiled decode; stream: osp's streaming decode")
    p.add_argument("--tiling_norm", choices=("tile", "estimate", "global"), default=None,
                   help="GroupNorm statistics of --tiling_mode stream (default tile)")
    p.add_argument("--num_frames", type=int, default=None,
                   help="1 (an image) or the model's frames, 1 + 4 (video_length - 1)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--transformer_path", default=None, help="LatteT2V folder replacing model_path/<version>")
    p.add_argument("--ae_path", default=None, help="CausalVideoVAE folder replacing model_path/vae")
    p.add_argument("--offload_text_encoder", action="store_true",
                   help="move the text encoder to the CPU once the prompts are encoded")
    # upstream flags accepted for its scripts
    p.add_argument("--ae", default=UPSTREAM_AE, help=f"upstream's VAE name; only {UPSTREAM_AE} exists in v1.0")
    p.add_argument("--cache_dir", default=None, help="accepted and unused (osp never downloads)")
    p.add_argument("--run_time", type=int, default=0, help="accepted and unused")
    p.set_defaults(run=run)


# --- inputs --------------------------------------------------------------------------------------------


def read_prompts(text_prompt: List[str]) -> List[str]:
    """Upstream's rule: one argument ending in "txt" is a file of prompts, one per stripped line."""
    if len(text_prompt) == 1 and text_prompt[0].endswith("txt"):
        path = text_prompt[0]
        if not os.path.isfile(path):
            raise UsageError(f"--text_prompt {path!r}: no such file; expected a .txt file with one prompt per line, "
                             "or the prompts themselves")
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f]
        prompts = [p for p in prompts if p]
        if not prompts:
            raise UsageError(f"--text_prompt {path!r} holds no prompts; expected one prompt per line")
        return prompts
    return list(text_prompt)


TRAINING_RECORD = "osp_training.json"  # written by osp train-t2v beside the weights it saves


def apply_training_record(args) -> None:
    """Fill --ae_path, --text_encoder_name and (without --version) --height/--width from the record
    that osp train-t2v writes into the model folders it saves, when --transformer_path holds one and
    the flags are not given; then the upstream defaults for what is still unset."""
    record = {}
    if args.transformer_path is not None:
        path = os.path.join(args.transformer_path, TRAINING_RECORD)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    record = json.load(f)
            except (OSError, ValueError):
                record = {}
    if args.ae_path is None and record.get("ae_path"):
        args.ae_path = record["ae_path"]
    if args.text_encoder_name is None:
        args.text_encoder_name = record.get("text_encoder_name") or "DeepFloyd/t5-v1_1-xxl"
    if args.version is None:
        args.version = "65x512x512"
        if record.get("height") and record.get("width"):
            args.height = args.height if args.height is not None else int(record["height"])
            args.width = args.width if args.width is not None else int(record["width"])


def _check_static(args) -> None:
    """Checks that need no model: sizes, steps, files, folders."""
    from ..pipelines import parse_version

    try:
        parse_version(args.version)
    except ValueError as exc:
        raise UsageError(f"--version {args.version!r}: expected FRAMESxHEIGHTxWIDTH such as 17x256x256, 65x256x256 "
                         "or 65x512x512") from exc
    if args.ae != UPSTREAM_AE:
        raise UsageError(f"--ae {args.ae!r}: expected {UPSTREAM_AE} (the only v1.0 VAE); use --ae_path for a VAE "
                         "folder")
    _check_steps(args.sample_method, args.num_sampling_steps)
    if args.fps < 1:
        raise UsageError(f"--fps {args.fps}: expected a positive frame rate")
    if not 0 <= args.tile_overlap_factor < 1:
        raise UsageError(f"--tile_overlap_factor {args.tile_overlap_factor}: expected a number in [0, 1)")
    if args.tiling_mode == "osp-v1.0" and args.tiling_norm not in (None, "tile"):
        raise UsageError(f"--tiling_norm {args.tiling_norm} with --tiling_mode osp-v1.0, which uses per-tile "
                         "statistics as upstream; expected --tiling_norm tile, or --tiling_mode stream")
    if args.num_frames is not None:
        if args.force_images and args.num_frames != 1:
            raise UsageError(f"--num_frames {args.num_frames} with --force_images; expected 1 (or no --num_frames)")
        if args.num_frames < 1 or (args.num_frames - 1) % 4:
            raise UsageError(f"--num_frames {args.num_frames}: expected 1 + 4k frames (1 for an image, or the "
                             "model's frames: 17 for video_length 5, 65 for 17)")
    for name in ("height", "width"):
        v = getattr(args, name)
        if v is not None and (v <= 0 or v % 8):
            raise UsageError(f"--{name} {v}: expected a positive multiple of 8 (16 for LatteT2V's 2x2 patches)")
    folders = []
    if args.ae_path is None or args.transformer_path is None:
        if not os.path.isdir(args.model_path):
            raise UsageError(f"--model_path {args.model_path!r} is not a folder; expected the local folder of "
                             "upstream's release (holding vae/ and the version folders; osp never downloads it), "
                             "or both --ae_path and --transformer_path")
    folders.append(("--ae_path", args.ae_path) if args.ae_path is not None
                   else ("--model_path .../vae", os.path.join(args.model_path, "vae")))
    folders.append(("--transformer_path", args.transformer_path) if args.transformer_path is not None
                   else ("--model_path .../<version>", os.path.join(args.model_path, args.version)))
    for flag, path in folders:
        if not os.path.isdir(path):
            raise UsageError(f"{flag}: {path!r} is not a folder; expected a model folder (config.json and weights)")
    if args.text_encoder_name != "tiny" and not os.path.isdir(args.text_encoder_name):
        raise UsageError(f"--text_encoder_name {args.text_encoder_name!r} is not a folder; expected the local folder "
                         "of a T5 v1.1 XXL encoder (osp never downloads it), or 'tiny'")
    if not args.force_images:
        try:
            import av  # noqa: F401
        except ImportError:
            raise UsageError("writing mp4 needs PyAV: pip install av (or pip install 'osp[sample]')") from None


def _check_steps(method: str, steps: int) -> None:
    """The scheduler must accept the step count (PNDM needs >= 4 for its warm-up; DDIM, DDPM and IDDPM
    take at most the 1000 training steps)."""
    import warnings

    from ..pipelines import make_scheduler

    if steps < 1:
        raise UsageError(f"--num_sampling_steps {steps}: expected a positive number of steps")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sched = make_scheduler(method)
            if hasattr(sched, "make_diffusion"):
                sched.make_diffusion(steps)
            else:
                sched.set_timesteps(steps)
    except ValueError as exc:
        hint = {"PNDM": "at least 4", "DDIM": "at most 1000", "DDPM": "at most 1000", "IDDPM": "at most 1000"}
        raise UsageError(f"--num_sampling_steps {steps} with --sample_method {method}: expected "
                         f"{hint.get(method, 'another step count')} ({_first_line(exc)})") from None


# --- outputs ---------------------------------------------------------------------------------------------


def file_stem(prompt: str, method: str, guidance: float, steps: int) -> str:
    """Upstream's name: prompt.replace(' ', '_')[:100] + f'{method}_gs{guidance}_s{steps}' (a '/' in the
    prompt, which upstream fails to save, becomes '_' too)."""
    return prompt.replace(" ", "_")[:100].replace("/", "_").replace(os.sep, "_") + grid_stem(method, guidance, steps)


def grid_stem(method: str, guidance: float, steps: int) -> str:
    return f"{method}_gs{guidance}_s{steps}"


def write_jpg(path: str, image) -> None:
    """image (H, W, 3) uint8 -> JPEG with PIL's defaults (as torchvision's save_image, which upstream uses)."""
    from PIL import Image

    image = image.numpy() if isinstance(image, torch.Tensor) else image
    tmp = path + ".tmp"
    try:
        Image.fromarray(image).save(tmp, format="JPEG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def video_grid(videos: torch.Tensor) -> torch.Tensor:
    """Upstream's save_video_grid: (N, T, H, W, 3) -> (T, H', W', 3) on a black canvas, nrow = ceil(sqrt(N))
    rows, ceil(N / nrow) columns, row-major, 1-px spacing; padded to even sizes for H.264."""
    N, T, H, W, C = videos.shape
    nrow = math.ceil(math.sqrt(N))
    ncol = math.ceil(N / nrow)
    gh, gw = (1 + H) * nrow + 1, (1 + W) * ncol + 1
    grid = torch.zeros(T, gh + gh % 2, gw + gw % 2, C, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, ncol)
        grid[:, (1 + H) * r:(1 + H) * r + H, (1 + W) * c:(1 + W) * c + W] = videos[i]
    return grid


def image_grid(images: torch.Tensor) -> torch.Tensor:
    """torchvision's make_grid as upstream calls it (nrow = ceil(sqrt(N)) images per row, padding 2):
    (N, H, W, 3) -> (H', W', 3); one image is returned unpadded."""
    N, H, W, C = images.shape
    if N == 1:
        return images[0]
    per_row = min(math.ceil(math.sqrt(N)), N)
    rows = math.ceil(N / per_row)
    grid = torch.zeros((H + 2) * rows + 2, (W + 2) * per_row + 2, C, dtype=torch.uint8)
    for i in range(N):
        r, c = divmod(i, per_row)
        grid[r * (H + 2) + 2:r * (H + 2) + 2 + H, c * (W + 2) + 2:c * (W + 2) + 2 + W] = images[i]
    return grid


# --- the command ---------------------------------------------------------------------------------------


def _load(args, device: torch.device, dtype: torch.dtype):
    from ..models import CausalVideoVAE, LatteT2V
    from ..pipelines import TextToVideoPipeline, load_text_encoder, parse_version

    vae_src = args.ae_path if args.ae_path is not None else os.path.join(args.model_path, "vae")
    tr_src = args.transformer_path if args.transformer_path is not None else os.path.join(args.model_path, args.version)
    try:
        vae = CausalVideoVAE.from_pretrained(vae_src, torch_dtype=dtype, device=device)
    except ValueError as exc:
        raise UsageError(f"cannot load the VAE from {vae_src!r}: {_first_line(exc)}") from exc
    try:
        transformer = LatteT2V.from_pretrained(tr_src, torch_dtype=dtype, device=device)
    except ValueError as exc:
        raise UsageError(f"cannot load the transformer from {tr_src!r}: {_first_line(exc)}") from exc
    _, height, width = parse_version(args.version)
    pipe = TextToVideoPipeline(vae, transformer, _NoEncoder(), args.sample_method,
                               default_size=(height, width))
    frames = 1 if args.force_images else args.num_frames
    try:
        size = pipe.resolve_size(frames, args.height, args.width)
    except ValueError as exc:
        raise UsageError(_flag_names(str(exc))) from exc
    try:
        enc = load_text_encoder(args.text_encoder_name, caption_channels=transformer.config.caption_channels,
                                torch_dtype=dtype, device=device)
    except (ValueError, ImportError) as exc:  # MissingWeightsError is a ValueError
        raise UsageError(f"cannot load the text encoder {args.text_encoder_name!r}: {_first_line(exc)}") from exc
    pipe.text_encoder = enc
    pipe.offload_text_encoder = args.offload_text_encoder
    if args.offload_text_encoder:
        enc.to("cpu")
    pipe.sources = {"vae": vae_src, "transformer": tr_src, "text_encoder": args.text_encoder_name,
                    "version": args.version}
    return pipe, size


class _NoEncoder:
    """Stands in for the text encoder while the sizes are checked (so a bad size fails before T5 loads)."""

    def encode(self, *args, **kwargs):
        raise RuntimeError("the text encoder is not loaded yet")


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def _flag_names(message: str) -> str:
    return re.sub(r"\b(num_frames|height|width)=", r"--\1 ", message)


def run(args) -> int:
    import osp
    from ..pipelines import scheduler_config, scheduler_name

    apply_training_record(args)
    _check_static(args)
    prompts = read_prompts(args.text_prompt)
    device = device_arg(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else (torch.float16 if device.type == "cuda" else torch.float32)
    pipe, (frames, height, width) = _load(args, device, dtype)
    tiling = None
    if args.enable_tiling:
        tiling = {"mode": args.tiling_mode, "tile_sample_size": 256, "overlap": args.tile_overlap_factor,
                  "norm": args.tiling_norm or "tile"}
        try:
            pipe.vae.enable_tiling(mode=args.tiling_mode, tile_sample_size=256, overlap=args.tile_overlap_factor,
                                   norm=args.tiling_norm)
        except ValueError as exc:
            raise UsageError(_first_line(exc)) from exc

    os.makedirs(args.save_img_path, exist_ok=True)
    image = frames == 1
    ext = "jpg" if image else "mp4"
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    method = args.sample_method
    progress = sys.stderr.isatty()
    base = {
        "negative_prompt": args.negative_prompt, "sample_method": method,
        "scheduler": {"class": type(pipe.scheduler).__name__, "name": scheduler_name(pipe.scheduler),
                      "config": scheduler_config(pipe.scheduler)},
        "num_sampling_steps": args.num_sampling_steps, "guidance_scale": args.guidance_scale,
        "text_mask": args.text_mask, "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "num_frames": frames, "height": height, "width": width, "fps": None if image else args.fps,
        "tiling": tiling, "models": pipe.sources, "osp_version": osp.__version__,
    }
    log_path = os.path.join(args.save_img_path, "samples.jsonl")
    outputs = []
    for i, prompt in enumerate(prompts):
        print(f"sampling {i + 1}/{len(prompts)}: {prompt!r}", flush=True)
        start = time.time()
        generator = torch.Generator("cpu").manual_seed(seed + i)
        video = pipe(prompt, negative_prompt=args.negative_prompt, num_frames=frames, height=height, width=width,
                     num_inference_steps=args.num_sampling_steps, guidance_scale=args.guidance_scale,
                     generator=generator, text_mask=args.text_mask, progress=progress).video  # (1, t, h, w, 3)
        outputs.append(video)
        path = os.path.join(args.save_img_path, f"{file_stem(prompt, method, args.guidance_scale, args.num_sampling_steps)}.{ext}")
        if image:
            write_jpg(path, video[0, 0])
        else:
            write_mp4(path, video[0], args.fps, crf=5)
        record = {"file": os.path.basename(path), "prompt": prompt, "seed": seed + i, **base,
                  "seconds": round(time.time() - start, 3)}
        write_json_atomic(os.path.splitext(path)[0] + ".json", record, indent=2)
        with open(log_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        print(f"saved {path}", flush=True)

    stem = grid_stem(method, args.guidance_scale, args.num_sampling_steps)
    grid_path = os.path.join(args.save_img_path, f"{stem}.{ext}")
    videos = torch.cat(outputs)
    if image:
        write_jpg(grid_path, image_grid(videos[:, 0]))
    else:
        write_mp4(grid_path, video_grid(videos), args.fps, crf=5)
    write_json_atomic(os.path.splitext(grid_path)[0] + ".json",
                      {"file": os.path.basename(grid_path), "grid_of": [r for r in prompts], "seed": seed, **base},
                      indent=2)
    print(f"saved {grid_path} (grid of {len(prompts)})")
    print(f"save path {args.save_img_path}")
    return 0
