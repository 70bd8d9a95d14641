"""CausalVideoVAE: Open-Sora-Plan v1.0's causal video VAE (4x8x8 compression) as a diffusers model.

Loads upstream checkpoints unchanged (their config.json with _class_name "CausalVAEModel" and
state-dict key names, or their Lightning .ckpt), strictly; saves in diffusers layout (safetensors).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput
from diffusers.models.modeling_utils import ModelMixin

from ...nn import CausalConv3d
from ..modeling import OspModelMixin
from . import tiling
from .blocks import NORM_GROUPS
from .distribution import DiagonalGaussianDistribution
from .encoder_decoder import (
    ATTENTION,
    CONVS,
    RESNET_BLOCKS,
    SPATIAL_DOWNSAMPLE,
    SPATIAL_UPSAMPLE,
    TEMPORAL_DOWNSAMPLE,
    TEMPORAL_UPSAMPLE,
    Decoder,
    Encoder,
    check_levels,
    check_name,
)

# Fields of upstream's config that configure its training loss / optimizer, not the autoencoder.
TRAINING_ONLY_FIELDS = ("loss_type", "loss_params", "lr")

# Upstream CausalVAEModel's constructor defaults (v1.0.0; numerics spec B.7): what a field missing
# from an upstream config.json (``_class_name`` "CausalVAEModel") means. osp's own defaults differ
# where osp chose better ones for new models (per-frame attention, the release temporal layout).
UPSTREAM_DEFAULTS = dict(
    hidden_size=128, z_channels=4, hidden_size_mult=(1, 2, 4, 4), attn_resolutions=(), dropout=0.0,
    resolution=256, double_z=True, embed_dim=4, num_res_blocks=2, q_conv="CausalConv3d",
    encoder_conv_in="CausalConv3d", encoder_conv_out="CausalConv3d", encoder_attention="AttnBlock3D",
    encoder_resnet_blocks=("ResnetBlock3D",) * 4,
    encoder_spatial_downsample=("SpatialDownsample2x",) * 3 + ("",),
    encoder_temporal_downsample=("", "TimeDownsample2x", "TimeDownsample2x", ""),
    encoder_mid_resnet="ResnetBlock3D", decoder_conv_in="CausalConv3d", decoder_conv_out="CausalConv3d",
    decoder_attention="AttnBlock3D", decoder_resnet_blocks=("ResnetBlock3D",) * 4,
    decoder_spatial_upsample=("",) + ("SpatialUpsample2x",) * 3,
    decoder_temporal_upsample=("", "", "TimeUpsample2x", "TimeUpsample2x"), decoder_mid_resnet="ResnetBlock3D",
)


class CausalVideoVAE(OspModelMixin, ModelMixin, ConfigMixin):
    r"""Causal video VAE of Open-Sora-Plan v1.0 (numerics spec B).

    A Stable-Diffusion-style KL autoencoder in which every conv is a causal 3-D conv (frame 0
    replicated in front), with temporal resamplers at some levels. With the defaults (upstream's
    release layout) a clip (B, 3, 1+4k, H, W) in [-1, 1] encodes to latents (B, 4, 1+k, H/8, W/8)
    and an image (T = 1) to one latent frame.

    Config fields are upstream's config.json fields: ``hidden_size`` C0 and ``hidden_size_mult``
    (level i has C0*mult[i] channels; every count a multiple of 32 for the 32-group GroupNorm),
    ``num_res_blocks`` (decoder levels have one more), the per-level module-name lists
    ``encoder_resnet_blocks`` / ``encoder_spatial_downsample`` / ``encoder_temporal_downsample`` /
    ``decoder_resnet_blocks`` / ``decoder_spatial_upsample`` / ``decoder_temporal_upsample`` ("" =
    none at that level), ``encoder_attention`` / ``decoder_attention`` (the mid-block attention:
    "AttnBlock3D" is upstream's memory-reinterpreting block that the v1.0 weights were trained with,
    "AttnBlock3DFix" attends per frame and is the default for new models), ``*_conv_in``,
    ``*_conv_out``, ``q_conv`` ("CausalConv3d"), ``*_mid_resnet`` ("ResnetBlock3D"), ``z_channels``,
    ``embed_dim``, ``double_z``, ``dropout``, ``attn_resolutions`` (spatial sizes, relative to
    ``resolution``, at which every level block is followed by attention; [] upstream). Training-only
    fields (``loss_type``, ``loss_params``, ``lr``) are accepted and dropped. Added by osp:
    ``in_channels``/``out_channels`` (3) and ``scaling_factor`` (0.18215: multiply posterior samples
    by it for the diffusion model, divide before ``decode``; the model itself never scales).
    """

    # Upstream's class name in its config.json (osp's own saves say "CausalVideoVAE"). Upstream builds
    # its training loss (LPIPS + discriminator) inside the model: its checkpoints carry loss.* keys.
    UPSTREAM_CLASS_NAMES = ("CausalVAEModel",)
    UPSTREAM_DEFAULTS = UPSTREAM_DEFAULTS
    IGNORED_KEY_PREFIXES = ("loss.",)

    _supports_gradient_checkpointing = True

    @register_to_config
    def __init__(
        self,
        hidden_size: int = 128,
        z_channels: int = 4,
        hidden_size_mult: Sequence[int] = (1, 2, 4, 4),
        attn_resolutions: Sequence[int] = (),
        dropout: float = 0.0,
        resolution: int = 256,
        double_z: bool = True,
        embed_dim: int = 4,
        num_res_blocks: int = 2,
        q_conv: str = "CausalConv3d",
        encoder_conv_in: str = "CausalConv3d",
        encoder_conv_out: str = "CausalConv3d",
        encoder_attention: str = "AttnBlock3DFix",
        encoder_resnet_blocks: Sequence[str] = ("ResnetBlock3D",) * 4,
        encoder_spatial_downsample: Sequence[str] = ("SpatialDownsample2x",) * 3 + ("",),
        encoder_temporal_downsample: Sequence[str] = ("TimeDownsample2x",) * 2 + ("",) * 2,
        encoder_mid_resnet: str = "ResnetBlock3D",
        decoder_conv_in: str = "CausalConv3d",
        decoder_conv_out: str = "CausalConv3d",
        decoder_attention: str = "AttnBlock3DFix",
        decoder_resnet_blocks: Sequence[str] = ("ResnetBlock3D",) * 4,
        decoder_spatial_upsample: Sequence[str] = ("",) + ("SpatialUpsample2x",) * 3,
        decoder_temporal_upsample: Sequence[str] = ("",) * 2 + ("TimeUpsample2x",) * 2,
        decoder_mid_resnet: str = "ResnetBlock3D",
        in_channels: int = 3,
        out_channels: int = 3,
        scaling_factor: float = 0.18215,
    ):
        super().__init__()
        levels = len(hidden_size_mult)
        _check_config(hidden_size, z_channels, hidden_size_mult, embed_dim, num_res_blocks, in_channels, out_channels)
        for field, value, allowed in (
            ("q_conv", q_conv, CONVS), ("encoder_conv_in", encoder_conv_in, CONVS),
            ("encoder_conv_out", encoder_conv_out, CONVS), ("decoder_conv_in", decoder_conv_in, CONVS),
            ("decoder_conv_out", decoder_conv_out, CONVS), ("encoder_attention", encoder_attention, ATTENTION),
            ("decoder_attention", decoder_attention, ATTENTION), ("encoder_mid_resnet", encoder_mid_resnet, RESNET_BLOCKS),
            ("decoder_mid_resnet", decoder_mid_resnet, RESNET_BLOCKS),
        ):
            check_name(field, value, allowed)
        for field, names, allowed, optional in (
            ("encoder_resnet_blocks", encoder_resnet_blocks, RESNET_BLOCKS, False),
            ("encoder_spatial_downsample", encoder_spatial_downsample, SPATIAL_DOWNSAMPLE, True),
            ("encoder_temporal_downsample", encoder_temporal_downsample, TEMPORAL_DOWNSAMPLE, True),
            ("decoder_resnet_blocks", decoder_resnet_blocks, RESNET_BLOCKS, False),
            ("decoder_spatial_upsample", decoder_spatial_upsample, SPATIAL_UPSAMPLE, True),
            ("decoder_temporal_upsample", decoder_temporal_upsample, TEMPORAL_UPSAMPLE, True),
        ):
            check_levels(field, names, levels, allowed, optional)
        attn_resolutions = list(attn_resolutions or ())

        self.encoder = Encoder(
            in_channels=in_channels, z_channels=z_channels, hidden_size=hidden_size,
            hidden_size_mult=hidden_size_mult, num_res_blocks=num_res_blocks, dropout=dropout, double_z=double_z,
            resnet_blocks=encoder_resnet_blocks, spatial_downsample=encoder_spatial_downsample,
            temporal_downsample=encoder_temporal_downsample, mid_resnet=encoder_mid_resnet,
            attention=encoder_attention, attn_resolutions=attn_resolutions, resolution=resolution,
        )
        self.decoder = Decoder(
            out_channels=out_channels, z_channels=z_channels, hidden_size=hidden_size,
            hidden_size_mult=hidden_size_mult, num_res_blocks=num_res_blocks, dropout=dropout,
            resnet_blocks=decoder_resnet_blocks, spatial_upsample=decoder_spatial_upsample,
            temporal_upsample=decoder_temporal_upsample, mid_resnet=decoder_mid_resnet,
            attention=decoder_attention, attn_resolutions=attn_resolutions, resolution=resolution,
        )
        self.quant_conv = CausalConv3d(2 * z_channels if double_z else z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = CausalConv3d(embed_dim, z_channels, 1)

    # --- geometry -------------------------------------------------------------------------------

    @property
    def spatial_compression(self) -> int:
        """H (and W) of a clip over H of its latent: 2 ** (number of spatial downsamples)."""
        return 2 ** sum(1 for s in self.config.encoder_spatial_downsample if s)

    @property
    def temporal_compression(self) -> int:
        """Clips have 1 + k * temporal_compression frames and give 1 + k latent frames."""
        return 2 ** sum(1 for s in self.config.encoder_temporal_downsample if s)

    def latent_shape(self, shape: Sequence[int]) -> Tuple[int, ...]:
        """(B, embed_dim, T', H', W') of the latents of a valid clip of shape (B, C, T, H, W)."""
        B, _, T, H, W = shape
        s = self.spatial_compression
        return (B, self.config.embed_dim, (T - 1) // self.temporal_compression + 1, H // s, W // s)

    def _check_clip(self, x: torch.Tensor, pad: bool) -> None:
        C = self.config.in_channels
        if not isinstance(x, torch.Tensor) or x.dim() != 5 or x.shape[1] != C or 0 in x.shape:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"CausalVideoVAE.encode: x has shape {shape}; expected (B, {C}, T, H, W), none of them 0")
        if pad:
            return
        _, _, T, H, W = x.shape
        tc, s = self.temporal_compression, self.spatial_compression
        if (T - 1) % tc or H % s or W % s:
            raise ValueError(
                f"CausalVideoVAE.encode: x has shape {tuple(x.shape)}; expected T = 1 + {tc}*k frames "
                f"(1, {1 + tc}, {1 + 2 * tc}, ...) and H, W multiples of {s}; pass pad=True to pad the clip "
                "(replicating its last frame and its bottom/right edge) instead"
            )

    def pad_clip(self, x: torch.Tensor) -> torch.Tensor:
        """x padded at the end of time (repeating the last frame) and at the bottom/right (repeating the
        edge) to the nearest valid shape: T = 1 + k*temporal_compression, H, W multiples of
        spatial_compression. Returns x itself when already valid."""
        _, _, T, H, W = x.shape
        tc, s = self.temporal_compression, self.spatial_compression
        pt, ph, pw = (-(T - 1)) % tc, (-H) % s, (-W) % s
        if not (pt or ph or pw):
            return x
        return F.pad(x, (0, pw, 0, ph, 0, pt), mode="replicate")

    # --- diffusers interface ------------------------------------------------------------------------

    def encode(self, x: torch.Tensor, return_dict: bool = True, pad: bool = False
               ) -> Union[AutoencoderKLOutput, Tuple[DiagonalGaussianDistribution]]:
        """Encode a clip x (B, in_channels, T, H, W) in [-1, 1] into its posterior.

        T must be 1 + k*temporal_compression (1, 5, 9, 17, 65, ...) and H, W multiples of
        spatial_compression (8), else ValueError; with ``pad=True`` the clip is padded instead (see
        ``pad_clip``) and the latents describe the padded clip.

        The clip is cast to the model's dtype, in which the posterior comes back.

        Returns ``AutoencoderKLOutput(latent_dist=DiagonalGaussianDistribution)`` over latents
        (B, embed_dim, 1 + k, H/8, W/8), or ``(latent_dist,)`` when return_dict is False. Unscaled:
        multiply samples by ``config.scaling_factor`` for the diffusion model.
        """
        self._check_clip(x, pad)
        x = x.to(self.dtype)  # models compute in their parameters' dtype (osp.models.modeling)
        if pad:
            x = self.pad_clip(x)
        moments = tiling.tiled_encode(self, self._tiling, x) if self._tiling is not None else None
        if moments is None:
            moments = self.quant_conv(self.encoder(x))
        posterior = DiagonalGaussianDistribution(moments)
        return AutoencoderKLOutput(latent_dist=posterior) if return_dict else (posterior,)

    def decode(self, z: torch.Tensor, return_dict: bool = True) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Decode raw (unscaled) latents z (B, embed_dim, T', h, w) into a clip
        (B, out_channels, 1 + (T'-1)*temporal factor, h*8, w*8) in the model's dtype. Returns
        ``DecoderOutput(sample=...)`` or ``(sample,)`` when return_dict is False."""
        E = self.config.embed_dim
        if not isinstance(z, torch.Tensor) or z.dim() != 5 or z.shape[1] != E:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"CausalVideoVAE.decode: z has shape {shape}; expected (B, {E}, T', h, w)")
        z = z.to(self.dtype)
        dec = tiling.tiled_decode(self, self._tiling, z) if self._tiling is not None else None
        if dec is None:
            dec = self.decoder(self.post_quant_conv(z))
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    # --- tiled inference ------------------------------------------------------------------------------

    _tiling: Optional[tiling.TilingConfig] = None

    def enable_tiling(self, mode: str = "stream", tile_sample_size: int = 256, tile_frames: Optional[int] = None,
                      overlap: float = 0.25, norm: Optional[str] = None, progress: Optional[bool] = None) -> None:
        """Tile ``decode`` and ``encode`` whenever the input exceeds one tile (``osp.models.vae.tiling``).

        Args:
            mode: "stream" (overlapping spatial tiles, each streamed through time in exact causal
                chunks, blended into one preallocated output: peak memory about the output plus one
                tile-chunk's activations) or "osp-v1.0" (upstream v1.0's tiled_decode2d /
                tiled_encode2d, spatial only, reproducing its results).
            tile_sample_size: largest tile side in sample pixels (a multiple of spatial_compression;
                256 = 32 latents). "stream" uses the fewest tiles that fit, nearly equal in size.
            tile_frames: "stream" only: sample frames per time chunk, 1 + 4k (e.g. 17); chunks do not
                overlap (each carries the previous chunk's causal history); None: all frames at once.
            overlap: fraction of a tile that spatial neighbours share, in [0, 1) (upstream's
                tile_overlap_factor); the spatial recomputation grows with it.
            norm: GroupNorm statistics in "stream" mode: "tile" (the default: each tile's own, as
                upstream; the fastest), "estimate" (one extra tiled pass that merges every norm's
                statistics over the tiles: closer to the untiled statistics, about 2x the time) or
                "global" (of the whole input, gathered exactly, one pass per norm layer: about n/2 + 1
                tiled decodes for n norms, so many times slower; with it time chunks are exact,
                spatial tiles still see zeros at their borders). "osp-v1.0" takes "tile" only.
                A tile smaller than the VAE's spatial receptive radius gets a warning naming its size.
            progress: tqdm progress bars over tiles: None shows them when stderr is a terminal and
                otherwise logs progress lines (INFO, logger ``osp.models.vae.tiling``); False: silent.
        """
        self._tiling = tiling.make_config(self, mode=mode, tile_sample_size=tile_sample_size,
                                          tile_frames=tile_frames, overlap=overlap, norm=norm, progress=progress)

    def disable_tiling(self) -> None:
        """Decode and encode untiled again."""
        self._tiling = None

    @property
    def use_tiling(self) -> bool:
        return self._tiling is not None

    def forward(self, sample: torch.Tensor, sample_posterior: bool = False, return_dict: bool = True,
                generator: Optional[torch.Generator] = None, pad: bool = False
                ) -> Union[DecoderOutput, Tuple[torch.Tensor]]:
        """Reconstruct ``sample`` through the posterior's mode (or a sample of it). With ``pad=True``
        the clip is padded for the autoencoder and the reconstruction cropped back to its shape."""
        posterior = self.encode(sample, pad=pad).latent_dist
        z = posterior.sample(generator=generator) if sample_posterior else posterior.mode()
        del posterior
        dec = self.decode(z).sample
        if pad:
            T, H, W = sample.shape[2:]
            dec = dec[:, :, :T, :H, :W]
        return DecoderOutput(sample=dec) if return_dict else (dec,)

    # --- configs and checkpoints -----------------------------------------------------------------

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # Upstream's training-only fields are not the autoencoder's: drop them before diffusers
        # would warn about them or keep them as hidden config entries.
        config_dict = {k: v for k, v in config_dict.items() if k not in TRAINING_ONLY_FIELDS}
        return super().extract_init_dict(config_dict, **kwargs)

    @classmethod
    def from_image_vae(cls, vae2d, init: str = "tail", **config_overrides) -> "CausalVideoVAE":
        """Inflate a 2-D image VAE into a causal video VAE (see ``osp.models.vae.inflate``).

        Args:
            vae2d: a diffusers AutoencoderKL, or its state dict in diffusers layout, or a state dict in
                the original Stable Diffusion (ldm) layout (``encoder.down.0.block.0...``, optionally
                under ``first_stage_model.``).
            init: how a k x k 2-D kernel fills the kt temporal taps of a causal 3-D kernel: "tail"
                (the last tap, which sees the current frame; other taps zero), "center", "average"
                (w/kt in every tap) or "random" (those convs keep their fresh random init; every
                other tensor is copied).
            config_overrides: config fields to set on the new model (e.g. the temporal layout).
                By default the layout is upstream's: temporal downsampling at the first two encoder
                levels, upsampling at the last two decoder levels, per-frame attention.

        With "tail", images (T = 1) give the 2-D VAE's latents and reconstructions, and a still
        clip decodes to that image on every frame (to float rounding).
        """
        from .inflate import inflate_image_vae

        return inflate_image_vae(cls, vae2d, init=init, **config_overrides)


def _check_config(hidden_size, z_channels, hidden_size_mult, embed_dim, num_res_blocks, in_channels, out_channels):
    def positive_int(v):
        return isinstance(v, int) and not isinstance(v, bool) and v > 0

    for field, value in (("hidden_size", hidden_size), ("z_channels", z_channels), ("embed_dim", embed_dim),
                         ("num_res_blocks", num_res_blocks), ("in_channels", in_channels),
                         ("out_channels", out_channels)):
        if not positive_int(value):
            raise ValueError(f"CausalVideoVAE config: {field}={value!r}; expected a positive int")
    if not isinstance(hidden_size_mult, (list, tuple)) or not hidden_size_mult or not all(
            positive_int(m) for m in hidden_size_mult):
        raise ValueError(
            f"CausalVideoVAE config: hidden_size_mult={hidden_size_mult!r}; expected a non-empty list of positive ints"
        )
    for m in (1,) + tuple(hidden_size_mult):
        if (hidden_size * m) % NORM_GROUPS:
            raise ValueError(
                f"CausalVideoVAE config: hidden_size={hidden_size} with mult {m} gives {hidden_size * m} channels, "
                f"not a multiple of the {NORM_GROUPS} GroupNorm groups"
            )
