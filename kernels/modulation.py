"""Triton kernels for the adaLN-single blocks of a video DiT (PixArt/Latte style).

layer_norm_modulate: y = LN(x) * (1 + scale[b]) + shift[b], LN without affine, over the last dim D.
    Forward: one program per BLOCK_R rows of one batch entry b; the whole row lives in registers,
    mean and variance by two passes over them, mean and 1/std saved in fp32.
    Backward: dxhat = dy * (1 + scale); dx = rstd * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat));
    dscale[b] = sum over b's rows of dy * xhat and dshift[b] = sum dy are written as per-program
    fp32 partials (deterministic, no atomics) that the host sums.
gated_residual: out = x + gate[b] * y.
    Backward: dx = dout, dy = dout * gate, dgate[b] = sum over b's rows of dout * y (partials again).
x, y: (B, L, D) with contiguous rows; shift, scale, gate: (Bm, D) with Bm = B or 1 (broadcast).
"""
from __future__ import annotations


import torch
import triton
import triton.language as tl

from osp._utils import interpreting


@triton.jit
def _rows(pid_r, L, BLOCK_R: tl.constexpr):
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    return rows, rows < L


@triton.jit
def _ln_mod_fwd_kernel(X, SHIFT, SCALE, Y, MEAN, RSTD, L, D, sx_b, sx_l, ssh_b, ssc_b, eps,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    rows, rmask = _rows(tl.program_id(0), L, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * sx_b + rows.to(tl.int64)[:, None] * sx_l + cols[None, :]
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / D + eps)
    shift = tl.load(SHIFT + b * ssh_b + cols, mask=cmask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * ssc_b + cols, mask=cmask, other=0.0).to(tl.float32)
    y = xc * rstd[:, None] * (1.0 + scale[None, :]) + shift[None, :]
    yoffs = (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * D + cols[None, :]
    tl.store(Y + yoffs, y.to(Y.dtype.element_ty), mask=mask)
    stat = b.to(tl.int64) * L + rows
    tl.store(MEAN + stat, mean, mask=rmask)
    tl.store(RSTD + stat, rstd, mask=rmask)


@triton.jit
def _ln_mod_bwd_kernel(X, SCALE, DY, MEAN, RSTD, DX, PSHIFT, PSCALE, L, D, sx_b, sx_l, sm_b,
                       BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    b = tl.program_id(1)
    rows, rmask = _rows(pid_r, L, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    offs = b.to(tl.int64) * sx_b + rows.to(tl.int64)[:, None] * sx_l + cols[None, :]
    doffs = (b.to(tl.int64) * L + rows.to(tl.int64))[:, None] * D + cols[None, :]
    stat = b.to(tl.int64) * L + rows
    mean = tl.load(MEAN + stat, mask=rmask, other=0.0)
    rstd = tl.load(RSTD + stat, mask=rmask, other=0.0)
    xhat = tl.where(mask, (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(DY + doffs, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(SCALE + b * sm_b + cols, mask=cmask, other=0.0).to(tl.float32)
    dxhat = dy * (1.0 + scale[None, :])
    c1 = tl.sum(dxhat, axis=1) / D
    c2 = tl.sum(dxhat * xhat, axis=1) / D
    dx = rstd[:, None] * (dxhat - c1[:, None] - xhat * c2[:, None])
    tl.store(DX + doffs, dx.to(DX.dtype.element_ty), mask=mask)
    part = (b.to(tl.int64) * tl.num_programs(0) + pid_r) * D + cols
    tl.store(PSHIFT + part, tl.sum(dy, axis=0), mask=cmask)
    tl.store(PSCALE + part, tl.sum(dy * xhat, axis=0), mask=cmask)


@triton.jit
def _gated_fwd_kernel(X, GATE, Y, OUT, L, D, sx_b, sx_l, sy_b, sy_l, sg_b,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    b = tl.program_id(1)
    rows, rmask = _rows(tl.program_id(0), L, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    x = tl.load(X + b.to(tl.int64) * sx_b + r64 * sx_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b.to(tl.int64) * sy_b + r64 * sy_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * sg_b + cols, mask=cmask, other=0.0).to(tl.float32)
    out = x + g[None, :] * y
    tl.store(OUT + (b.to(tl.int64) * L + r64) * D + cols[None, :], out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(DOUT, GATE, Y, DY, PGATE, L, D, sy_b, sy_l, sg_b,
                      BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_r = tl.program_id(0)
    b = tl.program_id(1)
    rows, rmask = _rows(pid_r, L, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    cmask = cols < D
    mask = rmask[:, None] & cmask[None, :]
    r64 = rows.to(tl.int64)[:, None]
    doffs = (b.to(tl.int64) * L + r64) * D + cols[None, :]
    dout = tl.load(DOUT + doffs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(Y + b.to(tl.int64) * sy_b + r64 * sy_l + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GATE + b * sg_b + cols, mask=cmask, other=0.0).to(tl.float32)
    tl.store(DY + doffs, (dout * g[None, :]).to(DY.dtype.element_ty), mask=mask)
    part = (b.to(tl.int64) * tl.num_programs(0) + pid_r) * D + cols
    tl.store(PGATE + part, tl.sum(dout * y, axis=0), mask=cmask)


def _geometry(L: int, D: int):
    """(BLOCK_R, BLOCK_D, num_warps): whole rows in registers, ~4-8K elements per program."""
    block_d = triton.next_power_of_2(D)
    budget = 16384 if interpreting() else 4096
    block_r = max(1, min(triton.next_power_of_2(L), budget // block_d))
    return block_r, block_d, (8 if block_d * block_r >= 4096 else 4)


def _mod_strides(t: torch.Tensor, B: int):
    """Batch stride of a (Bm, D) modulation tensor: 0 broadcasts one row over every batch entry."""
    return 0 if t.shape[0] == 1 and B != 1 else t.stride(0)


def layer_norm_modulate_forward(x, shift, scale, eps):
    """x (B, L, D) with unit last stride; shift, scale (Bm, D) contiguous. Returns y, mean, rstd."""
    B, L, D = x.shape
    block_r, block_d, warps = _geometry(L, D)
    y = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    mean = torch.empty((B, L), device=x.device, dtype=torch.float32)
    rstd = torch.empty((B, L), device=x.device, dtype=torch.float32)
    grid = (triton.cdiv(L, block_r), B)
    _ln_mod_fwd_kernel[grid](x, shift, scale, y, mean, rstd, L, D, x.stride(0), x.stride(1),
                             _mod_strides(shift, B), _mod_strides(scale, B), eps, BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return y, mean, rstd


def layer_norm_modulate_backward(dy, x, scale, mean, rstd):
    """dy (B, L, D) contiguous. Returns dx, dshift, dscale; the latter two (B, D) fp32 sums per entry."""
    B, L, D = x.shape
    block_r, block_d, warps = _geometry(L, D)
    grid = (triton.cdiv(L, block_r), B)
    dx = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    pshift = torch.empty((B, grid[0], D), device=x.device, dtype=torch.float32)
    pscale = torch.empty((B, grid[0], D), device=x.device, dtype=torch.float32)
    _ln_mod_bwd_kernel[grid](x, scale, dy, mean, rstd, dx, pshift, pscale, L, D, x.stride(0), x.stride(1),
                             _mod_strides(scale, B), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dx, pshift.sum(1), pscale.sum(1)


def gated_residual_forward(x, gate, y):
    """x, y (B, L, D) with unit last stride; gate (Bm, D) contiguous. Returns x + gate * y, contiguous."""
    B, L, D = x.shape
    block_r, block_d, warps = _geometry(L, D)
    out = torch.empty((B, L, D), device=x.device, dtype=x.dtype)
    grid = (triton.cdiv(L, block_r), B)
    _gated_fwd_kernel[grid](x, gate, y, out, L, D, x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                            _mod_strides(gate, B), BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return out


def gated_residual_backward(dout, gate, y):
    """dout (B, L, D) contiguous. Returns dy (y's dtype) and dgate as (B, D) fp32 sums per entry."""
    B, L, D = y.shape
    block_r, block_d, warps = _geometry(L, D)
    grid = (triton.cdiv(L, block_r), B)
    dy = torch.empty((B, L, D), device=y.device, dtype=y.dtype)
    pgate = torch.empty((B, grid[0], D), device=y.device, dtype=torch.float32)
    _gated_bwd_kernel[grid](dout, gate, y, dy, pgate, L, D, y.stride(0), y.stride(1), _mod_strides(gate, B),
                            BLOCK_R=block_r, BLOCK_D=block_d, num_warps=warps)
    return dy, pgate.sum(1)
