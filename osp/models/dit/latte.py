"""Latte video transformers: LatteT2V (Open-Sora-Plan v1.0's text-to-video model), LatteClass
(class-conditional) and Latte (unconditional), as diffusers models.

LatteT2V loads upstream checkpoints unchanged (their config.json with _class_name "LatteT2V" and
state-dict key names, spec/osp-v1.0-latte-t2v-state-dict-2-layers.txt), strictly, and reproduces
upstream's inference output (spec/open-sora-plan-v1.0-numerics.md, section A). The three models
share the patch embedding, the spatial/temporal block stack and the output head; they differ in
their conditioning (captions + adaLN-single, class labels, or the timestep alone).
"""
from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.utils.checkpoint
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ... import ops
from ..loading import StrictLoadingMixin
from .blocks import MODULATIONS, CaptionSegment, LatteBlock
from .embeddings import (
    AdaLNSingle,
    CaptionProjection,
    LabelEmbedding,
    PatchEmbed,
    TimestepEmbedding,
    temporal_sincos,
)

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

LATTE_T2V_XL_122: Dict[str, Any] = dict(
    num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
    dropout=0.0, cross_attention_dim=1152, attention_bias=True, sample_size=[32, 32], patch_size=2,
    activation_fn="gelu-approximate", num_embeds_ada_norm=1000, norm_type="ada_norm_single",
    norm_elementwise_affine=False, norm_eps=1e-6, caption_channels=4096, video_length=5,
)
"""LatteT2V-XL/122 as released for 17x256x256 clips (latents 5 x 32 x 32; 28 layers, 16 x 72)."""

PRESETS: Dict[str, Dict[str, Any]] = {
    "LatteT2V-XL/122": LATTE_T2V_XL_122,
    "LatteT2V-XL/122-17x256x256": LATTE_T2V_XL_122,
    "LatteT2V-XL/122-65x256x256": {**LATTE_T2V_XL_122, "video_length": 17},
    "LatteT2V-XL/122-65x512x512": {**LATTE_T2V_XL_122, "video_length": 17, "sample_size": [64, 64]},
    # Latte's smaller widths with the same layout (no released Open-Sora-Plan weights).
    "LatteT2V-L/122": {**LATTE_T2V_XL_122, "num_layers": 24, "attention_head_dim": 64, "cross_attention_dim": 1024},
    "LatteT2V-B/122": {**LATTE_T2V_XL_122, "num_layers": 12, "num_attention_heads": 12, "attention_head_dim": 64,
                       "cross_attention_dim": 768},
    "LatteT2V-S/122": {**LATTE_T2V_XL_122, "num_layers": 12, "num_attention_heads": 6, "attention_head_dim": 64,
                       "cross_attention_dim": 384},
}


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


class _LatteCore(StrictLoadingMixin):
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
        self.gradient_checkpointing = False

    def reset_buffers(self, device=None, dtype: Optional[torch.dtype] = None) -> None:
        """Recompute the non-persistent sin-cos buffers (pos_embed.pos_embed, temp_pos_embed) in
        float32 on ``device``, then cast them to ``dtype`` when given (as ``.to(dtype)`` would)."""
        self.pos_embed.reset_buffers(device)
        self.temp_pos_embed = temporal_sincos(self.inner_dim, self.config.video_length, device=device)
        if dtype is not None:
            self.pos_embed.pos_embed = self.pos_embed.pos_embed.to(dtype)
            self.temp_pos_embed = self.temp_pos_embed.to(dtype)

    # --- gradient checkpointing (the same switch on every diffusers version) -----------------------

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """Recompute each block's activations in backward (torch.utils.checkpoint, use_reentrant=False,
        unless ``gradient_checkpointing_func(block, *args)`` is given)."""
        self.gradient_checkpointing = True
        self._gradient_checkpointing_func = gradient_checkpointing_func

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _call(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            fn = getattr(self, "_gradient_checkpointing_func", None)
            if fn is not None:
                return fn(block, *args)
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

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
            x = self._call(spatial, x, cond, segments, total)
            if not enable_temporal:
                continue
            xf = x.view(b, total, T, D)
            video = xf[:, :frames].transpose(1, 2).reshape(b * T, frames, D)
            if i == 0:
                video = video + self.temp_pos_embed.to(video.dtype)
            video = self._call(temporal, video, cond).view(b, T, frames, D).transpose(1, 2)
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

    # --- dtype casts, configs, checkpoints -------------------------------------------------------------

    def to(self, *args, **kwargs):
        # diffusers' ModelMixin.to warns about fp32-pinned modules on every dtype cast even when
        # there are none; these models have none and need nothing beyond nn.Module.to.
        return nn.Module.to(self, *args, **kwargs)

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


def _caption_keep(fn: str, mask, b: int, groups: int, L: int, device) -> Optional[torch.Tensor]:
    """(b, groups, L) bool keys to attend to, from a 0/1 mask (b, L) or (b, groups, L).

    Upstream adds (1 - mask) * -10000 to the scaled logits. For a partially masked caption that is
    exactly a boolean key mask in fp32 (the masked keys' weights underflow to 0). For a fully masked
    caption every logit shifts by the same constant, so upstream attends over all L tokens as if
    unmasked: such rows are opened to every key here. (Upstream's only residue is the fp32 rounding
    of score - 10000, ~1e-5 relative on that caption's cross-attention.)
    """
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{fn}: encoder_attention_mask must be a tensor or None, got {type(mask).__name__}")
    m = mask[:, None] if mask.dim() == 2 else mask
    if m.dim() != 3 or tuple(m.shape) != (b, groups, L):
        expected = f"({b}, {L})" + (f" or ({b}, {groups}, {L})" if groups > 1 else f" or ({b}, 1, {L})")
        raise ValueError(f"{fn}: encoder_attention_mask has shape {tuple(mask.shape)}; expected {expected} "
                         "(1 = caption token, 0 = padding)")
    keep = m.to(device) if m.dtype == torch.bool else m.to(device) >= 0.5
    return keep | ~keep.any(dim=-1, keepdim=True)


class LatteT2V(_LatteCore, ModelMixin, ConfigMixin):
    r"""Open-Sora-Plan v1.0's text-to-video Latte transformer (LatteT2V-XL/122 and its relatives).

    Config fields are upstream's config.json fields: ``num_attention_heads`` x ``attention_head_dim``
    (hidden size D), ``in_channels`` / ``out_channels`` (latent channels; out = 2 x in with learned
    sigma), ``num_layers`` (spatial/temporal block pairs), ``dropout``, ``cross_attention_dim``
    (= D, or None for D), ``attention_bias`` (biases of to_q/to_k/to_v), ``sample_size`` (latent
    H, W the position buffer is built for; an int or [H, W]), ``patch_size``, ``activation_fn``
    ("gelu-approximate"), ``num_embeds_ada_norm`` (recorded; unused by adaLN-single),
    ``norm_type`` ("ada_norm_single"), ``norm_elementwise_affine`` (False), ``norm_eps`` (block
    LayerNorms), ``caption_channels`` (4096 for T5-XXL), ``video_length`` (latent frames the
    temporal blocks see). Upstream fields without effect here (attention_mode, norm_num_groups, ...)
    are accepted and dropped; fields naming unsupported variants with non-default values raise.

    Use ``LatteT2V.from_preset("LatteT2V-XL/122")`` (see ``PRESETS``) for a fresh model,
    ``from_pretrained`` for upstream or osp checkpoints.
    """

    UPSTREAM_CLASS_NAMES = ("LatteT2V",)

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        cross_attention_dim: Optional[int] = 1152,
        attention_bias: bool = True,
        sample_size: Union[int, Sequence[int]] = (32, 32),
        patch_size: int = 2,
        activation_fn: str = "gelu-approximate",
        num_embeds_ada_norm: Optional[int] = 1000,
        norm_type: str = "ada_norm_single",
        norm_elementwise_affine: bool = False,
        norm_eps: float = 1e-6,
        caption_channels: int = 4096,
        video_length: int = 5,
    ):
        super().__init__()
        name = type(self).__name__
        hw = _check_common(name, num_attention_heads, attention_head_dim, in_channels, out_channels, num_layers,
                           patch_size, video_length, norm_eps, sample_size)
        dim = num_attention_heads * attention_head_dim
        for field, value, allowed in (("activation_fn", activation_fn, ("gelu-approximate",)),
                                      ("norm_type", norm_type, ("ada_norm_single",)),
                                      ("norm_elementwise_affine", norm_elementwise_affine, (False,))):
            if value not in allowed:
                raise ValueError(f"{name} config: {field}={value!r} is not supported; expected {allowed[0]!r}")
        if cross_attention_dim not in (None, dim):
            raise ValueError(f"{name} config: cross_attention_dim={cross_attention_dim!r}; expected the hidden size "
                             f"{num_attention_heads}x{attention_head_dim} = {dim} (captions are projected to it)")
        if not _positive_int(caption_channels):
            raise ValueError(f"{name} config: caption_channels={caption_channels!r}; expected a positive int")
        # Parameters are registered in upstream's state-dict order: the top-level table first (a
        # parameter of this module), then pos_embed, the blocks, proj_out, adaln_single, captions.
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self._build_core(heads=num_attention_heads, head_dim=attention_head_dim, in_channels=in_channels,
                         out_channels=out_channels or in_channels, num_layers=num_layers, sample_hw=hw,
                         patch_size=patch_size, video_length=video_length, cross_attention=True,
                         attention_bias=attention_bias, norm_eps=norm_eps, dropout=dropout,
                         modulation="ada_norm_single")
        self.adaln_single = AdaLNSingle(dim)
        self.caption_projection = CaptionProjection(caption_channels, dim)

    @classmethod
    def from_preset(cls, name: str = "LatteT2V-XL/122", **overrides) -> "LatteT2V":
        """A freshly initialized model of a named configuration (``PRESETS``), with config overrides.

        "LatteT2V-XL/122" (= "-17x256x256") has video_length 5 and sample_size 32 (latents of
        17x256x256 clips); "-65x256x256" has 17 and 32; "-65x512x512" 17 and 64.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = {**PRESETS[name], **overrides}
        if "cross_attention_dim" not in overrides:
            cfg["cross_attention_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return cls(**cfg)

    def _segments(self, fn: str, encoder_hidden_states, encoder_attention_mask, b: int, frames: int,
                  images: int) -> List[CaptionSegment]:
        C = self.config.caption_channels
        groups = 1 + images
        ehs = encoder_hidden_states
        if not isinstance(ehs, torch.Tensor):
            raise ValueError(f"{fn}: encoder_hidden_states is required: caption states (b, L, {C}) or "
                             f"(b, 1 + use_image_num, L, {C})")
        if ehs.dim() == 3 and images == 0:
            ehs = ehs[:, None]
        if ehs.dim() != 4 or ehs.shape[0] != b or ehs.shape[1] != groups or ehs.shape[3] != C or ehs.shape[2] == 0:
            expected = f"(b={b}, L, {C})" if images == 0 else ""
            expected += (" or " if expected else "") + f"({b}, {groups}, L, {C}) (the video's caption, then one per image)"
            raise ValueError(f"{fn}: encoder_hidden_states has shape {tuple(ehs.shape)}; expected {expected}")
        L = ehs.shape[2]
        ctx = self.caption_projection(ehs.to(self.caption_projection.linear_1.weight.dtype))
        keep = _caption_keep(fn, encoder_attention_mask, b, groups, L, ctx.device)
        segments = [CaptionSegment(0, frames, ctx[:, 0], None if keep is None else keep[:, 0])]
        if images:
            segments.append(CaptionSegment(frames, frames + images, ctx[:, 1:].reshape(b * images, L, -1),
                                           None if keep is None else keep[:, 1:].reshape(b * images, L)))
        return segments

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: Optional[torch.Tensor] = None,
        encoder_hidden_states: Optional[torch.Tensor] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        use_image_num: int = 0,
        return_dict: bool = True,
        *,
        enable_temporal_attentions: bool = True,
        attention_mask: Optional[torch.Tensor] = None,
        added_cond_kwargs: Optional[dict] = None,
        cross_attention_kwargs: Optional[dict] = None,
    ) -> Union[Transformer2DModelOutput, Tuple[torch.Tensor]]:
        """Predict noise (and variance) for noisy latents.

        Args:
            hidden_states: (b, in_channels, F + use_image_num, H, W) latents: F = video_length video
                frames, then use_image_num images (joint image-video training). H, W multiples of
                patch_size; sizes other than sample_size get their position table computed.
            timestep: (b,) diffusion steps (int or float), or one scalar for the whole batch.
            encoder_hidden_states: caption states (b, L, caption_channels), or
                (b, 1 + use_image_num, L, caption_channels): the video's caption, then each image's.
            encoder_attention_mask: (b, L) or (b, 1 + use_image_num, L), 1/True = token, 0/False =
                padding; None = attend to all. A fully masked caption attends to all its tokens, as
                upstream's -10000 bias makes it do.
            use_image_num: images appended after the video frames; the spatial blocks see every
                frame, the temporal blocks (and temp_pos_embed) only the video frames.
            return_dict: return ``Transformer2DModelOutput(sample=...)`` (else a 1-tuple).
            enable_temporal_attentions: False runs the spatial blocks only (text-to-image: any
                number of frames, no temporal position embedding).
            attention_mask: must be None (upstream's self-attention mask is unused in T2V).
            added_cond_kwargs, cross_attention_kwargs: accepted for upstream call compatibility
                (PixArt's resolution conditions are off in LatteT2V); must be None or empty.

        Returns:
            ``.sample`` (b, out_channels, F + use_image_num, H, W) in the model's dtype.
        """
        fn = f"{type(self).__name__}.forward"
        if attention_mask is not None:
            raise ValueError(f"{fn}: attention_mask must be None (LatteT2V has no self-attention mask); "
                             "mask caption tokens with encoder_attention_mask")
        if added_cond_kwargs and any(v is not None for v in added_cond_kwargs.values()):
            raise ValueError(f"{fn}: added_cond_kwargs={added_cond_kwargs!r}; LatteT2V takes no resolution/aspect conditions")
        if cross_attention_kwargs:
            raise ValueError(f"{fn}: cross_attention_kwargs={cross_attention_kwargs!r} is not supported")
        b, total, frames = self._check_latents(fn, hidden_states, use_image_num, enable_temporal_attentions)
        t = self._timesteps(fn, timestep, b, hidden_states.device)
        x, Hp, Wp = self._patchify(hidden_states)
        segments = self._segments(fn, encoder_hidden_states, encoder_attention_mask, b, frames, use_image_num)
        tau, e = self.adaln_single(t, x.dtype)
        x = self._backbone(x, b, total, frames, tau, segments, enable_temporal_attentions)
        shift, scale = (self.scale_shift_table[None] + e[:, None]).unbind(1)
        out = self._head(x, shift, scale, b, total, (Hp, Wp))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class _LabelLatte(_LatteCore):
    """Shared body of LatteClass and Latte: timestep (plus class label) conditioning, no captions.

    ``ada_norm_single``: one adaLN-single MLP (``adaln_single``) over c = t_emb + y_emb, each block
    adds its ``scale_shift_table``; the head uses ``scale_shift_table`` (2, D) + c.
    ``ada_norm_zero`` (DiT): c = t_emb + y_emb (``t_embedder``), each block has its own zero-initialized
    ``adaLN_modulation``, the head ``norm_out_modulation`` (SiLU, Linear D -> 2D: shift, scale), and
    ``proj_out`` starts at zero, so a new model predicts zeros.
    """

    def _build_label_model(self, *, num_attention_heads, attention_head_dim, in_channels, out_channels, num_layers,
                           dropout, attention_bias, sample_size, patch_size, norm_type, norm_eps, video_length,
                           num_classes: int, class_dropout_prob: float) -> None:
        name = type(self).__name__
        hw = _check_common(name, num_attention_heads, attention_head_dim, in_channels, out_channels, num_layers,
                           patch_size, video_length, norm_eps, sample_size)
        if norm_type not in MODULATIONS:
            raise ValueError(f"{name} config: norm_type={norm_type!r}; expected one of {MODULATIONS}")
        if not (isinstance(num_classes, int) and num_classes >= 0):
            raise ValueError(f"{name} config: num_classes={num_classes!r}; expected an int >= 0")
        if not (isinstance(class_dropout_prob, (int, float)) and 0 <= class_dropout_prob < 1):
            raise ValueError(f"{name} config: class_dropout_prob={class_dropout_prob!r}; expected a float in [0, 1)")
        dim = num_attention_heads * attention_head_dim
        if norm_type == "ada_norm_single":
            self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self._build_core(heads=num_attention_heads, head_dim=attention_head_dim, in_channels=in_channels,
                         out_channels=out_channels or in_channels, num_layers=num_layers, sample_hw=hw,
                         patch_size=patch_size, video_length=video_length, cross_attention=False,
                         attention_bias=attention_bias, norm_eps=norm_eps, dropout=dropout, modulation=norm_type)
        if norm_type == "ada_norm_single":
            self.adaln_single = AdaLNSingle(dim)
        else:
            self.t_embedder = TimestepEmbedding(dim)
            self.norm_out_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))
            for layer in (self.norm_out_modulation[1], self.proj_out):
                nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)
        self.y_embedder = LabelEmbedding(num_classes, dim, class_dropout_prob) if num_classes else None

    def _label_forward(self, hidden_states, timestep, class_labels, use_image_num, enable_temporal_attentions,
                       return_dict, force_drop_ids=None):
        fn = f"{type(self).__name__}.forward"
        b, total, frames = self._check_latents(fn, hidden_states, use_image_num, enable_temporal_attentions)
        t = self._timesteps(fn, timestep, b, hidden_states.device)
        x, Hp, Wp = self._patchify(hidden_states)
        y = None
        if self.y_embedder is not None:
            n = self.y_embedder.num_classes
            if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (b,) or class_labels.is_floating_point():
                shape = tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else class_labels
                raise ValueError(f"{fn}: class_labels={shape}; expected ({b},) integer labels in [0, {n}] "
                                 f"({n} = no label, for classifier-free guidance)")
            y = self.y_embedder(class_labels.to(x.device), force_drop_ids)
        elif class_labels is not None:
            raise ValueError(f"{fn}: this model is unconditional; class_labels must be None")
        if self.config.norm_type == "ada_norm_single":
            cond, e = self.adaln_single(t, x.dtype, extra=y)
            shift, scale = (self.scale_shift_table[None] + e[:, None]).unbind(1)
        else:
            cond = self.t_embedder(t, x.dtype)
            if y is not None:
                cond = cond + y.to(cond.dtype)
            shift, scale = self.norm_out_modulation(cond).chunk(2, dim=1)
        x = self._backbone(x, b, total, frames, cond, None, enable_temporal_attentions)
        out = self._head(x, shift, scale, b, total, (Hp, Wp))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)


class LatteClass(_LabelLatte, ModelMixin, ConfigMixin):
    """Class-conditional Latte: a label embedding (with a "no label" row for classifier-free
    guidance) added to the timestep embedding; norm_type "ada_norm_zero" (DiT's adaLN-Zero, the
    default) or "ada_norm_single". Blocks, patching and head are LatteT2V's (without cross-attention)."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_size: Union[int, Sequence[int]] = 32,
        patch_size: int = 2,
        norm_type: str = "ada_norm_zero",
        norm_eps: float = 1e-6,
        video_length: int = 16,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LatteClass config: num_classes={num_classes!r}; expected >= 1 (use Latte for an "
                             "unconditional model)")
        self._build_label_model(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, num_layers=num_layers, dropout=dropout, attention_bias=attention_bias,
            sample_size=sample_size, patch_size=patch_size, norm_type=norm_type, norm_eps=norm_eps,
            video_length=video_length, num_classes=num_classes, class_dropout_prob=class_dropout_prob)

    def forward(self, hidden_states: torch.Tensor, timestep: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None, use_image_num: int = 0, return_dict: bool = True, *,
                enable_temporal_attentions: bool = True, force_drop_ids: Optional[torch.Tensor] = None):
        """hidden_states (b, C_in, F + use_image_num, H, W), timestep (b,) or a scalar, class_labels
        (b,) ints in [0, num_classes] (num_classes = no label); ``force_drop_ids`` (b,) 1 = use the
        no-label row. Returns ``.sample`` (b, out_channels, F + use_image_num, H, W)."""
        return self._label_forward(hidden_states, timestep, class_labels, use_image_num,
                                   enable_temporal_attentions, return_dict, force_drop_ids)


class Latte(_LabelLatte, ModelMixin, ConfigMixin):
    """Unconditional Latte: timestep conditioning only (norm_type "ada_norm_single", the default, or
    "ada_norm_zero"); blocks, patching and head are LatteT2V's (without cross-attention)."""

    @register_to_config
    def __init__(
        self,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        in_channels: int = 4,
        out_channels: Optional[int] = 8,
        num_layers: int = 28,
        dropout: float = 0.0,
        attention_bias: bool = True,
        sample_size: Union[int, Sequence[int]] = 32,
        patch_size: int = 2,
        norm_type: str = "ada_norm_single",
        norm_eps: float = 1e-6,
        video_length: int = 16,
    ):
        super().__init__()
        self._build_label_model(
            num_attention_heads=num_attention_heads, attention_head_dim=attention_head_dim, in_channels=in_channels,
            out_channels=out_channels, num_layers=num_layers, dropout=dropout, attention_bias=attention_bias,
            sample_size=sample_size, patch_size=patch_size, norm_type=norm_type, norm_eps=norm_eps,
            video_length=video_length, num_classes=0, class_dropout_prob=0.0)

    def forward(self, hidden_states: torch.Tensor, timestep: Optional[torch.Tensor] = None, use_image_num: int = 0,
                return_dict: bool = True, *, enable_temporal_attentions: bool = True):
        """hidden_states (b, C_in, F + use_image_num, H, W), timestep (b,) or a scalar. Returns
        ``.sample`` (b, out_channels, F + use_image_num, H, W)."""
        return self._label_forward(hidden_states, timestep, None, use_image_num, enable_temporal_attentions,
                                   return_dict)
