"""osp: fast Open-Sora-Plan v1.0-class text-to-video.

Public entry points: ``osp.ops`` (functional ops with explainable backend dispatch), ``osp.nn``
(modules built on them), ``osp.models`` (CausalVideoVAE, LatteT2V, text encoders), ``osp.diffusion``
(upstream's IDDPM), ``osp.pipelines`` (text-to-video sampling). ``import osp`` needs only torch: the
subpackages that need more (diffusers) are imported on first attribute access.
"""
import importlib

__version__ = "0.1.0"

from . import nn, ops  # noqa: E402,F401

_LAZY = ("models", "diffusion", "pipelines", "testing")


def __getattr__(name):
    if name in _LAZY:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
