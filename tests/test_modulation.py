"""osp.ops.layer_norm_modulate and osp.ops.gated_residual against float64, forward and gradients;
their dtype rules (layer_norm's mixed parameters, x + gate * y's promotion) and argument errors."""
import pytest
import torch
import torch.nn.functional as F

from osp.ops import gated_residual, gated_residual_reference, layer_norm_modulate, layer_norm_modulate_reference
from parity import DEVICE, DTYPES, assert_parity

# (id, x shape, modulation shape): per-entry (B, 1, D) as Latte's blocks use it, per-entry (B, D),
# one row for all; D = 72 (a head), 1152 (LatteT2V-XL), 88; L = 5 / 17 frames, odd token counts.
CASES = [
    ("temporal-B1D", (4, 5, 72), (4, 1, 72)),
    ("spatial-BD", (2, 33, 88), (2, 88)),
    ("xl-width-shared", (2, 17, 1152), (1152,)),
    ("one-row-1D", (3, 9, 40), (1, 40)),
]
BACKENDS = ["triton", "torch"]


def leaves(x_shape, m_shape, dtype, n_mod, strided):
    torch.manual_seed(sum(x_shape) + len(m_shape))
    if strided:  # rows contiguous in D, but rows spaced apart: a slice of a wider tensor
        x = (torch.randn(*x_shape[:-1], x_shape[-1] + 7, device=DEVICE) * 2 + 0.5)[..., 3:3 + x_shape[-1]]
    else:
        x = torch.randn(x_shape, device=DEVICE) * 2 + 0.5
    mods = [torch.randn(m_shape, device=DEVICE) * 0.5 for _ in range(n_mod)]
    return [t.to(dtype).requires_grad_(True) for t in [x] + mods]


def check(fn, ref_fn, torch_fn, tensors, backend):
    out = fn(*tensors, backend=backend)
    dy = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad(out, tensors, dy)
    torch_out = torch_fn(*tensors)
    torch_grads = torch.autograd.grad(torch_out, tensors, dy)
    t64 = [t.detach().double().requires_grad_(True) for t in tensors]
    ref = torch_fn(*t64)
    torch.testing.assert_close(ref, ref_fn(*t64), rtol=1e-12, atol=1e-12)
    ref_grads = torch.autograd.grad(ref, t64, dy.double())
    assert_parity(out, ref, torch_out, "out")
    for i, (g, tg, rg) in enumerate(zip(grads, torch_grads, ref_grads)):
        assert g.shape == tensors[i].shape
        assert_parity(g, rg, tg, f"grad[{i}]")


def torch_lnm(x, shift, scale):
    D = x.shape[-1]
    return F.layer_norm(x, (D,), eps=1e-6) * (1 + scale.reshape(-1, 1, D)) + shift.reshape(-1, 1, D)


def torch_gated(x, gate, y):
    return x + gate.reshape(-1, 1, x.shape[-1]) * y


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("x_shape,m_shape,strided",
                         [(c[1], c[2], s) for c in CASES for s in (False, True)],
                         ids=[f"{c[0]}-{'strided' if s else 'contiguous'}" for c in CASES for s in (False, True)])
def test_layer_norm_modulate(x_shape, m_shape, strided, dtype, backend):
    x, shift, scale = leaves(x_shape, m_shape, dtype, 2, strided)
    check(layer_norm_modulate, layer_norm_modulate_reference, torch_lnm, [x, shift, scale], backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("x_shape,m_shape,strided",
                         [(c[1], c[2], s) for c in CASES for s in (False, True)],
                         ids=[f"{c[0]}-{'strided' if s else 'contiguous'}" for c in CASES for s in (False, True)])
def test_gated_residual(x_shape, m_shape, strided, dtype, backend):
    x, gate = leaves(x_shape, m_shape, dtype, 1, strided)
    y = (torch.randn(x_shape, device=DEVICE)).to(dtype).requires_grad_(True)
    check(lambda x, g, y, backend: gated_residual(x, g, y, backend=backend), gated_residual_reference,
          torch_gated, [x, gate, y], backend)


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: layer_norm_modulate(torch.randn(2, 8), torch.randn(8), torch.randn(8)), r"x has shape \(2, 8\)"),
        (lambda: layer_norm_modulate(torch.randn(2, 3, 8), torch.randn(3, 8), torch.randn(8)),
         r"shift has shape \(3, 8\); expected \(2, 8\)"),
        (lambda: layer_norm_modulate(torch.randn(2, 3, 8), torch.randn(8), torch.randn(2, 3, 8)),
         r"scale has shape \(2, 3, 8\)"),
        (lambda: layer_norm_modulate(torch.randn(2, 3, 8), torch.randn(8), torch.randn(8), eps=0), r"eps=0"),
        (lambda: layer_norm_modulate(torch.ones(2, 3, 8, dtype=torch.int32), torch.randn(8), torch.randn(8)),
         r"dtype torch.int32"),
        (lambda: gated_residual(torch.randn(2, 3, 8), torch.randn(8), torch.randn(2, 4, 8)), r"y is \(2, 4, 8\)"),
        (lambda: gated_residual(torch.randn(2, 3, 8), torch.randn(2, 7), torch.randn(2, 3, 8)),
         r"gate has shape \(2, 7\)"),
        (lambda: layer_norm_modulate(torch.randn(2, 3, 8), torch.randn(8).bfloat16(), torch.randn(8)),
         r"layer_norm_modulate: shift has dtype torch.bfloat16 but x has torch.float32; expected torch.float32$"),
        (lambda: layer_norm_modulate(torch.randn(2, 3, 8).half(), torch.randn(8).half(), torch.randn(8).double()),
         r"scale has dtype torch.float64 but x has torch.float16; expected torch.float16 or torch.float32"),
    ],
    ids=["x-rank", "shift-batch", "scale-per-token", "eps", "int-dtype", "y-shape", "gate-width", "bf16-shift-fp32-x",
         "fp64-scale-fp16-x"],
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("backend", BACKENDS)
def test_mixed_dtypes_follow_torch(backend):
    """fp32 modulation rows next to fp16 tokens: layer_norm_modulate stays in x's dtype (as
    F.layer_norm with fp32 weight and bias), gated_residual promotes (as x + gate * y)."""
    x = torch.randn(2, 5, 40, device=DEVICE).half()
    m = torch.randn(2, 40, device=DEVICE)
    assert layer_norm_modulate(x, m, m, backend=backend).dtype == torch.float16
    out = gated_residual(x, m, x, backend=backend)
    expected = x + m[:, None] * x
    assert out.dtype == expected.dtype == torch.float32
    torch.testing.assert_close(out, expected)
    # An fp32 residual stream plus an fp16 branch: fp32, gradients in each leaf's dtype.
    xs, g, y = (t.clone().requires_grad_(True) for t in (x.float(), m.half(), x))
    out = gated_residual(xs, g, y, backend=backend)
    assert out.dtype == torch.float32
    grads = torch.autograd.grad(out.sum(), (xs, g, y))
    assert [t.dtype for t in grads] == [torch.float32, torch.float16, torch.float16]
