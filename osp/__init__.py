"""osp: fast Open-Sora-Plan v1.0-class text-to-video.

Public entry points: ``osp.ops`` (functional ops with explainable backend dispatch),
``osp.nn`` (modules built on them). ``import osp`` needs only torch.
"""
__version__ = "0.1.0"

from . import nn, ops  # noqa: E402,F401
