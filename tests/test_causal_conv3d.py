"""osp.ops.causal_conv3d and osp.nn.CausalConv3d: every backend against the float64 reference,
forward and all gradients (dx, dweight, dbias, dresidual) under a random upstream gradient; the
streaming history= form (chunked video) against the same reference; the folded nearest upsample
(upsample=(1, 2, 2)) against interpolate-then-conv, and that it never builds the upsampled tensor."""
import itertools
import zlib

import pytest
import torch
import torch.nn.functional as F

import osp
from osp.ops import BackendUnavailable, causal_conv3d, causal_conv3d_reference
from parity import DEVICE, DTYPES, assert_parity

# (id, (N, Cin, Cout, T, H, W), kernel (kt, kh, kw), stride, spatial padding, residual).
# T = 1 and 1+4k, odd H and W, channel counts that fill no block, batch > 1, every kt in 1..3 with
# st 1 and 2 (st 2 with kt 1, 2, 3 puts 0, 1 or 2 replicated frames before an output), the
# encoder's (1,3,3)/(1,2,2) downsample, 1x1x1 shortcuts with the residual epilogue, and one case
# wide enough for several channel blocks (the interpreter's blocks hold 64 channels).
CASES = [
    ("k333-s111-p1-T5", (2, 3, 5, 5, 7, 6), (3, 3, 3), (1, 1, 1), 1, False),
    ("k333-s111-p1-T1-res", (1, 4, 8, 1, 5, 7), (3, 3, 3), (1, 1, 1), 1, True),
    ("k333-s211-p0-T9", (1, 3, 5, 9, 5, 5), (3, 3, 3), (2, 1, 1), 0, False),
    ("k133-s122-p0-T5", (2, 4, 8, 5, 9, 7), (1, 3, 3), (1, 2, 2), 0, False),
    ("k311-s211-p0-T9-res", (1, 5, 3, 9, 4, 6), (3, 1, 1), (2, 1, 1), 0, True),
    ("k211-s111-p0-T5", (2, 3, 5, 5, 3, 5), (2, 1, 1), (1, 1, 1), 0, False),
    ("k212-s211-p1-T5", (1, 3, 4, 5, 3, 5), (2, 1, 2), (2, 1, 1), 1, False),
    ("k232-s122-p1-T1", (2, 3, 5, 1, 6, 5), (2, 3, 2), (1, 2, 2), 1, False),
    ("k323-s211-p1-T5-res", (1, 4, 3, 5, 5, 6), (3, 2, 3), (2, 1, 1), 1, True),
    ("k333-s222-p1-T9", (1, 3, 4, 9, 7, 8), (3, 3, 3), (2, 2, 2), 1, False),
    ("k111-s111-p0-T5-res", (2, 3, 5, 5, 4, 3), (1, 1, 1), (1, 1, 1), 0, True),
    ("k111-C70-T9-res", (1, 70, 70, 9, 3, 3), (1, 1, 1), (1, 1, 1), 0, True),
]
LAYOUTS = ["contiguous", "channels_last"]
DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@pytest.fixture(autouse=True)
def exact_fp32_convs(monkeypatch):
    """fp32 means fp32 here: cuDNN may otherwise run F.conv3d (and the kernel follows it) in tf32."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def make_input(shape, layout, dtype, device=DEVICE):
    """Fresh random x (mean 0.5, std 1.5) in the requested memory layout."""
    if layout == "strided-view":
        N, C, T, H, W = shape
        big = torch.randn(N, 2 * C, T, H, 2 * W, device=device) * 1.5 + 0.5
        x = big[:, 1::2, ..., ::2]
        assert x.shape == shape and not x.is_contiguous()
        return x.to(dtype)
    x = (torch.randn(shape, device=device) * 1.5 + 0.5).to(dtype)
    return x.to(memory_format=torch.channels_last_3d) if layout == "channels_last" else x


def upstream_causal_conv3d(x, w, b, stride, padding, residual=None):
    """Open-Sora-Plan's formulation: replicate frame 0 kt-1 times, concatenate, F.conv3d."""
    kt = w.shape[2]
    xp = torch.cat([x[:, :, :1].repeat(1, 1, kt - 1, 1, 1), x], dim=2)
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    y = F.conv3d(xp, w, b, stride, (0, ph, pw))
    return y if residual is None else y + residual


def stable_seed(*key) -> int:
    """A seed equal in every process (hash() of a str is salted per process); failures print it."""
    return zlib.crc32(repr(key).encode())


def check_against_reference(sizes, kernel, stride, padding, with_residual, layout, dtype, backend, with_bias=True):
    N, Cin, Cout, T, H, W = sizes
    seed = stable_seed(sizes, kernel, stride, padding, layout, str(dtype))
    torch.manual_seed(seed)
    x = make_input((N, Cin, T, H, W), layout, dtype)
    fan_in = Cin * kernel[0] * kernel[1] * kernel[2]
    w = (torch.randn(Cout, Cin, *kernel, device=DEVICE) / fan_in ** 0.5).to(dtype)
    b = (torch.randn(Cout, device=DEVICE) * 0.5).to(dtype) if with_bias else None
    ref_shape = causal_conv3d_reference(x, w, b, stride=stride, padding=padding).shape
    res = make_input(tuple(ref_shape), layout, dtype) if with_residual else None
    leaves = [t for t in (x, w, b, res) if t is not None]
    for t in leaves:
        t.requires_grad_(True)

    out = causal_conv3d(x, w, b, stride=stride, padding=padding, residual=res, backend=backend)
    assert out.dtype == dtype, f"seed {seed}"
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last_3d), f"output must keep channels_last_3d (seed {seed})"
    else:
        assert out.is_contiguous(), f"seed {seed}"
    dy = torch.randn(out.shape, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, leaves, dy)
    if layout == "channels_last" and backend == "triton":  # the torch backend's dx is F.conv3d's
        assert grads[0].stride() == x.stride(), f"dx must keep the input's memory format (seed {seed})"

    # PyTorch in the same dtype, upstream's way: its error sets the tolerance.
    torch_out = upstream_causal_conv3d(x, w, b, stride, padding, res)
    torch_grads = torch.autograd.grad(torch_out, leaves, dy)

    # The float64 reference and its gradients (autograd through the same float64 formulation).
    leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    it = iter(leaves64)
    x64, w64 = next(it), next(it)
    b64 = next(it) if with_bias else None
    r64 = next(it) if with_residual else None
    ref = upstream_causal_conv3d(x64, w64, b64, stride, padding, r64)
    assert torch.equal(ref, causal_conv3d_reference(x64, w64, b64, stride=stride, padding=padding, residual=r64))
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double().cpu())

    assert_parity(out, ref, torch_out, f"y (seed {seed})")
    names = ["dx", "dweight"] + (["dbias"] if with_bias else []) + (["dresidual"] if with_residual else [])
    for name, g, tg, rg in zip(names, grads, torch_grads, ref_grads):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype} (seed {seed})"
        assert_parity(g, rg, tg, f"{name} (seed {seed})")


PARAMS = [(c[1:], lay) for c in CASES for lay in LAYOUTS]
PARAM_IDS = [f"{c[0]}-{lay}" for c in CASES for lay in LAYOUTS]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,layout", PARAMS, ids=PARAM_IDS)
def test_triton_matches_reference(case, layout, dtype):
    check_against_reference(*case, layout, dtype, "triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,layout", PARAMS, ids=PARAM_IDS)
def test_torch_backend_matches_reference(case, layout, dtype):
    check_against_reference(*case, layout, dtype, "torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_strided_view_without_bias(backend):
    check_against_reference((2, 3, 4, 5, 5, 6), (3, 3, 3), (1, 1, 1), 1, True, "strided-view", torch.float32,
                            backend, with_bias=False)


def test_torch_backend_every_kt_stride_and_length():
    """The head/body split of the torch backend against the reference in float64, exhaustively."""
    torch.manual_seed(0)
    for kt, st, T in itertools.product((1, 2, 3, 4), (1, 2, 3), range(1, 8)):
        x = torch.randn(1, 2, T, 3, 4, dtype=torch.float64, device=DEVICE)
        w = torch.randn(3, 2, kt, 1, 2, dtype=torch.float64, device=DEVICE)
        out = causal_conv3d(x, w, stride=(st, 1, 1), backend="torch")
        ref = causal_conv3d_reference(x, w, stride=(st, 1, 1))
        assert out.shape[2] == (T - 1) // st + 1
        torch.testing.assert_close(out.cpu(), ref, rtol=1e-12, atol=1e-12, msg=f"kt={kt} st={st} T={T}")


def test_causality():
    """Output frame t depends on input frames <= t only."""
    x = torch.randn(1, 3, 9, 5, 5, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, 3, device=DEVICE)
    x2 = x.clone()
    x2[:, :, 5:] = torch.randn_like(x2[:, :, 5:])
    for backend in ("triton", "torch"):
        a = causal_conv3d(x, w, padding=1, backend=backend)
        b = causal_conv3d(x2, w, padding=1, backend=backend)
        torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=0, atol=0)
        assert not torch.allclose(a[:, :, 5:], b[:, :, 5:])


def test_only_some_inputs_need_grad():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 5, 4, 5, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, 3, device=DEVICE)
    b = torch.randn(4, device=DEVICE)
    ref = upstream_causal_conv3d(x.double(), w.double(), b.double(), (1, 1, 1), 1)
    # Frozen layer, gradient wanted for the input only; an expanded (stride 0) upstream gradient.
    xg = x.clone().requires_grad_(True)
    causal_conv3d(xg, w, b, padding=1, backend="triton").sum().backward()
    x64 = x.double().requires_grad_(True)
    upstream_causal_conv3d(x64, w.double(), b.double(), (1, 1, 1), 1).sum().backward()
    torch.testing.assert_close(xg.grad, x64.grad.float(), rtol=1e-4, atol=1e-4)
    # Frozen input, trainable weight only.
    wg = w.clone().requires_grad_(True)
    dy = torch.randn(ref.shape, device=DEVICE)
    (dw,) = torch.autograd.grad(causal_conv3d(x, wg, b, padding=1, backend="triton"), (wg,), dy)
    w64 = w.double().requires_grad_(True)
    (rdw,) = torch.autograd.grad(upstream_causal_conv3d(x.double(), w64, b.double(), (1, 1, 1), 1), (w64,), dy.double())
    torch.testing.assert_close(dw, rdw.float(), rtol=1e-4, atol=1e-4)


def test_mixed_dtypes_follow_f_conv3d():
    """As F.conv3d: fp32 parameters with an fp16 input are a ValueError naming both dtypes; under
    autocast they compute in fp16, and gradients come back in each leaf's dtype."""
    x = torch.randn(1, 3, 5, 4, 4, device=DEVICE, dtype=torch.float16, requires_grad=True)
    w = torch.randn(4, 3, 2, 3, 3, device=DEVICE, requires_grad=True)
    b = torch.randn(4, device=DEVICE, requires_grad=True)
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"weight has dtype torch.float32 but x has torch.float16"):
            causal_conv3d(x, w, b, padding=1, backend=backend)
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = causal_conv3d(x, w, b, padding=1, backend=backend)
        assert out.dtype == torch.float16
        dx, dw, db = torch.autograd.grad(out.float().sum(), (x, w, b))
        assert (dx.dtype, dw.dtype, db.dtype) == (torch.float16, torch.float32, torch.float32)


def test_dispatch_reasons():
    x = torch.randn(1, 3, 5, 4, 4, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, 3, device=DEVICE)
    op = osp.ops.registered_ops()["causal_conv3d"]
    args = (x.double(), w.double(), None, (1, 1, 1), (1, 1), None)
    assert op.explain(*args)["torch"] is None
    assert "float64" in op.backends["triton"].why_not(*args, forced=True)
    if DEVICE == "cpu":  # chosen automatically, the interpreter declines; forced, it runs
        assert "interpreter" in op.explain(*args[:2], *args[2:])["triton"]
        assert op.backends["triton"].why_not(x, w, None, (1, 1, 1), (1, 1), None, forced=True) is None
    with pytest.raises(BackendUnavailable, match="float64"):
        causal_conv3d(x.double(), w.double(), backend="triton")
    with osp.ops.use_backend(causal_conv3d="torch"):
        torch.testing.assert_close(causal_conv3d(x, w, padding=1), upstream_causal_conv3d(x, w, None, (1, 1, 1), 1))


@pytest.mark.skipif(DEVICE != "cuda", reason="2**31 elements need a GPU (under the interpreter it would take hours)")
def test_int64_offsets_past_two_to_the_31():
    # 2.4e9 elements; in NCDHW the last frame of channels >= 15 lies past element 2**31, and kt = 1
    # makes that frame's output depend on that frame alone.
    N, C, T, H, W = 1, 16, 9, 4096, 4096
    x = torch.randn(N, C, T, H, W, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(C, C, 1, 3, 3, device="cuda", dtype=torch.bfloat16) * 0.1
    out = causal_conv3d(x, w, padding=1, backend="triton")
    last = F.conv3d(x[:, :, -1:].float(), w.float(), padding=(0, 1, 1))
    err = (out[:, :, -1:].float() - last).abs().max().item()
    assert err < 2e-2 * max(1.0, last.abs().max().item()), f"last frame (beyond 2**31 elements) off by {err}"
    del out
    dy = torch.zeros(N, C, T, H, W, device="cuda", dtype=torch.bfloat16)
    dy[:, :, -1] = torch.randn(N, C, H, W, device="cuda", dtype=torch.bfloat16)
    from osp.kernels import causal_conv3d as kernel
    dx = kernel.backward_dx(dy, w, x, (1, 1, 1), (1, 1))
    ref = torch.nn.grad.conv2d_input((N, C, H, W), w[:, :, 0].float(), dy[:, :, -1].float(), padding=1)
    err = (dx[:, :, -1].float() - ref).abs().max().item()
    assert err < 2e-2 * max(1.0, ref.abs().max().item()), f"dx of the last frame off by {err}"


# Streaming (history=): (id, (N, Cin, Cout, T, H, W), kernel, stride, spatial padding, residual).
# kt 3 and 2, odd H and W, spatial stride 2, a T shorter than kt-1, the residual epilogue.
HISTORY_CASES = [
    ("k333-p1-T5", (2, 3, 5, 5, 5, 6), (3, 3, 3), (1, 1, 1), 1, False),
    ("k231-p0-T4-res", (1, 4, 3, 4, 5, 7), (2, 3, 1), (1, 1, 1), 0, True),
    ("k333-s122-p1-T1", (1, 3, 4, 1, 7, 5), (3, 3, 3), (1, 2, 2), 1, False),
    ("k323-s122-p1-T3-res", (2, 3, 5, 3, 5, 7), (3, 2, 3), (1, 2, 2), 1, True),
]
HISTORY_PARAMS = [(c[1:], lay) for c in HISTORY_CASES for lay in LAYOUTS]
HISTORY_IDS = [f"{c[0]}-{lay}" for c in HISTORY_CASES for lay in LAYOUTS]


def streaming_causal_conv3d(x, w, b, stride, padding, residual, history):
    """The definition of history=: the previous frames in front instead of replicated frame 0."""
    ph, pw = (padding, padding) if isinstance(padding, int) else padding
    y = F.conv3d(torch.cat([history, x], dim=2), w, b, stride, (0, ph, pw))
    return y if residual is None else y + residual


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,layout", HISTORY_PARAMS, ids=HISTORY_IDS)
def test_history_matches_reference(case, layout, dtype, backend):
    sizes, kernel, stride, padding, with_residual = case
    N, Cin, Cout, T, H, W = sizes
    seed = stable_seed(sizes, kernel, stride, padding, layout, str(dtype))
    torch.manual_seed(seed)
    x = make_input((N, Cin, T, H, W), layout, dtype)
    hist = make_input((N, Cin, kernel[0] - 1, H, W), layout, dtype)
    fan_in = Cin * kernel[0] * kernel[1] * kernel[2]
    w = (torch.randn(Cout, Cin, *kernel, device=DEVICE) / fan_in ** 0.5).to(dtype)
    b = (torch.randn(Cout, device=DEVICE) * 0.5).to(dtype)
    shape = causal_conv3d_reference(x, w, b, stride=stride, padding=padding).shape
    assert shape[2] == T
    res = make_input(tuple(shape), layout, dtype) if with_residual else None

    out = causal_conv3d(x, w, b, stride=stride, padding=padding, residual=res, history=hist, backend=backend)
    assert out.shape == shape and out.dtype == dtype, f"seed {seed}"
    if layout == "channels_last":
        assert out.is_contiguous(memory_format=torch.channels_last_3d), f"output must keep channels_last_3d (seed {seed})"
    else:
        assert out.is_contiguous(), f"seed {seed}"
    torch_out = streaming_causal_conv3d(x, w, b, stride, padding, res, hist)
    d = lambda t: t.double().cpu() if t is not None else None
    ref = causal_conv3d_reference(x, w, b, stride=stride, padding=padding, residual=res, history=hist)
    torch.testing.assert_close(ref, streaming_causal_conv3d(d(x), d(w), d(b), stride, padding, d(res), d(hist)).to(ref.device),
                               msg=lambda m: f"{m} (seed {seed})")
    assert_parity(out, ref, torch_out, f"y (seed {seed})")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_history_chunks_concatenate_to_the_whole_clip(backend, layout):
    """A clip run in chunks, each given the previous kt-1 frames, equals the clip run at once."""
    torch.manual_seed(3)
    x = make_input((1, 3, 8, 5, 7), layout, torch.float32)
    w = torch.randn(4, 3, 3, 3, 3, device=DEVICE) / 9
    b = torch.randn(4, device=DEVICE)
    whole = causal_conv3d(x, w, b, padding=1, backend=backend)
    for bounds in ((0, 3, 8), (0, 2, 3, 8), (0, 5, 6, 7, 8)):  # chunks of 1 frame take history from further back
        parts = [causal_conv3d(x[:, :, :bounds[1]], w, b, padding=1, backend=backend)]
        for lo, hi in zip(bounds[1:-1], bounds[2:]):
            parts.append(causal_conv3d(x[:, :, lo:hi], w, b, padding=1, history=x[:, :, lo - 2:lo], backend=backend))
        torch.testing.assert_close(torch.cat(parts, dim=2), whole, rtol=1e-5, atol=1e-5, msg=f"chunks {bounds}")


def test_history_gradients_through_torch():
    """Every gradient (x, weight, bias, residual, history) against float64 autograd of the definition."""
    torch.manual_seed(4)
    x, hist = torch.randn(1, 2, 3, 4, 5, device=DEVICE), torch.randn(1, 2, 2, 4, 5, device=DEVICE)
    w, b = torch.randn(3, 2, 3, 3, 2, device=DEVICE) / 6, torch.randn(3, device=DEVICE)
    res = torch.randn(1, 3, 3, 4, 4, device=DEVICE)
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b, res, hist)]
    out = causal_conv3d(*leaves[:3], padding=(1, 0), residual=leaves[3], history=leaves[4])  # automatic: torch
    dy = torch.randn(out.shape, device=DEVICE)
    grads = torch.autograd.grad(out, leaves, dy)
    leaves64 = [t.detach().double().requires_grad_(True) for t in (x, w, b, res, hist)]
    ref = streaming_causal_conv3d(*leaves64[:3], (1, 1, 1), (1, 0), leaves64[3], leaves64[4])
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    for name, g, rg in zip(["dx", "dweight", "dbias", "dresidual", "dhistory"], grads, ref_grads):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-4, msg=name)
    # And the float64 torch path passes gradcheck on a tiny case.
    small = [t.detach().double()[..., :2, :3].requires_grad_(True) for t in (x, hist)]
    w64 = w.detach().double()[..., :2, :2].requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda xx, ww, hh: causal_conv3d(xx, ww, padding=(0, 1), history=hh, backend="torch"),
        (small[0], w64, small[1]))


def test_history_triton_is_forward_only():
    """A wanted gradient makes triton decline history=: forced, BackendUnavailable; automatic, torch runs."""
    x = torch.randn(1, 3, 4, 4, 5, device=DEVICE)
    hist = torch.randn(1, 3, 2, 4, 5, device=DEVICE)
    w = torch.randn(4, 3, 3, 3, 3, device=DEVICE)
    op = osp.ops.registered_ops()["causal_conv3d"]
    expected = streaming_causal_conv3d(x, w, None, (1, 1, 1), 1, None, hist)
    for name in ("x", "w", "hist"):
        args = {"x": x, "w": w, "hist": hist}
        args[name] = args[name].clone().requires_grad_(True)
        call = (args["x"], args["w"], None, (1, 1, 1), (1, 1), None, args["hist"])
        assert "forward-only" in op.backends["triton"].why_not(*call, forced=True)
        assert "forward-only" in op.explain(*call)["triton"] or DEVICE == "cpu"  # cpu: the interpreter declines first
        with pytest.raises(BackendUnavailable, match="forward-only"):
            causal_conv3d(args["x"], args["w"], padding=1, history=args["hist"], backend="triton")
        auto = causal_conv3d(args["x"], args["w"], padding=1, history=args["hist"])
        assert auto.requires_grad
        torch.testing.assert_close(auto, expected, rtol=1e-5, atol=1e-5)
        with torch.no_grad():  # no gradient wanted: the kernel runs
            assert op.backends["triton"].why_not(*call, forced=True) is None
            out = causal_conv3d(args["x"], args["w"], padding=1, history=args["hist"], backend="triton")
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_history_dtype_follows_the_rule():
    """An fp32 history with an fp16 clip is a ValueError; under fp16 autocast it is cast to fp16,
    like the parameters."""
    x = torch.randn(1, 3, 3, 4, 4, device=DEVICE, dtype=torch.float16)
    hist = torch.randn(1, 3, 1, 4, 4, device=DEVICE)
    w = torch.randn(4, 3, 2, 1, 1, device=DEVICE)
    expected = streaming_causal_conv3d(x.float(), w, None, (1, 1, 1), 0, None, hist.half().float())
    for backend in ("triton", "torch"):
        with pytest.raises(ValueError, match=r"history has dtype torch.float32 but x has torch.float16"):
            causal_conv3d(x, w.half(), history=hist, backend=backend)
        with torch.autocast(DEVICE, dtype=torch.float16):
            out = causal_conv3d(x, w, history=hist, backend=backend)
        assert out.dtype == torch.float16
        torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)


# Folded nearest x2 upsampling (upsample=(1, 2, 2)): (id, (N, Cin, Cout, T, H, W), kernel, stride,
# padding, residual). SpatialUpsample2x's (1,3,3) p1 with T = 1 and odd H/W, batch > 1 with the
# residual epilogue, a causal kt = 3 (frame-0 passes of dx with replicas), temporal stride 2 with a
# 1x1 spatial kernel, and a 3x5 kernel with 70 channels (two channel blocks in the interpreter).
UPSAMPLE_CASES = [
    ("k133-p1-T1-odd", (1, 3, 5, 1, 5, 7), (1, 3, 3), (1, 1, 1), 1, False),
    ("k133-p1-T5-N2-res", (2, 4, 3, 5, 4, 3), (1, 3, 3), (1, 1, 1), 1, True),
    ("k333-p1-T5", (1, 3, 4, 5, 3, 5), (3, 3, 3), (1, 1, 1), 1, False),
    ("k311-s211-p0-T9", (1, 3, 4, 9, 3, 2), (3, 1, 1), (2, 1, 1), 0, False),
    ("k135-p12-C70", (1, 70, 6, 1, 3, 3), (1, 3, 5), (1, 1, 1), (1, 2), False),
]
UPSAMPLE_PARAMS = [(c[1:], lay) for c in UPSAMPLE_CASES for lay in LAYOUTS]
UPSAMPLE_IDS = [f"{c[0]}-{lay}" for c in UPSAMPLE_CASES for lay in LAYOUTS]


def upstream_upsample_conv(x, w, b, stride, padding, residual=None):
    """Open-Sora-Plan's SpatialUpsample2x: F.interpolate nearest x2 in H and W, then the causal conv."""
    xu = F.interpolate(x, scale_factor=(1.0, 2.0, 2.0), mode="nearest")
    return upstream_causal_conv3d(xu, w, b, stride, padding, residual)


def check_upsample_against_reference(sizes, kernel, stride, padding, with_residual, layout, dtype, backend):
    N, Cin, Cout, T, H, W = sizes
    seed = stable_seed("upsample", sizes, kernel, stride, padding, layout, str(dtype))
    torch.manual_seed(seed)
    x = make_input((N, Cin, T, H, W), layout, dtype)
    fan_in = Cin * kernel[0] * kernel[1] * kernel[2]
    w = (torch.randn(Cout, Cin, *kernel, device=DEVICE) / fan_in ** 0.5).to(dtype)
    b = (torch.randn(Cout, device=DEVICE) * 0.5).to(dtype)
    shape = causal_conv3d_reference(x, w, b, stride=stride, padding=padding, upsample=(1, 2, 2)).shape
    assert shape[3:] == (2 * H, 2 * W)
    res = make_input(tuple(shape), layout, dtype) if with_residual else None
    leaves = [t for t in (x, w, b, res) if t is not None]
    for t in leaves:
        t.requires_grad_(True)

    out = causal_conv3d(x, w, b, stride=stride, padding=padding, residual=res, upsample=(1, 2, 2), backend=backend)
    assert out.shape == shape and out.dtype == dtype, f"seed {seed}"
    fmt = torch.channels_last_3d if layout == "channels_last" else torch.contiguous_format
    assert out.is_contiguous(memory_format=fmt), f"output must keep the input's memory format (seed {seed})"
    dy = torch.randn(out.shape, device=DEVICE).to(dtype)
    grads = torch.autograd.grad(out, leaves, dy)
    assert grads[0].shape == x.shape

    torch_out = upstream_upsample_conv(x, w, b, stride, padding, res)  # PyTorch in dtype: the tolerance
    torch_grads = torch.autograd.grad(torch_out, leaves, dy)
    leaves64 = [t.detach().double().cpu().requires_grad_(True) for t in leaves]
    ref = upstream_upsample_conv(*leaves64[:3], stride, padding, leaves64[3] if with_residual else None)
    assert torch.equal(ref, causal_conv3d_reference(*leaves64[:3], stride=stride, padding=padding,
                                                    residual=leaves64[3] if with_residual else None,
                                                    upsample=(1, 2, 2)))
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double().cpu())

    assert_parity(out, ref, torch_out, f"y (seed {seed})")
    for name, g, tg, rg in zip(["dx", "dweight", "dbias", "dresidual"], grads, torch_grads, ref_grads):
        assert g.dtype == dtype, f"{name} has dtype {g.dtype} (seed {seed})"
        assert_parity(g, rg, tg, f"{name} (seed {seed})")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: DTYPE_IDS[d])
@pytest.mark.parametrize("case,layout", UPSAMPLE_PARAMS, ids=UPSAMPLE_IDS)
def test_upsample_matches_interpolate_then_conv(case, layout, dtype, backend):
    check_upsample_against_reference(*case, layout, dtype, backend)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_upsample_strided_view(backend):
    check_upsample_against_reference((2, 3, 4, 2, 3, 5), (1, 3, 3), (1, 1, 1), 1, False, "strided-view",
                                     torch.float32, backend)


def test_upsample_torch_form_is_exact_in_float64():
    """The sub-pixel form (summed taps per output phase) is an identity, not an approximation:
    float64 forward and gradients equal interpolate-then-conv to rounding, for odd kernels 1..5."""
    torch.manual_seed(5)
    for kernel in ((1, 3, 3), (2, 5, 3), (1, 1, 1), (3, 3, 5)):
        pad = ((kernel[1] - 1) // 2, (kernel[2] - 1) // 2)
        leaves = [torch.randn(2, 3, 3, 4, 5, dtype=torch.float64), torch.randn(4, 3, *kernel, dtype=torch.float64),
                  torch.randn(4, dtype=torch.float64)]
        a = [t.clone().requires_grad_(True) for t in leaves]
        b = [t.clone().requires_grad_(True) for t in leaves]
        out = causal_conv3d(*a, padding=pad, upsample=(1, 2, 2), backend="torch")
        ref = upstream_upsample_conv(*b, (1, 1, 1), pad)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12, msg=f"kernel {kernel}")
        dy = torch.randn_like(ref)
        for name, g, rg in zip(["dx", "dweight", "dbias"], torch.autograd.grad(out, a, dy), torch.autograd.grad(ref, b, dy)):
            torch.testing.assert_close(g, rg, rtol=1e-12, atol=1e-12, msg=f"{name}, kernel {kernel}")


class _LargestTensor(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the largest size in bytes of any tensor an op returns while active (bytes: the Triton
    interpreter moves kernel arguments as uint8 views of their storage)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(result):
            if isinstance(t, torch.Tensor) and t.numel() * t.element_size() > self.largest:
                self.largest, self.op = t.numel() * t.element_size(), str(func)
        return result


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_upsample_never_builds_the_upsampled_input(backend):
    """With Cout << Cin the output is far smaller than the upsampled input (4x x): no tensor of the
    forward or the backward may be that large (the largest legitimate ones: x-sized gradients)."""
    x_bytes = 16 * 2 * 6 * 5 * 4
    torch.manual_seed(6)
    x = torch.randn(1, 16, 2, 6, 5, device=DEVICE, requires_grad=True)
    w = (torch.randn(2, 16, 1, 3, 3, device=DEVICE) / 12).requires_grad_(True)
    b = torch.randn(2, device=DEVICE, requires_grad=True)
    with _LargestTensor() as fwd:
        out = causal_conv3d(x, w, b, padding=1, upsample=(1, 2, 2), backend=backend)
    assert out.numel() == x.numel() // 2
    with _LargestTensor() as bwd:
        out.backward(torch.randn_like(out))
    for name, seen in (("forward", fwd), ("backward", bwd)):
        assert seen.largest <= x_bytes, f"{name}: {seen.op} made a tensor of {seen.largest} bytes (x has {x_bytes})"
    with _LargestTensor() as unfused:  # the check sees the upsampled tensor where it exists
        upstream_upsample_conv(x, w, b, (1, 1, 1), 1)
    assert unfused.largest == 4 * x_bytes


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_upsample_with_history(backend):
    """Streaming and the folded upsample combine: history is at x's (un-upsampled) size."""
    torch.manual_seed(7)
    x, hist = torch.randn(1, 3, 3, 4, 3, device=DEVICE), torch.randn(1, 3, 2, 4, 3, device=DEVICE)
    w, b = torch.randn(4, 3, 3, 3, 3, device=DEVICE) / 9, torch.randn(4, device=DEVICE)
    with torch.no_grad():
        out = causal_conv3d(x, w, b, padding=1, history=hist, upsample=(1, 2, 2), backend=backend)
    up = lambda t: F.interpolate(t, scale_factor=(1.0, 2.0, 2.0), mode="nearest")  # noqa: E731
    expected = streaming_causal_conv3d(up(x).double(), w.double(), b.double(), (1, 1, 1), 1, None, up(hist).double())
    ref = causal_conv3d_reference(x, w, b, padding=1, history=hist, upsample=(1, 2, 2))
    torch.testing.assert_close(ref, expected.cpu(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.double().cpu(), ref, rtol=1e-5, atol=1e-5)


def test_nn_spatial_upsample_folds_the_interpolation():
    """CausalConv3d(x, upsample=(1, 2, 2)) and the VAE's SpatialUpsample2x equal interpolate-then-conv,
    keep upstream's parameter names, and a streamed empty chunk has the upsampled shape."""
    from osp.models.vae.blocks import SpatialUpsample2x

    torch.manual_seed(8)
    m = SpatialUpsample2x(6, 4).to(DEVICE)
    assert set(m.state_dict()) == {"conv.conv.weight", "conv.conv.bias"}
    x = make_input((2, 6, 3, 5, 4), "channels_last", torch.float32)
    expected = upstream_upsample_conv(x.double(), m.conv.conv.weight.double(), m.conv.conv.bias.double(), (1, 1, 1), 1)
    for backend in ("triton", "torch"):
        with osp.ops.use_backend(backend):
            torch.testing.assert_close(m(x).double(), expected, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(m.conv(x, upsample=(1, 2, 2)).double(), expected, rtol=1e-5, atol=1e-5)
    m.conv.stream_state = {}
    assert m(x[:, :, :0]).shape == (2, 4, 0, 10, 8)
    m.conv.stream_state = None
    with pytest.raises(ValueError, match=r"upsample=\(1, 3, 3\)"):
        m.conv(x, upsample=(1, 3, 3))


X = torch.randn(2, 3, 5, 6, 6)
WGT = torch.randn(4, 3, 3, 3, 3)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: causal_conv3d(torch.randn(2, 3, 6, 6), WGT), r"shape \(2, 3, 6, 6\) \(rank 4\); expected \(N, Cin, T, H, W\)"),
        (lambda: causal_conv3d(X.long(), WGT), r"x has dtype torch.int64"),
        (lambda: causal_conv3d(X, torch.randn(4, 3, 3, 3)), r"weight has shape \(4, 3, 3, 3\) \(rank 4\)"),
        (lambda: causal_conv3d(X, torch.randn(4, 2, 3, 3, 3)), r"x has Cin=3 channels but weight \(4, 2, 3, 3, 3\) expects Cin=2"),
        (lambda: causal_conv3d(X, WGT.int()), r"weight has dtype torch.int32"),
        (lambda: causal_conv3d(X, WGT, torch.randn(5)), r"bias has shape \(5,\); expected \(4,\)"),
        (lambda: causal_conv3d(X, WGT, stride=0), r"stride=0; expected a positive int or 3"),
        (lambda: causal_conv3d(X, WGT, stride=(1, 2)), r"stride=\(1, 2\)"),
        (lambda: causal_conv3d(X, WGT, padding=-1), r"padding=-1; expected a non-negative int or 2"),
        (lambda: causal_conv3d(X, WGT, padding=(1, 1, 1)), r"padding=\(1, 1, 1\).*time is never zero-padded"),
        (lambda: causal_conv3d(X, WGT, residual=torch.randn(2, 4, 5, 4, 5)),
         r"residual has shape \(2, 4, 5, 4, 5\); expected the output's shape \(2, 4, 5, 4, 4\)"),
        (lambda: causal_conv3d(X, WGT, residual=torch.ones(2, 4, 5, 4, 4, dtype=torch.int64)), r"residual has dtype torch.int64"),
        (lambda: causal_conv3d(torch.randn(2, 3, 5, 2, 6), WGT), r"output size \(2, 4, 5, 0, 4\) has a dim <= 0"),
        (lambda: causal_conv3d(torch.randn(2, 3, 0, 6, 6), WGT), r"output size \(2, 4, 0, 4, 4\)"),
        (lambda: causal_conv3d(X, WGT.to("meta")), r"weight is on meta but x is on cpu"),
        (lambda: causal_conv3d(X, WGT, backend="cuda"), r"unknown backend 'cuda'"),
        (lambda: causal_conv3d(X, WGT, history=torch.randn(2, 3, 1, 6, 6)),
         r"history has shape \(2, 3, 1, 6, 6\); expected \(N, Cin, kt-1, H, W\) = \(2, 3, 2, 6, 6\)"),
        (lambda: causal_conv3d(X, WGT, history=torch.randn(2, 3, 2, 5, 6)),
         r"history has shape \(2, 3, 2, 5, 6\); expected .* = \(2, 3, 2, 6, 6\)"),
        (lambda: causal_conv3d(X, WGT, stride=(2, 1, 1), history=torch.randn(2, 3, 2, 6, 6)),
         r"history needs temporal stride 1, got stride \(2, 1, 1\)"),
        (lambda: causal_conv3d(X, torch.randn(4, 3, 1, 3, 3), history=torch.randn(2, 3, 0, 6, 6)),
         r"history needs a temporal kernel > 1; weight \(4, 3, 1, 3, 3\) has kt=1"),
        (lambda: causal_conv3d(X, WGT, history=[0.0]), r"history must be a tensor .*got list"),
        (lambda: causal_conv3d(X, WGT, history=torch.ones(2, 3, 2, 6, 6, dtype=torch.int64)),
         r"history has dtype torch.int64"),
        (lambda: causal_conv3d(X, WGT, history=torch.randn(2, 3, 2, 6, 6, device="meta")),
         r"history is on meta but x is on cpu"),
        (lambda: causal_conv3d(X.bfloat16(), WGT), r"weight has dtype torch.float32 but x has torch.bfloat16"),
        (lambda: causal_conv3d(X, WGT, torch.randn(4, dtype=torch.float64)), r"bias has dtype torch.float64 but x has torch.float32"),
        (lambda: causal_conv3d(X, WGT, residual=torch.randn(2, 4, 5, 4, 4).half()),
         r"residual has dtype torch.float16 but x has torch.float32; expected one dtype"),
        (lambda: causal_conv3d(X, WGT, padding=1, upsample=(1, 3, 3)), r"upsample=\(1, 3, 3\); expected None or \(1, 2, 2\)"),
        (lambda: causal_conv3d(X, WGT, padding=1, upsample=2), r"upsample=2; expected None or \(1, 2, 2\)"),
        (lambda: causal_conv3d(X, WGT, padding=1, upsample=(2, 2, 2)), r"upsample=\(2, 2, 2\)"),
        (lambda: causal_conv3d(X, WGT, stride=(1, 2, 2), padding=1, upsample=(1, 2, 2)),
         r"upsample=\(1, 2, 2\) with stride \(1, 2, 2\); expected spatial stride 1"),
        (lambda: causal_conv3d(X, WGT, padding=0, upsample=(1, 2, 2)),
         r"upsample=\(1, 2, 2\) with padding \(0, 0\); expected the \"same\" padding \(1, 1\)"),
        (lambda: causal_conv3d(X, torch.randn(4, 3, 1, 2, 3), padding=(0, 1), upsample=(1, 2, 2)),
         r"upsample=\(1, 2, 2\) with an even spatial kernel \(2, 3\)"),
    ],
    ids=["x-rank-4", "x-integer", "weight-rank-4", "channel-mismatch", "weight-integer", "bias-size", "zero-stride",
         "stride-2-tuple", "negative-padding", "temporal-padding", "residual-shape", "residual-integer",
         "output-empty", "zero-frames", "device-mismatch", "unknown-backend", "history-frames", "history-height",
         "history-temporal-stride", "history-kt-1", "history-not-tensor", "history-integer", "history-device",
         "mixed-weight-dtype", "mixed-bias-dtype", "mixed-residual-dtype", "upsample-factor-3", "upsample-int",
         "upsample-in-time", "upsample-spatial-stride", "upsample-padding-0", "upsample-even-kernel"],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_nn_causal_conv3d_matches_upstream():
    torch.manual_seed(0)
    m = osp.nn.CausalConv3d(4, 8, 3, padding=1).to(DEVICE)
    assert set(m.state_dict()) == {"conv.weight", "conv.bias"}
    assert isinstance(m.conv, torch.nn.Conv3d) and m.conv.padding == (0, 0, 0)
    # Upstream's state dict loads without conversion.
    upstream = torch.nn.Conv3d(4, 8, 3).to(DEVICE)
    m.load_state_dict({"conv." + k: v for k, v in upstream.state_dict().items()})
    x = make_input((2, 4, 5, 6, 7), "channels_last", torch.float32)
    expected = upstream_causal_conv3d(x, upstream.weight, upstream.bias, (1, 1, 1), 1)
    for backend in ("triton", "torch"):
        with osp.ops.use_backend(backend):
            torch.testing.assert_close(m(x), expected, rtol=1e-5, atol=1e-5)
            r = torch.randn_like(expected)
            torch.testing.assert_close(m(x, residual=r), expected + r, rtol=1e-5, atol=1e-5)
    x.requires_grad_(True)
    m(x).square().sum().backward()
    assert m.conv.weight.grad is not None and m.conv.bias.grad is not None and x.grad is not None

    down = osp.nn.CausalConv3d(3, 5, (1, 3, 3), stride=(1, 2, 2))
    assert down.kernel_size == (1, 3, 3) and down.stride == (1, 2, 2) and down.padding == (0, 0)
    assert down(torch.randn(1, 3, 5, 9, 9)).shape == (1, 5, 5, 4, 4)
    assert osp.nn.CausalConv3d(3, 5, 3, padding=(2, 1, 0)).padding == (1, 0)
    assert osp.nn.CausalConv3d(3, 5, 3, padding=(0, 1, 1)).padding == (1, 1)
    assert set(osp.nn.CausalConv3d(3, 5, 1, bias=False).state_dict()) == {"conv.weight"}
    assert "causal" in repr(m)
    with pytest.raises(ValueError, match=r"padding=\(1, 1, 1\) asks for temporal padding 1"):
        osp.nn.CausalConv3d(3, 5, 3, padding=(1, 1, 1))
    with pytest.raises(ValueError, match=r"kernel_size=\(3, 3\)"):
        osp.nn.CausalConv3d(3, 5, (3, 3))
    with pytest.raises(ValueError, match=r"CausalConv3d: stride=-1"):
        osp.nn.CausalConv3d(3, 5, 3, stride=-1)


def test_torch_backend_under_non_reentrant_checkpointing():
    """The CPU fp32 path is a torch.autograd.Function (oneDNN forward and backward): a checkpointed
    pair of convs recomputes in the backward and gives the plain backward's gradients."""
    from torch.utils.checkpoint import checkpoint

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 5, 8, 9, generator=g, requires_grad=True)
    w = torch.randn(4, 4, 3, 3, 3, generator=g, requires_grad=True)
    b = torch.randn(4, generator=g, requires_grad=True)

    def f(x, w, b):
        h = causal_conv3d(x, w, b, padding=1, backend="torch")
        return causal_conv3d(torch.tanh(h), w, b, stride=(2, 1, 1), padding=1, backend="torch")

    dy = torch.randn(1, 4, 3, 8, 9, generator=g)
    expected = torch.autograd.grad(f(x, w, b), (x, w, b), dy)
    got = torch.autograd.grad(checkpoint(f, x, w, b, use_reentrant=False), (x, w, b), dy)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
