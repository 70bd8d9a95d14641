"""The compiled extension's layer_norm_modulate and gated_residual (``ext`` backends) against float64 at every CPU ISA
level built, forward and the gradients of every input; opcheck, determinism and checks in C++."""
import pytest
import torch

from osp.ops import _ext, gated_residual, gated_residual_reference, layer_norm_modulate, layer_norm_modulate_reference
from parity import DEVICE
from test_modulation import CASES, check, leaves, torch_gated, torch_lnm

pytestmark = [
    pytest.mark.skipif(not _ext.AVAILABLE or _ext.why_not("layer_norm_modulate", "cpu") is not None,
                       reason=f"osp._C has no layer_norm_modulate here: {_ext.why_not('layer_norm_modulate', 'cpu')}"),
    pytest.mark.skipif(DEVICE != "cpu", reason="the extension's kernels are CPU kernels"),
]
ISAS = _ext.cpu_isas() or ["default"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.fixture(params=ISAS)
def isa(request):
    before = torch.ops.osp_C.set_poison_outputs(True)  # outputs C++ allocates start as NaN
    yield _ext.set_cpu_isa(request.param)
    _ext.set_cpu_isa("")
    torch.ops.osp_C.set_poison_outputs(before)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("x_shape,m_shape,strided",
                         [(c[1], c[2], s) for c in CASES for s in (False, True)],
                         ids=[f"{c[0]}-{'strided' if s else 'contiguous'}" for c in CASES for s in (False, True)])
def test_layer_norm_modulate(x_shape, m_shape, strided, dtype, isa):
    x, shift, scale = leaves(x_shape, m_shape, dtype, 2, strided)
    check(layer_norm_modulate, layer_norm_modulate_reference, torch_lnm, [x, shift, scale], "ext")


def test_shift_per_entry_next_to_one_scale_for_all_and_fp32_rows(isa):
    torch.manual_seed(3)
    x = (torch.randn(3, 40, 72) * 2 + 1).bfloat16().requires_grad_(True)
    shift = (torch.randn(3, 1, 72) * 0.5).requires_grad_(True)  # fp32 next to bf16 tokens
    scale = (torch.randn(72) * 0.5).requires_grad_(True)
    out = layer_norm_modulate(x, shift, scale, backend="ext")
    assert out.dtype == torch.bfloat16
    ref = layer_norm_modulate_reference(x, shift, scale)
    assert (out.double() - ref).abs().max() < 0.05
    grads = torch.autograd.grad(out, (x, shift, scale), torch.ones_like(out))
    assert [g.shape for g in grads] == [x.shape, shift.shape, scale.shape]
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]
    t64 = [t.detach().double().requires_grad_(True) for t in (x, shift, scale)]
    ref_grads = torch.autograd.grad(torch_lnm(*t64), t64,
                                    torch.ones_like(ref))
    for g, rg in zip(grads[1:], ref_grads[1:]):
        torch.testing.assert_close(g.double(), rg, rtol=2e-2, atol=2e-2)


def test_two_runs_and_thread_counts_are_bit_equal():
    x = torch.randn(2, 300, 1152, requires_grad=True)
    shift, scale = torch.randn(2, 1152, requires_grad=True), torch.randn(2, 1152, requires_grad=True)
    dy = torch.randn(2, 300, 1152)

    def run():
        out = layer_norm_modulate(x, shift, scale, backend="ext")
        return (out, *torch.autograd.grad(out, (x, shift, scale), dy))

    first, second = run(), run()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run()
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_ext_is_the_automatic_choice_on_cpu():
    from osp.ops import registered_ops

    op = registered_ops()["layer_norm_modulate"]
    x, m = torch.randn(2, 5, 16), torch.randn(2, 16)
    assert op.select((x, m, m, 1e-6), {}).name == "ext"
    assert op.select((x.double(), m.double(), m.double(), 1e-6), {}).name == "torch"


def test_opcheck():
    x = torch.randn(2, 7, 40, requires_grad=True)
    shift, scale = torch.randn(2, 40, requires_grad=True), torch.randn(1, 40, requires_grad=True)
    torch.library.opcheck(torch.ops.osp_C.layer_norm_modulate, (x, shift, scale, 1e-6))
    torch.library.opcheck(torch.ops.osp_C.layer_norm_modulate, (x.detach().bfloat16(), shift, scale, 1e-5))
    _, mean, rstd = torch.ops.osp_C.layer_norm_modulate(x, shift, scale.expand(2, 40).contiguous(), 1e-6)
    torch.library.opcheck(torch.ops.osp_C.layer_norm_modulate_backward,
                          (torch.randn(2, 7, 40), x.detach(), scale.detach(), mean.detach(), rstd.detach()))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda op: op.layer_norm_modulate(torch.randn(2, 5), torch.randn(2, 5), torch.randn(2, 5), 1e-6),
         r"layer_norm_modulate: x has shape \[2, 5\] on cpu; expected a \(B, L, D\) CPU tensor"),
        (lambda op: op.layer_norm_modulate(torch.randn(2, 5, 8), torch.randn(3, 8), torch.randn(2, 8), 1e-6),
         r"shift has shape \[3, 8\]; expected \[2, 8\] or \[1, 8\]"),
        (lambda op: op.layer_norm_modulate(torch.randn(2, 5, 8).half(), torch.randn(2, 8).bfloat16(),
                                           torch.randn(2, 8), 1e-6),
         r"shift has dtype BFloat16 but x has Half; expected Half or Float"),
        (lambda op: op.layer_norm_modulate(torch.randn(2, 8, 5).transpose(1, 2), torch.randn(2, 8),
                                           torch.randn(2, 8), 1e-6),
         r"x with strides \[40, 1, 5\] is not contiguous"),
    ],
    ids=["rank-2", "shift-rows", "shift-dtype", "x-not-contiguous"],
)
def test_cpp_input_checks_name_the_bad_value(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.osp_C)


# ----------------------------------------------------------------------------- gated_residual

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("x_shape,m_shape,strided",
                         [(c[1], c[2], s) for c in CASES for s in (False, True)],
                         ids=[f"{c[0]}-{'strided' if s else 'contiguous'}" for c in CASES for s in (False, True)])
def test_gated_residual(x_shape, m_shape, strided, dtype, isa):
    x, gate = leaves(x_shape, m_shape, dtype, 1, strided)
    y = torch.randn(x_shape).to(dtype).requires_grad_(True)
    check(gated_residual, gated_residual_reference, torch_gated, [x, gate, y], "ext")


def test_gated_residual_mixed_dtypes_go_to_torch():
    from osp.ops import registered_ops

    op = registered_ops()["gated_residual"]
    x, m = torch.randn(2, 5, 40), torch.randn(2, 40)
    assert op.select((x, m, x), {}).name == "ext"
    assert op.select((x.half(), m, x.half()), {}).name == "torch"  # promotes to fp32: torch's rule
    assert gated_residual(x.half(), m, x.half()).dtype == torch.float32


def test_gated_residual_ext_is_chosen_on_cpu_only_with_grad_mode_on():
    """Forward alone (no_grad), torch.addcmul is the faster CPU path (bench_modulation); with grad
    mode on, the ext pair. Forcing ext runs it either way."""
    from osp.ops import registered_ops

    op = registered_ops()["gated_residual"]
    x, m, y = torch.randn(2, 5, 40), torch.randn(2, 40), torch.randn(2, 5, 40)
    assert op.select((x, m, y), {}).name == "ext"
    with torch.no_grad():
        assert op.select((x, m, y), {}).name == "torch"
        assert "forward only" in op.explain(x, m, y)["ext"]
        out = gated_residual(x, m, y, backend="ext")
    torch.testing.assert_close(out, gated_residual_reference(x, m, y).float())


def test_gated_residual_opcheck_and_determinism():
    x, y = torch.randn(2, 70, 96, requires_grad=True), torch.randn(2, 70, 96, requires_grad=True)
    gate = torch.randn(1, 96, requires_grad=True)
    torch.library.opcheck(torch.ops.osp_C.gated_residual, (x, gate, y))
    torch.library.opcheck(torch.ops.osp_C.gated_residual_backward, (torch.randn(2, 70, 96), gate.detach(), y.detach()))
    dout = torch.randn(2, 70, 96)
    runs = [torch.autograd.grad(gated_residual(x, gate, y, backend="ext"), (x, gate, y), dout) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_torch_compile_traces_the_registered_ops():
    """Eager calls run the kernels through a plain autograd.Function; under torch.compile
    (fullgraph=True) the registered ops with their fake and autograd kernels are traced instead, and
    forward and backward equal eager."""
    seen = []

    def capture(gm, example_inputs):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    def f(x, shift, scale, gate, y):
        h = layer_norm_modulate(x, shift, scale, backend="ext")
        return gated_residual(x, gate, h * y, backend="ext")

    g = torch.Generator().manual_seed(3)
    leaves = [torch.randn(s, generator=g).requires_grad_() for s in
              [(2, 7, 24), (2, 1, 24), (2, 1, 24), (2, 1, 24), (2, 7, 24)]]
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend=capture)(*leaves)
    assert any("osp_C.layer_norm_modulate" in t for t in seen) and any("osp_C.gated_residual" in t for t in seen), seen
    expected = f(*leaves)
    torch.testing.assert_close(out, expected)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    dy = torch.randn(out.shape, generator=g)
    for a, e in zip(torch.autograd.grad(out, leaves, dy), torch.autograd.grad(expected, leaves, dy)):
        torch.testing.assert_close(a, e)


def test_checkpointed_block_recomputes_with_autograd_on():
    """Non-reentrant checkpointing (how LatteT2V trains) recomputes the forward when the backward
    first unpacks a saved tensor: that unpacking must not happen with the Autograd key excluded
    (the eager ext path calls its kernels below it), or the recomputed matmuls save nothing."""
    from torch.utils.checkpoint import checkpoint

    def block(x, shift, scale, gate, w):
        h = layer_norm_modulate(x @ w, shift, scale, backend="ext")
        return gated_residual(x, gate, torch.tanh(h @ w), backend="ext")

    g = torch.Generator().manual_seed(5)
    leaves = [torch.randn(s, generator=g).requires_grad_() for s in
              [(2, 6, 16), (2, 1, 16), (2, 1, 16), (2, 1, 16), (16, 16)]]
    dy = torch.randn(2, 6, 16, generator=g)
    expected = torch.autograd.grad(block(*leaves), leaves, dy)
    got = torch.autograd.grad(checkpoint(block, *leaves, use_reentrant=False), leaves, dy)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e)
