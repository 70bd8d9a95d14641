"""osp.ops.group_norm and group_norm_fixed_stats: every backend against the float64 reference,
forward and all gradients; memory formats, the dtype rule and argument errors."""
import zlib

import pytest
import torch
import torch.nn.functional as F

import osp
from osp.ops import group_norm, group_norm_fixed_stats, group_norm_fixed_stats_reference, group_norm_reference
from parity import DEVICE, DTYPES, assert_parity

# (id, shape, groups): T=1 and 1+4k frames, odd H/W, 1 channel per group, channels per group not a
# power of two, 4-D images and 3-D sequences, batch > 1, groups split across several programs.
SHAPES = [
    ("video-T1", (2, 8, 1, 6, 10), 4),
    ("video-T5-oddHW", (2, 8, 5, 9, 11), 4),
    ("video-T17", (1, 16, 17, 6, 7), 8),
    ("1-channel-per-group", (2, 6, 5, 7, 5), 6),
    ("3-channels-per-group", (1, 24, 5, 5, 7), 8),
    ("one-group", (1, 12, 5, 4, 3), 1),
    ("image-4d", (2, 12, 9, 13), 4),
    ("sequence-3d", (3, 10, 37), 5),
    ("many-splits", (1, 4, 9, 40, 41), 2),
]
LAYOUTS = ["contiguous", "channels_last", "strided-view"]


def make_input(shape, layout, dtype, device=DEVICE):
    """Fresh random x (not centred: mean 1, std 3) in the requested memory layout."""
    if layout == "strided-view":
        # A slice with gaps in the channel and last spatial dims: neither layout is dense.
        big = torch.randn(shape[0], shape[1] * 2, *shape[2:-1], shape[-1] * 2, device=device) * 3 + 1
        x = big[:, ::2, ..., 1::2]
        assert x.shape == shape and not x.is_contiguous()
        return x.to(dtype)
    x = (torch.randn(shape, device=device) * 3 + 1).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last_3d if x.dim() == 5 else torch.channels_last)
    return x


def torch_group_norm_act(x, groups, w, b, eps, act):
    y = F.group_norm(x, groups, w, b, eps)
    return F.silu(y) if act == "silu" else y


def check_against_reference(shape, groups, layout, dtype, act="silu", affine=True, backend="triton"):
    seed = zlib.crc32(repr((shape, layout, str(dtype), act, affine)).encode())  # hash() of a str changes per process
    torch.manual_seed(seed)
    C = shape[1]
    x = make_input(shape, layout, dtype)
    w = (torch.randn(C, device=DEVICE) * 0.5 + 1).to(dtype) if affine else None
    b = (torch.randn(C, device=DEVICE) * 0.5).to(dtype) if affine else None
    leaves = [t for t in (x, w, b) if t is not None]
    for t in leaves:
        t.requires_grad_(True)

    out = group_norm(x, groups, w, b, 1e-6, act=act, backend=backend)
    if layout == "channels_last":
        assert out.stride() == x.stride(), f"output must keep the input's memory format (seed {seed})"
    dy = torch.randn(out.shape, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, leaves, dy)

    # PyTorch in the same dtype: its error sets the tolerance.
    torch_out = torch_group_norm_act(x, groups, w, b, 1e-6, act)
    torch_grads = torch.autograd.grad(torch_out, leaves, dy)

    # The float64 reference and its gradients.
    leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    x64, (w64, b64) = leaves64[0], (leaves64[1:] if affine else (None, None))
    ref = torch_group_norm_act(x64, groups, w64, b64, 1e-6, act)
    assert torch.allclose(ref, group_norm_reference(x64, groups, w64, b64, 1e-6, act), rtol=1e-10, atol=1e-10), \
        f"seed {seed}"
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double().cpu())

    assert_parity(out, ref, torch_out, f"y (seed {seed})")
    for name, g, tg, rg in zip(("dx", "dweight", "dbias"), grads, torch_grads, ref_grads):
        assert_parity(g, rg, tg, f"{name} (seed {seed})")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize(
    "shape,groups,layout",
    # channels_last exists for 2 and 3 spatial dims only
    [(shape, g, lay) for _, shape, g in SHAPES for lay in LAYOUTS if not (lay == "channels_last" and len(shape) == 3)],
    ids=[f"{name}-{lay}" for name, shape, _ in SHAPES for lay in LAYOUTS if not (lay == "channels_last" and len(shape) == 3)],
)
def test_triton_matches_reference(shape, groups, layout, dtype):
    check_against_reference(shape, groups, layout, dtype)


@pytest.mark.parametrize("act", [None, "silu"], ids=["no-act", "silu"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_variants(act, affine, backend):
    check_against_reference((2, 8, 5, 9, 11), 4, "channels_last", torch.float32, act=act, affine=affine,
                            backend=backend)
    check_against_reference((2, 8, 5, 9, 11), 4, "contiguous", torch.float16, act=act, affine=affine,
                            backend=backend)


def test_only_some_inputs_need_grad():
    x = make_input((2, 8, 5, 6, 7), "contiguous", torch.float32).requires_grad_(True)
    w = torch.randn(8, device=DEVICE)
    b = torch.randn(8, device=DEVICE).requires_grad_(True)
    out = group_norm(x, 4, w, b, act="silu", backend="triton")
    dx, db = torch.autograd.grad(out, (x, b), torch.ones_like(out))
    ref = torch_group_norm_act(x.double(), 4, w.double(), b.double(), 1e-6, "silu")
    rdx, rdb = torch.autograd.grad(ref, (x, b), torch.ones_like(ref))
    torch.testing.assert_close(dx, rdx.float(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(db, rdb.float(), rtol=1e-4, atol=1e-4)

    # Frozen input, trainable affine: dx is skipped, dweight still exact.
    x2 = x.detach()
    w2 = w.clone().requires_grad_(True)
    (dw,) = torch.autograd.grad(group_norm(x2, 4, w2, b.detach(), backend="triton").sum(), (w2,))
    (rdw,) = torch.autograd.grad(F.group_norm(x2.double(), 4, w2.double(), b.double(), 1e-6).sum(), (w2,))
    torch.testing.assert_close(dw, rdw.float(), rtol=1e-4, atol=1e-4)


def test_backward_accepts_a_differently_strided_gradient():
    x = make_input((2, 8, 5, 6, 7), "channels_last", torch.float32).requires_grad_(True)
    out = group_norm(x, 4, act="silu", backend="triton")
    dy = torch.randn(out.shape, device=DEVICE)  # contiguous while out is channels_last_3d
    (dx,) = torch.autograd.grad(out, x, dy)
    ref = torch_group_norm_act(x.double(), 4, None, None, 1e-6, "silu")
    (rdx,) = torch.autograd.grad(ref, x, dy.double())
    torch.testing.assert_close(dx, rdx.float(), rtol=1e-4, atol=1e-5)


def test_backends_agree_on_a_vae_sized_group():
    """Many elements per group (the VAE's case): split statistics must merge exactly."""
    x = (torch.randn(1, 64, 9, 24, 24, device=DEVICE) * 2 + 5).to(memory_format=torch.channels_last_3d)
    w, b = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    ref = group_norm_reference(x, 32, w, b, 1e-6, "silu")
    for backend in ("triton", "torch"):
        out = group_norm(x, 32, w, b, act="silu", backend=backend)
        torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=2e-5)


@pytest.mark.skipif(DEVICE != "cuda", reason="2**31 elements need a GPU (under the interpreter it would take hours)")
def test_int64_offsets_past_two_to_the_31():
    N, C, G = 1, 64, 32
    S = 2**31 // C + 1024  # x has more than 2**31 elements
    x = torch.randn(N, C, S, device="cuda", dtype=torch.float16)
    w = torch.randn(C, device="cuda", dtype=torch.float16)
    out = group_norm(x, G, w, w, act="silu", backend="triton")
    last = slice(C - C // G, C)  # the last group lives past element 2**31
    ref = group_norm_reference(x[:, last], 1, w[last], w[last], 1e-6, "silu")
    err = (out[:, last].double() - ref).abs().max().item()
    assert err < 2e-2, f"last group (beyond 2**31 elements) off by {err}"


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_norm(torch.randn(2, 6, 4, 4), 4), r"C=6 are not divisible by num_groups=4"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4), 4, torch.randn(5)), r"weight has shape \(5,\); expected \(8,\)"),
        (lambda: group_norm(torch.randn(2, 8, 4, 4), 4, None, torch.randn(8, 1)), r"bias has shape \(8, 1\)"),
        (lambda: group_norm(torch.ones(2, 8, 4, 4, dtype=torch.int64), 4), r"dtype torch.int64"),
        (lambda: group_norm(torch.randn(2, 8), 4), r"shape \(2, 8\) \(rank 2\)"),
        (lambda: group_norm(torch.randn(1, 2, 2, 2, 2, 2), 1), r"rank 6"),
        (lambda: group_norm(torch.randn(2, 8, 4), 0), r"num_groups=0"),
        (lambda: group_norm(torch.randn(2, 8, 4), 4, eps=-1.0), r"eps=-1.0"),
        (lambda: group_norm(torch.randn(2, 8, 4), 4, act="gelu"), r"act='gelu'"),
        (lambda: group_norm(torch.randn(2, 8, 4), 4, backend="cuda"), r"unknown backend 'cuda'"),
        (lambda: group_norm(torch.randn(2, 8, 4), 4, torch.randn(8).bfloat16()),
         r"weight has dtype torch.bfloat16 but x has torch.float32; expected torch.float32$"),
        (lambda: group_norm(torch.randn(2, 8, 4).half(), 4, None, torch.randn(8).bfloat16()),
         r"bias has dtype torch.bfloat16 but x has torch.float16; expected torch.float16 or torch.float32"),
        (lambda: group_norm(torch.randn(2, 8, 4).double(), 4, torch.randn(8)),
         r"weight has dtype torch.float32 but x has torch.float64"),
    ],
    ids=["groups-not-dividing", "weight-size", "bias-rank", "integer-dtype", "rank-2", "rank-6",
         "zero-groups", "negative-eps", "unknown-act", "unknown-backend", "bf16-weight-fp32-x", "bf16-bias-fp16-x",
         "fp32-weight-fp64-x"],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nn_group_norm_is_a_drop_in():
    torch.manual_seed(0)
    ref = torch.nn.GroupNorm(4, 8)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = osp.nn.GroupNorm(4, 8, act="silu")
    assert set(ours.state_dict()) == {"weight", "bias"}
    ours.load_state_dict(ref.state_dict())
    assert ours.eps == ref.eps
    x = make_input((2, 8, 5, 6, 7), "channels_last", torch.float32)
    for backend in ("triton", "torch"):
        with osp.ops.use_backend(backend):
            torch.testing.assert_close(ours(x), F.silu(ref(x)), rtol=1e-5, atol=1e-5)
    plain = osp.nn.GroupNorm(4, 8, affine=False)
    assert plain.weight is None and set(plain.state_dict()) == set()
    torch.testing.assert_close(plain(x), F.group_norm(x, 4, eps=1e-5), rtol=1e-5, atol=1e-5)
    assert "act='silu'" in repr(ours)
    with pytest.raises(ValueError, match="act='relu'"):
        osp.nn.GroupNorm(4, 8, act="relu")
    with pytest.raises(ValueError, match="num_channels=10 is not divisible by num_groups=4"):
        osp.nn.GroupNorm(4, 10)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_fp32_parameters_next_to_a_16_bit_input(backend):
    """As F.group_norm: float32 weight and bias with an fp16 x; the output keeps x's dtype and each
    gradient its leaf's dtype."""
    x = make_input((2, 8, 5, 6, 7), "channels_last", torch.float16).requires_grad_(True)
    w = (torch.randn(8, device=DEVICE) * 0.5 + 1).requires_grad_(True)
    b = torch.randn(8, device=DEVICE).requires_grad_(True)
    out = group_norm(x, 4, w, b, act="silu", backend=backend)
    assert out.dtype == torch.float16 and out.stride() == x.stride()
    dy = torch.randn(out.shape, device=DEVICE).half()
    grads = torch.autograd.grad(out, (x, w, b), dy)
    assert [g.dtype for g in grads] == [torch.float16, torch.float32, torch.float32]
    torch_out = torch_group_norm_act(x, 4, w.half(), b.half(), 1e-6, "silu")
    leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in (x, w, b)]
    ref = torch_group_norm_act(*leaves64[:1], 4, *leaves64[1:], 1e-6, "silu")
    assert_parity(out, ref, torch_out, "y")
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double().cpu())
    torch_grads = torch.autograd.grad(torch_out, (x, w, b), dy)
    for name, g, tg, rg in zip(("dx", "dweight", "dbias"), grads, torch_grads, ref_grads):
        assert_parity(g, rg, tg, name)


# group_norm_fixed_stats: (id, shape, groups, layout, act, affine).
FIXED_CASES = [
    ("video-cl3d-silu", (2, 8, 5, 6, 7), 4, "channels_last", "silu", True),
    ("video-contiguous", (1, 12, 5, 4, 3), 3, "contiguous", None, True),
    ("image-cl-no-affine", (2, 12, 9, 13), 4, "channels_last", "silu", False),
    ("sequence-strided", (3, 10, 37), 5, "strided-view", None, True),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("shape,groups,layout,act,affine", [c[1:] for c in FIXED_CASES], ids=[c[0] for c in FIXED_CASES])
def test_fixed_stats_matches_reference(shape, groups, layout, act, affine, dtype):
    """Statistics of another tensor (a whole video, while x is one tile), float64 as tiling passes them."""
    seed = zlib.crc32(repr((shape, layout, act, affine, str(dtype))).encode())
    torch.manual_seed(seed)
    C = shape[1]
    x = make_input(shape, layout, dtype)
    whole = make_input(shape, "contiguous", torch.float32).double().reshape(shape[0], groups, -1) * 1.5
    mean, rstd = whole.mean(-1), torch.rsqrt(whole.var(-1, unbiased=False) + 1e-6)
    w = (torch.randn(C, device=DEVICE) * 0.5 + 1).to(dtype) if affine else None
    b = (torch.randn(C, device=DEVICE) * 0.5).to(dtype) if affine else None
    leaves = [t.requires_grad_(True) for t in (x, w, b) if t is not None]

    out = group_norm_fixed_stats(x, groups, mean, rstd, w, b, act=act)
    assert out.dtype == dtype and out.shape == x.shape, f"seed {seed}"
    if layout == "channels_last":
        assert out.stride() == x.stride(), f"output must keep the input's memory format (seed {seed})"
    dy = torch.randn(out.shape, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, leaves, dy)

    def formula(x, mean, rstd, w, b):  # PyTorch in x's dtype: its error sets the tolerance
        N = x.shape[0]
        y = ((x.reshape(N, groups, -1) - mean[:, :, None]) * rstd[:, :, None]).reshape(x.shape)
        per_channel = (1, C) + (1,) * (x.dim() - 2)
        y = y * w.view(per_channel) + b.view(per_channel) if affine else y
        return F.silu(y) if act == "silu" else y

    torch_out = formula(x, mean.to(dtype), rstd.to(dtype), w, b)
    torch_grads = torch.autograd.grad(torch_out, leaves, dy)
    leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    x64, (w64, b64) = leaves64[0], (leaves64[1:] if affine else (None, None))
    ref = formula(x64, mean.cpu(), rstd.cpu(), w64, b64)
    torch.testing.assert_close(ref, group_norm_fixed_stats_reference(x64, groups, mean, rstd, w64, b64, act),
                               rtol=1e-12, atol=1e-12, msg=lambda m: f"{m} (seed {seed})")
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double().cpu())
    assert_parity(out, ref, torch_out, f"y (seed {seed})")
    for name, g, tg, rg in zip(("dx", "dweight", "dbias"), grads, torch_grads, ref_grads):
        assert_parity(g, rg, tg, f"{name} (seed {seed})")


def test_fixed_stats_of_the_input_itself_equal_group_norm():
    x = make_input((2, 8, 5, 6, 7), "channels_last", torch.float32)
    w, b = torch.randn(8, device=DEVICE), torch.randn(8, device=DEVICE)
    xg = x.double().reshape(2, 4, -1)
    mean, rstd = xg.mean(-1), torch.rsqrt(xg.var(-1, unbiased=False) + 1e-6)
    out = group_norm_fixed_stats(x, 4, mean.float(), rstd.float(), w, b, act="silu")
    torch.testing.assert_close(out, group_norm(x, 4, w, b, act="silu", backend="torch"), rtol=1e-5, atol=1e-5)
    op = osp.ops.registered_ops()["group_norm_fixed_stats"]
    assert op.group == "group_norm" and op.explain(x, 4, mean, rstd, w, b, "silu") == {"torch": None}


def test_nn_group_norm_fixed_stats_go_through_ops(monkeypatch):
    m = osp.nn.GroupNorm(4, 8, act="silu").to(DEVICE)
    x = make_input((1, 8, 3, 4, 5), "channels_last", torch.float32)
    mean, rstd = torch.zeros(1, 4, device=DEVICE), torch.ones(1, 4, device=DEVICE)
    m.fixed_stats = (mean, rstd)
    calls = []
    real = osp.ops.group_norm_fixed_stats
    monkeypatch.setattr(osp.ops, "group_norm_fixed_stats", lambda *a, **k: calls.append(a) or real(*a, **k))
    out = m(x)
    assert len(calls) == 1 and out.stride() == x.stride()
    torch.testing.assert_close(out, F.silu(x * m.weight.view(1, 8, 1, 1, 1) + m.bias.view(1, 8, 1, 1, 1)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 3), torch.ones(2, 4)),
         r"group_norm_fixed_stats: mean has shape \(2, 3\); expected \(N, G\) = \(2, 4\) for x \(2, 8, 4\)"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4), torch.ones(4)),
         r"rstd has shape \(4,\); expected \(N, G\) = \(2, 4\)"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4), [1.0]), r"rstd has shape list"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4, dtype=torch.int64), torch.ones(2, 4)),
         r"mean has dtype torch.int64; expected a floating dtype"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4, device="meta"), torch.ones(2, 4)),
         r"mean is on meta but x is on cpu"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 6, 4), 4, torch.zeros(2, 4), torch.ones(2, 4)),
         r"group_norm_fixed_stats: channels C=6 are not divisible by num_groups=4"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4), torch.ones(2, 4), torch.randn(5)),
         r"group_norm_fixed_stats: weight has shape \(5,\); expected \(8,\)"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4), torch.ones(2, 4), torch.randn(8).half()),
         r"group_norm_fixed_stats: weight has dtype torch.float16 but x has torch.float32"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4), torch.ones(2, 4), act="gelu"),
         r"group_norm_fixed_stats: act='gelu'"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8), 4, torch.zeros(2, 4), torch.ones(2, 4)), r"rank 2"),
        (lambda: group_norm_fixed_stats(torch.randn(2, 8, 4), 4, torch.zeros(2, 4), torch.ones(2, 4), backend="triton"),
         r"unknown backend 'triton'"),
    ],
    ids=["mean-shape", "rstd-shape", "rstd-not-tensor", "mean-integer", "mean-device", "groups-not-dividing",
         "weight-size", "weight-dtype", "unknown-act", "rank-2", "unknown-backend"],
)
def test_fixed_stats_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
