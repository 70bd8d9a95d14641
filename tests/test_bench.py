"""The benchmark suites' own machinery (bench/ is not installed: imported from the checkout): the
upstream-style conv keeps up with osp.ops.causal_conv3d's arguments, and the tiled-decode suite's
measurements (statistics error, work factor) say what they claim."""
import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import osp  # noqa: E402
from bench import bench_vae, bench_vae_tiling  # noqa: E402


def test_upstream_style_conv_takes_every_op_argument():
    ours = set(inspect.signature(osp.ops.causal_conv3d).parameters)
    assert ours <= set(inspect.signature(bench_vae._upstream_conv).parameters)


@pytest.mark.parametrize("history", [False, True])
def test_upstream_style_conv_equals_the_reference(history):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 3, 4, 6, 5, generator=g), torch.randn(4, 3, 3, 3, 3, generator=g)
    h = torch.randn(1, 3, 2, 6, 5, generator=g) if history else None
    out = bench_vae._upstream_conv(x, w, padding=1, history=h)
    ref = osp.ops.causal_conv3d_reference(x, w, padding=1, history=h)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_work_factor_counts_the_tiles():
    spec = dict(bench_vae_tiling.CPU, tile=64)  # 8 latents, overlap 2
    vae = bench_vae_tiling.model(spec, "cpu")
    z = torch.zeros(1, 4, 3, 16, 16)
    # stream: 3 tiles of 6-7 latents overlapping by 2 (20 of 16 per axis); osp-v1.0: tiles at every
    # 6 latents, clipped at the border (8 + 8 + 4 = 20 of 16)
    assert bench_vae_tiling.work_factor(vae, spec, z, "stream-tile") == pytest.approx((20 / 16) ** 2)
    assert bench_vae_tiling.work_factor(vae, spec, z, "osp-v1.0") == pytest.approx((20 / 16) ** 2)
    assert bench_vae_tiling.work_factor(vae, spec, z, "untiled") == 1


def test_statistics_error_ranks_global_before_tile():
    """The statistics the untiled decode uses have error 0 against themselves; global statistics are
    closer to them than per-tile ones."""
    spec = dict(bench_vae_tiling.CPU, tile=64)
    with osp.ops.use_backend("torch"):
        vae = bench_vae_tiling.model(spec, "cpu")
        z = bench_vae_tiling.latent(vae, spec, (5, 128, 64), "cpu")
        ref, ref_stats = bench_vae_tiling.decode_recording(vae, spec, z, "untiled")
        assert bench_vae_tiling.norm_stats_error(ref_stats, ref_stats) == 0
        errs = {v: bench_vae_tiling.norm_stats_error(ref_stats, bench_vae_tiling.decode_recording(vae, spec, z, v)[1])
                for v in ("stream-tile", "stream-global")}
    assert 0 < errs["stream-global"] < errs["stream-tile"], errs
