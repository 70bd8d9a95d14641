"""Modules built on osp.ops: the layer every model is made of."""
from .attention import AttnBlock3D, Attention, CaptionSegment
from .causal_conv3d import CausalConv3d
from .group_norm import GroupNorm

__all__ = ["Attention", "AttnBlock3D", "CaptionSegment", "CausalConv3d", "GroupNorm"]
