"""Latte video transformers: LatteT2V (Open-Sora-Plan v1.0), LatteClass, Latte."""
from .latte import Latte, LatteClass
from .latte_t2v import LATTE_T2V_XL_122, PRESETS, LatteT2V

__all__ = ["LATTE_T2V_XL_122", "PRESETS", "Latte", "LatteClass", "LatteT2V"]
