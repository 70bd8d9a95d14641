"""Models (need diffusers): ``CausalVideoVAE`` (osp.models.vae).

Submodules are imported on first use, so ``import osp.models`` stays cheap and ``import osp`` /
``osp.ops`` never need diffusers.
"""
import importlib

_EXPORTS = {"CausalVideoVAE": ".vae", "DiagonalGaussianDistribution": ".vae"}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
