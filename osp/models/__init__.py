"""Models (need diffusers): ``CausalVideoVAE`` (vae/), ``LatteT2V``, ``LatteClass``, ``Latte`` (dit/), the
text encoders (text/), and what they share (modeling.py).

Submodules are imported on first use, so ``import osp.models`` stays cheap and ``import osp`` /
``osp.ops`` never need diffusers.
"""
from .._utils import lazy_exports

_EXPORTS = {"CausalVideoVAE": ".vae", "DiagonalGaussianDistribution": ".vae"}
_EXPORTS.update({"LatteT2V": ".dit", "LatteClass": ".dit", "Latte": ".dit", "LATTE_T2V_XL_122": ".dit"})
_EXPORTS.update({"T5TextEncoder": ".text", "TinyTextEncoder": ".text", "TextEmbeddingCache": ".text",
                 "CachedTextEncoder": ".text"})

__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
