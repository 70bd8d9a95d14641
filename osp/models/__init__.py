"""Models (need diffusers): ``CausalVideoVAE`` (osp.models.vae).

Submodules are imported on first use, so ``import osp.models`` stays cheap and ``import osp`` /
``osp.ops`` never need diffusers.
"""
import importlib

_EXPORTS = {"CausalVideoVAE": ".vae", "DiagonalGaussianDistribution": ".vae"}
_EXPORTS.update({"LatteT2V": ".dit", "LatteClass": ".dit", "Latte": ".dit", "LATTE_T2V_XL_122": ".dit"})
_EXPORTS.update({"T5TextEncoder": ".text", "TinyTextEncoder": ".text", "TextEmbeddingCache": ".text",
                 "CachedTextEncoder": ".text"})

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
