"""Tiled inference of the causal video VAE: decode and encode videos larger than memory allows.

Two modes, chosen by ``CausalVideoVAE.enable_tiling(mode=...)``:

``"stream"`` (osp's): spatial tiles and, with ``tile_frames``, temporal chunks, all overlapping.
Every tile's output is accumulated into one preallocated output with ``osp.ops.blend_tile_``
(separable linear ramps over the overlaps), then ``blend_normalize_``: peak memory is the output
plus about one tile's activations. Grid, in latent units: tile L = tile_sample_size / s (s = 8),
overlap int(L * overlap), tiles spread evenly so the last one ends at the border (every tile full
size, overlaps at least the requested one). Time, in latent frames: chunk Lt = (tile_frames-1)/4 + 1,
chunks overlap 1 + ceil((Lt-1) * overlap) latent frames (at most Lt-1). The causal layout maps a
latent chunk [a, b) to sample frames [4a, 4(b-1)+1): its first latent frame decodes to one frame
(sample frame 4a), which has no temporal context, so for a > 0 that frame is dropped and the chunk
covers [4a+1, 4(b-1)+1); encode mirrors this (the chunk's sample frames [4a, 4(b-1)+1) give latents
[a, b), the first dropped for a > 0). No causal caches are kept between chunks: every chunk restarts
the causal padding (and TimeUpsample2x's interpolation sees no frame past the chunk), so temporal
chunking is approximate near chunk starts, which the overlap blends away.

Exact: a stream input that fits one tile (and one chunk) takes the untiled path, bit for bit.
Approximate: everything else (convs see zero padding at tile borders instead of the neighbours'
pixels; chunks restart causal history), blended over the overlaps.

``norm`` (stream mode) says which statistics each GroupNorm uses:

- ``"tile"``: each tile's own (what upstream does; a source of visible seams / "gridding").
- ``"global"``: statistics of the whole input, exact layer by layer: pass k runs every tile up to
  the k-th GroupNorm (earlier norms already fixed to their global statistics), records that norm's
  per-(sample, group) count/mean/M2 over the part of the tile the tile *owns* (the tiles' owned
  parts partition the whole activation), merges them exactly (Chan), fixes them, and stops the
  tile there. After the last norm a final pass decodes and blends. Cost: with n norms, about
  (n/2 + 1) full tiled decodes (n = 30 in the release decoder, 22 in the release encoder), peak
  memory unchanged. Remaining differences from the untiled model are the conv border effects only.
- ``"estimate"``: one extra untiled pass over a strided subsample of the input (every f-th latent
  row/column, and every ft-th latent frame, so that it fits one tile) records every norm's
  statistics at once; then one tiled pass uses them. Cost about one tile's decode extra; the
  statistics are an estimate (exact only when the activations' statistics are scale-invariant).

``"osp-v1.0"``: upstream Open-Sora-Plan v1.0's tiled_decode2d / tiled_encode2d (numerics spec B.6),
spatial only, per-tile statistics, in-place blending with the upper and left neighbour over the
blend extent, crop to the stride and concatenation (written into a preallocated output, same
values), so results published with upstream reproduce.

Tiled calls run under ``torch.no_grad()`` (inference only).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ... import ops
from ...nn.group_norm import GroupNorm

MODES = ("stream", "osp-v1.0")
NORMS = ("global", "estimate", "tile")


@dataclass(frozen=True)
class TilingConfig:
    mode: str = "stream"
    tile_sample_size: int = 256
    tile_frames: Optional[int] = None
    overlap: float = 0.25
    norm: str = "global"
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
        norm = "global" if mode == "stream" else "tile"
    if norm not in NORMS:
        raise ValueError(f"enable_tiling: norm={norm!r}; expected one of {NORMS}")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"enable_tiling: progress={progress!r}; expected None (when stderr is a tty), True or False")
    L = tile_sample_size // s
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


def axis_starts(n: int, tile: int, overlap: int) -> List[int]:
    """Starts of tiles of length ``tile`` covering [0, n), spread evenly with overlaps >= ``overlap``."""
    if n <= tile:
        return [0]
    count = math.ceil((n - tile) / (tile - overlap)) + 1
    return [round(k * (n - tile) / (count - 1)) for k in range(count)]


def _owned_bounds(starts: Sequence[int], tile: int, n: int, min_offset: int = 0) -> List[int]:
    """Boundaries b_0 = 0 < ... < b_k = n of a partition; tile i owns [b_i, b_{i+1}): the middle of each
    overlap, at least ``min_offset`` past the next tile's start."""
    bounds = [0]
    for i in range(1, len(starts)):
        end_prev = min(starts[i - 1] + tile, n)
        bounds.append(max(starts[i] + min_offset, (starts[i] + end_prev) // 2))
    return bounds + [n]


@dataclass
class _Tile:
    src: Tuple[slice, slice, slice]  # input region (T, H, W), in input units
    lat: Tuple[Tuple[int, int], ...]  # latent region (t0, t1), (h0, h1), (w0, w1)
    owned: Tuple[Tuple[int, int], ...]  # owned latent region, absolute
    drop_first: bool  # drop the output's first frame (a chunk that starts past frame 0)
    offset: Tuple[int, int, int]  # where the (dropped) output lands in the output
    lo: Tuple[int, int, int]
    hi: Tuple[int, int, int]


def _ramps(n: int, lo: int, hi: int) -> Tuple[int, int]:
    # Ramps never longer than the overlaps; shortened so that they fit the tile (any positive weights
    # blend correctly, since the output is normalized by the weight sum).
    lo = min(lo, n // 2)
    return lo, min(hi, n - lo)


def plan(cfg: TilingConfig, latent_shape: Sequence[int], s: int, tc: int, kind: str) -> List[_Tile]:
    """The stream tiles of a (T', h, w) latent grid, for ``kind`` "decode" (outputs in sample units) or
    "encode" (inputs in sample units, outputs in latent units)."""
    T, h, w = latent_shape
    L = cfg.tile_sample_size // s
    ol = int(L * cfg.overlap)
    Lt = T if cfg.tile_frames is None else (cfg.tile_frames - 1) // tc + 1
    ot = min(Lt - 1, 1 + math.ceil((Lt - 1) * cfg.overlap)) if Lt > 1 else 0
    t_starts = axis_starts(T, Lt, ot)
    h_starts, w_starts = axis_starts(h, L, ol), axis_starts(w, L, ol)
    t_bounds = _owned_bounds(t_starts, Lt, T, min_offset=1)
    h_bounds, w_bounds = _owned_bounds(h_starts, L, h), _owned_bounds(w_starts, L, w)
    out_unit_s = s if kind == "decode" else 1
    out_unit_t = tc if kind == "decode" else 1

    def t_out(a, b):  # output frame range of latent chunk [a, b) after dropping
        lo = out_unit_t * a + (1 if a > 0 else 0)
        return lo, out_unit_t * (b - 1) + 1

    t_ranges = [(a, min(a + Lt, T)) for a in t_starts]
    h_ranges = [(a, min(a + L, h)) for a in h_starts]
    w_ranges = [(a, min(a + L, w)) for a in w_starts]
    t_outs = [t_out(a, b) for a, b in t_ranges]

    def overlaps(outs, i):
        lo = outs[i - 1][1] - outs[i][0] if i > 0 else 0
        hi = outs[i][1] - outs[i + 1][0] if i + 1 < len(outs) else 0
        return max(lo, 0), max(hi, 0)

    h_outs = [(a * out_unit_s, b * out_unit_s) for a, b in h_ranges]
    w_outs = [(a * out_unit_s, b * out_unit_s) for a, b in w_ranges]
    tiles = []
    for it, (ta, tb) in enumerate(t_ranges):
        for ih, (ha, hb) in enumerate(h_ranges):
            for iw, (wa, wb) in enumerate(w_ranges):
                los, his = [], []
                for outs, i in ((t_outs, it), (h_outs, ih), (w_outs, iw)):
                    lo, hi = _ramps(outs[i][1] - outs[i][0], *overlaps(outs, i))
                    los.append(lo)
                    his.append(hi)
                if kind == "decode":
                    src = (slice(ta, tb), slice(ha, hb), slice(wa, wb))
                else:
                    src = (slice(tc * ta, tc * (tb - 1) + 1), slice(s * ha, s * hb), slice(s * wa, s * wb))
                tiles.append(_Tile(
                    src=src, lat=((ta, tb), (ha, hb), (wa, wb)),
                    owned=((t_bounds[it], t_bounds[it + 1]), (h_bounds[ih], h_bounds[ih + 1]),
                           (w_bounds[iw], w_bounds[iw + 1])),
                    drop_first=ta > 0, offset=(t_outs[it][0], h_outs[ih][0], w_outs[iw][0]),
                    lo=tuple(los), hi=tuple(his)))
    return tiles


# --- statistics ---------------------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by a collecting GroupNorm to end a tile's pass once its statistics are recorded."""


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
    rstd = torch.rsqrt(m2 / n + norm.eps)
    norm.fixed_stats = (mean.float(), rstd.float())


def _owned_crop(x: torch.Tensor, tile: _Tile) -> torch.Tensor:
    """The part of a tile's activation x (N, C, T_a, H_a, W_a) that the tile owns. The activation's
    scales relative to the latent tile follow from its shape: spatially H_a / h_tile, in time
    frame f of a chunk starting at latent a sits at rt*a + f (causal layout), rt = (T_a-1)/(Lt-1)."""
    (ta, tb), (ha, hb), (wa, wb) = tile.lat
    (oa, ob), (pa, pb), (qa, qb) = tile.owned
    Ta, Ha, Wa = x.shape[2:]
    rh, rw = Ha / (hb - ha), Wa / (wb - wa)
    rt = (Ta - 1) / (tb - ta - 1) if tb - ta > 1 else 1

    def t_full(q):  # first activation frame of latent q, in the full (untiled) activation
        return 0 if q == 0 else round(rt * (q - 1)) + 1

    t0 = max(0, t_full(oa) - round(rt * ta))
    t1 = min(Ta, t_full(ob) - round(rt * ta))
    return x[:, :, t0:t1, round((pa - ha) * rh):round((pb - ha) * rh), round((qa - wa) * rw):round((qb - wa) * rw)]


# --- the stream runner --------------------------------------------------------------------------------


def _bar(cfg: TilingConfig, total: int, desc: str):
    from tqdm.auto import tqdm

    show = cfg.progress if cfg.progress is not None else (sys.stderr.isatty() and total > 1)
    return tqdm(total=total, desc=desc, disable=not show, leave=False)


def _norms(net: nn.Module) -> List[GroupNorm]:
    return [m for m in net.modules() if isinstance(m, GroupNorm)]


def _input(x: torch.Tensor, tile: _Tile) -> torch.Tensor:
    return x[(slice(None), slice(None)) + tile.src]


def stream(cfg: TilingConfig, net: Callable[[torch.Tensor], torch.Tensor], modules: nn.Module, x: torch.Tensor,
           tiles: List[_Tile], out_shape: Sequence[int], kind: str) -> torch.Tensor:
    """Run ``net`` over ``tiles`` of x, blend into a preallocated output of ``out_shape``."""
    norms = _norms(modules)
    saved = [m.fixed_stats for m in norms]
    try:
        with torch.no_grad():
            if cfg.norm == "global":
                _collect_exact(cfg, net, norms, x, tiles, kind)
            elif cfg.norm == "estimate":
                _collect_estimate(net, norms, x, tiles, kind)
            return _blend_pass(cfg, net, x, tiles, out_shape, kind)
    finally:
        for m, st in zip(norms, saved):
            m.fixed_stats = st


def _blend_pass(cfg, net, x, tiles, out_shape, kind):
    # fp32 accumulator whatever the model's dtype (bf16 sums of weighted tiles lose the seams' precision);
    # it is the output's size, small next to one tile's activations.
    out = torch.zeros(out_shape, device=x.device, dtype=torch.float32)
    wsum = torch.zeros(out_shape[2:], device=x.device, dtype=torch.float32)
    with _bar(cfg, len(tiles), f"tiled {kind}") as bar:
        for tile in tiles:
            y = net(_input(x, tile))
            if tile.drop_first:
                y = y[:, :, 1:]
            ops.blend_tile_(out, wsum, y, tile.offset, tile.lo, tile.hi)
            del y
            bar.update(1)
    return ops.blend_normalize_(out, wsum).to(x.dtype)


def _collect_exact(cfg, net, norms, x, tiles, kind):
    """One pass per GroupNorm, in execution order (found as the first norm without statistics)."""
    state: Dict[str, object] = {}

    def pre_hook(module, args):
        if module.fixed_stats is not None:
            return None
        target = state.setdefault("target", module)
        if target is not module:  # cannot happen in a sequential net; be safe
            raise RuntimeError("tiled VAE: GroupNorms ran out of order in a statistics pass")
        part = group_partial_stats(_owned_crop(args[0], state["tile"]), module.num_groups)
        state["stats"] = merge_stats(state.get("stats"), part)
        raise _Stop

    handles = [m.register_forward_pre_hook(pre_hook) for m in norms]
    try:
        with _bar(cfg, len(norms) * len(tiles), f"tiled {kind}: global GroupNorm statistics") as bar:
            for _ in range(len(norms)):
                state.clear()
                for tile in tiles:
                    state["tile"] = tile
                    try:
                        net(_input(x, tile))
                    except _Stop:
                        pass
                    bar.update(1)
                if "target" not in state:
                    break
                _fix(state["target"], state["stats"])
    finally:
        for h in handles:
            h.remove()


def _collect_estimate(net, norms, x, tiles, kind):
    """Every norm's statistics from one untiled pass over a strided subsample that fits one tile."""
    (ta, tb), (ha, hb), (wa, wb) = tiles[0].lat
    T_lat = max(t.lat[0][1] for t in tiles)
    h_lat, w_lat = max(t.lat[1][1] for t in tiles), max(t.lat[2][1] for t in tiles)
    fh, fw = math.ceil(h_lat / (hb - ha)), math.ceil(w_lat / (wb - wa))
    ft = math.ceil(T_lat / (tb - ta))
    if kind == "decode":
        sub = x[:, :, ::ft, ::fh, ::fw]
    else:  # keep every fh-th (fw-th) block of s pixels and every ft-th latent frame's group of tc frames
        tc = (x.shape[2] - 1) // (T_lat - 1) if T_lat > 1 else 1
        s = x.shape[3] // h_lat
        frames = [0] + [f for q in range(ft, T_lat, ft) for f in range(tc * (q - 1) + 1, tc * q + 1)]
        sub = _every_block(_every_block(x[:, :, frames], 3, s, fh), 4, s, fw)
    records: Dict[GroupNorm, Tuple] = {}

    def pre_hook(module, args):
        records[module] = group_partial_stats(args[0], module.num_groups)

    handles = [m.register_forward_pre_hook(pre_hook) for m in norms]
    try:
        net(sub)
    finally:
        for h in handles:
            h.remove()
    for m in norms:
        if m in records:
            _fix(m, records[m])


def _every_block(x: torch.Tensor, dim: int, block: int, f: int) -> torch.Tensor:
    """x with only every f-th block of ``block`` elements along ``dim`` kept."""
    if f == 1:
        return x
    return x.unflatten(dim, (-1, block)).narrow(dim, 0, x.shape[dim] // block)[
        (slice(None),) * dim + (slice(None, None, f),)].flatten(dim, dim + 1)


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

    if cfg.mode == "osp-v1.0":
        if not _latent_grid(cfg, s, tc, T, h, w):
            return None
        S, o = cfg.tile_sample_size, cfg.overlap
        extent = int(S * o)
        return upstream_tiled(cfg, net, z, S // s, int(S // s * (1 - o)), extent, S - extent, s, "decode")
    if not _latent_grid(cfg, s, tc, T, h, w):
        return None
    tiles = plan(cfg, (T, h, w), s, tc, "decode")
    shape = (B, vae.config.out_channels, tc * (T - 1) + 1, h * s, w * s)
    return stream(cfg, net, vae, z, tiles, shape, "decode")


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
    tiles = plan(cfg, (Tl, h, w), s, tc, "encode")
    return stream(cfg, net, vae, x, tiles, (B, 2 * vae.config.embed_dim, Tl, h, w), "encode")


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
