"""VAE reconstruction metrics: SSIM + PSNR, and LPIPS, of a batch of clips, osp.eval against upstream's loops.

Op "ssim+psnr": ``osp.eval.ssim(a, b)`` and ``osp.eval.psnr(a, b)`` on (B, T, 3, H, W) clips in [0, 1]
(float32 inputs), per-video values, as ``osp eval-vae`` calls them; "torch-f64" computes in float64
(the default, as accurate as upstream's float64 SSIM), "torch-f32" with ``dtype=torch.float32``.

Baseline: upstream's per-frame loop (spec F.3, cal_ssim.py and cal_psnr.py), reimplemented here: per
video, per frame, the frame moved to numpy; PSNR in float32 (mse over C*H*W, 100 when mse < 1e-10);
SSIM in float64 per channel, each of its 5 statistics filtered over the whole frame with the 11x11
Gaussian (sigma 1.5) and cropped by 5 pixels, then the channel mean. The filter is cv2.filter2D with
the 2-D window when OpenCV is installed (upstream's own call), else scipy.ndimage.correlate1d twice
(the window is separable; mode "mirror" is cv2's default border), else numpy shifted sums. With scipy
the baseline is, if anything, faster than upstream's 2-D filter, so the speedup is not flattered.

CPU: 16 clips of 17x256x256 (the issue's target: >= 20x the loop). GPU: the same and 16 clips of
17x512x512; the loop runs on the CPU (upstream moves every frame to numpy). "data" holds clips/s and
the largest difference between osp's values and the loop's on the first two clips.

Op "lpips": ``osp.eval.lpips`` (AlexNet LPIPS v0.1, upstream's spatial-map mean; random seeded
weights, since nothing is downloaded) with the frames of the batch through the network 34 at a
time, against upstream's cal_lpips.py loop: the same network on one (1, 3, H, W) frame pair at a
time. CPU: 2 clips of 17x256x256; GPU: 4.
"""
from __future__ import annotations

import math
from typing import Callable, List

import numpy as np
import torch

from .harness import Case

CPU_SHAPES = [(16, 17, 3, 256, 256)]
GPU_SHAPES = [(16, 17, 3, 256, 256), (16, 17, 3, 512, 512)]
C1, C2 = 0.01 ** 2, 0.03 ** 2


def _gaussian() -> np.ndarray:
    x = np.arange(11) - 5.0
    g = np.exp(-x * x / (2 * 1.5 ** 2))
    return g / g.sum()


def frame_filter() -> tuple:
    """(name, f(img) -> the 11x11 Gaussian filter of a 2-D float64 frame cropped to its valid region)."""
    g = _gaussian()
    try:
        import cv2

        w = np.outer(g, g)
        return "cv2.filter2D", lambda img: cv2.filter2D(img, -1, w)[5:-5, 5:-5]
    except ImportError:
        pass
    try:
        from scipy import ndimage

        def scipy_filter(img):
            out = ndimage.correlate1d(img, g, axis=0, mode="mirror")
            return ndimage.correlate1d(out, g, axis=1, mode="mirror")[5:-5, 5:-5]

        return "scipy.ndimage separable", scipy_filter
    except ImportError:
        pass

    def numpy_filter(img):
        H, W = img.shape
        rows = sum(g[k] * img[k:k + H - 10] for k in range(11))
        return sum(g[k] * rows[:, k:k + W - 10] for k in range(11))

    return "numpy shifted sums", numpy_filter


def _ssim_channel(a: np.ndarray, b: np.ndarray, filt: Callable) -> float:
    mu1, mu2 = filt(a), filt(b)
    mu1_sq, mu2_sq, mu1_mu2 = mu1 ** 2, mu2 ** 2, mu1 * mu2
    s1 = filt(a ** 2) - mu1_sq
    s2 = filt(b ** 2) - mu2_sq
    s12 = filt(a * b) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + C1) * (2 * s12 + C2)) / ((mu1_sq + mu2_sq + C1) * (s1 + s2 + C2))
    return float(ssim_map.mean())


def upstream_loop(a: torch.Tensor, b: torch.Tensor, filt: Callable) -> tuple:
    """Upstream's per-frame loop: (ssim (B,), psnr (B,)) as numpy arrays, frame means per video."""
    ssim_v, psnr_v = [], []
    for i in range(a.shape[0]):
        va, vb = a[i].cpu().numpy(), b[i].cpu().numpy()
        s_frames, p_frames = [], []
        for t in range(va.shape[0]):
            fa, fb = va[t], vb[t]
            mse = np.mean((fa.astype(np.float32) - fb.astype(np.float32)) ** 2)
            p_frames.append(100.0 if mse < 1e-10 else 20 * math.log10(1 / math.sqrt(mse)))
            fa64, fb64 = fa.astype(np.float64), fb.astype(np.float64)
            s_frames.append(np.mean([_ssim_channel(fa64[c], fb64[c], filt) for c in range(fa64.shape[0])]))
        ssim_v.append(np.mean(s_frames))
        psnr_v.append(np.mean(p_frames))
    return np.array(ssim_v), np.array(psnr_v)


def _clips(shape, device: str):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(shape, generator=g)
    b = (a + 0.05 * torch.randn(shape, generator=g)).clamp_(0, 1)
    return a.to(device), b.to(device)


def cases(device: str, quick: bool) -> List[Case]:
    from osp.eval import psnr, ssim

    cuda = device.startswith("cuda")
    shapes = GPU_SHAPES if cuda else CPU_SHAPES
    filter_name, filt = frame_filter()
    out: List[Case] = []
    for shape in shapes[:1] if quick else shapes:
        a, b = _clips(shape, device)
        B, T, C, H, W = shape
        ref_ssim, ref_psnr = upstream_loop(a[:2], b[:2], filt)

        def baseline(a=a, b=b):
            return upstream_loop(a, b, filt)

        for backend, dtype in (("torch-f64", torch.float64), ("torch-f32", torch.float32)):
            def run(a=a, b=b, dtype=dtype):
                return ssim(a, b, dtype=dtype), psnr(a, b, dtype=dtype)

            s, p = run(a[:2], b[:2])
            diff = max(float(np.abs(s.double().cpu().numpy() - ref_ssim).max()),
                       float(np.abs(p.double().cpu().numpy() - ref_psnr).max()) / 100)
            out.append(Case(
                op="ssim+psnr", shape="x".join(map(str, shape)), dtype=f"fp32 in, {str(dtype)[6:]} math",
                layout="btchw", backend=backend, mode="fwd", run=run, baseline=baseline,
                baseline_name=f"upstream per-frame loop (numpy, {filter_name})",
                bytes=2 * a.numel() * a.element_size(),
                data=dict(clips=B, max_abs_diff_vs_loop_ssim_or_psnr_over_100=diff, filter=filter_name),
                ))
    out.extend(_lpips_cases(device, quick))
    return out


def upstream_lpips_loop(a: torch.Tensor, b: torch.Tensor, model) -> torch.Tensor:
    """Upstream's cal_lpips.py: per video, per frame, the spatial LPIPS map of (1, 3, H, W) frames in
    [-1, 1] and its mean; the frame means averaged per video."""
    out = torch.empty(a.shape[0])
    with torch.no_grad():
        for i in range(a.shape[0]):
            vals = [model(a[i, t:t + 1] * 2 - 1, b[i, t:t + 1] * 2 - 1).mean() for t in range(a.shape[1])]
            out[i] = torch.stack(vals).mean()
    return out


def _lpips_cases(device: str, quick: bool) -> List[Case]:
    """LPIPS-alex (random weights, seeded: no downloads) of a batch of clips: osp.eval.lpips, every
    frame of the batch through the network at once, against upstream's frame-at-a-time loop."""
    from osp.eval import LPIPS, lpips

    shape = (1, 5, 3, 64, 64) if quick else ((4, 17, 3, 256, 256) if device.startswith("cuda") else (2, 17, 3, 256, 256))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = LPIPS("alex", spatial=True, pretrained=False).to(device)
    a, b = _clips(shape, device)
    ref = upstream_lpips_loop(a[:1], b[:1], model)
    got = lpips(a[:1], b[:1], model=model).cpu()
    return [Case(
        op="lpips", shape="x".join(map(str, shape)), dtype="fp32", layout="btchw", backend="torch (batched)",
        mode="fwd", run=lambda: lpips(a, b, model=model, batch_frames=34),
        baseline=lambda: upstream_lpips_loop(a, b, model),
        baseline_name="upstream per-frame LPIPS loop (same network, spatial map mean)",
        bytes=2 * a.numel() * a.element_size(),
        data=dict(clips=shape[0], net="alex (random weights)", max_abs_diff_vs_loop=float((got - ref).abs().max())),
    )]
