"""What the Latte video transformers share (LatteT2V, LatteClass, Latte): config checks, the patch
embedding, the spatial/temporal block stack, the output head and checkpoint handling
(spec: open-sora-plan-v1.0-numerics.md, section A). The models differ in their conditioning.
"""
from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ... import ops
from ...nn import CaptionSegment
from ..modeling import Checkpointed, OspModelMixin
from .blocks import LatteBlock
from .embeddings import PatchEmbed, temporal_sincos

logger = logging.getLogger(__name__)

FINAL_NORM_EPS = 1e-6  # norm_out's eps is 1e-6 whatever norm_eps says (spec A.6)

# Upstream config fields that describe architecture variants LatteT2V v1.0 never uses, with the one
# value (or values) this implementation supports; any other value is a ValueError naming the field.
_FIXED_FIELDS: Dict[str, tuple] = {
    "num_vector_embeds": (None,),
    "only_cross_attention": (False,),
    "double_self_attention": (False,),
    "attention_type": ("default",),
    "compress_kv_factor": (1, None),
    "use_rope": (False, None),
    "use_first_frame": (False, None),
}
# Upstream config fields that do not change the network's outputs here (training switches, the SDPA
# backend choice, GroupNorm/linear-projection settings of input types LatteT2V does not have):
# accepted and dropped. Any other unknown field is dropped too, with an info log line naming it.
_IGNORED_FIELDS = ("norm_num_groups", "use_linear_projection", "upcast_attention", "attention_mode",
                   "gradient_checkpointing", "model_max_length", "rope_scaling_type")

def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _sample_hw(sample_size) -> Tuple[int, int]:
    if _positive_int(sample_size):
        return sample_size, sample_size
    if isinstance(sample_size, (list, tuple)) and len(sample_size) == 2 and all(map(_positive_int, sample_size)):
        return int(sample_size[0]), int(sample_size[1])
    raise ValueError(f"sample_size={sample_size!r}; expected a positive int or [height, width] (latent pixels)")


def _check_common(cls_name: str, heads, head_dim, in_channels, out_channels, num_layers, patch_size, video_length,
                  norm_eps, sample_size) -> Tuple[int, int]:
    for field, value in (("num_attention_heads", heads), ("attention_head_dim", head_dim),
                         ("in_channels", in_channels), ("num_layers", num_layers), ("patch_size", patch_size),
                         ("video_length", video_length)):
        if not _positive_int(value):
            raise ValueError(f"{cls_name} config: {field}={value!r}; expected a positive int")
    if out_channels is not None and not _positive_int(out_channels):
        raise ValueError(f"{cls_name} config: out_channels={out_channels!r}; expected a positive int or None (= in_channels)")
    if (heads * head_dim) % 4:
        raise ValueError(f"{cls_name} config: hidden size {heads}x{head_dim} = {heads * head_dim} must be a multiple of 4 "
                         "for the 2-D sin-cos position embedding")
    if not (isinstance(norm_eps, (int, float)) and norm_eps > 0):
        raise ValueError(f"{cls_name} config: norm_eps={norm_eps!r}; expected a positive float")
    hw = _sample_hw(sample_size)
    if hw[0] % patch_size or hw[1] % patch_size:
        raise ValueError(f"{cls_name} config: sample_size={sample_size!r} is not divisible by patch_size={patch_size}")
    return hw


class LatteCore(OspModelMixin, Checkpointed):
    """What the three Latte models share: patch embedding, block stack, output head, checkpoints.

    Subclasses build their conditioning and call ``_build_core`` (before their own embeddings, so
    that the state-dict order follows upstream's) and ``_backbone`` from their forward.
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["LatteBlock"]
    UPSTREAM_CLASS_NAMES: Tuple[str, ...] = ()

    # --- construction ------------------------------------------------------------------------------

    def _build_core(self, *, heads: int, head_dim: int, in_channels: int, out_channels: int, num_layers: int,
                    sample_hw: Tuple[int, int], patch_size: int, video_length: int, cross_attention: bool,
                    attention_bias: bool, norm_eps: float, dropout: float, modulation: str) -> None:
        dim = heads * head_dim
        self.inner_dim, self.patch_size, self.out_channels = dim, patch_size, out_channels
        self.pos_embed = PatchEmbed(sample_hw, patch_size, in_channels, dim)

        def block(cross: bool) -> LatteBlock:
            return LatteBlock(dim, heads, head_dim, cross_attention=cross, attention_bias=attention_bias,
                              norm_eps=norm_eps, dropout=dropout, modulation=modulation)

        self.transformer_blocks = nn.ModuleList([block(cross_attention) for _ in range(num_layers)])
        self.temporal_transformer_blocks = nn.ModuleList([block(False) for _ in range(num_layers)])
        self.proj_out = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.register_buffer("temp_pos_embed", temporal_sincos(dim, video_length), persistent=False)

    def reset_buffers(self, device=None, dtype: Optional[torch.dtype] = None) -> None:
        """Recompute the non-persistent sin-cos buffers (pos_embed.pos_embed, temp_pos_embed) in
        float32 on ``device``, then cast them to ``dtype`` when given (as ``.to(dtype)`` would)."""
        self.pos_embed.reset_buffers(device)
        self.temp_pos_embed = temporal_sincos(self.inner_dim, self.config.video_length, device=device)
        if dtype is not None:
            self.pos_embed.pos_embed = self.pos_embed.pos_embed.to(dtype)
            self.temp_pos_embed = self.temp_pos_embed.to(dtype)

    # --- forward pieces -------------------------------------------------------------------------------

    def _check_latents(self, fn: str, hidden_states, use_image_num, enable_temporal: bool) -> Tuple[int, int, int]:
        """(b, total frames, video frames) of valid latents (b, C_in, F + use_image_num, H, W)."""
        C, p, vl = self.config.in_channels, self.patch_size, self.config.video_length
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 5 or hidden_states.shape[1] != C:
            shape = tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__
            raise ValueError(f"{fn}: hidden_states has shape {shape}; expected (b, {C}, frames, H, W)")
        if not (isinstance(use_image_num, int) and not isinstance(use_image_num, bool) and use_image_num >= 0):
            raise ValueError(f"{fn}: use_image_num={use_image_num!r}; expected an int >= 0")
        b, _, total, H, W = hidden_states.shape
        if b == 0 or H == 0 or W == 0 or H % p or W % p:
            raise ValueError(f"{fn}: hidden_states has shape {tuple(hidden_states.shape)}; expected b >= 1 and H, W "
                             f"positive multiples of patch_size={p}")
        frames = total - use_image_num
        if frames < 1:
            raise ValueError(f"{fn}: hidden_states has {total} frames with use_image_num={use_image_num}; expected "
                             "the video frames first, then use_image_num images (at least one video frame)")
        if enable_temporal and frames != vl:
            raise ValueError(
                f"{fn}: {frames} video frames (hidden_states frames {total} - use_image_num {use_image_num}) but the "
                f"model's video_length is {vl}; the temporal blocks need exactly video_length frames (pass "
                "enable_temporal_attentions=False for images, i.e. spatial blocks only)"
            )
        return b, total, frames

    @staticmethod
    def _timesteps(fn: str, timestep, b: int, device) -> torch.Tensor:
        if timestep is None:
            raise ValueError(f"{fn}: timestep is required: a (b,) tensor of diffusion steps (or one scalar for all)")
        t = torch.as_tensor(timestep, device=device)
        if t.dim() == 0 or (t.dim() == 1 and t.shape[0] == 1):
            t = t.reshape(1).expand(b)
        if t.dim() != 1 or t.shape[0] != b or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{fn}: timestep has shape {tuple(t.shape)} and dtype {t.dtype}; expected ({b},) ints "
                             "or floats, or one scalar")
        return t

    def _patchify(self, hidden_states: torch.Tensor) -> Tuple[torch.Tensor, int, int]:
        """(b, C, F, H, W) -> tokens (b*F, T, D) with frames b-major, plus the patch grid (Hp, Wp)."""
        b, C, total, H, W = hidden_states.shape
        frames = hidden_states.to(self.pos_embed.proj.weight.dtype).transpose(1, 2).reshape(b * total, C, H, W)
        return self.pos_embed(frames), H // self.patch_size, W // self.patch_size

    def _backbone(self, x: torch.Tensor, b: int, total: int, frames: int, cond: torch.Tensor,
                  segments: Optional[Sequence[CaptionSegment]], enable_temporal: bool) -> torch.Tensor:
        """Spatial block i, then (over the video frames only) temporal block i, for every layer;
        temp_pos_embed is added once, after spatial block 0 and before temporal block 0 (spec A.5).

        x: (b*total, T, D) tokens; cond: tau (b, 6D) or c (b, D), per sample.
        """
        T, D = x.shape[1], x.shape[2]
        for i, (spatial, temporal) in enumerate(zip(self.transformer_blocks, self.temporal_transformer_blocks)):
            x = self.checkpointed(spatial, x, cond, segments, total)
            if not enable_temporal:
                continue
            xf = x.view(b, total, T, D)
            video = xf[:, :frames].transpose(1, 2).reshape(b * T, frames, D)
            if i == 0:
                video = video + self.temp_pos_embed.to(video.dtype)
            video = self.checkpointed(temporal, video, cond).view(b, T, frames, D).transpose(1, 2)
            x = (video if frames == total else torch.cat([video, xf[:, frames:]], dim=1)).reshape(b * total, T, D)
        return x

    def _head(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, b: int, total: int,
              grid: Tuple[int, int]) -> torch.Tensor:
        """LN(x)*(1+scale)+shift, proj_out, unpatchify: (b*total, T, D) -> (b, C_out, total, H, W)."""
        T, D = x.shape[1], x.shape[2]
        h = ops.layer_norm_modulate(x.reshape(b, total * T, D), shift.to(x.dtype), scale.to(x.dtype), FINAL_NORM_EPS)
        out = self.proj_out(h)
        p, C = self.patch_size, self.out_channels
        Hp, Wp = grid
        # token n = i*Wp + j holds (a*p + a')*C + c for pixel (c, i*p + a, j*p + a')
        out = out.view(b, total, Hp, Wp, p, p, C).permute(0, 6, 1, 2, 4, 3, 5)
        return out.reshape(b, C, total, Hp * p, Wp * p)

    # --- configs and checkpoints -------------------------------------------------------------

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        known = set(cls._get_init_keys(cls)) - {"self"}
        kept = {}
        for key, value in config_dict.items():
            if key in known or key.startswith("_"):
                kept[key] = value
            elif key in _FIXED_FIELDS:
                if value not in _FIXED_FIELDS[key]:
                    raise ValueError(f"{cls.__name__} config: {key}={value!r} is not supported; expected "
                                     f"{' or '.join(map(repr, _FIXED_FIELDS[key]))}")
            elif key not in _IGNORED_FIELDS:
                logger.info("%s config: ignoring field %s=%r (not used by this model)", cls.__name__, key, value)
        return super().extract_init_dict(kept, **kwargs)

    def _after_load(self, device, dtype: Optional[torch.dtype]) -> None:
        self.reset_buffers(device=device, dtype=dtype)
