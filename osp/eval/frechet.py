"""Fréchet video distance over I3D features (spec F.3 FVD, upstream's "styleganv" method).

Two forms, clearly apart:

- ``fvd(real, fake)``: the standard dataset-level FVD: the features of every whole clip of each set,
  one mean and covariance per set, one Fréchet distance.
- ``fvd_upstream(real, fake, batch_size=2)``: upstream's number (cal_fvd.py as eval_common_metric.py
  calls it): for each batch of ``batch_size`` clip pairs and every prefix length l = 10 ... T, the
  Fréchet distance between the features of the batch's clips cut to their first l frames; the result
  is the mean over batches and prefixes. It depends on the batch size (a covariance of 2 clips at
  batch 2) and needs T >= 10.

Videos are (N, T, C, H, W) tensors in [0, 1]. Before the detector every frame is resized (short side
224, the long side ceil(long * 224 / short), bilinear, align_corners=False), center-cropped to 224x224
at floor offsets and mapped to [-1, 1]; clips go to the detector as (n, C, T, 224, 224) in batches of
``feature_batch_size`` (upstream: 10).

The detector is StyleGAN-V's I3D TorchScript file ``i3d_torchscript.pt`` (400-d features, called with
rescale=False, resize=False, return_features=True), read from a local path; osp downloads nothing.
Any callable (n, C, T, 224, 224) in [-1, 1] -> (n, D) can stand in for it (``detector=``).

The Fréchet distance is computed in float64: ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrtm(S1 S2)),
covariances unbiased (np.cov), and tr(sqrtm(S1 S2)) as the sum of the square roots of the eigenvalues
of the symmetric positive semi-definite sqrt(S1) S2 sqrt(S1) (the same eigenvalues as S1 S2; tiny
negative ones from rounding count as 0, as the real part of scipy's sqrtm drops them). A set of one
clip has no covariance: its distance is the mean term only (as upstream).
"""
from __future__ import annotations

import math
import os
import warnings
from typing import Callable, List, Optional, Tuple, Union

import torch
import torch.nn.functional as F

I3D_FILE = "i3d_torchscript.pt"
I3D_URL = "https://www.dropbox.com/s/ge9e5ujwgetktms/i3d_torchscript.pt?dl=1"
RESOLUTION = 224
MIN_FRAMES = 10  # upstream's first prefix length
FEATURE_BATCH = 10  # clips per detector call (upstream's get_fvd_feats bs)

Detector = Callable[[torch.Tensor], torch.Tensor]


# --- Fréchet distance -----------------------------------------------------------------------------------


def feature_stats(feats: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(mean (D,), unbiased covariance (D, D)) of features (N, D) in float64; the covariance is None
    for N = 1."""
    if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] < 1:
        shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
        raise ValueError(f"feature_stats: features of shape {shape}; expected (N, D) with N >= 1")
    f = feats.to(torch.float64)
    mu = f.mean(dim=0)
    if f.shape[0] == 1:
        return mu, None
    d = f - mu
    return mu, d.t() @ d / (f.shape[0] - 1)


def _sqrt_psd(s: torch.Tensor) -> torch.Tensor:
    evals, evecs = torch.linalg.eigh((s + s.t()) / 2)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.t()


def trace_sqrt_product(sigma1: torch.Tensor, sigma2: torch.Tensor) -> float:
    """tr(sqrtm(sigma1 sigma2)) of two covariance matrices, in float64 through the symmetric form
    sqrt(sigma1) sigma2 sqrt(sigma1)."""
    s1, s2 = sigma1.to(torch.float64), sigma2.to(torch.float64)
    r = _sqrt_psd(s1)
    m = r @ s2 @ r
    evals = torch.linalg.eigvalsh((m + m.t()) / 2)
    return float(evals.clamp_min(0).sqrt().sum())


def frechet_distance(mu1: torch.Tensor, sigma1: Optional[torch.Tensor], mu2: torch.Tensor,
                     sigma2: Optional[torch.Tensor]) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), in float64:
    ||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 sqrtm(sigma1 sigma2)). With a covariance None (a set of
    one sample) the mean term only."""
    mu1, mu2 = torch.as_tensor(mu1).to(torch.float64), torch.as_tensor(mu2).to(torch.float64)
    if mu1.dim() != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"frechet_distance: means of shapes {tuple(mu1.shape)} and {tuple(mu2.shape)}; "
                         "expected two vectors (D,) of one length")
    D = mu1.shape[0]
    mean_term = float((mu1 - mu2.to(mu1.device)).square().sum())
    if sigma1 is None or sigma2 is None:
        return mean_term
    s1 = torch.as_tensor(sigma1).to(torch.float64)
    s2 = torch.as_tensor(sigma2).to(torch.float64).to(s1.device)
    for name, s in (("sigma1", s1), ("sigma2", s2)):
        if s.shape != (D, D):
            raise ValueError(f"frechet_distance: {name} has shape {tuple(s.shape)}; expected ({D}, {D})")
    return mean_term + float(torch.trace(s1) + torch.trace(s2)) - 2 * trace_sqrt_product(s1, s2)


def frechet_distance_features(feats1: torch.Tensor, feats2: torch.Tensor) -> float:
    """Fréchet distance between two feature sets (N1, D) and (N2, D); the mean term only when either
    set has one sample (upstream's single-clip batches)."""
    mu1, s1 = feature_stats(feats1)
    mu2, s2 = feature_stats(feats2)
    return frechet_distance(mu1, s1, mu2, s2)


# --- the detector -----------------------------------------------------------------------------------


def load_i3d(path: Optional[str], device: Union[str, torch.device] = "cpu") -> Detector:
    """The StyleGAN-V I3D TorchScript detector at ``path`` as a callable (n, 3, T, 224, 224) in [-1, 1]
    -> (n, 400) features (it is called with rescale=False, resize=False, return_features=True)."""
    if path is None or not os.path.isfile(path):
        raise FileNotFoundError(
            f"FVD needs the I3D detector {I3D_FILE} (StyleGAN-V's TorchScript file, as upstream uses; osp "
            f"downloads nothing): {'no path given' if path is None else f'no file at {path!r}'}. Download it "
            f"from {I3D_URL} and pass its path (detector_path=..., or --i3d_path in osp eval-vae)")
    with warnings.catch_warnings():  # torch 2.9+ deprecates TorchScript; the detector only exists as one
        warnings.filterwarnings("ignore", message=".*torch.jit.load.*is deprecated", category=DeprecationWarning)
        model = torch.jit.load(path, map_location=device).eval()

    def detector(x: torch.Tensor) -> torch.Tensor:
        return model(x, rescale=False, resize=False, return_features=True)

    return detector


def preprocess_i3d(videos: torch.Tensor, resolution: int = RESOLUTION) -> torch.Tensor:
    """Videos (N, T, C, H, W) in [0, 1] -> the detector's input (N, C, T, resolution, resolution) in
    [-1, 1] (float32): short side to ``resolution``, long side ceil(long * resolution / short),
    bilinear (align_corners=False), center crop at floor offsets."""
    N, T, C, H, W = videos.shape
    scale = resolution / min(H, W)
    size = (resolution, math.ceil(W * scale)) if H < W else (math.ceil(H * scale), resolution)
    x = F.interpolate(videos.reshape(N * T, C, H, W).float(), size=size, mode="bilinear", align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - resolution) // 2, (w - resolution) // 2
    x = x[..., top:top + resolution, left:left + resolution]
    x = (x - 0.5) * 2
    return x.reshape(N, T, C, resolution, resolution).permute(0, 2, 1, 3, 4).contiguous()


def _check_sets(real: torch.Tensor, fake: torch.Tensor, name: str) -> None:
    for label, x in (("real", real), ("fake", fake)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != 5 or 0 in x.shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{name}: {label} is {shape}; expected float videos (N, T, C, H, W) in [0, 1]")
    if real.shape[1:] != fake.shape[1:]:
        raise ValueError(f"{name}: real clips are {tuple(real.shape[1:])}, fake clips {tuple(fake.shape[1:])}; "
                         "expected clips (T, C, H, W) of one shape")


def _detector(detector: Optional[Detector], detector_path: Optional[str], device) -> Detector:
    if detector is not None:
        return detector
    return load_i3d(detector_path, device)


@torch.no_grad()
def video_features(videos: torch.Tensor, detector: Detector, *, batch_size: int = FEATURE_BATCH,
                   device: Optional[Union[str, torch.device]] = None) -> torch.Tensor:
    """Detector features (N, D) (float64, on the CPU) of videos (N, T, C, H, W) in [0, 1], preprocessed
    as upstream, ``batch_size`` clips per detector call on ``device`` (default: the videos' device)."""
    if batch_size < 1:
        raise ValueError(f"video_features: batch_size {batch_size}; expected a positive int")
    device = torch.device(device) if device is not None else videos.device
    out: List[torch.Tensor] = []
    for start in range(0, videos.shape[0], batch_size):
        clips = preprocess_i3d(videos[start:start + batch_size].to(device))
        feats = detector(clips)
        if not isinstance(feats, torch.Tensor) or feats.dim() != 2 or feats.shape[0] != clips.shape[0]:
            shape = tuple(feats.shape) if isinstance(feats, torch.Tensor) else type(feats).__name__
            raise ValueError(f"video_features: the detector returned {shape} for {clips.shape[0]} clips; "
                             "expected features (n, D)")
        out.append(feats.detach().to("cpu", torch.float64))
    return torch.cat(out)


def fvd(real: torch.Tensor, fake: torch.Tensor, *, detector: Optional[Detector] = None,
        detector_path: Optional[str] = None, batch_size: int = FEATURE_BATCH,
        device: Optional[Union[str, torch.device]] = None) -> float:
    """The standard, dataset-level FVD: the Fréchet distance between the detector features of all
    clips of ``real`` and of ``fake`` (N, T, C, H, W) in [0, 1]. ``detector``: a callable (n, C, T,
    224, 224) -> (n, D); default: the I3D TorchScript at ``detector_path``. ``batch_size``: clips per
    detector call."""
    _check_sets(real, fake, "fvd")
    det = _detector(detector, detector_path, device or real.device)
    f_real = video_features(real, det, batch_size=batch_size, device=device)
    f_fake = video_features(fake, det, batch_size=batch_size, device=device)
    return frechet_distance_features(f_fake, f_real)


def _check_upstream(real: torch.Tensor, fake: torch.Tensor, batch_size: int) -> None:
    _check_sets(real, fake, "fvd_upstream")
    if real.shape[0] != fake.shape[0]:
        raise ValueError(f"fvd_upstream: {real.shape[0]} real and {fake.shape[0]} fake clips; expected pairs "
                         "(one fake clip per real clip)")
    if batch_size < 1:
        raise ValueError(f"fvd_upstream: batch_size {batch_size}; expected a positive int")
    T = real.shape[1]
    if T < MIN_FRAMES:
        raise ValueError(f"fvd_upstream: clips of {T} frames; upstream's FVD needs at least {MIN_FRAMES} "
                         f"(prefixes of {MIN_FRAMES} ... T frames)")


@torch.no_grad()
def fvd_upstream_values(real: torch.Tensor, fake: torch.Tensor, detector: Detector, *, batch_size: int = 2,
                        feature_batch_size: int = FEATURE_BATCH,
                        device: Optional[Union[str, torch.device]] = None) -> List[float]:
    """Upstream's per-batch, per-prefix distances, in order (batch 0: l = 10 ... T, batch 1: ...)."""
    _check_upstream(real, fake, batch_size)
    T = real.shape[1]
    device = torch.device(device) if device is not None else real.device
    values: List[float] = []
    for start in range(0, real.shape[0], batch_size):
        # Preprocessing works frame by frame, so the prefixes of the preprocessed clips are the
        # preprocessed prefixes.
        pre = [preprocess_i3d(x[start:start + batch_size].to(device)) for x in (real, fake)]
        for length in range(MIN_FRAMES, T + 1):
            feats = []
            for clips in pre:
                part = [detector(clips[i:i + feature_batch_size, :, :length])
                        for i in range(0, clips.shape[0], feature_batch_size)]
                feats.append(torch.cat(part).detach().to("cpu", torch.float64))
            values.append(frechet_distance_features(feats[1], feats[0]))
    return values


def fvd_upstream(real: torch.Tensor, fake: torch.Tensor, *, batch_size: int = 2, detector: Optional[Detector] = None,
                 detector_path: Optional[str] = None, feature_batch_size: int = FEATURE_BATCH,
                 device: Optional[Union[str, torch.device]] = None) -> float:
    """Upstream's reported FVD: real and fake (N, T, C, H, W) in [0, 1] (clip i of one paired with clip i
    of the other), cut into batches of ``batch_size`` pairs; for each batch and each prefix length
    l = 10 ... T the Fréchet distance between the two batches' features of their first l frames; the
    mean of all these. T >= 10. Depends on ``batch_size`` (upstream's eval script: --batch_size)."""
    _check_upstream(real, fake, batch_size)
    det = _detector(detector, detector_path, device or real.device)
    values = fvd_upstream_values(real, fake, det, batch_size=batch_size, feature_batch_size=feature_batch_size,
                                 device=device)
    return sum(values) / len(values)


__all__ = ["fvd", "fvd_upstream", "fvd_upstream_values", "frechet_distance", "frechet_distance_features",
           "feature_stats", "trace_sqrt_product", "load_i3d", "preprocess_i3d", "video_features",
           "I3D_URL", "I3D_FILE"]
