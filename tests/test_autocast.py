"""Every op under torch.autocast behaves as its torch counterpart does under the same autocast.

Issue 11 trains with bf16 autocast: weights stay fp32 and activations arrive in bf16. Each case runs
the op and its torch counterpart inside ``torch.autocast(DEVICE, dtype)`` and checks that the output
dtype is torch's, the values pass the parity rule against float64 (torch's own error under autocast
sets the bound), and the gradients reach every leaf in that leaf's dtype, fp32 weights included.
On CPU the Triton interpreter runs the float16 cases (it rounds bfloat16 wrongly); on a GPU every
case runs compiled, and the expected dtypes are CUDA autocast's (group_norm and layer_norm in fp32).
"""
import zlib

import pytest
import torch
import torch.nn.functional as F

import osp.ops as ops
from osp.ops._dtypes import float32_except_cpu, lower_precision
from parity import DEVICE, assert_parity

DTYPE_ID = {torch.bfloat16: "bf16", torch.float16: "fp16"}
CASES = [
    pytest.param(ac, backend, id=f"{DTYPE_ID[ac]}-{backend}")
    for ac in (torch.bfloat16, torch.float16) for backend in ("triton", "torch")
    if not (DEVICE == "cpu" and ac == torch.bfloat16 and backend == "triton")  # the interpreter's bf16 is wrong
]


@pytest.fixture
def seed(request) -> int:
    """Seeds torch from the test's id, the same in every process; failure messages print it."""
    value = zlib.crc32(request.node.name.encode())
    torch.manual_seed(value)
    return value


def randn(*shape, dtype=torch.float32, scale=1.0, shift=0.0, grad=True):
    t = (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype)
    return t.requires_grad_(grad)


def check(op_call, torch_call, leaves, ac, seed, ref_call=None, expected_dtype=None):
    """Run ``op_call`` and ``torch_call`` on ``leaves`` under autocast to ``ac``; compare dtypes,
    values and gradients with float64 (``ref_call``, default ``torch_call``, on float64 leaves)."""
    with torch.autocast(DEVICE, dtype=ac):
        out = op_call(*leaves)
        torch_out = torch_call(*leaves)
    assert out.dtype == (expected_dtype or torch_out.dtype), f"{out.dtype} vs torch's {torch_out.dtype} (seed {seed})"
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = (ref_call or torch_call)(*leaves64)
    assert_parity(out, ref, torch_out, f"out (seed {seed})")
    dy = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    grads = torch.autograd.grad(out, leaves, dy)
    torch_grads = torch.autograd.grad(torch_out, leaves, dy.to(torch_out.dtype))
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    for i, (leaf, g, tg, rg) in enumerate(zip(leaves, grads, torch_grads, ref_grads)):
        assert g.dtype == leaf.dtype, f"grad[{i}] has dtype {g.dtype}, its leaf {leaf.dtype} (seed {seed})"
        assert_parity(g, rg, tg, f"grad[{i}] (seed {seed})")
    return out


def upstream_causal_conv3d(x, w, b, residual):
    xp = torch.cat([x[:, :, :1].repeat(1, 1, w.shape[2] - 1, 1, 1), x], dim=2)
    return F.conv3d(xp, w, b, 1, (0, 1, 1)) + residual


@pytest.mark.parametrize("ac,backend", CASES)
def test_causal_conv3d_casts_like_conv3d(ac, backend, seed):
    """Activations in the autocast dtype, fp32 weight and bias: everything computes in the autocast dtype."""
    x = randn(2, 3, 5, 6, 7, dtype=ac).detach().to(memory_format=torch.channels_last_3d).requires_grad_(True)
    w, b = randn(4, 3, 3, 3, 3, scale=0.2), randn(4)
    res = randn(2, 4, 5, 6, 7, dtype=ac)
    out = check(lambda x, w, b, r: ops.causal_conv3d(x, w, b, padding=1, residual=r, backend=backend),
                upstream_causal_conv3d, [x, w, b, res], ac, seed)
    assert out.dtype == ac and out.is_contiguous(memory_format=torch.channels_last_3d), f"seed {seed}"


def test_float64_is_not_autocast():
    """As torch: float64 tensors are not eligible, so a float64 call stays float64 under autocast."""
    x, w = torch.randn(1, 2, 3, 4, 4, device=DEVICE, dtype=torch.float64), torch.randn(3, 2, 2, 3, 3, device=DEVICE,
                                                                                          dtype=torch.float64)
    q = torch.randn(1, 2, 5, 8, device=DEVICE, dtype=torch.float64)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        assert ops.causal_conv3d(x, w, padding=1).dtype == torch.float64
        assert ops.attention(q, q, q).dtype == torch.float64
        assert ops.group_norm(x, 2).dtype == torch.float64
        # A float64 x next to an fp32 weight (cast to bf16) is as mixed as under F.conv3d.
        with pytest.raises(ValueError, match="weight has dtype torch.bfloat16 but x has torch.float64"):
            ops.causal_conv3d(x, w.float())


@pytest.mark.parametrize("ac,backend", CASES)
def test_group_norm_casts_like_group_norm(ac, backend, seed):
    x = randn(2, 8, 5, 6, 7, dtype=ac, scale=2, shift=1).detach().to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    w, b = randn(8, scale=0.5, shift=1), randn(8, scale=0.5)
    out = check(lambda x, w, b: ops.group_norm(x, 4, w, b, act="silu", backend=backend),
                lambda x, w, b: F.silu(F.group_norm(x, 4, w, b, 1e-6)), [x, w, b], ac, seed)
    assert out.dtype == (ac if DEVICE == "cpu" else torch.float32), f"seed {seed}"  # CUDA: torch's fp32 list
    assert out.stride() == x.stride(), f"output must keep the input's memory format (seed {seed})"


@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_group_norm_fixed_stats_casts_like_group_norm(ac, seed):
    x = randn(2, 8, 5, 6, 7, dtype=ac, scale=2, shift=1).detach().to(memory_format=torch.channels_last_3d)
    x.requires_grad_(True)
    w, b = randn(8, scale=0.5, shift=1), randn(8, scale=0.5)
    xg = x.detach().double().reshape(2, 4, -1)
    mean, rstd = xg.mean(-1), torch.rsqrt(xg.var(-1, unbiased=False) + 1e-6)
    with torch.autocast(DEVICE, dtype=ac):
        expected_dtype = F.group_norm(x, 4, w, b, 1e-6).dtype

    def formula(x, w, b):  # the op's definition, in whatever dtype its inputs have
        y = ((x.reshape(2, 4, -1) - mean.to(x.dtype)[:, :, None]) * rstd.to(x.dtype)[:, :, None]).reshape(x.shape)
        return F.silu(y * w.view(1, 8, 1, 1, 1) + b.view(1, 8, 1, 1, 1))

    def torch_in_out_dtype(x, w, b):  # PyTorch in the op's output dtype sets the tolerance
        with torch.autocast(DEVICE, enabled=False):
            return formula(x.to(expected_dtype), w.to(expected_dtype), b.to(expected_dtype))

    out = check(lambda x, w, b: ops.group_norm_fixed_stats(x, 4, mean, rstd, w, b, act="silu"),
                torch_in_out_dtype, [x, w, b], ac, seed, ref_call=formula, expected_dtype=expected_dtype)
    assert out.stride() == x.stride(), f"output must keep the input's memory format (seed {seed})"


@pytest.mark.parametrize("ac,backend", CASES)
def test_attention_casts_like_sdpa(ac, backend, seed):
    """fp32 q, k, v (and a key padding mask) compute in the autocast dtype, as SDPA does."""
    q, k, v = randn(2, 3, 17, 40), randn(2, 3, 11, 40), randn(2, 3, 11, 40)
    mask = torch.arange(11, device=DEVICE)[None, :] < torch.tensor([[11], [6]], device=DEVICE)
    out = check(lambda q, k, v: ops.attention(q, k, v, key_padding_mask=mask, backend=backend),
                lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :]),
                [q, k, v], ac, seed)
    assert out.dtype == ac, f"seed {seed}"


@pytest.mark.parametrize("ac,backend", CASES)
def test_layer_norm_modulate_casts_like_layer_norm(ac, backend, seed):
    """bf16 tokens with fp32 shift and scale: as F.layer_norm with that weight and bias."""
    x = randn(3, 9, 72, dtype=ac, scale=2, shift=0.5)
    shift, scale = randn(3, 1, 72, scale=0.5), randn(3, 1, 72, scale=0.5)

    def layer_norm(x, shift, scale):  # per batch entry: F.layer_norm with weight 1 + scale, bias shift
        return torch.stack([F.layer_norm(x[i], (72,), 1 + scale[i, 0], shift[i, 0], 1e-6) for i in range(3)])

    out = check(lambda x, sh, sc: ops.layer_norm_modulate(x, sh, sc, backend=backend), layer_norm,
                [x, shift, scale], ac, seed)
    assert out.dtype == (ac if DEVICE == "cpu" else torch.float32), f"seed {seed}"  # CUDA: torch's fp32 list


@pytest.mark.parametrize("ac,backend", CASES)
def test_gated_residual_promotes_like_its_formula(ac, backend, seed):
    """An fp32 residual stream plus a gated branch in the autocast dtype stays fp32 (autocast does
    not touch elementwise ops); a branch with an fp32 gate promotes to fp32 too."""
    for x, gate, y in ((randn(2, 7, 48), randn(2, 1, 48, dtype=ac), randn(2, 7, 48, dtype=ac)),
                       (randn(2, 7, 48, dtype=ac), randn(2, 48), randn(2, 7, 48, dtype=ac))):
        out = check(lambda x, g, y: ops.gated_residual(x, g, y, backend=backend),
                    lambda x, g, y: x + g.reshape(-1, 1, 48) * y, [x, gate, y], ac, seed)
        assert out.dtype == torch.float32, f"seed {seed}"


@pytest.mark.parametrize("ac", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_tile_blending_writes_in_place_in_out_dtype(ac):
    """In-place ops are not autocast: out keeps its dtype and the result equals the one without autocast."""
    tile = torch.randn(1, 2, 3, 6, 7, device=DEVICE)
    results = []
    for autocast in (False, True):
        out, wsum = torch.zeros(1, 2, 3, 10, 9, device=DEVICE), torch.zeros(3, 10, 9, device=DEVICE)
        with torch.autocast(DEVICE, dtype=ac, enabled=autocast):
            ops.blend_tile_(out, wsum, tile, (0, 0, 0), (0, 0, 0), (0, 2, 3), backend="torch")
            ops.blend_tile_(out, wsum, tile, (0, 4, 2), (0, 2, 3), (0, 0, 0), backend="torch")
            ops.blend_normalize_(out, wsum.clamp_min(1e-3))
        assert out.dtype == torch.float32 and wsum.dtype == torch.float32
        results.append(out)
    torch.testing.assert_close(results[0], results[1], rtol=0, atol=0)


def test_policies_follow_torchs_autocast_lists():
    """aten/src/ATen/autocast_mode.cpp: conv3d and SDPA are lower-precision ops on CPU and CUDA;
    group_norm and layer_norm are fp32 ops on CUDA and on no list on CPU."""
    for device in ("cpu", "cuda"):
        assert lower_precision(device, torch.bfloat16) == torch.bfloat16
    assert float32_except_cpu("cuda", torch.bfloat16) == torch.float32
    assert float32_except_cpu("cpu", torch.bfloat16) is None
    registry = ops.registered_ops()
    policies = {name: op.autocast_policy for name, op in registry.items()}
    assert policies == {"causal_conv3d": lower_precision, "attention": lower_precision,
                        "group_norm": float32_except_cpu, "group_norm_fixed_stats": float32_except_cpu,
                        "layer_norm_modulate": float32_except_cpu, "gated_residual": None,
                        "blend_tile_": None, "blend_normalize_": None}
