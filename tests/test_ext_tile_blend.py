"""The compiled extension's tile blending (``ext`` backend of blend_tile_ / blend_normalize_) against
float64 at every CPU ISA level built; mixed dtypes, strided tiles, opcheck, and checks in C++."""
import pytest
import torch

from osp.ops import _ext, blend_normalize_, blend_tile_, blend_tile_reference
from osp.ops.tile_blend import ramp
from parity import DEVICE, assert_parity
from test_tile_blend import tiles_of

pytestmark = [
    pytest.mark.skipif(not _ext.AVAILABLE or _ext.why_not("blend_tile_", "cpu") is not None,
                       reason=f"osp._C has no tile blending here: {_ext.why_not('blend_tile_', 'cpu')}"),
    pytest.mark.skipif(DEVICE != "cpu", reason="the extension's kernels are CPU kernels"),
]
ISAS = _ext.cpu_isas() or ["default"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
dtype_id = lambda d: str(d).replace("torch.", "")  # noqa: E731


@pytest.fixture(params=ISAS)
def isa(request):
    yield _ext.set_cpu_isa(request.param)
    _ext.set_cpu_isa("")


@pytest.mark.parametrize("tile_dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-tile", "strided-tile"])
def test_one_tile_matches_reference(dtype, tile_dtype, strided, isa):
    torch.manual_seed(0)
    out = torch.randn(2, 3, 6, 13, 37).to(dtype)  # 37: rows with a vector tail at every width
    wsum = torch.rand(6, 13, 37)
    tile = torch.randn(2, 3, 5, 9, 31).to(tile_dtype)
    if strided:
        tile = torch.randn(2, 5, 3, 9, 31).to(tile_dtype).transpose(1, 2)
    args = (tile, (1, 3, 6), (2, 3, 4), (1, 2, 5))
    ref_out, ref_ws = blend_tile_reference(out, wsum, *args)
    torch_out = out.clone()
    torch_out[:, :, 1:6, 3:12, 6:37] += (tile * ramp(5, 2, 1)[:, None, None] * ramp(9, 3, 2)[:, None]
                                         * ramp(31, 4, 5)).to(dtype)
    blend_tile_(out, wsum, *args, backend="ext")
    assert_parity(out, ref_out, torch_out, "out")
    torch.testing.assert_close(wsum.double(), ref_ws, rtol=1e-6, atol=1e-6)


def test_weight_sum_equals_the_torch_backend_bit_for_bit(isa):
    """The ramps and their products are computed in fp32 in torch's order: wsum is bit-identical."""
    wsum_ext = torch.rand(6, 13, 37)
    wsum_torch = wsum_ext.clone()
    out = torch.zeros(1, 2, 6, 13, 37)
    tile = torch.randn(1, 2, 5, 9, 31)
    blend_tile_(out, wsum_ext, tile, (1, 3, 6), (2, 3, 4), (1, 2, 5), backend="ext")
    blend_tile_(out.clone(), wsum_torch, tile, (1, 3, 6), (2, 3, 4), (1, 2, 5), backend="torch")
    assert torch.equal(wsum_ext, wsum_torch)


def test_overlapping_tiles_of_one_signal_reconstruct_it(isa):
    torch.manual_seed(1)
    video = torch.randn(1, 3, 9, 20, 23)
    out = torch.zeros_like(video)
    wsum = torch.zeros(video.shape[2:])
    for t0, t, lt, ht in tiles_of(9, 5, 2):
        for h0, h, lh, hh in tiles_of(20, 8, 3):
            for w0, w, lw, hw in tiles_of(23, 10, 4):
                tile = video[:, :, t0:t0 + t, h0:h0 + h, w0:w0 + w]
                blend_tile_(out, wsum, tile, (t0, h0, w0), (lt, lh, lw), (ht, hh, hw), backend="ext")
    blend_normalize_(out, wsum, backend="ext")
    torch.testing.assert_close(out, video, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_normalize_matches_reference(dtype, isa):
    torch.manual_seed(2)
    out = torch.randn(2, 3, 4, 5, 37).to(dtype)
    wsum = torch.rand(4, 5, 37) * 2 + 0.1
    ref = out.double() / wsum.double()
    torch_out = out / wsum.to(dtype)
    assert blend_normalize_(out, wsum, backend="ext") is out and out.dtype == dtype
    assert_parity(out, ref, torch_out, "out")


def test_automatic_choice_and_fallbacks():
    from osp.ops import registered_ops

    out, wsum = torch.zeros(1, 2, 4, 8, 8), torch.ones(4, 8, 8)
    tile = torch.randn(1, 2, 4, 5, 5)
    assert registered_ops()["blend_tile_"].select((out, wsum, tile, (0, 0, 0), (0, 0, 0), (0, 0, 0)), {}).name == "ext"
    assert registered_ops()["blend_normalize_"].select((out, wsum), {}).name == "ext"
    # float64 and non-float32 weight sums go to torch
    assert registered_ops()["blend_normalize_"].select((out.double(), wsum), {}).name == "torch"
    assert registered_ops()["blend_normalize_"].select((out, wsum.double()), {}).name == "torch"


def test_opcheck():
    out, wsum = torch.randn(1, 2, 4, 8, 8), torch.rand(4, 8, 8) + 0.5
    tile = torch.randn(1, 2, 3, 5, 6)
    torch.library.opcheck(torch.ops.osp_C.blend_tile_, (out, wsum, tile, [1, 2, 2], [1, 1, 2], [0, 2, 1]))
    torch.library.opcheck(torch.ops.osp_C.blend_normalize_, (out, wsum))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda op: op.blend_tile_(torch.zeros(1, 2, 4, 8, 8), torch.zeros(4, 8, 8), torch.zeros(1, 2, 4, 5, 5),
                                   [0, 4, 0], [0, 0, 0], [0, 0, 0]),
         r"blend_tile_: tile \[4, 5, 5\] at offset \[0, 4, 0\] overruns out's \[4, 8, 8\] along axis H"),
        (lambda op: op.blend_tile_(torch.zeros(1, 2, 4, 8, 8), torch.zeros(4, 8, 8).half(), torch.zeros(1, 2, 4, 5, 5),
                                   [0, 0, 0], [0, 0, 0], [0, 0, 0]),
         r"wsum is \[4, 8, 8\] Half; expected a contiguous Float \[4, 8, 8\]"),
        (lambda op: op.blend_tile_(torch.zeros(1, 2, 4, 8, 8).double(), torch.zeros(4, 8, 8),
                                   torch.zeros(1, 2, 4, 5, 5), [0, 0, 0], [0, 0, 0], [0, 0, 0]),
         r"out has dtype Double and tile Float; expected Float, Half or BFloat16"),
        (lambda op: op.blend_normalize_(torch.zeros(1, 2, 4, 8, 8).transpose(3, 4), torch.ones(4, 8, 8)),
         r"blend_normalize_: out is \[1, 2, 4, 8, 8\] Float with strides \[512, 256, 64, 1, 8\]"),
    ],
    ids=["overrun", "wsum-dtype", "out-float64", "out-not-contiguous"],
)
def test_cpp_input_checks_name_the_bad_value(call, match):
    with pytest.raises(RuntimeError, match=match):
        call(torch.ops.osp_C)
