"""Modules built on osp.ops."""
from .causal_conv3d import CausalConv3d
from .group_norm import GroupNorm

__all__ = ["CausalConv3d", "GroupNorm"]
