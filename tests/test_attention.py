"""osp.ops.attention: every available backend against the float64 reference, forward and dq, dk, dv."""
import importlib
import importlib.util
import math

import pytest
import torch

import osp
from osp.ops import BackendUnavailable, attention, attention_reference
from parity import DEVICE, DTYPES, assert_parity

attn_mod = importlib.import_module("osp.ops.attention")
ATTENTION = attn_mod.ATTENTION
BACKENDS = ["triton", "torch", "flash_attn", "xformers"]
# The optional packages are tested only where they are installed.
PACKAGES = {"flash_attn": "flash_attn", "xformers": "xformers.ops"}

# (id, B, H, Lq, Lk, D, mask, layout). mask: None, "few" (batch 1 keeps 2 keys, batch 0 keeps a
# random half) or "empty" (batch 1 attends to nothing). Under the interpreter tiles are at most
# 32 wide, so L = 33 and 40 cross tile boundaries.
CASES = [
    ("spatial-D72", 1, 2, 40, 40, 72, None, "contiguous"),
    ("spatial-D88-batch2", 2, 1, 24, 24, 88, None, "contiguous"),
    ("temporal-L5-batch4", 4, 1, 5, 5, 16, None, "contiguous"),
    ("temporal-L17-D72", 2, 2, 17, 17, 72, None, "contiguous"),
    ("cross-masked-few-keys", 2, 2, 33, 20, 72, "few", "contiguous"),
    ("cross-fully-masked-row", 2, 1, 9, 13, 88, "empty", "contiguous"),
    ("packed-qkv-slices", 2, 2, 17, 17, 16, None, "packed"),
    ("cross-masked-kv-view", 2, 2, 12, 37, 16, "few", "packed"),
]


def make_inputs(B, H, Lq, Lk, D, mask, layout, dtype, device=DEVICE, seed=0):
    """Fresh random q, k, v (std 1, queries scaled up so the softmax is not flat) and a mask."""
    g = torch.Generator().manual_seed(seed)
    if layout == "packed":
        # Slices of one packed projection, as a model gets them from a fused qkv Linear:
        # (B, L, 3, H, D) -> q, k, v (B, H, L, D) with strides (L*3*H*D, D, 3*H*D, 1).
        Lmax = max(Lq, Lk)
        qkv = torch.randn(B, Lmax, 3, H, D, generator=g).to(device=device, dtype=dtype)
        q, k, v = (qkv[:, :L, i].transpose(1, 2) for i, L in zip(range(3), (Lq, Lk, Lk)))
        q = q * 2
        assert not q.is_contiguous() and not k.is_contiguous()
    else:
        q = (torch.randn(B, H, Lq, D, generator=g) * 2).to(device=device, dtype=dtype)
        k = torch.randn(B, H, Lk, D, generator=g).to(device=device, dtype=dtype)
        v = torch.randn(B, H, Lk, D, generator=g).to(device=device, dtype=dtype)
    m = None
    if mask is not None:
        m = torch.rand(B, Lk, generator=g) < 0.5
        m[:, 0] = True
        if mask == "few":
            m[1] = False
            m[1, [3, Lk - 1]] = True
        elif mask == "empty":
            m[1] = False
        m = m.to(device)
    return q, k, v, m


def skip_unless_usable(backend, q, k, v, mask):
    if backend in PACKAGES:
        pytest.importorskip(PACKAGES[backend])
    reason = ATTENTION.backends[backend].why_not(q, k, v, mask, None, forced=True)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def check_against_reference(backend, B, H, Lq, Lk, D, mask, layout, dtype, scale=None, seed=0):
    q, k, v, m = make_inputs(B, H, Lq, Lk, D, mask, layout, dtype, seed=seed)
    skip_unless_usable(backend, q, k, v, m)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, key_padding_mask=m, scale=scale, backend=backend)
    assert out.shape == (B, H, Lq, D) and out.dtype == dtype
    dy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, dy)

    # torch's SDPA in the same dtype: its error sets the tolerance.
    tleaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    torch_out = attention(*tleaves, key_padding_mask=m, scale=scale, backend="torch")
    torch_grads = torch.autograd.grad(torch_out, tleaves, dy)

    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_reference(*leaves64, key_padding_mask=m, scale=scale)
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())

    assert_parity(out, ref, torch_out, "out")
    for name, g_, tg, rg in zip(("dq", "dk", "dv"), grads, torch_grads, ref_grads):
        assert g_.shape == rg.shape and g_.dtype == dtype
        assert_parity(g_, rg, tg, name)
    return out, grads, m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("case", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_matches_reference(case, dtype, backend):
    check_against_reference(backend, *case, dtype)


def test_reference_matches_an_explicit_masked_softmax():
    q, k, v, m = make_inputs(2, 3, 7, 11, 8, "few", "contiguous", torch.float64, device="cpu")
    s = q @ k.transpose(-1, -2) * 0.37
    s = s + torch.where(m, 0.0, float("-inf"))[:, None, None, :].double()
    expected = torch.softmax(s, -1) @ v
    torch.testing.assert_close(attention_reference(q, k, v, m, scale=0.37), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(attention_reference(q, k, v), torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), -1) @ v,
                               rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fully_masked_rows_are_zero_with_zero_gradients(backend):
    dtype = torch.float16 if DEVICE == "cuda" else torch.float32
    q, k, v, m = make_inputs(3, 2, 6, 10, 16, None, "contiguous", dtype)
    m = torch.ones(3, 10, dtype=torch.bool, device=DEVICE)
    m[1] = False  # batch 1 attends to nothing
    m[2, 4:] = False
    skip_unless_usable(backend, q, k, v, m)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out = attention(*leaves, key_padding_mask=m, backend=backend)
    dq, dk, dv = torch.autograd.grad(out, leaves, torch.randn_like(out))
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv)):
        assert not torch.isnan(t).any(), f"{name} has NaN"
        assert (t[1] == 0).all(), f"{name} of the fully masked batch is not exactly zero"
    # Padded keys of a partly masked batch get no gradient either; its other rows are ordinary.
    assert (dk[2, :, 4:] == 0).all() and (dv[2, :, 4:] == 0).all()
    assert out[0].abs().sum() > 0 and out[2].abs().sum() > 0
    assert (attention_reference(q, k, v, m)[1] == 0).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_scale(backend):
    check_against_reference(backend, 1, 2, 19, 21, 16, "few" if False else None, "contiguous", torch.float32, scale=0.3)
    check_against_reference(backend, 2, 1, 19, 21, 72, "few", "contiguous", torch.float32, scale=1.7)


@pytest.mark.parametrize("which", ["q-only", "kv-only"])
def test_triton_only_some_inputs_need_grad(which):
    q, k, v, m = make_inputs(2, 1, 9, 12, 16, "few", "contiguous", torch.float32)
    want = (True, False, False) if which == "q-only" else (False, True, True)
    leaves = [t.detach().requires_grad_(w) for t, w in zip((q, k, v), want)]
    out = attention(*leaves, key_padding_mask=m, backend="triton")
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, [t for t in leaves if t.requires_grad], dy)
    leaves64 = [t.detach().double().requires_grad_(w) for t, w in zip((q, k, v), want)]
    ref = attention_reference(*leaves64, key_padding_mask=m)
    ref_grads = torch.autograd.grad(ref, [t for t in leaves64 if t.requires_grad], dy.double())
    for g_, rg in zip(grads, ref_grads):
        torch.testing.assert_close(g_.double(), rg, rtol=1e-4, atol=1e-5)


def test_triton_backward_is_deterministic():
    q, k, v, m = make_inputs(2, 2, 33, 40, 72, "few", "contiguous", torch.float32)
    runs = []
    for _ in range(2):
        leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
        out = attention(*leaves, key_padding_mask=m, backend="triton")
        runs.append(torch.autograd.grad(out, leaves, torch.ones_like(out)))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_triton_accepts_a_stride_zero_gradient():
    """out.sum().backward() hands the backward an expanded (all strides 0) gradient."""
    q, k, v, m = make_inputs(2, 2, 9, 20, 72, "few", "packed", torch.float32)
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    attention(*leaves, key_padding_mask=m, backend="triton").sum().backward()
    leaves64 = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    attention_reference(*leaves64, key_padding_mask=m).sum().backward()
    for t, r in zip(leaves, leaves64):
        torch.testing.assert_close(t.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


def test_empty_batch_or_queries():
    for B, Lq in ((0, 4), (1, 0)):
        q, k = torch.randn(B, 2, Lq, 8, device=DEVICE), torch.randn(B, 2, 5, 8, device=DEVICE)
        mask = torch.ones(B, 5, dtype=torch.bool, device=DEVICE)
        assert attention(q, k, k, key_padding_mask=mask).shape == (B, 2, Lq, 8)
        assert ATTENTION.backends["triton"].why_not(q, k, k, mask, None, forced=True) == "empty tensor"


@pytest.mark.skipif(DEVICE != "cpu", reason="on a GPU the native-operand path is the default one")
def test_triton_native_operand_path_in_the_interpreter(monkeypatch):
    """The GPU path (fp16 dot operands, P and dS rounded to fp16 before their dots) run by the
    interpreter, which otherwise upcasts every load: checks the casts the GPU relies on."""
    kernel = pytest.importorskip("osp.kernels.attention")
    monkeypatch.setattr(kernel, "_dot_args", lambda dtype: (False, "ieee" if dtype == torch.float32 else "tf32"))
    check_against_reference("triton", 2, 2, 33, 40, 72, "few", "packed", torch.float16)
    check_against_reference("triton", 2, 1, 17, 17, 88, "empty", "contiguous", torch.float16)


def test_head_dim_chunks():
    kernel = pytest.importorskip("osp.kernels.attention")
    assert kernel.head_dim_blocks(72) == (64, 16)
    assert kernel.head_dim_blocks(88) == (64, 32)
    assert kernel.head_dim_blocks(64) == (64, 0)
    assert kernel.head_dim_blocks(16) == (16, 0)
    assert kernel.head_dim_blocks(8) == (16, 0)
    assert kernel.head_dim_blocks(20) == (32, 0)
    assert kernel.head_dim_blocks(160) == (128, 32)


def test_short_sequences_get_short_tiles():
    """Temporal attention (5 to 17 frames) must not pad every sequence to a 64- or 128-wide tile."""
    kernel = pytest.importorskip("osp.kernels.attention")
    for L in (5, 17):
        fitted = max(16, 1 << (L - 1).bit_length())
        cfg = kernel.forward_config(L, L, 72)
        assert cfg.block_m == cfg.block_n == fitted
        for c in kernel.backward_config(L, L, 72):
            assert max(c.block_m, c.block_n) <= fitted


# --- dispatch ------------------------------------------------------------------------------------

def test_automatic_choice_and_reasons():
    q, k, v, m = make_inputs(2, 2, 8, 8, 16, "few", "contiguous", torch.float32)
    reasons = ATTENTION.explain(q, k, v, m, None)
    assert list(reasons) == ["flash_attn", "triton", "xformers", "torch"]
    assert reasons["torch"] is None
    for name, module in PACKAGES.items():
        if importlib.util.find_spec(module.split(".")[0]) is None:
            assert "not installed" in reasons[name], reasons[name]
    if DEVICE == "cpu":
        assert reasons["triton"] is not None  # the interpreter runs only when forced
        assert ATTENTION.select((q, k, v, m, None), {}).name == "torch"
    double = [t.double() for t in (q, k, v)]
    assert "float64" in ATTENTION.backends["triton"].why_not(*double, m, None, forced=True)
    big = torch.randn(1, 1, 4, 264, device=DEVICE)
    assert "head dim 264" in ATTENTION.backends["triton"].why_not(big, big, big, None, None, forced=True)
    torch.testing.assert_close(attention(big.double(), big.double(), big.double()),
                               attention_reference(big, big, big), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_forcing_a_missing_package_lists_the_reasons(backend):
    if importlib.util.find_spec(PACKAGES[backend].split(".")[0]) is not None:
        pytest.skip(f"{backend} is installed")
    q, k, v, _ = make_inputs(1, 1, 4, 4, 16, None, "contiguous", torch.float32)
    with pytest.raises(BackendUnavailable, match=rf"{backend}.*not installed(.|\n)*torch: usable"):
        attention(q, k, v, backend=backend)
    with osp.ops.use_backend(attention=backend), pytest.raises(BackendUnavailable, match="not installed"):
        attention(q, k, v)


# --- the optional packages' argument plumbing, checked against torch stand-ins ---------------------
# These stand-ins implement flash_attn's and xformers' documented layouts in plain torch. They do not
# test those packages (the parametrized tests above do, where they are installed); they test that
# our code hands them correctly laid out arguments and reassembles their outputs.

class FlashAttnStandIn:
    """flash_attn_func / flash_attn_varlen_func semantics: (B, L, H, D) and (total, H, D) layouts."""

    @staticmethod
    def _check(*ts):
        for t in ts:
            assert t.stride(-1) == 1, "flash-attn needs a contiguous last dim"

    @staticmethod
    def _attend(q, k, v, scale):  # q (Lq, H, D), k/v (Lk, H, D)
        s = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale
        return torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v.double()).to(q.dtype)

    def flash_attn_func(self, q, k, v, softmax_scale=None):
        self._check(q, k, v)
        assert q.dim() == 4 and q.shape[0] == k.shape[0] and q.shape[2:] == k.shape[2:]
        return torch.stack([self._attend(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])

    def flash_attn_varlen_func(self, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                               softmax_scale=None):
        self._check(q, k, v)
        assert q.dim() == k.dim() == v.dim() == 3 and k.shape == v.shape
        assert cu_seqlens_q.dtype == cu_seqlens_k.dtype == torch.int32
        assert int(cu_seqlens_q[-1]) == q.shape[0] and int(cu_seqlens_k[-1]) == k.shape[0]
        lens_q, lens_k = cu_seqlens_q.diff(), cu_seqlens_k.diff()
        assert int(lens_q.max()) <= max_seqlen_q and int(lens_k.max()) <= max_seqlen_k
        assert int(lens_k.min()) > 0, "a fully masked batch must not reach the kernel with no keys"
        out = torch.empty_like(q)
        for b in range(len(lens_q)):
            sq = slice(int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1]))
            sk = slice(int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1]))
            out[sq] = self._attend(q[sq], k[sk], v[sk], softmax_scale)
        return out


class XformersStandIn:
    """memory_efficient_attention semantics: (B, M, H, K) inputs, an additive (B, H, Mq, Mk) bias."""

    @staticmethod
    def memory_efficient_attention(query, key, value, attn_bias=None, scale=None):
        B, Mq, H, _ = query.shape
        s = torch.einsum("bqhd,bkhd->bhqk", query.double(), key.double()) * scale
        if attn_bias is not None:
            assert attn_bias.shape == (B, H, Mq, key.shape[1]) and attn_bias.dtype == query.dtype
            assert attn_bias.stride(-1) == 1 and attn_bias.storage_offset() == 0
            assert all(st % 8 == 0 for st in attn_bias.stride()[:-1]), "bias rows must be 16-byte aligned"
            s = s + attn_bias.double()
        assert not torch.isinf(s).all(-1).any(), "a row with no finite logit would be NaN"
        return torch.einsum("bhqk,bkhd->bqhd", torch.softmax(s, -1), value.double()).to(query.dtype)


@pytest.mark.parametrize("mask", [None, "few", "empty"])
@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_optional_backend_plumbing(backend, mask):
    q, k, v, m = make_inputs(3, 2, 7, 13, 16, mask, "packed", torch.float32, device="cpu")
    if mask == "empty":
        m[2] = False
    if backend == "flash_attn":
        out = attn_mod._flash_run(q, k, v, m, None, module=FlashAttnStandIn())
    else:
        out = attn_mod._xformers_run(q, k, v, m, None, module=XformersStandIn())
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), attention_reference(q, k, v, m), rtol=1e-5, atol=1e-6)


def test_flash_varlen_inputs_gather_the_kept_keys():
    q, k, v, m = make_inputs(2, 3, 4, 6, 8, "few", "contiguous", torch.float32, device="cpu")
    q_flat, k_unpad, v_unpad, cu_q, cu_k, max_q, max_k, has_key = attn_mod.flash_varlen_inputs(q, k, v, m)
    assert cu_q.tolist() == [0, 4, 8] and (max_q, max_k) == (4, 6)
    assert cu_k.tolist() == [0, int(m[0].sum()), int(m.sum())]
    keys0 = m[0].nonzero().flatten()
    torch.testing.assert_close(k_unpad[: int(m[0].sum())], k[0][:, keys0].transpose(0, 1))
    torch.testing.assert_close(v_unpad[int(m[0].sum()):], v[1][:, m[1]].transpose(0, 1))
    torch.testing.assert_close(q_flat.view(2, 4, 3, 8).transpose(1, 2), q)
    assert has_key.tolist() == [True, True]


# --- validation ----------------------------------------------------------------------------------

def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, device=device).to(dtype) if dtype.is_floating_point else torch.ones(*shape, dtype=dtype)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: attention(_t(2, 8, 16), _t(2, 8, 16), _t(2, 8, 16)), r"q has shape \(2, 8, 16\) \(rank 3\)"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 6, 8)), r"k has shape \(1, 2, 5, 8\) but v has \(1, 2, 6, 8\)"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 16), _t(1, 2, 5, 16)), r"expected \(1, 2, Lk, 8\)"),
        (lambda: attention(_t(1, 2, 4, 8), _t(2, 2, 5, 8), _t(2, 2, 5, 8)), r"expected \(1, 2, Lk, 8\)"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 0, 8), _t(1, 2, 0, 8)), r"at least one key"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8, dtype=torch.float16), _t(1, 2, 5, 8)), r"expected one dtype"),
        (lambda: attention(*(_t(1, 2, 4, 8, dtype=torch.int64),) * 3), r"q has dtype torch.int64"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8, device="meta")), r"expected one device"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8), key_padding_mask=torch.ones(1, 5)),
         r"key_padding_mask has dtype torch.float32; expected torch.bool"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8), key_padding_mask=torch.ones(1, 4, dtype=torch.bool)),
         r"key_padding_mask has shape \(1, 4\); expected \(B, Lk\) = \(1, 5\)"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8),
                           key_padding_mask=torch.ones(1, 5, dtype=torch.bool, device="meta")), r"key_padding_mask is on meta"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8), scale=float("nan")), r"scale=nan"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8), key_padding_mask=[True] * 5), r"got list"),
        (lambda: attention(_t(1, 2, 4, 8), _t(1, 2, 5, 8), _t(1, 2, 5, 8), backend="sdpa"), r"unknown backend 'sdpa'"),
    ],
    ids=["rank-3", "k-v-shapes", "head-dim-mismatch", "batch-mismatch", "no-keys", "mixed-dtypes", "integer-dtype",
         "devices", "float-mask", "mask-shape", "mask-device", "nan-scale", "list-mask", "unknown-backend"],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- GPU only: sizes the interpreter cannot afford -----------------------------------------------

@pytest.mark.skipif(DEVICE != "cuda", reason="many tiles per sequence and huge batches need a GPU")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "case",
    [(1, 3, 300, 257, 72, "few", "contiguous"), (1, 2, 1000, 1000, 88, None, "packed"),
     (2, 2, 513, 120, 72, "empty", "contiguous")],
    ids=["cross-300x257-D72", "spatial-1000-D88-packed", "cross-fully-masked-513x120"],
)
def test_gpu_long_sequences(case, dtype):
    check_against_reference("triton", *case, dtype)


@pytest.mark.skipif(DEVICE != "cuda", reason="a batch past the 65535 grid limit needs a GPU")
def test_gpu_temporal_batch_past_the_grid_limit():
    """Temporal attention of a 2 x 32 x 32 latent with 16 heads x 2 (B*H = 70000 > 65535), L = 17."""
    q, k, v, _ = make_inputs(4375, 16, 17, 17, 72, None, "packed", torch.bfloat16)
    out = attention(q, k, v, backend="triton")
    ref = attention_reference(q, k, v)
    torch_out = attention(q, k, v, backend="torch")
    assert_parity(out, ref, torch_out, "out")
