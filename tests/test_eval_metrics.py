"""osp.eval PSNR, SSIM (spec F.3) against scikit-image, a float64 per-frame reference written here from
the spec and known values; the Fréchet distance against scipy's sqrtm; FVD with a tiny detector,
its TorchScript loading, and upstream's prefix averaging against a hand-written loop."""
import math

import numpy as np
import pytest
import torch

from osp.eval import frechet_distance, fvd, fvd_upstream, psnr, ssim
from osp.eval import frechet as fr
from osp.eval.psnr_ssim import psnr_frames, ssim_frames

skimage_metrics = pytest.importorskip("skimage.metrics")
scipy_linalg = pytest.importorskip("scipy.linalg")


def videos(*shape, seed=0, noise=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(shape, generator=g, dtype=torch.float64)
    b = (a + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return a.to(dtype), b.to(dtype)


# --- float64 references from the spec (upstream's per-frame, per-channel loop) --------------------------


def ref_window():
    x = np.arange(11) - 5.0
    g = np.exp(-x * x / (2 * 1.5 ** 2))
    g /= g.sum()
    return np.outer(g, g)


def ref_filter_valid(img, w):
    H, W = img.shape
    out = np.zeros((H - 10, W - 10))
    for i in range(11):
        for j in range(11):
            out += w[i, j] * img[i:i + H - 10, j:j + W - 10]
    return out


def ref_ssim_plane(a, b):
    w = ref_window()
    C1, C2 = 0.01 ** 2, 0.03 ** 2
    mu1, mu2 = ref_filter_valid(a, w), ref_filter_valid(b, w)
    s1 = ref_filter_valid(a * a, w) - mu1 ** 2
    s2 = ref_filter_valid(b * b, w) - mu2 ** 2
    s12 = ref_filter_valid(a * b, w) - mu1 * mu2
    return (((2 * mu1 * mu2 + C1) * (2 * s12 + C2)) / ((mu1 ** 2 + mu2 ** 2 + C1) * (s1 + s2 + C2))).mean()


def ref_per_video(a, b, frame_fn):
    a, b = a.double().numpy(), b.double().numpy()
    return np.array([np.mean([frame_fn(a[i, t], b[i, t]) for t in range(a.shape[1])]) for i in range(a.shape[0])])


def ref_ssim_frame(fa, fb):
    return np.mean([ref_ssim_plane(fa[c], fb[c]) for c in range(fa.shape[0])])


def ref_psnr_frame(fa, fb):
    mse = np.mean((fa - fb) ** 2)
    return 100.0 if mse < 1e-10 else 20 * math.log10(1 / math.sqrt(mse))


# --- SSIM -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(2, 3, 3, 23, 19), (1, 2, 1, 11, 11), (1, 1, 3, 70, 41)],
                         ids=["odd-2x3", "window-size", "wide-blocks"])
def test_ssim_matches_float64_reference_and_skimage(shape):
    a, b = videos(*shape, seed=sum(shape))
    out = ssim_frames(a, b)
    ref = np.array([[ref_ssim_frame(a[i, t].numpy(), b[i, t].numpy()) for t in range(shape[1])]
                    for i in range(shape[0])])
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=1e-12)
    sk = np.array([[skimage_metrics.structural_similarity(
        a[i, t].numpy(), b[i, t].numpy(), gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        data_range=1.0, channel_axis=0) for t in range(shape[1])] for i in range(shape[0])])
    np.testing.assert_allclose(out.numpy(), sk, rtol=0, atol=1e-12)
    np.testing.assert_allclose(ssim(a, b).numpy(), ref.mean(axis=1), rtol=0, atol=1e-12)


def test_ssim_chunks_and_float32_agree():
    a, b = videos(2, 3, 3, 40, 33, seed=3)
    ref = ssim(a, b)
    torch.testing.assert_close(ssim(a, b, chunk_elements=1), ref, rtol=0, atol=1e-13)  # one plane a chunk
    torch.testing.assert_close(ssim(a.float(), b.float(), dtype=torch.float32).double(), ref, rtol=0, atol=2e-5)
    assert ssim(a.float(), b.float()).dtype == torch.float64  # float64 by default whatever the input


def test_ssim_known_values():
    a, b = videos(1, 2, 3, 16, 16, seed=4)
    torch.testing.assert_close(ssim(a, a), torch.ones(1, dtype=torch.float64), rtol=0, atol=1e-12)
    # two constant frames c1, c2: sigma = 0, so SSIM = (2 c1 c2 + C1) / (c1^2 + c2^2 + C1)
    c1, c2 = 0.3, 0.7
    x, y = torch.full((1, 1, 3, 12, 12), c1, dtype=torch.float64), torch.full((1, 1, 3, 12, 12), c2, dtype=torch.float64)
    C1 = 0.01 ** 2
    assert ssim(x, y).item() == pytest.approx((2 * c1 * c2 + C1) / (c1 ** 2 + c2 ** 2 + C1), abs=1e-12)
    assert ssim(a, b).item() < 0.99


# --- PSNR -----------------------------------------------------------------------------------------------------


def test_psnr_matches_reference_and_skimage():
    a, b = videos(2, 3, 3, 9, 7, seed=5)
    out = psnr_frames(a, b)
    sk = np.array([[skimage_metrics.peak_signal_noise_ratio(a[i, t].numpy(), b[i, t].numpy(), data_range=1.0)
                    for t in range(3)] for i in range(2)])
    np.testing.assert_allclose(out.numpy(), sk, rtol=1e-12)
    np.testing.assert_allclose(psnr(a, b).numpy(), ref_per_video(a, b, ref_psnr_frame), rtol=1e-12)


def test_psnr_known_values():
    a, _ = videos(2, 3, 3, 8, 8, seed=6, noise=0)
    a = a * 0.8  # room for the shift
    assert torch.equal(psnr(a, a), torch.full((2,), 100.0, dtype=torch.float64))
    d = 0.05
    np.testing.assert_allclose(psnr(a, a + d).numpy(), 20 * math.log10(1 / d), rtol=1e-10)
    # identical frames count 100 dB each in the frame mean (upstream's cap), the others their value
    b = a.clone()
    b[:, 1:] += d
    np.testing.assert_allclose(psnr(a, b).numpy(), (100 + 2 * 20 * math.log10(1 / d)) / 3, rtol=1e-10)


def test_psnr_float32_input_is_computed_in_float64():
    a, b = videos(1, 2, 3, 8, 8, seed=7, dtype=torch.float32)
    out = psnr(a, b)
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), ref_per_video(a, b, ref_psnr_frame), rtol=1e-12)


@pytest.mark.parametrize("metric", [psnr, ssim], ids=["psnr", "ssim"])
def test_bad_inputs(metric):
    name = metric.__name__
    a, b = videos(1, 2, 3, 16, 16, seed=8)
    with pytest.raises(ValueError, match=rf"{name}: shapes \(1, 2, 3, 16, 16\) and \(1, 2, 3, 16, 14\) differ"):
        metric(a, b[..., :14])
    with pytest.raises(ValueError, match=rf"{name}: a has shape \(2, 3, 16, 16\); expected \(B, T, C, H, W\)"):
        metric(a[0], b[0])
    with pytest.raises(ValueError, match=rf"{name}: a has dtype torch.uint8; expected a float tensor"):
        metric((a * 255).to(torch.uint8), b)
    big = b.clone()
    big[0, 1, 2, 3, 4] = 2.0
    with pytest.raises(ValueError, match=rf"{name}: b has values in \[[0-9.e-]+, 2\]; expected \[0, 1\]"):
        metric(a, big)
    nan = b.clone()
    nan[0, 0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=rf"{name}: b has values .*expected \[0, 1\] \(no NaN\)"):
        metric(a, nan)


def test_ssim_needs_the_window():
    a, b = videos(1, 1, 3, 10, 16, seed=9)
    with pytest.raises(ValueError, match=r"ssim: frames are 10x16; expected at least 11x11"):
        ssim(a, b)
    with pytest.raises(ValueError, match=r"ssim: dtype torch.float16; expected torch.float64 or torch.float32"):
        ssim(*videos(1, 1, 3, 16, 16), dtype=torch.float16)


# --- Fréchet distance and FVD ---------------------------------------------------------------------------------


def scipy_fd(f1, f2):
    f1, f2 = np.asarray(f1, np.float64), np.asarray(f2, np.float64)
    m = np.square(f1.mean(0) - f2.mean(0)).sum()
    if f1.shape[0] == 1 or f2.shape[0] == 1:
        return float(m)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    root = scipy_linalg.sqrtm(s1 @ s2)
    return float(np.real(m + np.trace(s1 + s2 - 2 * root)))


def test_frechet_distance_matches_scipy_sqrtm():
    g = torch.Generator().manual_seed(10)
    f1 = torch.randn(40, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    f2 = torch.randn(30, 6, generator=g, dtype=torch.float64) * 1.5 + 0.3
    mu1, s1 = fr.feature_stats(f1)
    mu2, s2 = fr.feature_stats(f2)
    np.testing.assert_allclose(s1.numpy(), np.cov(f1.numpy(), rowvar=False), rtol=1e-12)
    out = frechet_distance(mu1, s1, mu2, s2)
    assert out == pytest.approx(scipy_fd(f1, f2), rel=1e-9)
    # rank-deficient covariances (fewer samples than dimensions), as upstream's batches of 2 give
    f3, f4 = f1[:3], f2[:4]
    assert fr.frechet_distance_features(f3, f4) == pytest.approx(scipy_fd(f3, f4), rel=1e-6, abs=1e-9)


def test_frechet_distance_known_values():
    g = torch.Generator().manual_seed(11)
    f = torch.randn(12, 5, generator=g, dtype=torch.float64)
    assert abs(fr.frechet_distance_features(f, f)) < 1e-8
    shift = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25], dtype=torch.float64)
    # a shifted set keeps its covariance: only the mean term remains
    assert fr.frechet_distance_features(f, f + shift) == pytest.approx(float(shift.square().sum()), abs=1e-8)
    # one sample: the mean term only
    assert fr.frechet_distance_features(f[:1], f[1:2]) == pytest.approx(float((f[0] - f[1]).square().sum()))
    with pytest.raises(ValueError, match=r"sigma2 has shape \(4, 4\); expected \(5, 5\)"):
        frechet_distance(f[0], torch.eye(5), f[1], torch.eye(4))


class TinyDetector(torch.nn.Module):
    """A random conv over (n, 3, T, 224, 224) clips -> (n, 6) features, with I3D's keyword arguments."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(12)
        self.conv = torch.nn.Conv3d(3, 6, kernel_size=(1, 16, 16), stride=(1, 16, 16))

    def forward(self, x: torch.Tensor, rescale: bool = True, resize: bool = True, return_features: bool = False):
        if rescale or resize or not return_features:
            raise RuntimeError("called without upstream's keyword arguments")
        return torch.tanh(self.conv(x)).mean(dim=(2, 3, 4)) * 3


def detector_fn():
    model = TinyDetector().double()
    return lambda x: model(x.double(), rescale=False, resize=False, return_features=True)


def ref_preprocess(video):
    """Upstream's preprocess_single on one (C, T, H, W) clip in [0, 1]."""
    c, t, h, w = video.shape
    scale = 224 / min(h, w)
    size = (224, math.ceil(w * scale)) if h < w else (math.ceil(h * scale), 224)
    video = torch.nn.functional.interpolate(video, size=size, mode="bilinear", align_corners=False)
    h, w = video.shape[-2:]
    top, left = (h - 224) // 2, (w - 224) // 2
    return ((video[:, :, top:top + 224, left:left + 224] - 0.5) * 2).contiguous()


def ref_features(vids, det, length=None):
    clips = torch.stack([ref_preprocess(v.permute(1, 0, 2, 3).float()) for v in vids])
    if length is not None:
        clips = clips[:, :, :length]
    with torch.no_grad():
        return det(clips).double()


def test_preprocess_matches_upstream_form():
    g = torch.Generator().manual_seed(13)
    v = torch.rand(2, 3, 3, 30, 47, generator=g)
    ref = torch.stack([ref_preprocess(x.permute(1, 0, 2, 3)) for x in v])
    torch.testing.assert_close(fr.preprocess_i3d(v), ref, rtol=0, atol=0)
    assert fr.preprocess_i3d(v.transpose(-1, -2)).shape == (2, 3, 3, 224, 224)


def test_fvd_with_a_detector():
    g = torch.Generator().manual_seed(14)
    real = torch.rand(5, 4, 3, 32, 40, generator=g)
    fake = (real + 0.2 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    det = detector_fn()
    assert abs(fvd(real, real, detector=det, batch_size=2)) < 1e-8
    out = fvd(real, fake, detector=det, batch_size=2)
    assert out == pytest.approx(scipy_fd(ref_features(fake, det).numpy(), ref_features(real, det).numpy()), rel=1e-7)
    assert out > 0


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
def test_fvd_loads_the_torchscript_detector(tmp_path):
    g = torch.Generator().manual_seed(15)
    real = torch.rand(3, 2, 3, 24, 24, generator=g)
    fake = torch.rand(3, 2, 3, 24, 24, generator=g)
    model = TinyDetector()
    path = tmp_path / "i3d_torchscript.pt"
    torch.jit.script(model).save(str(path))
    direct = fvd(real, fake, detector=lambda x: model(x, rescale=False, resize=False, return_features=True))
    assert fvd(real, fake, detector_path=str(path)) == pytest.approx(direct, rel=1e-9)
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match=rf"i3d_torchscript.pt .*no file at '{missing}'.*dropbox"):
        fvd(real, fake, detector_path=str(missing))
    with pytest.raises(FileNotFoundError, match=r"no path given"):
        fvd(real, fake)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # scipy's sqrtm of rank-deficient batch covariances
def test_fvd_upstream_averages_batches_and_prefixes():
    g = torch.Generator().manual_seed(16)
    real = torch.rand(5, 12, 3, 16, 16, generator=g)
    fake = (real + 0.3 * torch.randn(real.shape, generator=g)).clamp(0, 1)
    det = detector_fn()
    values = []
    for start in range(0, 5, 2):  # batches of 2, 2 and 1 (the last: the mean term only)
        for length in range(10, 13):
            fr_ = ref_features(real[start:start + 2], det, length).numpy()
            ff_ = ref_features(fake[start:start + 2], det, length).numpy()
            values.append(scipy_fd(ff_, fr_))
    assert len(values) == 9
    out = fvd_upstream(real, fake, batch_size=2, detector=det, feature_batch_size=1)
    assert out == pytest.approx(float(np.mean(values)), rel=1e-7)
    # the dataset-level form differs (different covariances): the two are not interchangeable
    assert fvd(real, fake, detector=det) != pytest.approx(out, rel=1e-3)


def test_fvd_bad_inputs():
    g = torch.Generator().manual_seed(17)
    real = torch.rand(2, 9, 3, 16, 16, generator=g)
    det = detector_fn()
    with pytest.raises(ValueError, match=r"fvd_upstream: clips of 9 frames; upstream's FVD needs at least 10"):
        fvd_upstream(real, real, detector=det)
    with pytest.raises(ValueError, match=r"fvd: real clips are \(9, 3, 16, 16\), fake clips \(9, 3, 16, 12\)"):
        fvd(real, real[..., :12], detector=det)
    with pytest.raises(ValueError, match=r"fvd_upstream: 2 real and 1 fake clips; expected pairs"):
        fvd_upstream(torch.rand(2, 10, 3, 8, 8), torch.rand(1, 10, 3, 8, 8), detector=det)


def test_bench_baseline_is_upstreams_loop():
    """bench/bench_eval.py's baseline (upstream's per-frame loop) gives osp's values."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bench import bench_eval

    a, b = videos(2, 2, 3, 20, 17, seed=18, dtype=torch.float32)
    _, filt = bench_eval.frame_filter()
    ref_ssim, ref_psnr = bench_eval.upstream_loop(a, b, filt)
    np.testing.assert_allclose(ssim(a, b).numpy(), ref_ssim, rtol=0, atol=1e-12)
    np.testing.assert_allclose(psnr(a, b).numpy(), ref_psnr, rtol=1e-5)  # upstream's mse is float32
