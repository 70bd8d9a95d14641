"""Triton GroupNorm with a fused activation, forward and backward.

A tensor x of shape (N, C, *spatial) is viewed as (N, C, S), S = prod(spatial), stored either
channel-major (NCS: contiguous, the channel stride is S) or channel-last (NSC: channels_last /
channels_last_3d, the spatial stride is C). Groups of a video VAE hold millions of elements
(4 channels x 17 x 256 x 256), so one program per (sample, group) would leave most of a GPU idle:
every pass splits each group's spatial range across SPLITS programs.

A program owns (sample n, a block of BLOCK_G groups, one spatial split). In NCS one group per
program (BLOCK_G = 1) reads BLOCK_CG contiguous rows; in NSC a program spans all groups of a row
(BLOCK_G x BLOCK_CG = C when it fits) so that every load is a contiguous run of channels.

Forward:  pass 1 writes per-split partial statistics (count, mean, M2), each merged in-program
          over tiles by Chan's formula (tile mean and M2 by two passes over registers);
          pass 2 merges the partials of its groups (again Chan, exact), saves mean and 1/std in
          fp32, and writes act((x - mean) * rstd * w + b).
Backward: pass 1 recomputes z = xhat * w + b and dz = dy * act'(z), writing per-split, per-channel
          sums of dz and dz * xhat (fp32, no atomics: deterministic); the host reduces those small
          buffers into dweight, dbias and the two group means the dx formula needs;
          pass 2 writes dx = rstd * (dz * w - mean(dz * w) - xhat * mean(dz * w * xhat)).
Loads are upcast to fp32 before arithmetic (the interpreter's bf16 is wrong; GPU math is fp32
anyway); offsets are int64 (a video tensor passes 2**31 elements).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from osp._utils import ACTIVATIONS, interpreting

_ACT_CODE = {act: code for code, act in enumerate(ACTIVATIONS)}  # the ACT constexpr of the kernels


@triton.jit
def _channels(offs_g, G, Cg, c0, BLOCK_CG: tl.constexpr):
    """Channel index and mask (BLOCK_G, BLOCK_CG) of channels c0.. of the groups offs_g."""
    offs_c = c0 + tl.arange(0, BLOCK_CG)
    ch = offs_g[:, None] * Cg + offs_c[None, :]
    ch_mask = (offs_g < G)[:, None] & (offs_c < Cg)[None, :]
    return ch, ch_mask


@triton.jit
def _tile(n, offs_s, s_hi, ch, ch_mask, sxn, sxc, sxs):
    """int64 element offsets and mask of one (BLOCK_S, BLOCK_G, BLOCK_CG) tile."""
    mask = (offs_s < s_hi)[:, None, None] & ch_mask[None, :, :]
    offs = (n.to(tl.int64) * sxn + offs_s.to(tl.int64)[:, None, None] * sxs
            + ch.to(tl.int64)[None, :, :] * sxc)
    return offs, mask


@triton.jit
def _merged_stats(PART, n, offs_g, G, SPLITS, eps, BLOCK_P: tl.constexpr):
    """Merge the SPLITS partial (count, mean, M2) of each group in offs_g: mean and 1/std."""
    offs_p = tl.arange(0, BLOCK_P)
    pmask = (offs_g < G)[:, None] & (offs_p < SPLITS)[None, :]
    pp = PART + ((n * G + offs_g)[:, None] * SPLITS + offs_p[None, :]).to(tl.int64) * 3
    cnt = tl.load(pp, mask=pmask, other=0.0)
    mu = tl.load(pp + 1, mask=pmask, other=0.0)
    m2 = tl.load(pp + 2, mask=pmask, other=0.0)
    total = tl.where(offs_g < G, tl.sum(cnt, axis=1), 1.0)  # padding lanes: avoid 0/0
    mean = tl.sum(cnt * mu, axis=1) / total
    d = tl.where(pmask, mu - mean[:, None], 0.0)
    var = (tl.sum(m2, axis=1) + tl.sum(cnt * d * d, axis=1)) / total
    return mean, 1.0 / tl.sqrt(var + eps)


@triton.jit
def _act_grad(gy, z, ACT: tl.constexpr):
    """dL/dz given dL/d(act(z))."""
    dz = gy
    if ACT == 1:
        sig = 1.0 / (1.0 + tl.exp(-z))
        dz = gy * sig * (1.0 + z * (1.0 - sig))
    return dz


@triton.jit
def _gn_stats_kernel(X, PART, S, G, Cg, n_gblocks, s_per_split, SPLITS, sxn, sxc, sxs,
                     BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // n_gblocks
    offs_g = (pid % n_gblocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    s_lo = sp * s_per_split
    s_hi = tl.minimum(s_lo + s_per_split, S)
    cnt = tl.zeros([BLOCK_G], dtype=tl.float32)
    mean = tl.zeros([BLOCK_G], dtype=tl.float32)
    m2 = tl.zeros([BLOCK_G], dtype=tl.float32)
    for c0 in range(0, Cg, BLOCK_CG):
        n_c = tl.minimum(Cg - c0, BLOCK_CG)
        ch, ch_mask = _channels(offs_g, G, Cg, c0, BLOCK_CG)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = _tile(n, s0 + tl.arange(0, BLOCK_S), s_hi, ch, ch_mask, sxn, sxc, sxs)
            v = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            t_cnt = (tl.minimum(s_hi - s0, BLOCK_S) * n_c).to(tl.float32)
            t_mean = tl.sum(tl.sum(v, axis=2), axis=0) / t_cnt
            d = tl.where(mask, v - t_mean[None, :, None], 0.0)
            t_m2 = tl.sum(tl.sum(d * d, axis=2), axis=0)
            total = cnt + t_cnt
            delta = t_mean - mean
            mean = mean + delta * (t_cnt / total)
            m2 = m2 + t_m2 + delta * delta * (cnt * (t_cnt / total))
            cnt = total
    out = PART + ((n * G + offs_g) * SPLITS + sp).to(tl.int64) * 3
    g_mask = offs_g < G
    tl.store(out, cnt, mask=g_mask)
    tl.store(out + 1, mean, mask=g_mask)
    tl.store(out + 2, m2, mask=g_mask)


@triton.jit
def _gn_apply_kernel(X, Y, W, B, PART, MEAN, RSTD, S, G, Cg, n_gblocks, s_per_split, SPLITS, eps,
                     sxn, sxc, sxs,
                     HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr,
                     BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    # Walk the splits in reverse of the statistics pass: the tail of x it read last is the part
    # still in L2.
    sp = SPLITS - 1 - tl.program_id(1)
    n = pid // n_gblocks
    offs_g = (pid % n_gblocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    mean, rstd = _merged_stats(PART, n, offs_g, G, SPLITS, eps, BLOCK_P)
    if sp == 0:
        tl.store(MEAN + n * G + offs_g, mean, mask=offs_g < G)
        tl.store(RSTD + n * G + offs_g, rstd, mask=offs_g < G)
    s_lo = sp * s_per_split
    s_hi = tl.minimum(s_lo + s_per_split, S)
    for c0 in range(0, Cg, BLOCK_CG):
        offs_s0 = tl.arange(0, BLOCK_S)
        ch, ch_mask = _channels(offs_g, G, Cg, c0, BLOCK_CG)
        scale = tl.broadcast_to(rstd[:, None], ch.shape)
        shift = tl.broadcast_to((-mean * rstd)[:, None], ch.shape)
        if HAS_W:
            w = tl.load(W + ch, mask=ch_mask, other=0.0).to(tl.float32)
            scale = scale * w
            shift = shift * w
        if HAS_B:
            shift = shift + tl.load(B + ch, mask=ch_mask, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = _tile(n, s0 + offs_s0, s_hi, ch, ch_mask, sxn, sxc, sxs)
            z = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) * scale[None, :, :] + shift[None, :, :]
            if ACT == 1:
                z = z / (1.0 + tl.exp(-z))
            tl.store(Y + offs, z.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gn_bwd_reduce_kernel(X, DY, W, B, MEAN, RSTD, PDZ, PDZX, S, C, G, Cg, n_gblocks, s_per_split, SPLITS,
                          sxn, sxc, sxs,
                          HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                          BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // n_gblocks
    offs_g = (pid % n_gblocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    mean = tl.load(MEAN + n * G + offs_g, mask=g_mask, other=0.0)
    rstd = tl.load(RSTD + n * G + offs_g, mask=g_mask, other=0.0)
    s_lo = sp * s_per_split
    s_hi = tl.minimum(s_lo + s_per_split, S)
    for c0 in range(0, Cg, BLOCK_CG):
        offs_s0 = tl.arange(0, BLOCK_S)
        ch, ch_mask = _channels(offs_g, G, Cg, c0, BLOCK_CG)
        w = tl.full(ch.shape, 1.0, tl.float32)
        b = tl.zeros(ch.shape, tl.float32)
        if HAS_W:
            w = tl.load(W + ch, mask=ch_mask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(B + ch, mask=ch_mask, other=0.0).to(tl.float32)
        acc_dz = tl.zeros(ch.shape, tl.float32)
        acc_dzx = tl.zeros(ch.shape, tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = _tile(n, s0 + offs_s0, s_hi, ch, ch_mask, sxn, sxc, sxs)
            xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :, None]) * rstd[None, :, None]
            gy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            dz = tl.where(mask, _act_grad(gy, xhat * w[None, :, :] + b[None, :, :], ACT), 0.0)
            acc_dz += tl.sum(dz, axis=0)
            acc_dzx += tl.sum(dz * xhat, axis=0)
        out = (n * SPLITS + sp).to(tl.int64) * C + ch
        tl.store(PDZ + out, acc_dz, mask=ch_mask)
        tl.store(PDZX + out, acc_dzx, mask=ch_mask)


@triton.jit
def _gn_bwd_dx_kernel(X, DY, DX, W, B, MEAN, RSTD, GA, GB, S, G, Cg, n_gblocks, s_per_split,
                      sxn, sxc, sxs,
                      HAS_W: tl.constexpr, HAS_B: tl.constexpr, ACT: tl.constexpr,
                      BLOCK_S: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_CG: tl.constexpr):
    pid = tl.program_id(0)
    sp = tl.program_id(1)
    n = pid // n_gblocks
    offs_g = (pid % n_gblocks) * BLOCK_G + tl.arange(0, BLOCK_G)
    g_mask = offs_g < G
    mean = tl.load(MEAN + n * G + offs_g, mask=g_mask, other=0.0)
    rstd = tl.load(RSTD + n * G + offs_g, mask=g_mask, other=0.0)
    ga = tl.load(GA + n * G + offs_g, mask=g_mask, other=0.0)  # mean over the group of dz * w
    gb = tl.load(GB + n * G + offs_g, mask=g_mask, other=0.0)  # mean over the group of dz * w * xhat
    s_lo = sp * s_per_split
    s_hi = tl.minimum(s_lo + s_per_split, S)
    for c0 in range(0, Cg, BLOCK_CG):
        offs_s0 = tl.arange(0, BLOCK_S)
        ch, ch_mask = _channels(offs_g, G, Cg, c0, BLOCK_CG)
        w = tl.full(ch.shape, 1.0, tl.float32)
        b = tl.zeros(ch.shape, tl.float32)
        if HAS_W:
            w = tl.load(W + ch, mask=ch_mask, other=0.0).to(tl.float32)
        if HAS_B:
            b = tl.load(B + ch, mask=ch_mask, other=0.0).to(tl.float32)
        for s0 in range(s_lo, s_hi, BLOCK_S):
            offs, mask = _tile(n, s0 + offs_s0, s_hi, ch, ch_mask, sxn, sxc, sxs)
            xhat = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[None, :, None]) * rstd[None, :, None]
            gy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            dxhat = _act_grad(gy, xhat * w[None, :, :] + b[None, :, :], ACT) * w[None, :, :]
            dx = rstd[None, :, None] * (dxhat - ga[None, :, None] - xhat * gb[None, :, None])
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)


def _layout(x: torch.Tensor) -> Tuple[int, int, int]:
    """(stride_n, stride_c, stride_s) of a dense NCS or NSC tensor viewed as (N, C, S)."""
    if x.is_contiguous():
        return x.stride(0), x.stride(1), 1
    return x.stride(0), 1, x.shape[1]


def _config(x: torch.Tensor, num_groups: int):
    """Launch geometry: (BLOCK_S, BLOCK_G, BLOCK_CG, n_gblocks, s_per_split, SPLITS, num_warps)."""
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    G = num_groups
    Cg = C // G
    interp = interpreting()
    channel_last = not x.is_contiguous()
    block_cg = min(triton.next_power_of_2(Cg), 64)
    # NSC: cover as many whole groups as fit in one contiguous row segment. The interpreter pays per
    # program, not per element: there every layout takes many groups and large tiles per program.
    if block_cg >= Cg and (channel_last or interp):
        block_g = min(triton.next_power_of_2(G), max(1, (1024 if interp else 256) // block_cg))
    else:
        block_g = 1
    tile = 16384 if interp else 4096  # elements per tile
    block_s = max(1, min(triton.next_power_of_2(S), tile // (block_g * block_cg)))
    n_gblocks = triton.cdiv(G, block_g)
    s_blocks = triton.cdiv(S, block_s)
    if interp:
        target = 4 * N * n_gblocks  # a few splits, so the cross-program merge is always exercised
    else:
        sms = torch.cuda.get_device_properties(x.device).multi_processor_count
        target = 8 * sms
    splits = max(1, min(s_blocks, triton.cdiv(target, N * n_gblocks), 1024))
    s_per_split = triton.cdiv(s_blocks, splits) * block_s
    splits = triton.cdiv(S, s_per_split)
    num_warps = 4 if block_s * block_g * block_cg <= 2048 else 8
    return block_s, block_g, block_cg, n_gblocks, s_per_split, splits, num_warps


def forward(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
            num_groups: int, eps: float, act: Optional[str]):
    """y = act(group_norm(x)); x dense NCS or NSC. Returns (y, mean, rstd), mean/rstd (N, G) fp32."""
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    G = num_groups
    block_s, block_g, block_cg, n_gblocks, s_per_split, splits, num_warps = _config(x, G)
    sxn, sxc, sxs = _layout(x)
    y = torch.empty_like(x)
    part = torch.empty((N, G, splits, 3), device=x.device, dtype=torch.float32)
    mean = torch.empty((N, G), device=x.device, dtype=torch.float32)
    rstd = torch.empty((N, G), device=x.device, dtype=torch.float32)
    grid = (N * n_gblocks, splits)
    _gn_stats_kernel[grid](x, part, S, G, C // G, n_gblocks, s_per_split, splits, sxn, sxc, sxs,
                           BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_CG=block_cg, num_warps=num_warps)
    _gn_apply_kernel[grid](x, y, weight if weight is not None else x, bias if bias is not None else x,
                           part, mean, rstd, S, G, C // G, n_gblocks, s_per_split, splits, eps, sxn, sxc, sxs,
                           HAS_W=weight is not None, HAS_B=bias is not None, ACT=_ACT_CODE[act],
                           BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_CG=block_cg,
                           BLOCK_P=triton.next_power_of_2(splits), num_warps=num_warps)
    return y, mean, rstd


def backward(dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
             mean: torch.Tensor, rstd: torch.Tensor, num_groups: int, act: Optional[str],
             needs_dx: bool = True):
    """Gradients (dx, dweight, dbias) of act(group_norm(x)); dy has x's shape and strides.

    dweight/dbias are None when weight/bias are; dx is None when not needed.
    """
    N, C = x.shape[:2]
    S = x[0, 0].numel()
    G = num_groups
    Cg = C // G
    block_s, block_g, block_cg, n_gblocks, s_per_split, splits, num_warps = _config(x, G)
    sxn, sxc, sxs = _layout(x)
    grid = (N * n_gblocks, splits)
    has_w, has_b = weight is not None, bias is not None
    w_arg = weight if has_w else x
    b_arg = bias if has_b else x
    pdz = torch.empty((N, splits, C), device=x.device, dtype=torch.float32)
    pdzx = torch.empty((N, splits, C), device=x.device, dtype=torch.float32)
    _gn_bwd_reduce_kernel[grid](x, dy, w_arg, b_arg, mean, rstd, pdz, pdzx, S, C, G, Cg, n_gblocks, s_per_split,
                                splits, sxn, sxc, sxs, HAS_W=has_w, HAS_B=has_b, ACT=_ACT_CODE[act],
                                BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_CG=block_cg, num_warps=num_warps)
    # Small deterministic reductions over (N, SPLITS, C) fp32 buffers.
    sdz, sdzx = pdz.sum(1), pdzx.sum(1)  # (N, C)
    dweight = sdzx.sum(0).to(weight.dtype) if has_w else None
    dbias = sdz.sum(0).to(bias.dtype) if has_b else None
    dx = None
    if needs_dx:
        w32 = weight.float() if has_w else torch.ones(C, device=x.device, dtype=torch.float32)
        count = Cg * S
        ga = ((sdz * w32).view(N, G, Cg).sum(-1) / count).contiguous()
        gb = ((sdzx * w32).view(N, G, Cg).sum(-1) / count).contiguous()
        dx = torch.empty_like(x)
        _gn_bwd_dx_kernel[grid](x, dy, dx, w_arg, b_arg, mean, rstd, ga, gb, S, G, Cg, n_gblocks, s_per_split,
                                sxn, sxc, sxs, HAS_W=has_w, HAS_B=has_b, ACT=_ACT_CODE[act],
                                BLOCK_S=block_s, BLOCK_G=block_g, BLOCK_CG=block_cg, num_warps=num_warps)
    return dx, dweight, dbias
