"""Video reconstruction metrics (Open-Sora-Plan v1.0's eval_common_metric.py, spec F), batched.

Per-video metrics take (B, T, C, H, W) tensors in [0, 1] and return a (B,) tensor of frame means:
``psnr``, ``ssim``, ``lpips``, ``flolpips``. ``fvd`` (dataset-level Fréchet video distance) and
``fvd_upstream`` (upstream's prefix- and batch-averaged form) return a number for two sets.
``LPIPS`` is the LPIPS v0.1 network (AlexNet or VGG16 backbone) with weights from local files.

Names are resolved lazily, so importing osp.eval loads nothing until a metric is used.
"""
from __future__ import annotations

import importlib

# public name -> module under osp.eval that defines it
_EXPORTS = {
    "psnr": "psnr_ssim",
    "ssim": "psnr_ssim",
    "LPIPS": "lpips_net",
    "lpips": "lpips_net",
    "flolpips": "flow_lpips",
    "PWCNet": "flow",
    "fvd": "frechet",
    "fvd_upstream": "frechet",
    "frechet_distance": "frechet",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'osp.eval' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
