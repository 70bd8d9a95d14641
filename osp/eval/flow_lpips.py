"""FloLPIPS (Danier et al. 2022): LPIPS weighted by the optical-flow error between consecutive frames.

Per video pair a (reference), b (distorted), (T, 3, H, W) in [0, 1], and consecutive frames (k, k+1)
(spec F.3, upstream's cal_flolpips.py):
  1. delta = flow(a_k, a_{k+1}) - flow(b_k, b_{k+1})                               (N, 2, H, W)
  2. LPIPS-alex v0.1 lin maps m_l = lin_l((n(f_l(a_k)) - n(f_l(b_k)))^2)            (N, 1, h_l, w_l)
  3. delta bilinearly resized (align_corners=False) to (h_l, w_l); w_l = |delta| (per-pixel L2
     norm), normalised to sum 1 over the map
  4. value_k = sum_l sum_{y,x} m_l * w_l
T - 1 values per video; the video's FloLPIPS is their mean.

Zero flow difference: upstream divides by the sum of |delta|, which is 0 when the two flows agree
exactly on a whole layer map (NaN). Here a map whose |delta| sums to 0 gets uniform weights
1 / (h_l w_l), so that layer contributes its plain LPIPS spatial mean: no motion error, no
emphasis. Any other map is normalised exactly as upstream.
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.nn.functional as F

from .flow import FlowEstimator, PWCNet
from .lpips_net import LPIPS, cached_lpips, check_videos, default_weights_dir

PathLike = Union[str, os.PathLike]

_FLOW_CACHE: dict = {}


def flow_weights_map(delta: torch.Tensor, size) -> torch.Tensor:
    """|delta| resized to ``size``, normalised to sum 1 per sample; uniform where it sums to 0.

    delta: (N, 2, H, W) -> (N, 1, h, w)."""
    d = F.interpolate(delta, size=tuple(size), mode="bilinear", align_corners=False)
    mag = torch.sqrt(d[:, 0:1] ** 2 + d[:, 1:2] ** 2)
    total = mag.sum(dim=(1, 2, 3), keepdim=True)
    uniform = torch.full_like(mag, 1.0 / (mag.shape[-1] * mag.shape[-2]))
    return torch.where(total > 0, mag / torch.where(total > 0, total, torch.ones_like(total)), uniform)


def _default_flow(flow_weights: Optional[PathLike], device: torch.device) -> PWCNet:
    key = (str(flow_weights), str(default_weights_dir()), str(device))
    model = _FLOW_CACHE.get(key)
    if model is None:
        model = PWCNet.from_file(flow_weights).to(device)
        if len(_FLOW_CACHE) >= 2:
            _FLOW_CACHE.pop(next(iter(_FLOW_CACHE)))
        _FLOW_CACHE[key] = model
    return model


def flolpips(a: torch.Tensor, b: torch.Tensor, *, model: Optional[LPIPS] = None,
             flow: Optional[FlowEstimator] = None, lpips_weights: Optional[PathLike] = None,
             flow_weights: Optional[PathLike] = None, backbone_weights: Optional[PathLike] = None,
             batch_pairs: Optional[int] = None) -> torch.Tensor:
    """Per-video FloLPIPS, (B,).

    a, b: (B, T, 3, H, W) in [0, 1], T >= 2 (a = reference, b = distorted; the value is symmetric
    in LPIPS but the flows of each side are computed on that side). ``model``: an LPIPS (upstream:
    AlexNet v0.1), else ``LPIPS("alex")`` from ``lpips_weights`` / ``backbone_weights`` or the default
    folder. ``flow``: any ``flow(x, y) -> (N, 2, H, W)`` callable on RGB [0, 1] frames, else
    :class:`PWCNet` from ``flow_weights`` or the default folder. All B (T - 1) pairs run as one
    batch (both sides' flows in one call), or ``batch_pairs`` pairs at a time."""
    check_videos(a, b, "flolpips")
    bsz, t = a.shape[:2]
    if t < 2:
        raise ValueError(f"flolpips needs at least 2 frames per video (it weights consecutive pairs), "
                         f"got T = {t} in shape {tuple(a.shape)}")
    if batch_pairs is not None and (not isinstance(batch_pairs, int) or batch_pairs < 1):
        raise ValueError(f"flolpips batch_pairs={batch_pairs!r}: expected a positive int or None")
    if model is None:
        model = cached_lpips("alex", lpips_weights, backbone_weights, a.device)
    if flow is None:
        flow = _default_flow(flow_weights, a.device)
    shape = a.shape[2:]
    a0, a1 = a[:, :-1].reshape(-1, *shape), a[:, 1:].reshape(-1, *shape)
    b0, b1 = b[:, :-1].reshape(-1, *shape), b[:, 1:].reshape(-1, *shape)
    n = a0.shape[0]
    step = batch_pairs or n
    values = []
    with torch.no_grad():
        for i in range(0, n, step):
            sl = slice(i, i + step)
            m = a0[sl].shape[0]
            flows = flow(torch.cat([a0[sl], b0[sl]]), torch.cat([a1[sl], b1[sl]]))
            if flows.shape != (2 * m, 2, *shape[-2:]):
                raise ValueError(f"flolpips: the flow estimator returned shape {tuple(flows.shape)}, expected "
                                 f"{(2 * m, 2, *shape[-2:])} (N, 2, H, W)")
            maps = model.layer_maps(a0[sl], b0[sl], normalize=True)
            delta = (flows[:m] - flows[m:]).to(device=maps[0].device, dtype=maps[0].dtype)
            total = sum((mp * flow_weights_map(delta, mp.shape[-2:])).sum(dim=(1, 2, 3)) for mp in maps)
            values.append(total)
    return torch.cat(values).view(bsz, t - 1).mean(dim=1)
