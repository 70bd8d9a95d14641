"""Tiled inference of the causal video VAE: decode and encode videos larger than memory allows.

Two modes, chosen by ``CausalVideoVAE.enable_tiling(mode=...)``:

``"stream"`` (osp's): spatial tiles, each fed through the network in consecutive time chunks.

- Space: tiles of at most L = tile_sample_size / s latents (s = 8), neighbours overlapping by
  int(L * overlap); the fewest such tiles, of nearly equal size (``axis_tiles``), so the
  recomputation is the least the overlap allows. Every tile's output is accumulated into one
  preallocated output with ``osp.ops.blend_tile_`` (separable linear ramps over the overlaps), then
  ``blend_normalize_``: peak memory is the output plus about one tile-chunk's activations.
- Time (``tile_frames``): chunks of Lt = (tile_frames-1)/4 + 1 latent frames that do NOT overlap
  (sample frames [0, 4(b-1)+1) for the first chunk [0, b), [4(a-1)+1, 4(b-1)+1) for the others).
  The chunks of one spatial tile run in order through a ``TimeStream``: every causal conv reads the
  previous chunk's last kt-1 input frames instead of replicating frame 0, the causal temporal
  downsampler its last two frames, and the temporal upsampler (whose odd outputs look one frame
  ahead) holds its last output until the next chunk arrives. Peak memory does not grow with the
  clip's length, except with upstream's mid-block attention (``AttnBlock3D``, the v1.0 weights'),
  whose groups mix frames: it must see all frames, so the decoder's latent-resolution head
  (conv_in, mid.block_1, mid.attn_1) and the encoder's tail (mid.attn_1 onwards) run over all latent
  frames of the tile at once (for 129 frames in 256-px tiles, 512x33x32x32 values: an eighth of one
  full-resolution 16-frame chunk activation, growing with the length).

What is exact: a stream input that fits one tile takes the untiled path, bit for bit. Time chunks
with ``norm="global"`` reproduce the untiled model to float rounding (tested in float64 to 1e-10)
for any layout whose attention blocks are only in the mid block (the v1.0 release config), with
either attention variant. What is approximate: spatial tiles (a conv sees zeros at a tile border
instead of the neighbour's pixels, and the mid-block attention sees only its tile), blended away
over the overlaps; with ``norm="tile"`` also the statistics of every tile-chunk; attention blocks
inside the levels (``attn_resolutions``) with upstream's frame-mixing form, across time chunks.

``norm`` (stream mode) says which statistics each GroupNorm uses:

- ``"tile"``: each tile-chunk's own (what upstream does; a source of visible seams / "gridding").
- ``"global"``: statistics of the whole input, exact layer by layer: pass k runs every tile (all its
  chunks) up to the k-th GroupNorm (earlier norms already fixed to their global statistics),
  records that norm's per-(sample, group) count/mean/M2 over the part of the tile the tile *owns*
  (the owned parts partition the whole activation), merges them exactly (Chan), fixes them, and
  stops there. After the last norm a final pass decodes and blends. Cost: with n norms, about
  (n/2 + 1) full tiled decodes (n = 30 in the release decoder, 22 in the release encoder), peak
  memory unchanged.
- ``"estimate"``: one extra tiled pass, normalizing each tile with its own statistics, records
  every norm's statistics over the tiles' owned parts at once and merges them (Chan); the final
  pass uses them. Exact for the first norm, close for the rest (their inputs saw per-tile
  statistics). Cost: one extra tiled decode instead of ~n/2. (Iterating the pass, each time
  normalizing with the previous merge, did not bring the statistics closer in our measurements.)

``"osp-v1.0"``: upstream Open-Sora-Plan v1.0's tiled_decode2d / tiled_encode2d (numerics spec B.6),
spatial only, per-tile statistics, in-place blending with the upper and left neighbour over the
blend extent, crop to the stride and concatenation (written into a preallocated output, same
values), so results published with upstream reproduce.

Tiled calls run under ``torch.no_grad()`` (inference only).
"""
from __future__ import annotations

import functools
import logging
import math
import sys
import time
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ... import ops
from ...nn.causal_conv3d import CausalConv3d
from ...nn.group_norm import GroupNorm

logger = logging.getLogger(__name__)

MODES = ("stream", "osp-v1.0")
NORMS = ("global", "estimate", "tile")


@dataclass(frozen=True)
class TilingConfig:
    mode: str = "stream"
    tile_sample_size: int = 256
    tile_frames: Optional[int] = None
    overlap: float = 0.25
    norm: str = "tile"
    progress: Optional[bool] = None


def make_config(vae, mode="stream", tile_sample_size=256, tile_frames=None, overlap=0.25, norm=None,
                progress=None) -> TilingConfig:
    """Validated TilingConfig (ValueError naming the bad value)."""
    s, tc = vae.spatial_compression, vae.temporal_compression
    if mode not in MODES:
        raise ValueError(f"enable_tiling: mode={mode!r}; expected one of {MODES}")
    if (not isinstance(tile_sample_size, int) or isinstance(tile_sample_size, bool) or tile_sample_size <= 0
            or tile_sample_size % s):
        raise ValueError(f"enable_tiling: tile_sample_size={tile_sample_size!r}; expected a positive multiple of "
                         f"the spatial compression {s}")
    if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
        raise ValueError(f"enable_tiling: overlap={overlap!r}; expected a number in [0, 1)")
    if norm is None:
        norm = "tile"
    if norm not in NORMS:
        raise ValueError(f"enable_tiling: norm={norm!r}; expected one of {NORMS}")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"enable_tiling: progress={progress!r}; expected None (when stderr is a tty), True or False")
    L = tile_sample_size // s
    reach = max(vae.encoder.spatial_reach(), vae.decoder.spatial_reach())
    if L < reach:
        warnings.warn(
            f"enable_tiling: tile_sample_size={tile_sample_size} gives tiles of {L} latents, less than this VAE's "
            f"spatial receptive radius of {reach:.1f} latents: every pixel of a tile sees the tile's zero-padded "
            f"border, so seams grow and many small tiles cost time; expected tile_sample_size >= "
            f"{s * math.ceil(reach)}", stacklevel=3)
    if mode == "osp-v1.0":
        if tile_frames is not None:
            raise ValueError(f"enable_tiling: tile_frames={tile_frames!r} with mode='osp-v1.0', which tiles space "
                             "only; expected None (use mode='stream' for temporal tiles)")
        if norm != "tile":
            raise ValueError(f"enable_tiling: norm={norm!r} with mode='osp-v1.0', which uses per-tile statistics "
                             "as upstream does; expected 'tile' (use mode='stream' for global statistics)")
        if int(L * (1 - overlap)) < 1 or int(tile_sample_size * (1 - overlap)) < 1:
            raise ValueError(f"enable_tiling: overlap={overlap!r} with tile_sample_size={tile_sample_size} leaves a "
                             "latent stride of 0; expected a smaller overlap or a larger tile")
    else:  # the stream stride L - int(L * overlap) is >= 1 for every overlap < 1
        if tile_frames is not None and (not isinstance(tile_frames, int) or isinstance(tile_frames, bool)
                                        or tile_frames < 1 + tc or (tile_frames - 1) % tc):
            raise ValueError(f"enable_tiling: tile_frames={tile_frames!r}; expected None (no temporal tiles) or "
                             f"1 + {tc}*k frames with k >= 1 ({1 + tc}, {1 + 2 * tc}, ...)")
    return TilingConfig(mode, tile_sample_size, tile_frames, float(overlap), norm, progress)


# --- the stream grid ----------------------------------------------------------------------------------


def axis_tiles(n: int, tile: int, overlap: int) -> List[Tuple[int, int]]:
    """Fewest tiles of at most ``tile`` covering [0, n), neighbours overlapping by exactly ``overlap``:
    count c = ceil((n - overlap) / (tile - overlap)), lengths within one of each other summing to
    n + (c-1) * overlap, the least any such cover recomputes."""
    if n <= tile:
        return [(0, n)]
    count = -(-(n - overlap) // (tile - overlap))
    total = n + (count - 1) * overlap
    cuts = [round(k * total / count) for k in range(count + 1)]
    return [(cuts[k] - k * overlap, cuts[k + 1] - k * overlap) for k in range(count)]


def _owned_bounds(ranges: Sequence[Tuple[int, int]], n: int) -> List[int]:
    """Boundaries b_0 = 0 < ... < b_k = n of a partition; tile i owns [b_i, b_{i+1}): the middle of
    each overlap."""
    return [0] + [(ranges[i][0] + ranges[i - 1][1]) // 2 for i in range(1, len(ranges))] + [n]


def _ramps(n: int, lo: int, hi: int) -> Tuple[int, int]:
    # Ramps never longer than the overlaps; shortened so that they fit the tile (any positive weights
    # blend correctly, since the output is normalized by the weight sum).
    lo = min(lo, n // 2)
    return lo, min(hi, n - lo)


@dataclass
class _Tile:
    """A spatial tile; every tile runs through all time chunks."""
    src: Tuple[slice, slice]  # input region (H, W), in input units
    lat: Tuple[Tuple[int, int], Tuple[int, int]]  # latent region (h0, h1), (w0, w1)
    owned: Tuple[Tuple[int, int], Tuple[int, int]]  # owned latent region, absolute
    offset: Tuple[int, int]  # where the output lands (H, W)
    lo: Tuple[int, int]  # blend ramps at the start / end (H, W)
    hi: Tuple[int, int]


@dataclass
class _Plan:
    tiles: List[_Tile]
    chunks: List[slice]  # consecutive, non-overlapping input frame ranges
    work: float  # latent positions the tiles cover / latent positions (1 = no recomputation)


def plan(cfg: TilingConfig, latent_shape: Sequence[int], s: int, tc: int, kind: str) -> _Plan:
    """The stream tiles of a (T', h, w) latent grid, for ``kind`` "decode" (input latent, output in
    sample units) or "encode" (input in sample units, output latent). Time chunks of Lt latent frames
    do not overlap: latent [a, b) is sample frames [0, tc*(b-1)+1) for a = 0, else
    [tc*(a-1)+1, tc*(b-1)+1)."""
    T, h, w = latent_shape
    L = cfg.tile_sample_size // s
    ol = int(L * cfg.overlap)
    Lt = T if cfg.tile_frames is None else (cfg.tile_frames - 1) // tc + 1
    unit = s if kind == "decode" else 1
    h_ranges, w_ranges = axis_tiles(h, L, ol), axis_tiles(w, L, ol)
    h_bounds, w_bounds = _owned_bounds(h_ranges, h), _owned_bounds(w_ranges, w)

    def ramps(ranges, i):
        lo = ranges[i - 1][1] - ranges[i][0] if i > 0 else 0
        hi = ranges[i][1] - ranges[i + 1][0] if i + 1 < len(ranges) else 0
        return _ramps((ranges[i][1] - ranges[i][0]) * unit, lo * unit, hi * unit)

    tiles = []
    for ih, (ha, hb) in enumerate(h_ranges):
        for iw, (wa, wb) in enumerate(w_ranges):
            (lh, hh), (lw, hw) = ramps(h_ranges, ih), ramps(w_ranges, iw)
            src_unit = 1 if kind == "decode" else s
            tiles.append(_Tile(
                src=(slice(src_unit * ha, src_unit * hb), slice(src_unit * wa, src_unit * wb)),
                lat=((ha, hb), (wa, wb)), owned=((h_bounds[ih], h_bounds[ih + 1]), (w_bounds[iw], w_bounds[iw + 1])),
                offset=(unit * ha, unit * wa), lo=(lh, lw), hi=(hh, hw)))
    if kind == "decode":
        chunks = [slice(a, min(a + Lt, T)) for a in range(0, T, Lt)]
    else:
        chunks = [slice(0 if a == 0 else tc * (a - 1) + 1, tc * (min(a + Lt, T) - 1) + 1) for a in range(0, T, Lt)]
    work = sum(b - a for a, b in h_ranges) * sum(b - a for a, b in w_ranges) / (h * w)
    return _Plan(tiles, chunks, work)


# --- temporal streaming -------------------------------------------------------------------------------


class TimeStream:
    """Feeds modules one time chunk at a time, exactly where they are causal.

    While active, every CausalConv3d under ``roots`` keeps the last kt-1 input frames of the previous
    chunk in place of the replicated frame 0, TimeDownsample2x keeps its last two frames and
    TimeUpsample2x its last frame (its look-ahead output waits for the next chunk; ``final``
    releases it). ``restart()`` begins a new clip (a new spatial tile). Not causal, hence approximate
    across chunks: a GroupNorm with its own statistics (fixed, global ones are exact) and AttnBlock3D
    with ``per_frame=False`` (upstream's, whose groups mix frames), which is why the mid-block
    attention is kept out of the streamed part (see ``_decode_tile``).
    """

    def __init__(self, roots: Sequence[nn.Module]):
        from .blocks import TimeDownsample2x, TimeUpsample2x

        kinds = (CausalConv3d, TimeDownsample2x, TimeUpsample2x)
        self.modules = [m for r in roots for m in r.modules() if isinstance(m, kinds)]
        self.final = False

    def restart(self) -> None:
        self.final = False
        for m in self.modules:
            m.stream_state = {"ctx": self}

    def __enter__(self) -> "TimeStream":
        self.restart()
        return self

    def __exit__(self, *exc) -> None:
        for m in self.modules:
            m.stream_state = None


def _mixes_frames(coder: nn.Module) -> bool:
    """Whether the mid-block attention is upstream's AttnBlock3D, whose groups mix frames."""
    return not getattr(coder.mid.attn_1, "per_frame", True)


def _decode_tile(vae, ctx: TimeStream, z: torch.Tensor, chunks: List[slice], visit) -> None:
    """Decode one spatial tile z (B, C, T', h, w) chunk by chunk, streamed; ``visit(y)`` gets every
    chunk's finished frames in order. When the mid-block attention mixes frames, the decoder's
    latent-resolution head (up to that attention) first runs over all T' frames at once."""
    d = vae.decoder
    whole = d.head(vae.post_quant_conv(z)) if _mixes_frames(d) else None
    ctx.restart()
    for i, ts in enumerate(chunks):
        ctx.final = i == len(chunks) - 1
        try:
            y = d.tail(whole[:, :, ts] if whole is not None else d.head(vae.post_quant_conv(z[:, :, ts])))
        except _Stop:
            continue
        visit(y)
        del y


def _encode_tile(vae, ctx: TimeStream, x: torch.Tensor, chunks: List[slice], visit) -> None:
    """Encode one spatial tile x (B, C, T, H, W) chunk by chunk, streamed. When the mid-block
    attention mixes frames, the encoder's latent-resolution tail (that attention onwards) runs once,
    over all latent frames of the chunks' heads."""
    e = vae.encoder
    mixes = _mixes_frames(e)
    ctx.restart()
    parts, stopped = [], False
    for i, ts in enumerate(chunks):
        ctx.final = i == len(chunks) - 1
        try:
            if mixes:
                parts.append(e.head(x[:, :, ts]))
            else:
                visit(vae.quant_conv(e(x[:, :, ts])))
        except _Stop:
            stopped = True
    if stopped:
        raise _Stop
    if not mixes:
        return
    h = torch.cat(parts, dim=2) if len(parts) > 1 else parts[0]
    del parts
    visit(vae.quant_conv(vae.encoder.tail(h)))


def _run_tile(run, ctx: TimeStream, x: torch.Tensor, tile: _Tile, chunks: List[slice], visit) -> None:
    try:
        run(ctx, x[(slice(None), slice(None), slice(None)) + tile.src], chunks, visit)
    except _Stop:
        pass


# --- statistics ---------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a collecting GroupNorm to end a chunk's pass once its statistics are recorded."""


def group_partial_stats(x: torch.Tensor, groups: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(count, mean, M2) per (N, G) of x (N, C, ...), in float64 (two-pass within the block)."""
    N = x.shape[0]
    xg = x.reshape(N, groups, -1)
    n = xg.shape[-1]
    mean = xg.mean(-1, dtype=torch.float64)
    m2 = (xg.double() - mean[:, :, None]).square_().sum(-1)
    return torch.full_like(mean, float(n)), mean, m2


def merge_stats(a, b):
    """Chan et al.'s exact merge of two (count, mean, M2) triples."""
    if a is None:
        return b
    na, ma, m2a = a
    nb, mb, m2b = b
    n = na + nb
    delta = mb - ma
    return n, ma + delta * (nb / n), m2a + m2b + delta.square() * (na * nb / n)


def _fix(norm: GroupNorm, stats) -> None:
    n, mean, m2 = stats
    norm.fixed_stats = (mean, torch.rsqrt(m2 / n + norm.eps))  # float64; applied in the input's precision


def _owned_crop(x: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """The part of a tile's activation x (N, C, T_a, H_a, W_a) that the tile owns, at the activation's
    scale relative to the latent tile (H_a / h_tile). Chunks do not overlap: every frame is owned."""
    (ha, hb), (wa, wb) = tile.lat
    (pa, pb), (qa, qb) = tile.owned
    rh, rw = x.shape[3] / (hb - ha), x.shape[4] / (wb - wa)
    return x[:, :, :, round((pa - ha) * rh):round((pb - ha) * rh), round((qa - wa) * rw):round((qb - wa) * rw)]


# --- the stream runner --------------------------------------------------------------------------------


class _LoggedProgress:
    """Progress of long tiled work through ``logging`` (INFO on ``osp.models.vae.tiling``) when no
    bar is shown: at most one line every ``every`` seconds, and one at the end."""

    def __init__(self, total: int, desc: str, every: float = 10.0):
        self.total, self.desc, self.every, self.n = total, desc, every, 0
        self.start = self.last = time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if self.n >= self.total or now - self.last >= self.every:
            self.last = now
            logger.info("%s: %d/%d tile steps, %.0f s", self.desc, self.n, self.total, now - self.start)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _bar(cfg: TilingConfig, total: int, desc: str):
    """A tqdm bar (``progress`` True, or None on a terminal), else progress lines on the logger
    (``progress`` None without a terminal), else nothing (``progress`` False)."""
    from tqdm.auto import tqdm

    show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and total > 1)
    if not show and cfg.progress is None and total > 1:
        return _LoggedProgress(total, desc)
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def _norms(net: nn.Module) -> List[GroupNorm]:
    return [m for m in net.modules() if isinstance(m, GroupNorm)]


def stream(cfg: TilingConfig, vae, kind: str, x: torch.Tensor, p: _Plan, out_shape: Sequence[int]) -> torch.Tensor:
    """Run the tiles and time chunks of ``p`` through the VAE's decoder or encoder, blend into a
    preallocated output of ``out_shape``."""
    if kind == "decode":
        d = vae.decoder
        run, streamed = functools.partial(_decode_tile, vae), d.tail_modules() if _mixes_frames(d) else [d]
    else:
        e = vae.encoder
        run, streamed = functools.partial(_encode_tile, vae), e.head_modules() if _mixes_frames(e) else [e]
    norms = _norms(vae.decoder if kind == "decode" else vae.encoder)
    saved = [m.fixed_stats for m in norms]
    try:
        with torch.no_grad(), TimeStream(streamed) as ctx:
            if cfg.norm == "global":
                _collect_exact(cfg, ctx, run, norms, x, p, kind)
            elif cfg.norm == "estimate":
                _collect_merged(cfg, ctx, run, norms, x, p, kind)
            return _blend_pass(cfg, ctx, run, x, p, out_shape, kind)
    finally:
        for m, st in zip(norms, saved):
            m.fixed_stats = st


def _blend_pass(cfg, ctx, run, x, p, out_shape, kind):
    # fp32 accumulator for fp32/bf16/fp16 models (bf16 sums of weighted tiles lose the seams' precision).
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(out_shape, device=x.device, dtype=acc)
    wsum = torch.zeros(out_shape[2:], device=x.device, dtype=torch.float32)
    with _bar(cfg, len(p.tiles) * len(p.chunks), f"tiled {kind}") as bar:
        for tile in p.tiles:
            cursor = [0]

            def place(y, tile=tile, cursor=cursor):
                ops.blend_tile_(out, wsum, y, (cursor[0],) + tile.offset, (0,) + tile.lo, (0,) + tile.hi)
                cursor[0] += y.shape[2]
                bar.update(1)

            _run_tile(run, ctx, x, tile, p.chunks, place)
            if cursor[0] != out_shape[2]:  # a broken stream would leave frames unwritten
                raise RuntimeError(f"tiled {kind}: the time chunks produced {cursor[0]} frames; expected {out_shape[2]}")
    return ops.blend_normalize_(out, wsum).to(x.dtype)


def _statistics_pass(ctx, run, x, p, norms, pre_hook, state, bar) -> None:
    """One tiled pass with no output, ``pre_hook`` on every GroupNorm (``state["tile"]`` says which
    tile is running)."""
    handles = [m.register_forward_pre_hook(pre_hook) for m in norms]
    try:
        for tile in p.tiles:
            state["tile"] = tile
            _run_tile(run, ctx, x, tile, p.chunks, lambda y: None)
            bar.update(len(p.chunks))
    finally:
        for h in handles:
            h.remove()


def _owned_stats(x: torch.Tensor, module: GroupNorm, state) -> Optional[Tuple]:
    """(count, mean, M2) of the part of a norm's input that the running tile owns (None: no frames)."""
    return group_partial_stats(_owned_crop(x, state["tile"]), module.num_groups) if x.shape[2] else None


def _collect_exact(cfg, ctx, run, norms, x, p, kind):
    """One pass per GroupNorm, in execution order (found as the first norm without statistics)."""
    state: Dict[str, object] = {}

    def pre_hook(module, args):
        if module.fixed_stats is not None:
            return None
        target = state.setdefault("target", module)
        if target is not module:  # cannot happen in a sequential net; be safe
            raise RuntimeError("tiled VAE: GroupNorms ran out of order in a statistics pass")
        part = _owned_stats(args[0], module, state)
        if part is not None:
            state["stats"] = merge_stats(state.get("stats"), part)
        raise _Stop

    with _bar(cfg, len(norms) * len(p.tiles) * len(p.chunks), f"tiled {kind}: global GroupNorm statistics") as bar:
        for _ in range(len(norms)):
            state.clear()
            _statistics_pass(ctx, run, x, p, norms, pre_hook, state, bar)
            if "target" not in state:
                break
            _fix(state["target"], state["stats"])


def _collect_merged(cfg, ctx, run, norms, x, p, kind):
    """norm="estimate": one tiled pass in which every tile normalizes with its own statistics while
    each norm's statistics over the tiles' owned parts are merged (Chan); the merged ones are fixed
    for the final pass. Exact for the first norm; the later ones' inputs saw per-tile statistics."""
    state: Dict[str, object] = {}
    merged: Dict[GroupNorm, Tuple] = {}

    def pre_hook(module, args):
        part = _owned_stats(args[0], module, state)
        if part is not None:
            merged[module] = merge_stats(merged.get(module), part)

    with _bar(cfg, len(p.tiles) * len(p.chunks), f"tiled {kind}: estimated GroupNorm statistics") as bar:
        _statistics_pass(ctx, run, x, p, norms, pre_hook, state, bar)
    for m, stats in merged.items():
        _fix(m, stats)


# --- entry points -----------------------------------------------------------------------------------


def _latent_grid(cfg: TilingConfig, s: int, tc: int, T: int, h: int, w: int) -> bool:
    """Whether a latent grid (T', h, w) exceeds one tile."""
    L = cfg.tile_sample_size // s
    if cfg.mode == "osp-v1.0":
        return h > L or w > L
    Lt = T if cfg.tile_frames is None else (cfg.tile_frames - 1) // tc + 1
    return h > L or w > L or T > Lt


def tiled_decode(vae, cfg: TilingConfig, z: torch.Tensor) -> Optional[torch.Tensor]:
    """Decoded clip, or None when z fits one tile (the caller decodes it untiled)."""
    s, tc = vae.spatial_compression, vae.temporal_compression
    B, _, T, h, w = z.shape

    def net(t):
        return vae.decoder(vae.post_quant_conv(t))

    if not _latent_grid(cfg, s, tc, T, h, w):
        return None
    if cfg.mode == "osp-v1.0":
        S, o = cfg.tile_sample_size, cfg.overlap
        extent = int(S * o)
        return upstream_tiled(cfg, net, z, S // s, int(S // s * (1 - o)), extent, S - extent, s, "decode")
    shape = (B, vae.config.out_channels, tc * (T - 1) + 1, h * s, w * s)
    return stream(cfg, vae, "decode", z, plan(cfg, (T, h, w), s, tc, "decode"), shape)


def tiled_encode(vae, cfg: TilingConfig, x: torch.Tensor) -> Optional[torch.Tensor]:
    """Moments (B, 2*embed_dim, T', H/s, W/s) of a valid clip, or None when it fits one tile."""
    s, tc = vae.spatial_compression, vae.temporal_compression
    B, _, T, H, W = x.shape

    def net(t):
        return vae.quant_conv(vae.encoder(t))

    if cfg.mode == "osp-v1.0":
        S, o = cfg.tile_sample_size, cfg.overlap
        if not (H > S or W > S):
            return None
        L = S // s
        extent = int(L * o)
        return upstream_tiled(cfg, net, x, S, int(S * (1 - o)), extent, L - extent, -s, "encode")
    Tl, h, w = (T - 1) // tc + 1, H // s, W // s
    if not _latent_grid(cfg, s, tc, Tl, h, w):
        return None
    p = plan(cfg, (Tl, h, w), s, tc, "encode")
    return stream(cfg, vae, "encode", x, p, (B, 2 * vae.config.embed_dim, Tl, h, w))


# --- upstream v1.0 --------------------------------------------------------------------------------------


def _blend_extent_weights(e: int, device, dtype):
    up = torch.tensor([y / e for y in range(e)], dtype=torch.float64)
    down = torch.tensor([1 - y / e for y in range(e)], dtype=torch.float64)
    return down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)


def _blend_v(a, b, extent):
    e = min(a.shape[3], b.shape[3], extent)
    if e > 0:
        down, up = _blend_extent_weights(e, b.device, b.dtype)
        b[:, :, :, :e, :] = a[:, :, :, -e:, :] * down[:, None] + b[:, :, :, :e, :] * up[:, None]
    return b


def _blend_h(a, b, extent):
    e = min(a.shape[4], b.shape[4], extent)
    if e > 0:
        down, up = _blend_extent_weights(e, b.device, b.dtype)
        b[:, :, :, :, :e] = a[:, :, :, :, -e:] * down + b[:, :, :, :, :e] * up
    return b


def upstream_tiled(cfg: TilingConfig, net, x: torch.Tensor, tile_in: int, stride_in: int, extent: int, keep: int,
                   scale: int, kind: str) -> torch.Tensor:
    """Upstream's tiled_decode2d (scale = s: latent in, sample out) / tiled_encode2d (scale = 1/s, given
    as a negative divisor -s). Tiles over all frames, blended in place with the already blended upper
    and left neighbours, cropped to ``keep`` and written where upstream's torch.cat would put them.
    Only the previous row of blended tiles is kept."""
    H, W = x.shape[3:]
    rows_i, cols_j = list(range(0, H, stride_in)), list(range(0, W, stride_in))
    out = None
    prev_row: List[torch.Tensor] = []
    y0 = 0
    with torch.no_grad(), _bar(cfg, len(rows_i) * len(cols_j), f"tiled {kind} (osp-v1.0)") as bar:
        for ri, i in enumerate(rows_i):
            row: List[torch.Tensor] = []
            x0 = 0
            for ci, j in enumerate(cols_j):
                tile = net(x[:, :, :, i:i + tile_in, j:j + tile_in])
                if out is None:
                    oh = sum(min(keep, _out_len(H - i2, tile_in, scale)) for i2 in rows_i)
                    ow = sum(min(keep, _out_len(W - j2, tile_in, scale)) for j2 in cols_j)
                    out = torch.empty(tile.shape[:3] + (oh, ow), device=tile.device, dtype=tile.dtype)
                if ri > 0:
                    tile = _blend_v(prev_row[ci], tile, extent)
                if ci > 0:
                    tile = _blend_h(row[ci - 1], tile, extent)
                row.append(tile)
                crop = tile[:, :, :, :keep, :keep]
                out[:, :, :, y0:y0 + crop.shape[3], x0:x0 + crop.shape[4]] = crop
                x0 += crop.shape[4]
                bar.update(1)
            y0 += row[0][:, :, :, :keep].shape[3]
            prev_row = row
    return out


def _out_len(remaining: int, tile_in: int, scale: int) -> int:
    n = min(remaining, tile_in)
    return n * scale if scale > 0 else n // -scale
