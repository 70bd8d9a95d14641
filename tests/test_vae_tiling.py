"""Tiled VAE inference (osp.models.vae.tiling): the stream mode (spatial + temporal tiles blended with
osp.ops.blend_tile_, GroupNorm statistics per tile / global / estimated), upstream v1.0's tiled
decode/encode against an independent reference of its algorithm, and argument errors.

Model: a tiny VAE (hidden 32, mult 1,1,2,2, one res block, upstream's layout) with random weights,
GroupNorm affines randomized and every res block's conv2 scaled by 0.1, so that the residual path
dominates as in a trained model (a fully random decoder amplifies any border difference without
bound and no tiling can match it). Clips 9x64x64 (latents 3x8x8), tiles of 32 px (4 latents)
overlapping by 2 latents (overlap=0.5), so that the tiles' owned parts stay a latent inside every
tile border.

Tolerances (PSNR on [-1, 1] data, 20*log10(2/rmse)): these random decoders are far less local
than trained ones, so the thresholds only catch broken blending (a misplaced or unweighted tile
costs > 10 dB): spatial tiles >= 16 dB, spatial + temporal >= 13 dB.

Temporal chunking is exact (causal history carried between chunks, the mid-block attention over the
whole clip, global statistics): tested in float64 against the untiled model to 1e-10, for both
attention variants, decode and encode, chunks of several sizes.
"""
import math

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("tqdm")

from parity import DEVICE  # noqa: E402

import osp  # noqa: E402
from osp.models import CausalVideoVAE  # noqa: E402
from osp.models.vae import tiling  # noqa: E402
from osp.models.vae.blocks import ResnetBlock3D  # noqa: E402
from vae_helpers import clip, tiny_config, tiny_vae  # noqa: E402


@pytest.fixture(autouse=True)
def torch_backend():
    if DEVICE == "cpu":
        with osp.ops.use_backend("torch"):
            yield
    else:
        yield


def smooth_vae(seed=0):
    vae = tiny_vae(seed)
    with torch.no_grad():
        for m in vae.modules():
            if isinstance(m, ResnetBlock3D):
                m.conv2.conv.weight.mul_(0.1)
    return vae


def latents(*shape, seed=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(DEVICE)


def psnr(out, ref):
    assert out.shape == ref.shape and torch.isfinite(out).all()
    mse = (out.double() - ref.double()).square().mean().item()
    return 20 * math.log10(2 / math.sqrt(mse)) if mse > 0 else math.inf


@pytest.fixture(scope="module")
def model_and_ref():
    with osp.ops.use_backend("torch"), torch.no_grad():
        vae = smooth_vae()
        z = latents(1, 4, 3, 8, 8)
        return vae, z, vae.decode(z).sample


# --- exactness where it is claimed ------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["global", "estimate", "tile"])
def test_stream_fits_one_tile_is_untiled(norm):
    vae = tiny_vae()
    z = latents(1, 4, 3, 4, 4)
    x = clip(1, 3, 5, 32, 32)
    with torch.no_grad():
        ref, ref_m = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        vae.enable_tiling(tile_sample_size=32, tile_frames=9, norm=norm, progress=False)
        out, m = vae.decode(z).sample, vae.encode(x).latent_dist.mean
    assert torch.equal(out, ref) and torch.equal(m, ref_m)


def test_stream_global_statistics_machinery_on_one_tile():
    """Forced through the tiled path with one tile, global statistics (collected layer by layer,
    then fixed) reproduce the untiled decode: the collect / fix / restore cycle is exact."""
    vae = tiny_vae()
    z = latents(1, 4, 3, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z).sample
        cfg = tiling.make_config(vae, tile_sample_size=32, norm="global", progress=False)
        p = tiling.plan(cfg, (3, 4, 4), 8, 4, "decode")
        out = tiling.stream(cfg, vae, "decode", z, p, ref.shape)
    assert len(p.tiles) == 1 and len(p.chunks) == 1
    assert (out - ref).abs().max().item() <= 1e-4 * ref.abs().max().item()
    assert all(m.fixed_stats is None for m in vae.modules() if isinstance(m, osp.nn.GroupNorm))


def test_global_statistics_match_untiled_first_norm(monkeypatch):
    """The first decoder norm sees conv_in (k3) of the latent (after a 1x1x1 conv): with overlaps of 2
    latents, the owned parts of the tiles end one latent inside every tile border, so they hold the
    untiled values and the merged statistics are the untiled ones (the "estimate" pass too)."""
    vae = smooth_vae()
    z = latents(1, 4, 3, 8, 8)
    first = vae.decoder.mid.block_1.norm1
    seen = {}
    real_fix = tiling._fix

    class Recorded(Exception):
        """Stops the decode once the first norm's statistics are fixed: the rest is not under test."""

    def spy(norm, stats):
        seen.setdefault(norm, stats)
        real_fix(norm, stats)
        if first in seen:
            raise Recorded

    monkeypatch.setattr(tiling, "_fix", spy)
    with torch.no_grad():
        h = vae.decoder.conv_in(vae.post_quant_conv(z))
        for norm in ("global", "estimate"):
            seen.clear()
            vae.enable_tiling(tile_sample_size=32, overlap=0.5, norm=norm, progress=False)
            with pytest.raises(Recorded):
                vae.decode(z)
            n, mean, m2 = seen[first]
            assert n.sum().item() == h.numel() // 1  # the owned parts partition the activation
            hg = h.reshape(1, 32, -1).double()
            torch.testing.assert_close(mean, hg.mean(-1), rtol=0, atol=1e-5 * hg.std().item())
            torch.testing.assert_close(m2 / n, hg.var(-1, unbiased=False), rtol=1e-5, atol=0)


# --- stream accuracy --------------------------------------------------------------------------------


@pytest.mark.parametrize("tile_frames", [None, 5], ids=["spatial", "spatial+temporal"])
def test_stream_decode_close_and_global_beats_tile(model_and_ref, tile_frames):
    vae, z, ref = model_and_ref
    got = {}
    with torch.no_grad():
        for norm in ("tile", "global"):
            vae.enable_tiling(tile_sample_size=32, tile_frames=tile_frames, overlap=0.5, norm=norm, progress=False)
            got[norm] = psnr(vae.decode(z).sample, ref)
    vae.disable_tiling()
    assert got["tile"] >= (16 if tile_frames is None else 13), got
    assert got["global"] > got["tile"], got


def test_stream_estimate_runs_close(model_and_ref):
    vae, z, ref = model_and_ref
    with torch.no_grad():
        vae.enable_tiling(tile_sample_size=32, tile_frames=5, overlap=0.5, norm="estimate", progress=False)
        out = vae.decode(z).sample
    vae.disable_tiling()
    assert psnr(out, ref) >= 12


def _expand_latent(t, first):
    """A stand-in decoder: every latent value covers its 8x8 pixels and its frames in the causal layout
    (latent 0 -> frame 0, latent q > 0 -> frames 4q-3 .. 4q)."""
    reps = torch.full((t.shape[2],), 4)
    if first:
        reps[0] = 1
    return t.repeat_interleave(reps, dim=2).repeat_interleave(8, dim=3).repeat_interleave(8, dim=4)


def test_stream_blending_is_a_partition_of_unity():
    """With a stand-in decoder whose tiles agree wherever they overlap, the blended output equals
    that decoder's untiled output: tiles and time chunks land where they belong (1+4k layout)."""
    vae = tiny_vae()
    cfg = tiling.make_config(vae, tile_sample_size=32, tile_frames=9, overlap=0.5, norm="tile", progress=False)
    T, h, w = 7, 11, 9
    p = tiling.plan(cfg, (T, h, w), 8, 4, "decode")
    z = torch.randn(1, 2, T, h, w)

    def run(ctx, zt, chunks, visit):
        for ts in chunks:
            visit(_expand_latent(zt[:, :, ts], ts.start == 0))

    full = _expand_latent(z, True)
    out = tiling._blend_pass(cfg, None, run, z, p, full.shape, "decode")
    torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)
    assert len(p.chunks) == 3 and len({t.lat[0] for t in p.tiles}) > 1 and len({t.lat[1] for t in p.tiles}) > 1


def test_axis_tiles_fewest_and_cover_with_overlap():
    for n in range(1, 60):
        for tile in (1, 3, 4, 8, 32):
            for ov in range(tile):
                r = tiling.axis_tiles(n, tile, ov)
                assert r[0][0] == 0 and r[-1][1] == n
                assert all(0 < b - a <= tile for a, b in r)
                assert all(r[i][1] - r[i + 1][0] == ov and r[i + 1][0] > r[i][0] for i in range(len(r) - 1))
                fewest = 1 if n <= tile else math.ceil((n - ov) / (tile - ov))
                assert len(r) == fewest
                assert sum(b - a for a, b in r) == n + (len(r) - 1) * ov


def test_plan_work_is_the_least_recomputation():
    """512x512 in 256-px tiles with overlap 0.25: 3 tiles of 26-27 latents per axis (80 of 64
    latents), 1.5625x the untiled work, as upstream's grid; 32-latent tiles spread evenly: 2.25x.
    With overlap 0.1 at 1024x1024: 1.20x."""
    vae = tiny_vae()
    cfg = tiling.make_config(vae, tile_sample_size=256, tile_frames=17, progress=False)
    p = tiling.plan(cfg, (17, 64, 64), 8, 4, "decode")
    assert len(p.tiles) == 9 and p.work == pytest.approx((80 / 64) ** 2)
    small_overlap = tiling.make_config(vae, tile_sample_size=256, overlap=0.1, progress=False)
    assert tiling.plan(small_overlap, (1, 128, 128), 8, 4, "decode").work == pytest.approx((140 / 128) ** 2)
    assert [c.stop - c.start for c in p.chunks] == [5, 5, 5, 2]  # time chunks do not overlap
    enc = tiling.plan(cfg, (17, 64, 64), 8, 4, "encode")
    assert [(c.start, c.stop) for c in enc.chunks] == [(0, 17), (17, 37), (37, 57), (57, 65)]


# --- exact temporal streaming -----------------------------------------------------------------------


@pytest.mark.parametrize("tf", [5, 9, 13], ids=["tf5", "tf9", "tf13-uneven"])
@pytest.mark.parametrize("attention", ["AttnBlock3D", "AttnBlock3DFix"])
def test_temporal_chunking_is_exact(attention, tf):
    """Time chunks with causal history, the mid-block attention over the whole clip and global
    statistics reproduce the untiled decode and encode (float64, frames fit one spatial tile).
    21 frames: 13-frame chunks split the 6 latents 4 + 2 (uneven), 9-frame ones 3 + 3, 5-frame ones 2 x 3."""
    vae = tiny_vae(encoder_attention=attention, decoder_attention=attention).double()
    z = latents(1, 4, 6, 4, 4).double()
    x = clip(1, 3, 21, 32, 32).double()
    with torch.no_grad():
        ref, ref_m = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        vae.enable_tiling(tile_sample_size=32, tile_frames=tf, norm="global", progress=False)
        out, m = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        assert out.shape == ref.shape and m.shape == ref_m.shape
        assert (out - ref).abs().max().item() <= 1e-10 * ref.abs().max().item(), tf
        assert (m - ref_m).abs().max().item() <= 1e-10 * ref_m.abs().max().item(), tf
    vae.disable_tiling()


def test_streamed_time_layers_equal_whole_clip():
    """CausalConv3d, TimeUpsample2x and TimeDownsample2x fed in uneven chunks (1-frame ones included)
    give the whole clip's output, concatenated."""
    from osp.models.vae.blocks import TimeDownsample2x, TimeUpsample2x

    torch.manual_seed(0)
    conv = osp.nn.CausalConv3d(3, 4, 3, padding=1).double()
    # the 1x1x1 conv after the downsampler meets chunks it had no finished frames for
    net = torch.nn.Sequential(conv, TimeUpsample2x(), TimeDownsample2x(), osp.nn.CausalConv3d(4, 4, 1).double(),
                              TimeUpsample2x()).to(DEVICE)
    x = torch.randn(1, 3, 11, 5, 6, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        ref = net(x)
        for sizes in ([1, 1, 9], [3, 2, 4, 2], [1, 10], [11]):
            outs = []
            with tiling.TimeStream([net]) as ctx:
                a = 0
                for i, n in enumerate(sizes):
                    ctx.final = i == len(sizes) - 1
                    outs.append(net(x[:, :, a:a + n]))
                    a += n
            out = torch.cat(outs, dim=2)
            assert out.shape == ref.shape, sizes
            assert (out - ref).abs().max().item() <= 1e-12 * ref.abs().max().item(), sizes
    assert conv.stream_state is None


def test_encode_tiling_shapes_and_closeness():
    vae = smooth_vae()
    x = clip(2, 3, 9, 64, 48)
    with torch.no_grad():
        ref = vae.encode(x).latent_dist
        for tf in (None, 5):
            vae.enable_tiling(tile_sample_size=32, tile_frames=tf, norm="tile", progress=False)
            post = vae.encode(x).latent_dist
            assert post.mean.shape == ref.mean.shape == (2, 4, 3, 8, 6)
            assert psnr(post.mean, ref.mean) >= 12
        vae.enable_tiling(tile_sample_size=32, tile_frames=5, norm="tile", progress=False)
        padded = vae.encode(x[:, :, :8, :60, :44], pad=True).latent_dist
    assert padded.mean.shape == (2, 4, 3, 8, 6)


def test_progress_bar(capsys):
    vae = tiny_vae()
    z = latents(1, 4, 1, 8, 4)
    with torch.no_grad():
        vae.enable_tiling(tile_sample_size=32, norm="tile", progress=True)
        vae.decode(z)
    assert "tiled decode" in capsys.readouterr().err


# --- upstream v1.0 ----------------------------------------------------------------------------------


def _ref_blend_v(a, b, extent):
    e = min(a.shape[3], b.shape[3], extent)
    for y in range(e):
        b[:, :, :, y, :] = a[:, :, :, -e + y, :] * (1 - y / e) + b[:, :, :, y, :] * (y / e)
    return b


def _ref_blend_h(a, b, extent):
    e = min(a.shape[4], b.shape[4], extent)
    for x in range(e):
        b[:, :, :, :, x] = a[:, :, :, :, -e + x] * (1 - x / e) + b[:, :, :, :, x] * (x / e)
    return b


def _ref_tiled(x, net, tile, stride, extent, keep):
    """Upstream's algorithm as written in spec B.6: decode every tile, blend each in place with its
    (already blended) upper and left neighbours row by row, crop, concatenate."""
    rows = [[net(x[:, :, :, i:i + tile, j:j + tile]) for j in range(0, x.shape[4], stride)]
            for i in range(0, x.shape[3], stride)]
    result_rows = []
    for i, row in enumerate(rows):
        result_row = []
        for j, t in enumerate(row):
            if i > 0:
                t = _ref_blend_v(rows[i - 1][j], t, extent)
            if j > 0:
                t = _ref_blend_h(row[j - 1], t, extent)
            result_row.append(t[:, :, :, :keep, :keep])
        result_rows.append(torch.cat(result_row, dim=4))
    return torch.cat(result_rows, dim=3)


def ref_tiled_decode(vae, z, S=256, o=0.25):
    L = S // 8
    return _ref_tiled(z, lambda t: vae.decoder(vae.post_quant_conv(t)), L, int(L * (1 - o)), int(S * o),
                      S - int(S * o))


def ref_tiled_encode(vae, x, S=256, o=0.25):
    L = S // 8
    return _ref_tiled(x, lambda t: vae.quant_conv(vae.encoder(t)), S, int(S * (1 - o)), int(L * o), L - int(L * o))


@pytest.mark.parametrize("S,o,hw", [(32, 0.25, (8, 8)), (32, 0.25, (9, 7)), (48, 0.5, (10, 13))],
                         ids=["32px-8x8", "32px-9x7", "48px-o0.5-10x13"])
def test_osp_v10_decode_matches_upstream_reference(S, o, hw):
    vae = tiny_vae()
    z = latents(1, 4, 2, *hw)
    with torch.no_grad():
        ref = ref_tiled_decode(vae, z, S, o)
        vae.enable_tiling(mode="osp-v1.0", tile_sample_size=S, overlap=o, progress=False)
        out = vae.decode(z).sample
    assert out.shape == ref.shape == (1, 3, 5, 8 * hw[0], 8 * hw[1])
    assert (out - ref).abs().max().item() <= 1e-6 * ref.abs().max().item()


@pytest.mark.parametrize("hw", [(64, 64), (72, 56)], ids=["64x64", "72x56"])
def test_osp_v10_encode_matches_upstream_reference(hw):
    vae = tiny_vae()
    x = clip(1, 3, 5, *hw)
    with torch.no_grad():
        ref = ref_tiled_encode(vae, x, 32, 0.25)
        vae.enable_tiling(mode="osp-v1.0", tile_sample_size=32, progress=False)
        post = vae.encode(x).latent_dist
    moments = torch.cat([post.mean, post.logvar], dim=1)
    assert moments.shape == ref.shape == (1, 8, 2, hw[0] // 8, hw[1] // 8)
    # the posterior clamps logvar to [-30, 20]; compare the mean half exactly, logvar after the clamp
    assert (post.mean - ref[:, :4]).abs().max().item() <= 1e-6 * ref.abs().max().item()
    assert torch.allclose(post.logvar, ref[:, 4:].clamp(-30, 20), rtol=0, atol=1e-6)


def test_osp_v10_small_input_untiled():
    vae = tiny_vae()
    z = latents(1, 4, 2, 4, 4)
    with torch.no_grad():
        ref = vae.decode(z).sample
        vae.enable_tiling(mode="osp-v1.0", tile_sample_size=32, progress=False)
        assert vae.use_tiling
        assert torch.equal(vae.decode(z).sample, ref)
        vae.disable_tiling()
        assert not vae.use_tiling


# --- arguments --------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs,needle", [
    (dict(mode="tiles"), "mode='tiles'"),
    (dict(tile_sample_size=30), "tile_sample_size=30"),
    (dict(tile_sample_size=0), "tile_sample_size=0"),
    (dict(tile_sample_size=32.0), "tile_sample_size=32.0"),
    (dict(overlap=1.0), "overlap=1.0"),
    (dict(overlap=-0.1), "overlap=-0.1"),
    (dict(mode="osp-v1.0", overlap=0.5, tile_sample_size=8), "overlap=0.5"),
    (dict(tile_frames=4), "tile_frames=4"),
    (dict(tile_frames=1), "tile_frames=1"),
    (dict(norm="batch"), "norm='batch'"),
    (dict(progress="yes"), "progress='yes'"),
    (dict(mode="osp-v1.0", tile_frames=17), "tile_frames=17"),
    (dict(mode="osp-v1.0", norm="global"), "norm='global'"),
], ids=lambda v: str(v) if isinstance(v, str) else None)
def test_enable_tiling_argument_errors(kwargs, needle):
    vae = CausalVideoVAE.from_config(tiny_config())
    with pytest.raises(ValueError, match=needle.replace("(", r"\(").replace(".", r"\.")):
        vae.enable_tiling(**kwargs)
    assert not vae.use_tiling


def test_global_statistics_cost_one_pass_per_streamed_norm(monkeypatch):
    """norm="global" runs the streamed part once per norm in it, plus the final pass: no more (the
    head's norms, over all frames, stop each tile before the streamed part)."""
    vae = tiny_vae()  # upstream's AttnBlock3D: the decoder's head (3 norms) runs over all frames
    calls = []
    tail = vae.decoder.tail
    monkeypatch.setattr(vae.decoder, "tail", lambda h: calls.append(1) or tail(h))
    n_tail = sum(isinstance(m, osp.nn.GroupNorm) for r in vae.decoder.tail_modules() for m in r.modules())
    with torch.no_grad():
        vae.enable_tiling(tile_sample_size=32, overlap=0.5, norm="global", progress=False)
        vae.decode(latents(1, 4, 3, 8, 8))
    p = tiling.plan(vae._tiling, (3, 8, 8), 8, 4, "decode")
    assert len(calls) == (n_tail + 1) * len(p.tiles) * len(p.chunks)
