"""Encoder and Decoder of the causal video VAE, built from upstream's per-level module names
(numerics spec B.2 and B.4). Intermediates are dropped as soon as the next one exists, so under
torch.no_grad the peak is a few activations of the largest level, not the whole pyramid.
"""
from __future__ import annotations

from typing import Callable, Dict, List, Sequence

import torch
from torch import nn

from ...nn import AttnBlock3D, CausalConv3d
from ..modeling import Checkpointed
from .blocks import (
    ResnetBlock3D,
    SpatialDownsample2x,
    SpatialUpsample2x,
    TimeDownsample2x,
    TimeUpsample2x,
    normalize,
)

RESNET_BLOCKS: Dict[str, Callable[..., nn.Module]] = {"ResnetBlock3D": ResnetBlock3D}
SPATIAL_DOWNSAMPLE: Dict[str, Callable[..., nn.Module]] = {"SpatialDownsample2x": SpatialDownsample2x}
TEMPORAL_DOWNSAMPLE: Dict[str, Callable[..., nn.Module]] = {"TimeDownsample2x": TimeDownsample2x}
SPATIAL_UPSAMPLE: Dict[str, Callable[..., nn.Module]] = {"SpatialUpsample2x": SpatialUpsample2x}
TEMPORAL_UPSAMPLE: Dict[str, Callable[..., nn.Module]] = {"TimeUpsample2x": TimeUpsample2x}
# "AttnBlock3D" is upstream's memory-reinterpreting attention (what the v1.0 weights expect);
# "AttnBlock3DFix" attends within each frame.
ATTENTION: Dict[str, Callable[[int], nn.Module]] = {
    "AttnBlock3D": lambda c: AttnBlock3D(c, per_frame=False),
    "AttnBlock3DFix": lambda c: AttnBlock3D(c, per_frame=True),
}
CONVS = ("CausalConv3d",)


def check_name(field: str, value, allowed, optional: bool = False) -> None:
    """ValueError naming the config field when ``value`` is not a known module name."""
    ok = (optional and value in ("", None)) or value in allowed
    if not ok:
        choices = sorted(allowed) + (['""'] if optional else [])
        raise ValueError(f"CausalVideoVAE config: {field}={value!r} is not supported; expected one of {choices}")


def check_levels(field: str, names: Sequence, levels: int, allowed, optional: bool) -> None:
    if not isinstance(names, (list, tuple)) or len(names) != levels:
        raise ValueError(
            f"CausalVideoVAE config: {field}={names!r}; expected a list of {levels} module names, one per level "
            f"of hidden_size_mult"
        )
    for i, name in enumerate(names):
        check_name(f"{field}[{i}]", name, allowed, optional)


def _conv_reach(module: nn.Module) -> int:
    """Spatial pixels one output pixel of ``module`` reaches beyond itself on each side, through the
    convs inside it (its attention blocks, which see a whole frame, are not counted)."""
    return sum(m.kernel_size[1] // 2 for m in module.modules() if isinstance(m, CausalConv3d))


class _MidBlock(nn.Module):
    def __init__(self, channels: int, resnet: str, attention: str, dropout: float):
        super().__init__()
        self.block_1 = RESNET_BLOCKS[resnet](channels, channels, dropout=dropout)
        self.attn_1 = ATTENTION[attention](channels)
        self.block_2 = RESNET_BLOCKS[resnet](channels, channels, dropout=dropout)


class Encoder(Checkpointed):
    """(B, in_channels, T, H, W) -> moments (B, 2*z_channels if double_z else z_channels, T', H/s, W/s).

    Keys: ``conv_in``, ``down.i.block.j``, ``down.i.attn.j`` (only at attn_resolutions),
    ``down.i.downsample``, ``mid.block_1/attn_1/block_2``, ``norm_out``, ``conv_out``. Level i has
    hidden_size * hidden_size_mult[i] channels; its spatial, then temporal downsample follow its blocks.
    """

    def __init__(self, *, in_channels: int, z_channels: int, hidden_size: int, hidden_size_mult: Sequence[int],
                 num_res_blocks: int, dropout: float, double_z: bool, resnet_blocks: Sequence[str],
                 spatial_downsample: Sequence[str], temporal_downsample: Sequence[str], mid_resnet: str,
                 attention: str, attn_resolutions: Sequence[int], resolution: int):
        super().__init__()
        in_mult = (1,) + tuple(hidden_size_mult)
        self.conv_in = CausalConv3d(in_channels, hidden_size, 3, padding=1)
        self.down = nn.ModuleList()
        res = resolution
        block_in = hidden_size
        for i, mult in enumerate(hidden_size_mult):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = hidden_size * in_mult[i], hidden_size * mult
            for _ in range(num_res_blocks):
                level.block.append(RESNET_BLOCKS[resnet_blocks[i]](block_in, block_out, dropout=dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(ATTENTION[attention](block_in))
            if spatial_downsample[i]:
                level.downsample = SPATIAL_DOWNSAMPLE[spatial_downsample[i]](block_in)
                res //= 2
            if temporal_downsample[i]:
                level.time_downsample = TEMPORAL_DOWNSAMPLE[temporal_downsample[i]]()
            self.down.append(level)
        self.mid = _MidBlock(block_in, mid_resnet, attention, dropout)
        self.norm_out = normalize(block_in, act="silu")
        self.conv_out = CausalConv3d(block_in, 2 * z_channels if double_z else z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(x))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """conv_in, the levels and mid.block_1: everything before the mid-block attention."""
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = self.checkpointed(block, h)
                if len(level.attn):
                    h = self.checkpointed(level.attn[j], h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
            if hasattr(level, "time_downsample"):
                h = level.time_downsample(h)
        return self.checkpointed(self.mid.block_1, h)

    def spatial_reach(self) -> float:
        """How far (in output latent pixels, each side) one latent's value reaches into the input
        through the convs: the spatial receptive radius, not counting the attention."""
        scale = 1  # input pixels per pixel of the current level
        reach = _conv_reach(self.conv_in)
        for level in self.down:
            reach += sum(_conv_reach(b) for b in level.block) * scale
            if hasattr(level, "downsample"):
                reach += _conv_reach(level.downsample) * scale
                scale *= 2
        reach += (_conv_reach(self.mid) + _conv_reach(self.conv_out)) * scale
        return reach / scale

    def head_modules(self) -> List[nn.Module]:
        return [self.conv_in, self.down, self.mid.block_1]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """The mid-block attention onwards (at latent resolution)."""
        h = self.checkpointed(self.mid.attn_1, h)
        h = self.checkpointed(self.mid.block_2, h)
        return self.conv_out(self.norm_out(h))


class Decoder(Checkpointed):
    """latent (B, z_channels, T', h, w) -> (B, out_channels, T, H, W).

    Keys: ``conv_in``, ``mid.*``, ``up.i.block.j`` (num_res_blocks + 1 per level), ``up.i.attn.j``,
    ``up.i.upsample``, ``norm_out``, ``conv_out``. ``up`` is indexed by level (0 = full resolution)
    and runs from the last index down to 0; each level's spatial, then temporal upsample follow its blocks.
    """

    def __init__(self, *, out_channels: int, z_channels: int, hidden_size: int, hidden_size_mult: Sequence[int],
                 num_res_blocks: int, dropout: float, resnet_blocks: Sequence[str], spatial_upsample: Sequence[str],
                 temporal_upsample: Sequence[str], mid_resnet: str, attention: str,
                 attn_resolutions: Sequence[int], resolution: int):
        super().__init__()
        levels = len(hidden_size_mult)
        block_in = hidden_size * hidden_size_mult[-1]
        res = resolution // 2 ** sum(1 for s in spatial_upsample if s)
        self.conv_in = CausalConv3d(z_channels, block_in, 3, padding=1)
        self.mid = _MidBlock(block_in, mid_resnet, attention, dropout)
        up = [None] * levels
        for i in reversed(range(levels)):
            level = nn.Module()
            level.block, level.attn = nn.ModuleList(), nn.ModuleList()
            block_out = hidden_size * hidden_size_mult[i]
            for _ in range(num_res_blocks + 1):
                level.block.append(RESNET_BLOCKS[resnet_blocks[i]](block_in, block_out, dropout=dropout))
                block_in = block_out
                if res in attn_resolutions:
                    level.attn.append(ATTENTION[attention](block_in))
            if spatial_upsample[i]:
                level.upsample = SPATIAL_UPSAMPLE[spatial_upsample[i]](block_in)
                res *= 2
            if temporal_upsample[i]:
                level.time_upsample = TEMPORAL_UPSAMPLE[temporal_upsample[i]]()
            up[i] = level
        self.up = nn.ModuleList(up)
        self.norm_out = normalize(block_in, act="silu")
        self.conv_out = CausalConv3d(block_in, out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.tail(self.head(z))

    def head(self, z: torch.Tensor) -> torch.Tensor:
        """conv_in, mid.block_1 and the mid-block attention (at latent resolution)."""
        h = self.conv_in(z)
        h = self.checkpointed(self.mid.block_1, h)
        return self.checkpointed(self.mid.attn_1, h)

    def spatial_reach(self) -> float:
        """How far (in input latent pixels, each side) one output pixel's value reaches through the
        convs: the spatial receptive radius, not counting the attention."""
        scale = 1.0  # latent pixels per pixel of the current level
        reach = float(_conv_reach(self.conv_in) + _conv_reach(self.mid))
        for level in reversed(self.up):
            reach += sum(_conv_reach(b) for b in level.block) * scale
            if hasattr(level, "upsample"):
                scale /= 2
                reach += _conv_reach(level.upsample) * scale
        return reach + _conv_reach(self.conv_out) * scale

    def tail_modules(self) -> List[nn.Module]:
        return [self.mid.block_2, self.up, self.norm_out, self.conv_out]

    def tail(self, h: torch.Tensor) -> torch.Tensor:
        """mid.block_2 onwards: the levels up to full resolution."""
        h = self.checkpointed(self.mid.block_2, h)
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = self.checkpointed(block, h)
                if len(level.attn):
                    h = self.checkpointed(level.attn[j], h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
            if hasattr(level, "time_upsample"):
                h = level.time_upsample(h)
        return self.conv_out(self.norm_out(h))
