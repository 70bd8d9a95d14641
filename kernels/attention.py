"""Triton flash attention with a key padding mask, forward and backward.

Shapes: q (B, H, Lq, D), k and v (B, H, Lk, D), any strides; key padding mask (B, Lk), nonzero =
attend. One program owns one (batch*head, row block); the grid is one-dimensional with the row
block varying fastest, so the programs that share a head's K and V run together (L2 reuse) and
B*H may exceed CUDA's 65535 limit on the second grid axis (temporal attention: B*H*W*heads).

Forward:  online softmax over key blocks in the log2 domain, fp32 accumulation; writes O in q's
          dtype and the row logsumexp (log2 units, fp32) for the backward.
Backward: delta = rowsum(dO * O) (one small kernel); then dK and dV by programs that own a key
          block and loop over all query blocks, and dQ by programs that own a query block and loop
          over all key blocks. Each gradient element is written by exactly one program: no atomics,
          deterministic.

Fully masked rows (a batch whose mask is all zero): no key contributes, the row's softmax sum is
0, and the kernel writes O = 0 and logsumexp = +inf, so the backward's probabilities
exp2(s - lse) are 0 and dQ, dK, dV get no contribution from it (zero gradients).

Head dims that are not powers of two are split into two power-of-two chunks when that is smaller
than padding to the next power of two (72 -> 64 + 16 instead of 128, 88 -> 64 + 32): scores sum the
chunks' dots, outputs keep one accumulator per chunk, loads past D are masked. tl.dot needs every
dim >= 16, so chunks and tiles are at least 16.

Tiles follow the sequence lengths: a 17-frame temporal attention runs its forward on 32 x 32
tiles and its backward on 16 x 16, not on 128 x 64. On GPU the dots take fp16/bf16 operands with
fp32 accumulation (fp32 inputs use exact fp32 dots, never TF32); in the interpreter every load is
upcast to fp32 (its bf16 is wrong). Per-head base offsets are int64; offsets inside one head are
int32 unless a head spans 2**31 elements (OFF64), which saves registers.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from osp._utils import interpreting

LOG2E = 1.4426950408889634


@triton.jit
def _offsets(offs_r, stride_r, offs_d, stride_d, OFF64: tl.constexpr):
    """Element offsets of a (rows, head-dim chunk) tile within one head. The head's base is
    already an int64 pointer; int32 suffices inside a head unless OFF64 (a head spanning 2**31
    elements), and saves a register pair per element."""
    r = offs_r
    d = offs_d
    if OFF64:
        r = r.to(tl.int64)
        d = d.to(tl.int64)
    return r[:, None] * stride_r + d[None, :] * stride_d


@triton.jit
def _load(base, offs_r, r_ok, stride_r, offs_d, D, stride_d, OFF64: tl.constexpr, UPCAST: tl.constexpr):
    """A (rows, head-dim chunk) tile; rows past their length and columns past D read as 0."""
    ptrs = base + _offsets(offs_r, stride_r, offs_d, stride_d, OFF64)
    t = tl.load(ptrs, mask=r_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def _store(base, val, offs_r, r_ok, stride_r, offs_d, D, stride_d, OFF64: tl.constexpr):
    ptrs = base + _offsets(offs_r, stride_r, offs_d, stride_d, OFF64)
    tl.store(ptrs, val.to(base.dtype.element_ty), mask=r_ok[:, None] & (offs_d < D)[None, :])


@triton.jit
def _keys_ok(MASK, b, offs_n, Lk, smb, smn, HAS_MASK: tl.constexpr):
    """Which keys of this block exist and are attended to."""
    ok = offs_n < Lk
    if HAS_MASK:
        keep = tl.load(MASK + b.to(tl.int64) * smb + offs_n.to(tl.int64) * smn, mask=ok, other=0)
        ok = ok & (keep != 0)
    return ok


@triton.jit
def _attn_fwd_kernel(Q, K, V, O, LSE, MASK,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                     sob, soh, som, sod, smb, smn,
                     H, Lq, Lk, D, n_m_blocks, qk_scale,
                     HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_D1: tl.constexpr,
                     UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr):
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    b = bh // H
    h = bh % H
    offs_m = (pid % n_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh

    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load(q_base, offs_m, m_ok, sqm, offs_d0, D, sqd, OFF64, UPCAST)
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if HAS_D1:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load(q_base, offs_m, m_ok, sqm, offs_d1, D, sqd, OFF64, UPCAST)
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = _keys_ok(MASK, b, offs_n, Lk, smb, smn, HAS_MASK)
        k0 = _load(k_base, offs_n, n_ok, skn, offs_d0, D, skd, OFF64, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        if HAS_D1:
            k1 = _load(k_base, offs_n, n_ok, skn, offs_d1, D, skd, OFF64, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
        s = tl.where(n_ok[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with no attended key so far keeps m = -inf; subtract 0 there so that
        # exp2(-inf - (-inf)) never forms a NaN.
        m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_sub[:, None])
        alpha = tl.exp2(m_i - m_sub)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = _load(v_base, offs_n, n_ok, svn, offs_d0, D, svd, OFF64, UPCAST)
        acc0 = tl.dot(p.to(v0.dtype), v0, acc0 * alpha[:, None], input_precision=DOT_PREC)
        if HAS_D1:
            v1 = _load(v_base, offs_n, n_ok, svn, offs_d1, D, svd, OFF64, UPCAST)
            acc1 = tl.dot(p.to(v1.dtype), v1, acc1 * alpha[:, None], input_precision=DOT_PREC)

    # Fully masked rows: l = 0 and acc = 0, so O = 0; their lse = +inf makes every backward
    # probability exp2(s - lse) exactly 0.
    empty = l_i == 0.0
    inv_l = 1.0 / tl.where(empty, 1.0, l_i)
    o_base = O + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    _store(o_base, acc0 * inv_l[:, None], offs_m, m_ok, som, offs_d0, D, sod, OFF64)
    if HAS_D1:
        _store(o_base, acc1 * inv_l[:, None], offs_m, m_ok, som, offs_d1, D, sod, OFF64)
    lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    tl.store(LSE + bh.to(tl.int64) * Lq + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sob, soh, som, sod, sdb, sdh, sdm, sdd,
                           H, Lq, D, n_m_blocks, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                           OFF64: tl.constexpr):
    """delta[bh, m] = sum_d dO * O (fp32): the softmax backward's row term."""
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    b = bh // H
    h = bh % H
    offs_m = (pid % n_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    offs_d = tl.arange(0, BLOCK_D)
    o = _load(O + b.to(tl.int64) * sob + h.to(tl.int64) * soh, offs_m, m_ok, som, offs_d, D, sod, OFF64, True)
    do = _load(DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh, offs_m, m_ok, sdm, offs_d, D, sdd, OFF64, True)
    tl.store(DELTA + bh.to(tl.int64) * Lq + offs_m, tl.sum(o * do, 1), mask=m_ok)


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, MASK,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                          sdb, sdh, sdm, sdd, sgkb, sgkh, sgkn, sgkd, sgvb, sgvh, sgvn, sgvd, smb, smn,
                          H, Lq, Lk, D, n_n_blocks, qk_scale, sm_scale,
                          HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_D1: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr):
    """One key block: dV = P^T dO and dK = scale * dS^T Q, summed over every query block."""
    pid = tl.program_id(0)
    bh = pid // n_n_blocks
    b = bh // H
    h = bh % H
    offs_n = (pid % n_n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_in = offs_n < Lk
    n_ok = _keys_ok(MASK, b, offs_n, Lk, smb, smn, HAS_MASK)
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    row_base = bh.to(tl.int64) * Lq

    offs_d0 = tl.arange(0, BLOCK_D0)
    k0 = _load(k_base, offs_n, n_ok, skn, offs_d0, D, skd, OFF64, UPCAST)
    v0 = _load(v_base, offs_n, n_ok, svn, offs_d0, D, svd, OFF64, UPCAST)
    dk0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    dv0 = tl.zeros([BLOCK_N, BLOCK_D0], dtype=tl.float32)
    if HAS_D1:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        k1 = _load(k_base, offs_n, n_ok, skn, offs_d1, D, skd, OFF64, UPCAST)
        v1 = _load(v_base, offs_n, n_ok, svn, offs_d1, D, svd, OFF64, UPCAST)
        dk1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)
        dv1 = tl.zeros([BLOCK_N, BLOCK_D1], dtype=tl.float32)

    for start_m in range(0, Lq, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < Lq
        q0 = _load(q_base, offs_m, m_ok, sqm, offs_d0, D, sqd, OFF64, UPCAST)
        do0 = _load(do_base, offs_m, m_ok, sdm, offs_d0, D, sdd, OFF64, UPCAST)
        # Rows past Lq read lse = +inf: their probabilities are exactly 0.
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        s_t = tl.dot(k0, tl.trans(q0), input_precision=DOT_PREC)
        dp_t = tl.dot(v0, tl.trans(do0), input_precision=DOT_PREC)
        if HAS_D1:
            q1 = _load(q_base, offs_m, m_ok, sqm, offs_d1, D, sqd, OFF64, UPCAST)
            do1 = _load(do_base, offs_m, m_ok, sdm, offs_d1, D, sdd, OFF64, UPCAST)
            s_t += tl.dot(k1, tl.trans(q1), input_precision=DOT_PREC)
            dp_t += tl.dot(v1, tl.trans(do1), input_precision=DOT_PREC)
        p_t = tl.where(n_ok[:, None], tl.exp2(s_t * qk_scale - lse[None, :]), 0.0)
        ds_t = p_t * (dp_t - delta[None, :])
        dv0 = tl.dot(p_t.to(do0.dtype), do0, dv0, input_precision=DOT_PREC)
        dk0 = tl.dot(ds_t.to(q0.dtype), q0, dk0, input_precision=DOT_PREC)
        if HAS_D1:
            dv1 = tl.dot(p_t.to(do1.dtype), do1, dv1, input_precision=DOT_PREC)
            dk1 = tl.dot(ds_t.to(q1.dtype), q1, dk1, input_precision=DOT_PREC)

    dk_base = DK + b.to(tl.int64) * sgkb + h.to(tl.int64) * sgkh
    dv_base = DV + b.to(tl.int64) * sgvb + h.to(tl.int64) * sgvh
    _store(dk_base, dk0 * sm_scale, offs_n, n_in, sgkn, offs_d0, D, sgkd, OFF64)
    _store(dv_base, dv0, offs_n, n_in, sgvn, offs_d0, D, sgvd, OFF64)
    if HAS_D1:
        _store(dk_base, dk1 * sm_scale, offs_n, n_in, sgkn, offs_d1, D, sgkd, OFF64)
        _store(dv_base, dv1, offs_n, n_in, sgvn, offs_d1, D, sgvd, OFF64)


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, MASK,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
                        sdb, sdh, sdm, sdd, sgqb, sgqh, sgqm, sgqd, smb, smn,
                        H, Lq, Lk, D, n_m_blocks, qk_scale, sm_scale,
                        HAS_MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr, HAS_D1: tl.constexpr,
                        UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, OFF64: tl.constexpr):
    """One query block: dQ = scale * dS K, summed over every key block."""
    pid = tl.program_id(0)
    bh = pid // n_m_blocks
    b = bh // H
    h = bh % H
    offs_m = (pid % n_m_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < Lq
    q_base = Q + b.to(tl.int64) * sqb + h.to(tl.int64) * sqh
    do_base = DO + b.to(tl.int64) * sdb + h.to(tl.int64) * sdh
    k_base = K + b.to(tl.int64) * skb + h.to(tl.int64) * skh
    v_base = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    row_base = bh.to(tl.int64) * Lq
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=float("inf"))
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)

    offs_d0 = tl.arange(0, BLOCK_D0)
    q0 = _load(q_base, offs_m, m_ok, sqm, offs_d0, D, sqd, OFF64, UPCAST)
    do0 = _load(do_base, offs_m, m_ok, sdm, offs_d0, D, sdd, OFF64, UPCAST)
    dq0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if HAS_D1:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        q1 = _load(q_base, offs_m, m_ok, sqm, offs_d1, D, sqd, OFF64, UPCAST)
        do1 = _load(do_base, offs_m, m_ok, sdm, offs_d1, D, sdd, OFF64, UPCAST)
        dq1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    for start_n in range(0, Lk, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = _keys_ok(MASK, b, offs_n, Lk, smb, smn, HAS_MASK)
        k0 = _load(k_base, offs_n, n_ok, skn, offs_d0, D, skd, OFF64, UPCAST)
        v0 = _load(v_base, offs_n, n_ok, svn, offs_d0, D, svd, OFF64, UPCAST)
        s = tl.dot(q0, tl.trans(k0), input_precision=DOT_PREC)
        dp = tl.dot(do0, tl.trans(v0), input_precision=DOT_PREC)
        if HAS_D1:
            k1 = _load(k_base, offs_n, n_ok, skn, offs_d1, D, skd, OFF64, UPCAST)
            v1 = _load(v_base, offs_n, n_ok, svn, offs_d1, D, svd, OFF64, UPCAST)
            s += tl.dot(q1, tl.trans(k1), input_precision=DOT_PREC)
            dp += tl.dot(do1, tl.trans(v1), input_precision=DOT_PREC)
        p = tl.where(n_ok[None, :], tl.exp2(s * qk_scale - lse[:, None]), 0.0)
        ds = p * (dp - delta[:, None])
        dq0 = tl.dot(ds.to(k0.dtype), k0, dq0, input_precision=DOT_PREC)
        if HAS_D1:
            dq1 = tl.dot(ds.to(k1.dtype), k1, dq1, input_precision=DOT_PREC)

    dq_base = DQ + b.to(tl.int64) * sgqb + h.to(tl.int64) * sgqh
    _store(dq_base, dq0 * sm_scale, offs_m, m_ok, sgqm, offs_d0, D, sgqd, OFF64)
    if HAS_D1:
        _store(dq_base, dq1 * sm_scale, offs_m, m_ok, sgqm, offs_d1, D, sgqd, OFF64)


def head_dim_blocks(D: int) -> Tuple[int, int]:
    """(BLOCK_D0, BLOCK_D1) covering D; BLOCK_D1 = 0 when one power-of-two chunk is cheapest.

    72 -> (64, 16), 88 -> (64, 32), 64 -> (64, 0), 20 -> (32, 0): a second chunk is used only
    when the two chunks together are narrower than the next power of two.
    """
    full = max(16, triton.next_power_of_2(D))
    lo = max(16, 1 << (D.bit_length() - 1))
    if lo < D:
        rest = max(16, triton.next_power_of_2(D - lo))
        if lo + rest < full:
            return lo, rest
    return full, 0


class Config(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def _tile(L: int, cap: int) -> int:
    """The smallest power of two >= L within [16, cap]: short sequences get short tiles."""
    return max(16, min(cap, triton.next_power_of_2(max(L, 1))))


def _short(Lq: int, Lk: int) -> bool:
    return max(Lq, Lk) <= 32


def _wide(D: int, dtype: torch.dtype) -> bool:
    """fp32 operands or head dims past 128: rows too wide for the large tiles' registers."""
    d0, d1 = head_dim_blocks(D)
    return dtype == torch.float32 or d0 + d1 > 128


# GPU tiles were chosen so that ptxas reports no register spills for fp16/bf16 at head dims 16, 64,
# 72 and 88 on sm_90 (fp32 and head dims >= 128 spill some: correctness paths, not the model's);
# short sequences (temporal attention) get tiles no wider than the sequence.
def forward_config(Lq: int, Lk: int, D: int, dtype: torch.dtype = torch.bfloat16) -> Config:
    if interpreting():
        # Small caps keep the tests' short sequences crossing tile boundaries.
        return Config(_tile(Lq, 32), _tile(Lk, 32), 4, 1)
    if _short(Lq, Lk):
        return Config(_tile(Lq, 32), _tile(Lk, 32), 4, 1)
    if _wide(D, dtype):
        bm, bn = _tile(Lq, 32), _tile(Lk, 32)
    else:
        bm = _tile(Lq, 128)
        bn = _tile(Lk, 64 if bm >= 128 else 32)
    return Config(bm, bn, 8 if bm >= 128 else 4, 3 if Lk > bn else 2)


def backward_config(Lq: int, Lk: int, D: int, dtype: torch.dtype = torch.bfloat16) -> Tuple[Config, Config]:
    """(dK/dV config: block_n resident keys, block_m the query loop; dQ config: block_m resident
    queries, block_n the key loop)."""
    if interpreting():
        cfg = Config(_tile(Lq, 32), _tile(Lk, 32), 4, 1)
        return cfg, cfg
    if _short(Lq, Lk):
        cfg = Config(16, 16, 4, 1)
        return cfg, cfg
    if _wide(D, dtype):
        cfg = Config(_tile(Lq, 32), _tile(Lk, 32), 4, 2)
        return cfg, cfg
    dkdv = Config(_tile(Lq, 32), _tile(Lk, 64), 8, 2)
    dq = Config(_tile(Lq, 128), _tile(Lk, 32), 8, 2)
    return dkdv, dq


def _dot_args(dtype: torch.dtype) -> Tuple[bool, str]:
    """(UPCAST, DOT_PREC): the interpreter computes in fp32; fp32 inputs use exact fp32 dots."""
    if interpreting():
        return True, "ieee"
    return False, "ieee" if dtype == torch.float32 else "tf32"


def _off64(*tensors: torch.Tensor) -> bool:
    """Whether an offset inside one head (rows x head dim, with a tile's overshoot) can pass int32."""
    span = max((t.shape[2] + 256) * abs(t.stride(2)) + 256 * abs(t.stride(3)) for t in tensors)
    return span >= 2**31


def _mask_args(mask: Optional[torch.Tensor], like: torch.Tensor):
    """(pointer tensor, stride_b, stride_n): a bool mask is read as bytes in place."""
    if mask is None:
        return like, 0, 0
    m = mask.view(torch.uint8)
    return m, m.stride(0), m.stride(1)


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: Optional[torch.Tensor],
            scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """O = softmax(q k^T * scale + mask) v. Returns (O (B, H, Lq, D) contiguous in q's dtype,
    lse (B*H, Lq) fp32 in log2 units; +inf for fully masked rows)."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    o = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype)
    lse = torch.empty((B * H, Lq), device=q.device, dtype=torch.float32)
    cfg = forward_config(Lq, Lk, D, q.dtype)
    d0, d1 = head_dim_blocks(D)
    upcast, prec = _dot_args(q.dtype)
    mask, smb, smn = _mask_args(key_padding_mask, q)
    n_m = triton.cdiv(Lq, cfg.block_m)
    _attn_fwd_kernel[(n_m * B * H,)](
        q, k, v, o, lse, mask, *q.stride(), *k.stride(), *v.stride(), *o.stride(), smb, smn,
        H, Lq, Lk, D, n_m, scale * LOG2E,
        HAS_MASK=key_padding_mask is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D0=d0, BLOCK_D1=max(d1, 16), HAS_D1=d1 > 0, UPCAST=upcast, DOT_PREC=prec,
        OFF64=_off64(q, k, v, o), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return o, lse


def backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
             lse: torch.Tensor, key_padding_mask: Optional[torch.Tensor], scale: float,
             needs_dq: bool = True, needs_dkdv: bool = True):
    """(dq, dk, dv), each contiguous in its input's dtype, or None where not needed."""
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cfg_kv, cfg_q = backward_config(Lq, Lk, D, q.dtype)
    d0, d1 = head_dim_blocks(D)
    upcast, prec = _dot_args(q.dtype)
    mask, smb, smn = _mask_args(key_padding_mask, q)
    off64 = _off64(q, k, v, o, do)
    consts = dict(HAS_MASK=key_padding_mask is not None, BLOCK_D0=d0, BLOCK_D1=max(d1, 16), HAS_D1=d1 > 0,
                  UPCAST=upcast, DOT_PREC=prec, OFF64=off64)

    delta = torch.empty((B * H, Lq), device=q.device, dtype=torch.float32)
    delta_rows = 64 if not interpreting() else 32
    n_m_delta = triton.cdiv(Lq, delta_rows)
    _attn_bwd_delta_kernel[(n_m_delta * B * H,)](
        o, do, delta, *o.stride(), *do.stride(), H, Lq, D, n_m_delta,
        BLOCK_M=delta_rows, BLOCK_D=max(16, triton.next_power_of_2(D)), OFF64=off64, num_warps=4,
    )

    dq = dk = dv = None
    if needs_dkdv:
        dk = torch.empty((B, H, Lk, D), device=k.device, dtype=k.dtype)
        dv = torch.empty((B, H, Lk, D), device=v.device, dtype=v.dtype)
        n_n = triton.cdiv(Lk, cfg_kv.block_n)
        _attn_bwd_dkdv_kernel[(n_n * B * H,)](
            q, k, v, do, lse, delta, dk, dv, mask, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dk.stride(), *dv.stride(), smb, smn, H, Lq, Lk, D, n_n, scale * LOG2E, scale, **consts,
            BLOCK_M=cfg_kv.block_m, BLOCK_N=cfg_kv.block_n, num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages,
        )
    if needs_dq:
        dq = torch.empty((B, H, Lq, D), device=q.device, dtype=q.dtype)
        n_m = triton.cdiv(Lq, cfg_q.block_m)
        _attn_bwd_dq_kernel[(n_m * B * H,)](
            q, k, v, do, lse, delta, dq, mask, *q.stride(), *k.stride(), *v.stride(), *do.stride(),
            *dq.stride(), smb, smn, H, Lq, Lk, D, n_m, scale * LOG2E, scale, **consts,
            BLOCK_M=cfg_q.block_m, BLOCK_N=cfg_q.block_n, num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages,
        )
    return dq, dk, dv

