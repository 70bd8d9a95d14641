"""LatteT2V: Open-Sora-Plan v1.0's text-to-video transformer, as a diffusers model.

Loads upstream checkpoints unchanged (their config.json with _class_name "LatteT2V" and state-dict
key names, spec/osp-v1.0-latte-t2v-state-dict-2-layers.txt), strictly, and reproduces upstream's
inference output (spec/open-sora-plan-v1.0-numerics.md, section A).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ...nn import CaptionSegment
from .core import LatteCore, _check_common, _positive_int
from .embeddings import AdaLNSingle, CaptionProjection

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
    # A tiny model for tests and the offline demo: 2 layers of 2 heads x 32, 64-px frames (latents
    # 8 x 8), captions of TinyTextEncoder's default width 64.
    "LatteT2V-tiny": {**LATTE_T2V_XL_122, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 32,
                      "cross_attention_dim": 64, "sample_size": [8, 8], "caption_channels": 64},
}


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


class LatteT2V(LatteCore, ModelMixin, ConfigMixin):
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

    Added by osp: ``learned_null_caption`` (False, as upstream; an upstream config.json lacks it):
    True for models trained with caption dropout (``osp train-t2v --cfg_dropout``), whose
    ``caption_projection.y_embedding`` is a trained parameter rather than upstream's untrained
    random buffer (same key and shape). ``forward(..., drop_caption=)`` replaces captions by that
    null caption, and the pipeline's ``text_mask="mask"`` mode uses it for an empty negative prompt.

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
        learned_null_caption: bool = False,
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
        if not isinstance(learned_null_caption, bool):
            raise ValueError(f"{name} config: learned_null_caption={learned_null_caption!r}; expected true or false")
        # Parameters are registered in upstream's state-dict order: the top-level table first (a
        # parameter of this module), then pos_embed, the blocks, proj_out, adaln_single, captions.
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self._build_core(heads=num_attention_heads, head_dim=attention_head_dim, in_channels=in_channels,
                         out_channels=out_channels or in_channels, num_layers=num_layers, sample_hw=hw,
                         patch_size=patch_size, video_length=video_length, cross_attention=True,
                         attention_bias=attention_bias, norm_eps=norm_eps, dropout=dropout,
                         modulation="ada_norm_single")
        self.adaln_single = AdaLNSingle(dim)
        self.caption_projection = CaptionProjection(caption_channels, dim, learned=learned_null_caption)

    @classmethod
    def from_preset(cls, name: str = "LatteT2V-XL/122", **overrides) -> "LatteT2V":
        """A freshly initialized model of a named configuration (``PRESETS``), with config overrides.

        "LatteT2V-XL/122" (= "-17x256x256") has video_length 5 and sample_size 32 (latents of
        17x256x256 clips); "-65x256x256" has 17 and 32; "-65x512x512" 17 and 64. "LatteT2V-tiny"
        (2 layers, 2 heads x 32, sample_size 8, caption_channels 64) is for tests and the demo.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
        cfg = {**PRESETS[name], **overrides}
        if "cross_attention_dim" not in overrides:
            cfg["cross_attention_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return cls(**cfg)

    def enable_learned_null_caption(self) -> None:
        """Make ``caption_projection.y_embedding`` a trainable parameter (same key and values) and record
        ``learned_null_caption=True`` in the config, so that saved models load with it as a parameter
        and the pipeline uses it as the unconditional caption."""
        self.caption_projection.make_learned()
        self.register_to_config(learned_null_caption=True)

    def null_caption(self, length: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(states (length, caption_channels), mask (length,) int64): ``y_embedding``'s 120 rows first
        (mask 1), zero states with mask 0 after them (the first ``length`` rows when length < 120)."""
        return self.caption_projection.null_caption(length)

    def _drop_captions(self, fn: str, ehs: torch.Tensor, mask, drop) -> Tuple[torch.Tensor, torch.Tensor]:
        """Replace the captions (every group: the video's and its images') of the samples where
        ``drop`` (b,) is true by the null caption, states and mask."""
        b, groups, L = ehs.shape[:3]
        if not isinstance(drop, torch.Tensor) or tuple(drop.shape) != (b,):
            got = tuple(drop.shape) if isinstance(drop, torch.Tensor) else type(drop).__name__
            raise ValueError(f"{fn}: drop_caption has shape {got}; expected ({b},) bools (true = use the null caption)")
        drop = drop.to(device=ehs.device, dtype=torch.bool)
        null, null_mask = self.null_caption(L)
        ehs = torch.where(drop[:, None, None, None], null.to(ehs.dtype)[None, None], ehs)
        if mask is None:
            m = torch.ones(b, groups, L, dtype=torch.long, device=ehs.device)
        else:
            m = mask[:, None] if mask.dim() == 2 else mask
            if m.dim() != 3 or tuple(m.shape) != (b, groups, L):
                raise ValueError(f"{fn}: encoder_attention_mask has shape {tuple(mask.shape)}; expected ({b}, {L}) "
                                 f"or ({b}, {groups}, {L}) (1 = caption token, 0 = padding)")
            m = m.to(ehs.device).long()
        m = torch.where(drop[:, None, None], null_mask.to(ehs.device)[None, None], m)
        return ehs, m

    def _segments(self, fn: str, encoder_hidden_states, encoder_attention_mask, b: int, frames: int,
                  images: int, drop_caption=None) -> List[CaptionSegment]:
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
        if drop_caption is not None:
            ehs, encoder_attention_mask = self._drop_captions(fn, ehs, encoder_attention_mask, drop_caption)
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
        *,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        use_image_num: int = 0,
        return_dict: bool = True,
        enable_temporal_attentions: bool = True,
        attention_mask: Optional[torch.Tensor] = None,
        added_cond_kwargs: Optional[dict] = None,
        cross_attention_kwargs: Optional[dict] = None,
        drop_caption: Optional[torch.Tensor] = None,
    ) -> Union[Transformer2DModelOutput, Tuple[torch.Tensor]]:
        """Predict noise (and variance) for noisy latents.

        The first three arguments may be positional; every other one is keyword-only, because
        upstream's positional order after ``encoder_hidden_states`` differs from diffusers' and a
        positional call would be ambiguous. Inputs are cast to the model's dtype.

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
            drop_caption: (b,) bools (osp; classifier-free-guidance training): the samples whose
                captions (the video's and its images') are replaced by ``null_caption(L)``, states
                and mask. None (default) leaves every caption as given.

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
        segments = self._segments(fn, encoder_hidden_states, encoder_attention_mask, b, frames, use_image_num,
                                  drop_caption)
        tau, e = self.adaln_single(t, x.dtype)
        x = self._backbone(x, b, total, frames, tau, segments, enable_temporal_attentions)
        shift, scale = (self.scale_shift_table[None] + e[:, None]).unbind(1)
        out = self._head(x, shift, scale, b, total, (Hp, Wp))
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
