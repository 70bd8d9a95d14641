"""osp.ops.blend_tile_ / blend_normalize_: tiled reconstruction against float64."""
import pytest
import torch

from osp.ops import blend_normalize_, blend_tile_, blend_tile_reference
from osp.ops.tile_blend import ramp
from parity import DEVICE, DTYPES, assert_parity

BACKENDS = ["triton", "torch"]


def tiles_of(full, tile, overlap):
    """(offset, size, lo, hi) per axis for tiles of ``tile`` elements stepping by tile - overlap."""
    out, start = [], 0
    while True:
        size = min(tile, full - start)
        out.append((start, size, overlap if start else 0, overlap if start + size < full else 0))
        if start + size >= full:
            return out
        start += tile - overlap


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("strided", [False, True], ids=["contiguous-tile", "strided-tile"])
def test_one_tile_matches_reference(backend, dtype, strided):
    torch.manual_seed(0)
    out = torch.randn(2, 3, 6, 13, 17, device=DEVICE).to(dtype)
    wsum = torch.rand(6, 13, 17, device=DEVICE)
    tile = torch.randn(2, 3, 5, 9, 11, device=DEVICE).to(dtype)
    if strided:
        tile = torch.randn(2, 5, 3, 9, 11, device=DEVICE).to(dtype).transpose(1, 2)
    args = (tile, (1, 3, 6), (2, 3, 4), (1, 2, 5))
    ref_out, ref_ws = blend_tile_reference(out, wsum, *args)
    torch_out = out.clone()
    torch_out[:, :, 1:6, 3:12, 6:17] += (tile * ramp(5, 2, 1, DEVICE)[:, None, None] * ramp(9, 3, 2, DEVICE)[:, None]
                                         * ramp(11, 4, 5, DEVICE)).to(dtype)
    blend_tile_(out, wsum, *args, backend=backend)
    assert_parity(out, ref_out, torch_out, "out")
    torch.testing.assert_close(wsum.double(), ref_ws, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_overlapping_tiles_of_one_signal_reconstruct_it(backend):
    """Tiles cut from one video reassemble it exactly: the weights are a partition after normalizing."""
    torch.manual_seed(1)
    video = torch.randn(1, 3, 9, 20, 23, device=DEVICE)
    out = torch.full_like(video, float("nan")).zero_()
    wsum = torch.zeros(video.shape[2:], device=DEVICE)
    for t0, t, lt, ht in tiles_of(9, 5, 2):
        for h0, h, lh, hh in tiles_of(20, 8, 3):
            for w0, w, lw, hw in tiles_of(23, 10, 4):
                tile = video[:, :, t0:t0 + t, h0:h0 + h, w0:w0 + w]
                blend_tile_(out, wsum, tile, (t0, h0, w0), (lt, lh, lw), (ht, hh, hw), backend=backend)
    blend_normalize_(out, wsum)
    torch.testing.assert_close(out, video, rtol=1e-5, atol=1e-5)


def test_weights_ramp_linearly_across_a_seam():
    assert ramp(6, 0, 0).tolist() == [1.0] * 6
    torch.testing.assert_close(ramp(6, 3, 2), torch.tensor([0.25, 0.5, 0.75, 1.0, 2 / 3, 1 / 3]))
    # Two tiles overlapping by 3: their weights over the overlap sum to the same constant.
    a, b = ramp(6, 0, 3), ramp(6, 3, 0)
    torch.testing.assert_close(a[3:] + b[:3], torch.ones(3))


def test_uncovered_positions_and_bad_arguments_raise():
    out = torch.zeros(1, 2, 4, 8, 8)
    wsum = torch.zeros(4, 8, 8)
    with pytest.raises(ValueError, match="covered by no tile"):
        blend_normalize_(out, wsum)
    tile = torch.zeros(1, 2, 4, 5, 5)
    with pytest.raises(ValueError, match=r"overruns out's \(4, 8, 8\) along axis H"):
        blend_tile_(out, wsum, tile, (0, 4, 0), (0, 0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"overlaps 3 \+ 3 exceed the tile's length 5 along W"):
        blend_tile_(out, wsum, tile, (0, 0, 0), (0, 0, 3), (0, 0, 3))
    with pytest.raises(ValueError, match=r"wsum has shape \(4, 8\); expected rank 3"):
        blend_tile_(out, torch.zeros(4, 8), tile, (0, 0, 0), (0, 0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"wsum is \(4, 8, 8\) torch.float16"):
        blend_tile_(out, wsum.half(), tile, (0, 0, 0), (0, 0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"offset=\(0, -1, 0\)"):
        blend_tile_(out, wsum, tile, (0, -1, 0), (0, 0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"tile \(1, 3, 4, 5, 5\)"):
        blend_tile_(out, wsum, torch.zeros(1, 3, 4, 5, 5), (0, 0, 0), (0, 0, 0), (0, 0, 0))
    with pytest.raises(ValueError, match=r"blend_normalize_: wsum \(4, 8, 7\) does not match out's \(4, 8, 8\)"):
        blend_normalize_(out, torch.ones(4, 8, 7))
    with pytest.raises(ValueError, match=r"blend_normalize_: out has shape \(2, 4, 8, 8\); expected rank 5"):
        blend_normalize_(out[0], torch.ones(4, 8, 8))
    with pytest.raises(ValueError, match=r"blend_normalize_: wsum has dtype torch.int64"):
        blend_normalize_(out, torch.ones(4, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"blend_normalize_: wsum is on meta but out is on cpu"):
        blend_normalize_(out, torch.ones(4, 8, 8, device="meta"))
    with pytest.raises(ValueError, match=r"unknown backend 'triton'"):
        blend_normalize_(out, torch.ones(4, 8, 8), backend="triton")


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_normalize_divides_in_fp32_and_keeps_the_dtype(dtype):
    torch.manual_seed(2)
    out = torch.randn(2, 3, 4, 5, 6, device=DEVICE).to(dtype)
    wsum = torch.rand(4, 5, 6, device=DEVICE) * 2 + 0.1
    ref = out.double() / wsum.double()
    torch_out = out / wsum.to(dtype)
    result = blend_normalize_(out, wsum, backend="torch")
    assert result is out and out.dtype == dtype
    assert_parity(out, ref, torch_out, "out")
