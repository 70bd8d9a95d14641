"""Functional ops with explainable backend dispatch; needs only torch to import.

Each op has a float64 reference (``<op>_reference``) and backends chosen per call; see
``osp.ops._dispatch`` for how a backend is chosen or forced (``backend=``, ``use_backend``,
``OSP_BACKEND``, by op or by file name) and ``python -m osp info`` for what is usable here.
Every op treats dtypes, under torch.autocast too, as its torch counterpart does
(``osp.ops._dtypes``; each op's docstring states its output dtype).
"""
from ._dispatch import BACKEND_NAMES, BackendUnavailable, registered_ops, use_backend
from .attention import attention, attention_reference
from .causal_conv3d import causal_conv3d, causal_conv3d_reference
from .group_norm import group_norm, group_norm_, group_norm_fixed_stats, group_norm_fixed_stats_reference, group_norm_reference
from .tile_blend import blend_normalize_, blend_tile_, blend_tile_reference
from .modulation import gated_residual, gated_residual_reference, layer_norm_modulate, layer_norm_modulate_reference

__all__ = [
    "BACKEND_NAMES",
    "BackendUnavailable",
    "blend_normalize_",
    "blend_tile_",
    "blend_tile_reference",
    "attention",
    "attention_reference",
    "causal_conv3d",
    "causal_conv3d_reference",
    "gated_residual",
    "gated_residual_reference",
    "group_norm",
    "group_norm_",
    "group_norm_fixed_stats",
    "group_norm_fixed_stats_reference",
    "group_norm_reference",
    "layer_norm_modulate",
    "layer_norm_modulate_reference",
    "registered_ops",
    "use_backend",
]
