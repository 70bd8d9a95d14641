"""Synthetic captioned videos: moving coloured shapes over plain or gradient backgrounds.

Each clip shows one shape (square, circle or triangle) in one saturated colour moving in one direction
(left, right, up or down) over a dark, light or gradient background, captioned with exactly those
words: "a red circle moving left on a dark background". Written as mp4 (PyAV, H.264 or MPEG-4 Part 2)
plus upstream's JSON (``[{"path": "videos/000000.mp4", "cap": ["..."]}]``, paths relative to the
output folder); optionally still images (png) of shapes with their own caption JSON. Each entry also
carries an ``"attributes"`` record (colour name and RGB, shape, direction, background) that the
dataset ignores and a demo can use to score what a model learned.

Clip i depends only on (seed, i) and the sizes, so ``num_videos`` can grow without changing the
first clips. Colours are balanced: clip i has colour ``COLORS[(i + seed) % 6]``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Dict, List, Optional, Tuple

import numpy as np

from .._utils import write_json_atomic
from .video import encoder_name, write_mp4

COLORS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 200, 60), "blue": (40, 80, 230),
    "yellow": (235, 215, 40), "cyan": (40, 210, 220), "magenta": (220, 50, 210),
}
SHAPES = ("square", "circle", "triangle")
DIRECTIONS = ("left", "right", "up", "down")
BACKGROUNDS: Dict[str, Tuple[Tuple[int, int, int], Tuple[int, int, int]]] = {
    "dark": ((25, 25, 30), (25, 25, 30)),
    "light": ((215, 215, 210), (215, 215, 210)),
    "gradient": ((30, 30, 40), (200, 200, 195)),  # top to bottom
}
VIDEO_JSON, IMAGE_JSON = "data.json", "images.json"


def caption(color: str, shape: str, direction: Optional[str], background: str) -> str:
    motion = f" moving {direction}" if direction else ""
    return f"a {color} {shape}{motion} on a {background} background"


def _background(name: str, height: int, width: int) -> np.ndarray:
    top, bottom = (np.array(c, dtype=np.float32) for c in BACKGROUNDS[name])
    t = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    return np.broadcast_to(top + (bottom - top) * t, (height, width, 3))


def _mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= 0.85 * r) & (np.abs(dy) <= 0.85 * r)
    # an upward triangle: apex at dy = -r, base of half-width r at dy = +r
    return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)


def render(color: str, shape: str, background: str, centers: np.ndarray, radius: float,
           height: int, width: int) -> np.ndarray:
    """uint8 frames (T, H, W, 3): the shape centred at ``centers`` (T, 2) (x, y in pixels) over the
    background."""
    ys = np.arange(height, dtype=np.float32)[None, :, None] + 0.5
    xs = np.arange(width, dtype=np.float32)[None, None, :] + 0.5
    dx = xs - centers[:, 0, None, None].astype(np.float32)
    dy = ys - centers[:, 1, None, None].astype(np.float32)
    inside = _mask(shape, dx, dy, radius)[..., None]
    frames = np.where(inside, np.array(COLORS[color], dtype=np.float32), _background(background, height, width)[None])
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def clip_attributes(seed: int, index: int, num_frames: int, height: int, width: int) -> dict:
    """The random choices of clip ``index``: colour, shape, direction, background, radius, path."""
    rng = np.random.default_rng([seed, index])
    color = list(COLORS)[(index + seed) % len(COLORS)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    direction = DIRECTIONS[rng.integers(len(DIRECTIONS))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    short = min(height, width)
    radius = float(rng.uniform(0.16, 0.24) * short)
    horizontal = direction in ("left", "right")
    extent = width if horizontal else height
    room = extent - 2 * radius  # the centre's range along the motion
    travel = float(rng.uniform(0.4, 0.8) * room)
    start = float(rng.uniform(radius, extent - radius - travel))
    across = float(rng.uniform(radius, (height if horizontal else width) - radius))
    pos = start + travel * np.linspace(0.0, 1.0, num_frames)
    if direction in ("left", "up"):
        pos = pos[::-1]
    centers = np.stack([pos, np.full(num_frames, across)] if horizontal else [np.full(num_frames, across), pos], 1)
    return {"color": color, "rgb": list(COLORS[color]), "shape": shape, "direction": direction,
            "background": background, "radius": radius, "centers": centers}


def image_attributes(seed: int, index: int, height: int, width: int) -> dict:
    rng = np.random.default_rng([seed, index, 1])
    color = list(COLORS)[(index + seed) % len(COLORS)]
    shape = SHAPES[rng.integers(len(SHAPES))]
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    radius = float(rng.uniform(0.16, 0.24) * min(height, width))
    center = [float(rng.uniform(radius, width - radius)), float(rng.uniform(radius, height - radius))]
    return {"color": color, "rgb": list(COLORS[color]), "shape": shape, "background": background,
            "radius": radius, "centers": np.array([center])}


def write_png(path: str, image: np.ndarray) -> None:
    from PIL import Image

    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        Image.fromarray(image).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _public(attrs: dict) -> dict:
    return {k: v for k, v in attrs.items() if k not in ("centers", "radius")}


def make_dataset(output_dir: str, num_videos: int = 64, num_frames: int = 17, size: Sequence[int] = (64, 64),
                 fps: int = 24, seed: int = 0, num_images: int = 0, codec: str = "h264",
                 progress=None) -> dict:
    """Write ``num_videos`` clips (``num_frames`` frames of ``size`` = (height, width)) to
    ``output_dir/videos/`` with ``output_dir/data.json``, and ``num_images`` png images to
    ``output_dir/images/`` with ``output_dir/images.json`` when ``num_images`` > 0.

    Returns {"data_path", "image_data_path" (None without images), "videos", "images"}. Raises
    ValueError for a bad count, size, rate or codec.
    """
    height, width = (int(size), int(size)) if np.isscalar(size) else (int(size[0]), int(size[1]))
    for name, value, low in (("num_videos", num_videos, 0), ("num_frames", num_frames, 1), ("fps", fps, 1),
                             ("num_images", num_images, 0), ("seed", seed, 0)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ValueError(f"make_dataset: {name}={value!r}; expected an int >= {low}")
    if height < 16 or width < 16 or height % 2 or width % 2:
        raise ValueError(f"make_dataset: size {height}x{width}; expected even sides of at least 16 pixels")
    encoder_name(codec)
    os.makedirs(os.path.join(output_dir, "videos"), exist_ok=True)
    entries: List[dict] = []
    for i in range(num_videos):
        attrs = clip_attributes(seed, i, num_frames, height, width)
        frames = render(attrs["color"], attrs["shape"], attrs["background"], attrs["centers"], attrs["radius"],
                        height, width)
        rel = f"videos/{i:06d}.mp4"
        write_mp4(os.path.join(output_dir, rel), frames, fps=fps, codec=codec)
        entries.append({"path": rel, "cap": [caption(attrs["color"], attrs["shape"], attrs["direction"],
                                                     attrs["background"])], "attributes": _public(attrs)})
        if progress is not None:
            progress(1)
    data_path = os.path.join(output_dir, VIDEO_JSON)
    write_json_atomic(data_path, entries)
    image_data_path = None
    if num_images:
        os.makedirs(os.path.join(output_dir, "images"), exist_ok=True)
        images: List[dict] = []
        for i in range(num_images):
            attrs = image_attributes(seed, i, height, width)
            image = render(attrs["color"], attrs["shape"], attrs["background"], attrs["centers"], attrs["radius"],
                           height, width)[0]
            rel = f"images/{i:06d}.png"
            write_png(os.path.join(output_dir, rel), image)
            images.append({"path": rel, "cap": [caption(attrs["color"], attrs["shape"], None, attrs["background"])],
                           "attributes": _public(attrs)})
            if progress is not None:
                progress(1)
        image_data_path = os.path.join(output_dir, IMAGE_JSON)
        write_json_atomic(image_data_path, images)
    return {"data_path": data_path, "image_data_path": image_data_path, "videos": num_videos, "images": num_images}
