"""Latte without captions: LatteClass (class-conditional) and Latte (unconditional), as diffusers
models. Patching, blocks and head are LatteT2V's (``core.LatteCore``) without cross-attention.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .blocks import MODULATIONS
from .core import LatteCore, _check_common
from .embeddings import AdaLNSingle, LabelEmbedding, TimestepEmbedding

class _LabelLatte(LatteCore):
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
