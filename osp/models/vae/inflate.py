"""Inflation of a 2-D image VAE (diffusers AutoencoderKL or Stable Diffusion's ldm layout) into a
causal video VAE (spec: open-sora-plan-v1.0.md, "Inflation of a 2-D VAE").

A Conv2d weight (o, i, kh, kw) becomes a causal (o, i, kt, kh, kw) weight. With "tail" init it sits
in the last temporal tap, which sees the current frame (earlier taps see earlier frames, or frame 0
replicated), so every frame goes through the 2-D VAE unchanged: images reproduce it exactly.
"""
from __future__ import annotations

import re
from typing import Dict, Mapping

import torch

INITS = ("tail", "center", "average", "random")
_LDM_PREFIX = "first_stage_model."

# diffusers AutoencoderKL names -> ldm names (levels of the decoder are re-indexed separately).
_DIFFUSERS_RULES = [
    (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.0\.", r"\1.mid.block_1."),
    (r"^(encoder|decoder)\.mid_block\.resnets\.1\.", r"\1.mid.block_2."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.group_norm\.", r"\1.mid.attn_1.norm."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_q|query)\.", r"\1.mid.attn_1.q."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_k|key)\.", r"\1.mid.attn_1.k."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_v|value)\.", r"\1.mid.attn_1.v."),
    (r"^(encoder|decoder)\.mid_block\.attentions\.0\.(to_out\.0|proj_attn)\.", r"\1.mid.attn_1.proj_out."),
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
]
_UP = re.compile(r"^decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.*)$")


def _diffusers_to_ldm(sd: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    levels = 1 + max((int(m.group(1)) for k in sd if (m := _UP.match(k))), default=-1)
    out = {}
    for key, value in sd.items():
        m = _UP.match(key)
        if m:
            level = levels - 1 - int(m.group(1))
            inner = f"block.{m.group(3)}" if m.group(3) is not None else "upsample"
            key = f"decoder.up.{level}.{inner}.{m.group(4)}"
        for pattern, repl in _DIFFUSERS_RULES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    return out


def image_vae_state_dict(vae2d) -> Dict[str, torch.Tensor]:
    """The 2-D VAE's state dict in ldm layout (encoder.down.i.block.j..., decoder.up.i with i the
    resolution level, mid.attn_1.q...), from an AutoencoderKL or a diffusers/ldm state dict."""
    config = getattr(vae2d, "config", None)
    if isinstance(vae2d, torch.nn.Module):
        if config is not None:
            _check_autoencoder_kl_config(config)
        sd = vae2d.state_dict()
    elif isinstance(vae2d, Mapping):
        sd = dict(vae2d)
    else:
        raise ValueError(f"vae2d is a {type(vae2d).__name__}; expected a diffusers AutoencoderKL or a state dict")
    if any(k.startswith(_LDM_PREFIX) for k in sd):  # a whole Stable Diffusion checkpoint
        sd = {k[len(_LDM_PREFIX):]: v for k, v in sd.items() if k.startswith(_LDM_PREFIX)}
    sd = {k: v for k, v in sd.items() if not k.startswith("loss.")}
    if any(".down_blocks." in k or ".up_blocks." in k or ".mid_block." in k for k in sd):
        sd = _diffusers_to_ldm(sd)
    elif not any(k.startswith("encoder.down.") for k in sd):
        raise ValueError("vae2d's state dict is neither in diffusers layout (encoder.down_blocks...) nor in "
                         "Stable Diffusion's ldm layout (encoder.down.0.block.0...)")
    return sd


def _check_autoencoder_kl_config(config) -> None:
    get = config.get if isinstance(config, Mapping) else (lambda k, d=None: getattr(config, k, d))
    if get("norm_num_groups", 32) != 32:
        raise ValueError(f"vae2d has norm_num_groups={get('norm_num_groups')}; the causal VAE's GroupNorm uses 32 groups")
    if get("act_fn", "silu") != "silu":
        raise ValueError(f"vae2d has act_fn={get('act_fn')!r}; the causal VAE uses silu")
    for flag in ("use_quant_conv", "use_post_quant_conv", "mid_block_add_attention"):
        if get(flag, True) is False:
            raise ValueError(f"vae2d has {flag}=False; the causal VAE always has that part")


def _levels(sd, prefix: str) -> int:
    return 1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"^{prefix}\.(\d+)\.", k))), default=-1)


def _count(sd, prefix: str) -> int:
    return 1 + max((int(m.group(1)) for k in sd if (m := re.match(rf"^{re.escape(prefix)}\.(\d+)\.", k))), default=-1)


def infer_config(sd: Mapping[str, torch.Tensor], vae2d=None, temporal_levels: int = 2) -> dict:
    """The CausalVideoVAE config that holds an ldm-layout 2-D VAE state dict."""
    try:
        hidden = sd["encoder.conv_in.weight"].shape[0]
        in_channels = sd["encoder.conv_in.weight"].shape[1]
        levels = _levels(sd, "encoder.down")
        mult = [sd[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // hidden for i in range(levels)]
        num_res_blocks = _count(sd, "encoder.down.0.block")
        z2 = sd["encoder.conv_out.weight"].shape[0]
        z_channels = sd["decoder.conv_in.weight"].shape[1]
        embed_dim = sd["post_quant_conv.weight"].shape[1]
        out_channels = sd["decoder.conv_out.weight"].shape[0]
    except KeyError as exc:
        raise ValueError(f"vae2d's state dict lacks {exc.args[0]!r}; is it a KL autoencoder?") from None
    if any(re.match(r"^(encoder\.down|decoder\.up)\.\d+\.attn\.", k) for k in sd):
        raise ValueError("vae2d has attention inside its levels; only mid-block attention is supported")
    if _levels(sd, "decoder.up") != levels or any(_count(sd, f"decoder.up.{i}.block") != num_res_blocks + 1
                                                  for i in range(levels)):
        raise ValueError("vae2d's decoder does not mirror its encoder (levels, or num_res_blocks + 1 blocks per level)")
    t = min(temporal_levels, levels)
    config = getattr(vae2d, "config", None)
    resolution = getattr(config, "sample_size", None) or 256
    if isinstance(resolution, (list, tuple)):
        resolution = resolution[0]
    scaling_factor = getattr(config, "scaling_factor", None) or 0.18215
    return dict(
        hidden_size=hidden,
        hidden_size_mult=mult,
        num_res_blocks=num_res_blocks,
        z_channels=z_channels,
        double_z=z2 == 2 * z_channels,
        embed_dim=embed_dim,
        in_channels=in_channels,
        out_channels=out_channels,
        attn_resolutions=[],
        resolution=int(resolution),
        encoder_resnet_blocks=["ResnetBlock3D"] * levels,
        decoder_resnet_blocks=["ResnetBlock3D"] * levels,
        encoder_spatial_downsample=["SpatialDownsample2x" if f"encoder.down.{i}.downsample.conv.weight" in sd else ""
                                    for i in range(levels)],
        decoder_spatial_upsample=["SpatialUpsample2x" if f"decoder.up.{i}.upsample.conv.weight" in sd else ""
                                  for i in range(levels)],
        encoder_temporal_downsample=["TimeDownsample2x"] * t + [""] * (levels - t),
        decoder_temporal_upsample=[""] * (levels - t) + ["TimeUpsample2x"] * t,
        encoder_attention="AttnBlock3DFix",
        decoder_attention="AttnBlock3DFix",
        scaling_factor=float(scaling_factor),
    )


def inflate_weight(w2d: torch.Tensor, shape, init: str) -> torch.Tensor:
    """A 2-D conv weight (o, i, kh, kw), or a Linear weight (o, i), as a causal (o, i, kt, kh, kw) weight."""
    o, i, kt, kh, kw = shape
    w = w2d.reshape(o, i, kh, kw) if w2d.dim() == 2 else w2d
    if tuple(w.shape) != (o, i, kh, kw):
        raise ValueError(f"cannot inflate a weight of shape {tuple(w2d.shape)} into {tuple(shape)}")
    out = torch.zeros(shape, dtype=w.dtype)
    if init == "tail":
        out[:, :, -1] = w
    elif init == "center":
        out[:, :, kt // 2] = w
    elif init == "average":
        out[:] = (w / kt).unsqueeze(2)
    else:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    return out


def inflate_image_vae(cls, vae2d, init: str = "tail", **config_overrides):
    if init not in INITS:
        raise ValueError(f"init={init!r}; expected one of {INITS}")
    sd2d = image_vae_state_dict(vae2d)
    config = infer_config(sd2d, vae2d if isinstance(vae2d, torch.nn.Module) else None)
    known = set(cls._get_init_keys(cls)) - {"self"}
    unknown = sorted(set(config_overrides) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}.from_image_vae: unknown config fields {unknown}")
    config.update(config_overrides)
    model = cls.from_config(config)
    target = model.state_dict()
    new = {}
    used = set()
    for key, ref in target.items():
        # A CausalConv3d keeps its weights in a child `.conv`: ldm's "x.weight" is our "x.conv.weight".
        cut = key.rfind(".conv.")
        src = key[:cut] + key[cut + len(".conv"):] if cut >= 0 else key
        if src not in sd2d:
            raise ValueError(f"vae2d has no tensor for {key!r} (looked for {src!r})")
        used.add(src)
        value = sd2d[src].detach().to("cpu", torch.float32)
        if ref.dim() == 5:
            if init == "random" and ref.shape[2] > 1:
                new[key] = ref.detach().clone()
                continue
            new[key] = inflate_weight(value, tuple(ref.shape), "tail" if ref.shape[2] == 1 else init)
        else:
            if tuple(value.shape) != tuple(ref.shape):
                raise ValueError(f"vae2d's {src!r} has shape {tuple(value.shape)}; expected {tuple(ref.shape)}")
            new[key] = value
    unused = sorted(set(sd2d) - used)
    if unused:
        raise ValueError(f"vae2d has tensors the causal VAE has no place for: {unused[:20]}")
    model.load_state_dict(new, strict=True)
    return model
