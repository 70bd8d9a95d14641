"""Modules built on osp.ops."""
from .group_norm import GroupNorm

__all__ = ["GroupNorm"]
