"""osp.models.CausalVideoVAE: upstream's state-dict names and config, shapes, the posterior,
strict checkpoint loading (diffusers directories, Lightning .ckpt), inflation of a 2-D VAE,
the AttnBlock3D quirk, low precision, freeing intermediates, and backend agreement."""
import copy
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from parity import DEVICE  # noqa: E402

import osp  # noqa: E402
from osp.models import CausalVideoVAE  # noqa: E402
from osp.models.vae.blocks import SpatialDownsample2x, TimeDownsample2x, TimeUpsample2x  # noqa: E402
from osp.nn import AttnBlock3D  # noqa: E402
from spec_data import DATA, FILES, SPEC, VAE_RELEASE_CONFIG as RELEASE_CONFIG  # noqa: E402
from spec_data import VAE_RELEASE_STATE_DICT  # noqa: E402
from vae_helpers import (  # noqa: E402,F401
    assert_close_rel, clip, exact_backend, randomize_norms, rel_err, tiny_config, tiny_vae)

# --- upstream's names and config --------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
def test_data_files_are_the_spec_files(name):
    spec = os.path.join(SPEC, name)
    if not os.path.exists(spec):
        pytest.skip("the shared spec folder is not beside this checkout")
    with open(spec, encoding="utf-8") as f, open(os.path.join(DATA, name), encoding="utf-8") as g:
        assert g.read() == f.read(), f"tests/data/{name} differs from the spec's copy"


@pytest.fixture(scope="module")
def meta_models():
    """The release-config model and a model made with no config, on the meta device (no memory, no init)."""
    with torch.device("meta"):
        return CausalVideoVAE.from_config(RELEASE_CONFIG), CausalVideoVAE()


def test_release_state_dict_equals_upstream_key_list(meta_models):
    model = meta_models[0]
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    expected = VAE_RELEASE_STATE_DICT
    assert len(expected) == 248
    missing = sorted(set(expected) - set(got))
    extra = sorted(set(got) - set(expected))
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    assert got == expected  # the same order too
    assert not list(model.buffers()), "upstream's VAE has no buffers"


def test_release_config_selects_upstream_layout_and_attention(meta_models):
    model, fresh = meta_models
    assert [hasattr(level, "time_downsample") for level in model.encoder.down] == [True, True, False, False]
    assert [hasattr(level, "downsample") for level in model.encoder.down] == [True, True, True, False]
    assert [hasattr(level, "time_upsample") for level in model.decoder.up] == [False, False, True, True]
    assert [hasattr(level, "upsample") for level in model.decoder.up] == [False, True, True, True]
    assert (model.spatial_compression, model.temporal_compression) == (8, 4)
    assert not model.encoder.mid.attn_1.per_frame and not model.decoder.mid.attn_1.per_frame
    assert model.config.scaling_factor == 0.18215
    for field in ("loss_type", "loss_params", "lr"):  # training-only: accepted and dropped
        assert field not in model.config
    # A model made without a config has the release layout with the corrected per-frame attention.
    assert fresh.encoder.mid.attn_1.per_frame and fresh.decoder.mid.attn_1.per_frame
    assert [(k, tuple(v.shape)) for k, v in fresh.state_dict().items()] == VAE_RELEASE_STATE_DICT


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (dict(encoder_attention="Attention"), "encoder_attention"),
        (dict(q_conv="Conv3d"), "q_conv"),
        (dict(encoder_spatial_downsample=["SpatialDownsample2x"] * 2), "encoder_spatial_downsample"),
        (dict(decoder_temporal_upsample=["", "", "TimeUpsample3x", ""]), r"decoder_temporal_upsample\[2\]"),
        (dict(hidden_size=48), "multiple of the 32"),
        (dict(num_res_blocks=0), "num_res_blocks"),
    ],
    ids=["attention-name", "conv-name", "list-length", "level-name", "channels-vs-groups", "res-blocks"],
)
def test_bad_config_raises(overrides, needle):
    with pytest.raises(ValueError, match=needle), torch.device("meta"):
        CausalVideoVAE.from_config(tiny_config(**overrides))


# --- shapes, posterior, errors -----------------------------------------------------------------------


@pytest.mark.parametrize("T,latent_T", [(1, 1), (5, 2), (17, 5)], ids=["image-T1", "T5", "T17"])
def test_shapes(T, latent_T):
    model = tiny_vae()
    B, H, W = (1, 16, 8) if T > 5 else (2, 16, 24)
    x = clip(B, 3, T, H, W)
    with torch.no_grad():
        post = model.encode(x).latent_dist
        assert tuple(post.mean.shape) == (B, 4, latent_T, H // 8, W // 8) == model.latent_shape(x.shape)
        rec = model.decode(post.mode()).sample
    assert rec.shape == x.shape and torch.isfinite(rec).all()


def test_attn_resolutions_add_attention_inside_levels():
    """attn_resolutions (empty upstream) puts attention after every block of the levels whose spatial
    size, counted from ``resolution``, is listed: here the coarsest level of both halves."""
    model = tiny_vae(attn_resolutions=[32], resolution=256)
    keys = model.state_dict().keys()
    assert {k.split(".attn.")[0] for k in keys if ".attn." in k} == {"encoder.down.3", "decoder.up.3"}
    assert "encoder.down.3.attn.0.q.conv.weight" in keys and "decoder.up.3.attn.1.proj_out.conv.bias" in keys
    with torch.no_grad():
        assert model(clip(1, 3, 5, 16, 16)).sample.shape == (1, 3, 5, 16, 16)


def test_posterior_and_tuple_outputs():
    model = tiny_vae()
    x = clip(1, 3, 5, 8, 16)
    with torch.no_grad():
        (post,) = model.encode(x, return_dict=False)
        moments = model.quant_conv(model.encoder(x))
        torch.testing.assert_close(post.mean, moments[:, :4], rtol=0, atol=0)
        torch.testing.assert_close(post.logvar, moments[:, 4:].clamp(-30, 20), rtol=0, atol=0)
        torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
        torch.testing.assert_close(post.var, torch.exp(post.logvar))
        assert post.mode() is post.mean
        s1 = post.sample(generator=torch.Generator().manual_seed(3))
        s2 = post.sample(generator=torch.Generator().manual_seed(3))
        assert torch.equal(s1, s2) and not torch.equal(s1, post.mean)
        torch.manual_seed(5)  # upstream draws from the default CPU generator, whatever the device
        s3 = post.sample()
        torch.manual_seed(5)
        torch.testing.assert_close(s3, post.mean + post.std * torch.randn(post.mean.shape).to(post.mean.device))
        (rec,) = model.decode(post.mean, return_dict=False)
        torch.testing.assert_close(model(x).sample, rec)  # forward reconstructs through the mode
        assert tuple(post.kl().shape) == (1,)
        model.quant_conv.conv.bias[4:] = 1e4
        assert torch.all(model.encode(x).latent_dist.logvar == 20)
        model.quant_conv.conv.bias[4:] = -1e4
        assert torch.all(model.encode(x).latent_dist.logvar == -30)


@pytest.mark.parametrize(
    "shape",
    [(1, 3, 4, 16, 16), (1, 3, 16, 16, 16), (1, 3, 5, 12, 16), (1, 3, 5, 16, 20), (1, 4, 5, 16, 16), (3, 5, 16, 16)],
    ids=["T4", "T16", "H12", "W20", "4-channels", "rank4"],
)
def test_invalid_clips_raise_naming_the_shape(shape):
    model = tiny_vae()
    with pytest.raises(ValueError, match=str(tuple(shape)).replace("(", r"\(").replace(")", r"\)")):
        model.encode(torch.zeros(shape, device=DEVICE))


def test_invalid_latents_raise():
    model = tiny_vae()
    with pytest.raises(ValueError, match=r"\(1, 8, 2, 2, 2\)"):
        model.decode(torch.zeros(1, 8, 2, 2, 2, device=DEVICE))


def test_pad_is_an_explicit_opt_in():
    model = tiny_vae()
    x = clip(1, 3, 7, 12, 20)
    padded = model.pad_clip(x)
    assert padded.shape == (1, 3, 9, 16, 24)
    assert torch.equal(padded[:, :, :7, :12, :20], x)
    assert torch.equal(padded[:, :, 7:, :12, :20], x[:, :, -1:].expand(-1, -1, 2, -1, -1))
    assert model.pad_clip(padded) is padded
    with torch.no_grad():
        post = model.encode(x, pad=True).latent_dist
        assert post.mean.shape == (1, 4, 3, 2, 3)
        torch.testing.assert_close(post.mean, model.encode(padded).latent_dist.mean, rtol=0, atol=0)
        assert model(x, pad=True).sample.shape == x.shape


# --- checkpoints -----------------------------------------------------------------------------------------


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k].cpu(), sb[k].cpu()), k


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_vae()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["_class_name"] == "CausalVideoVAE" and saved["encoder_attention"] == "AttnBlock3D"
    loaded = CausalVideoVAE.from_pretrained(tmp_path, device=DEVICE)
    assert public(loaded.config) == public(model.config)
    assert_same_weights(model, loaded)
    assert not loaded.training
    x = clip(1, 3, 5, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).sample, model(x).sample, rtol=0, atol=0)
    half = CausalVideoVAE.from_pretrained(tmp_path, torch_dtype=torch.float16, low_cpu_mem_usage=True)
    assert {p.dtype for p in half.parameters()} == {torch.float16}
    model.save_pretrained(tmp_path / "variant", variant="fp16")
    assert (tmp_path / "variant" / "diffusion_pytorch_model.fp16.safetensors").is_file()
    assert_same_weights(model, CausalVideoVAE.from_pretrained(tmp_path / "variant", variant="fp16"))
    with pytest.raises(ValueError, match="no weights"):
        CausalVideoVAE.from_pretrained(tmp_path, use_safetensors=False)
    with pytest.raises(ValueError, match="does not exist"):
        CausalVideoVAE.from_pretrained(tmp_path / "nowhere")


@pytest.mark.parametrize("weights", ["safetensors", "bin"])
def test_upstream_directory_loads(tmp_path, weights):
    from safetensors.torch import save_file

    model = tiny_vae()
    cfg = tiny_config()
    assert cfg["_class_name"] == "CausalVAEModel" and "loss_type" in cfg
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    if weights == "safetensors":
        save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(sd, tmp_path / "diffusion_pytorch_model.bin")
    loaded = CausalVideoVAE.from_pretrained(str(tmp_path))
    assert_same_weights(model, loaded)
    assert not loaded.encoder.mid.attn_1.per_frame  # upstream's "AttnBlock3D" keeps upstream's numerics
    assert "loss_type" not in loaded.config
    fixed = CausalVideoVAE.from_pretrained(tmp_path, encoder_attention="AttnBlock3DFix")
    assert fixed.encoder.mid.attn_1.per_frame and not fixed.decoder.mid.attn_1.per_frame
    with pytest.raises(ValueError, match="unknown arguments or config fields"):
        CausalVideoVAE.from_pretrained(tmp_path, encoder_attn="AttnBlock3DFix")


def lightning_ckpt(path, state_dict):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 3, "global_step": 1000, "state_dict": state_dict, "lr_schedulers": []}, path)
    return path


def with_loss_keys(model):
    sd = {k: v.cpu() for k, v in model.state_dict().items()}
    sd["loss.logvar"] = torch.zeros(())
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(8, 3, 3, 3)
    sd["loss.discriminator.main.0.weight"] = torch.randn(8, 3, 4, 4)
    return sd


def test_lightning_ckpt_loads_and_ignores_loss_keys(tmp_path):
    model = tiny_vae()
    ckpt = lightning_ckpt(tmp_path / "run" / "last.ckpt", with_loss_keys(model))
    with pytest.raises(ValueError, match="config"):  # weights alone do not say where the resamplers are
        CausalVideoVAE.from_pretrained(ckpt)
    assert_same_weights(model, CausalVideoVAE.from_pretrained(ckpt, config=tiny_config()))
    (tmp_path / "tiny.json").write_text(json.dumps(tiny_config()))
    assert_same_weights(model, CausalVideoVAE.from_pretrained(ckpt, config=tmp_path / "tiny.json"))
    (tmp_path / "run" / "config.json").write_text(json.dumps(tiny_config()))
    loaded = CausalVideoVAE.from_pretrained(str(ckpt))
    assert_same_weights(model, loaded)
    assert not loaded.encoder.mid.attn_1.per_frame


@pytest.mark.parametrize("defect", ["bogus-key", "missing-key", "wrong-shape", "class-name"])
def test_loading_is_strict(tmp_path, defect):
    model = tiny_vae()
    sd = with_loss_keys(model)
    cfg = tiny_config()
    if defect == "bogus-key":
        sd["encoder.mid.attn_2.q.conv.weight"], needle = torch.zeros(64, 64, 1, 1, 1), r"encoder\.mid\.attn_2\.q\.conv\.weight"
    elif defect == "missing-key":
        del sd["decoder.up.1.upsample.conv.conv.bias"]
        needle = r"missing keys \(1\): decoder\.up\.1\.upsample\.conv\.conv\.bias"
    elif defect == "wrong-shape":
        sd["quant_conv.conv.weight"], needle = torch.zeros(8, 8, 3, 1, 1), r"quant_conv\.conv\.weight: \(8, 8, 3, 1, 1\)"
    else:
        cfg["_class_name"], needle = "AutoencoderKL", "_class_name 'AutoencoderKL'"
    ckpt = lightning_ckpt(tmp_path / "bad.ckpt", sd)
    with pytest.raises(ValueError, match=needle):
        CausalVideoVAE.from_pretrained(ckpt, config=cfg)


# --- inflation of a 2-D VAE --------------------------------------------------------------------------------


def tiny_autoencoder_kl(seed=0):
    """A random diffusers AutoencoderKL with the SD layout at 32/32/64/64 channels (8x down)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
        latent_channels=4, norm_num_groups=32, sample_size=32,
    )
    return randomize_norms(vae).to(DEVICE).eval()


@pytest.fixture(scope="module")
def vae2d():
    return tiny_autoencoder_kl()


@pytest.mark.parametrize("init", ["tail", "center", "average"])
def test_inflated_vae_reproduces_images_and_still_clips(vae2d, init):
    """Every frame of an image or a still clip sees only copies of itself, so any init whose taps
    sum to the 2-D kernel reproduces the 2-D VAE; "tail" does so for each frame of any clip's convs."""
    model = CausalVideoVAE.from_image_vae(vae2d, init=init).to(DEVICE).eval()
    assert model.encoder.mid.attn_1.per_frame and model.decoder.mid.attn_1.per_frame
    assert (model.spatial_compression, model.temporal_compression) == (8, 4)
    x = clip(2, 3, 24, 16)  # a latent of a few pixels: GroupNorm over 2x1 latents is ill-conditioned
    with torch.no_grad():
        ref_post = vae2d.encode(x).latent_dist
        ref_rec = vae2d.decode(ref_post.mean).sample
        post = model.encode(x[:, :, None]).latent_dist
        assert_close_rel(post.mean[:, :, 0], ref_post.mean, 1e-5, "image latent mean")
        assert_close_rel(post.logvar[:, :, 0], ref_post.logvar, 1e-5, "image latent logvar")
        assert_close_rel(model.decode(post.mean).sample[:, :, 0], ref_rec, 1e-5, "image reconstruction")
        still = x[:, :, None].expand(-1, -1, 5, -1, -1)
        post = model.encode(still).latent_dist
        assert post.mean.shape[2] == 2
        assert_close_rel(post.mean, ref_post.mean[:, :, None].expand_as(post.mean), 1e-5, "still-clip latents")
        rec = model.decode(post.mean).sample
        assert rec.shape[2] == 5
        assert_close_rel(rec, ref_rec[:, :, None].expand_as(rec), 1e-5, "still-clip reconstruction")


def ldm_state_dict(model):
    """Stable Diffusion's original layout of the same 2-D VAE: the causal names without the
    CausalConv3d's `.conv`, 4-D kernels (the tail tap)."""
    import re

    out = {}
    for k, v in model.state_dict().items():
        out[re.sub(r"\.conv\.(weight|bias)$", r".\1", k)] = v[:, :, -1] if v.dim() == 5 else v
    return out


def test_inflation_accepts_diffusers_and_ldm_state_dicts(vae2d):
    model = CausalVideoVAE.from_image_vae(vae2d)
    assert_same_weights(model, CausalVideoVAE.from_image_vae(vae2d.state_dict()))
    ldm = ldm_state_dict(model)
    assert "encoder.down.0.block.0.conv1.weight" in ldm and ldm["encoder.mid.attn_1.q.weight"].dim() == 4
    from_ldm = CausalVideoVAE.from_image_vae(ldm)
    assert_same_weights(model, from_ldm)
    # A whole Stable Diffusion checkpoint: the VAE under first_stage_model., other parts ignored.
    full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    assert_same_weights(model, CausalVideoVAE.from_image_vae(full))


def test_inflation_inits_place_the_2d_kernel(vae2d):
    w2 = vae2d.encoder.conv_in.weight.detach().cpu()
    taps = {init: CausalVideoVAE.from_image_vae(vae2d, init=init).encoder.conv_in.conv.weight.detach()
            for init in ("tail", "center", "average", "random")}
    zero = torch.zeros_like(w2)
    assert all(torch.equal(t, u) for t, u in zip(taps["tail"].unbind(2), (zero, zero, w2)))
    assert all(torch.equal(t, u) for t, u in zip(taps["center"].unbind(2), (zero, w2, zero)))
    assert all(torch.allclose(t, w2 / 3) for t in taps["average"].unbind(2))
    assert taps["random"][:, :, :2].abs().sum() > 0
    rnd = CausalVideoVAE.from_image_vae(vae2d, init="random")
    # Kernels with one temporal tap and all biases and norms are copied whatever the init.
    assert torch.equal(rnd.encoder.down[0].downsample.conv.conv.weight[:, :, 0].cpu(),
                       vae2d.encoder.down_blocks[0].downsamplers[0].conv.weight.detach().cpu())
    assert torch.equal(rnd.decoder.mid.attn_1.q.conv.weight.flatten(1).cpu(),
                       vae2d.decoder.mid_block.attentions[0].to_q.weight.detach().cpu())
    assert torch.equal(rnd.encoder.conv_in.conv.bias.cpu(), vae2d.encoder.conv_in.bias.detach().cpu())


def test_inflation_errors(vae2d):
    from diffusers import AutoencoderKL

    with pytest.raises(ValueError, match="init"):
        CausalVideoVAE.from_image_vae(vae2d, init="middle")
    with pytest.raises(ValueError, match="norm_num_groups"):
        CausalVideoVAE.from_image_vae(AutoencoderKL(block_out_channels=(32, 64), norm_num_groups=16,
                                                    down_block_types=("DownEncoderBlock2D",) * 2,
                                                    up_block_types=("UpDecoderBlock2D",) * 2))
    with pytest.raises(ValueError, match="state dict"):
        CausalVideoVAE.from_image_vae("vae.safetensors")
    with pytest.raises(ValueError, match="neither in diffusers layout"):
        CausalVideoVAE.from_image_vae({"decoder.conv_in.weight": torch.zeros(1)})


# --- the AttnBlock3D quirk and the temporal resamplers, against the spec's own words --------------------


def quirky_attention_reference(q, k, v):
    """Spec B.1 AttnBlock3D: per sample, q/k/v as (C*T, H*W) matrices (row r = c*T + t); pseudo-frame
    g = rows [g*C, (g+1)*C); attention over H*W per pseudo-frame; rows written back in place."""
    b, C, T, H, W = q.shape
    out = torch.empty_like(q)
    for beta in range(b):
        Q, K, V = (t[beta].reshape(C * T, H * W) for t in (q, k, v))
        res = torch.empty_like(Q)
        for g in range(T):
            rows = slice(g * C, (g + 1) * C)
            A = torch.softmax(Q[rows].T @ K[rows] / C ** 0.5, dim=-1)
            res[rows] = (A @ V[rows].T).T
        out[beta] = res.reshape(C, T, H, W)
    return out


def per_frame_attention_reference(q, k, v):
    b, C, T, H, W = q.shape
    out = torch.empty_like(q)
    for beta in range(b):
        for t in range(T):
            Q, K, V = (x[beta, :, t].reshape(C, H * W) for x in (q, k, v))
            A = torch.softmax(Q.T @ K / C ** 0.5, dim=-1)
            out[beta, :, t] = (A @ V.T).T.reshape(C, H, W)
    return out


@pytest.mark.parametrize("T", [1, 3])
@pytest.mark.parametrize("per_frame", [False, True], ids=["AttnBlock3D-quirk", "AttnBlock3DFix"])
def test_attention_block_matches_spec(per_frame, T):
    torch.manual_seed(T)
    block = randomize_norms(AttnBlock3D(64, per_frame=per_frame)).to(DEVICE).eval()
    x = torch.randn(2, 64, T, 3, 5, device=DEVICE)
    with torch.no_grad():
        out = block(x)
    p = {k: v.detach().double().cpu() for k, v in block.state_dict().items()}
    xd = x.double().cpu()
    hn = F.group_norm(xd, 32, p["norm.weight"], p["norm.bias"], 1e-6)
    q, k, v = (F.conv3d(hn, p[f"{n}.conv.weight"], p[f"{n}.conv.bias"]) for n in "qkv")
    a = (per_frame_attention_reference if per_frame else quirky_attention_reference)(q, k, v)
    ref = xd + F.conv3d(a, p["proj_out.conv.weight"], p["proj_out.conv.bias"])
    assert_close_rel(out, ref, 1e-5)


def test_quirky_and_per_frame_attention_agree_on_images_only():
    quirky = tiny_vae()
    fixed = tiny_vae(encoder_attention="AttnBlock3DFix", decoder_attention="AttnBlock3DFix")
    fixed.load_state_dict(quirky.state_dict())
    with torch.no_grad():
        image = clip(1, 3, 1, 16, 16)
        assert_close_rel(fixed(image).sample, quirky(image).sample, 1e-5, "T=1")
        video = clip(1, 3, 9, 16, 16)
        assert rel_err(fixed.encode(video).latent_dist.mean, quirky.encode(video).latent_dist.mean) > 1e-3
        assert rel_err(fixed(video).sample, quirky(video).sample) > 1e-3


def spec_reference_vae(model, x):
    """Encoder mean/logvar and decoder output in float64 straight from the numerics spec (B.1-B.4):
    plain torch on the state dict, every causal pad an explicit copy, upstream's attention as the
    SD-VAE block applied to the (b*t, c, h*w) view of the contiguous (b, c, t, h, w) tensors."""
    cfg = model.config
    p = {k: v.detach().double().cpu() for k, v in model.state_dict().items()}

    def conv(name, h, stride=1, pad=0):
        w = p[f"{name}.conv.weight"]
        h = torch.cat([h[:, :, :1]] * (w.shape[2] - 1) + [h], dim=2)
        return F.conv3d(h, w, p[f"{name}.conv.bias"], stride, (0, pad, pad))

    def norm(name, h, silu=True):
        h = F.group_norm(h, 32, p[f"{name}.weight"], p[f"{name}.bias"], 1e-6)
        return h * torch.sigmoid(h) if silu else h

    def resnet(name, h):
        y = conv(f"{name}.conv2", norm(f"{name}.norm2", conv(f"{name}.conv1", norm(f"{name}.norm1", h), pad=1)), pad=1)
        return (conv(f"{name}.nin_shortcut", h) if f"{name}.nin_shortcut.conv.weight" in p else h) + y

    def attn(name, h, kind):
        b, c, t, H, W = h.shape
        hn = norm(f"{name}.norm", h, silu=False)
        q, k, v = (conv(f"{name}.{n}", hn) for n in "qkv")
        if kind == "AttnBlock3D":
            q, k, v = (z.reshape(b * t, c, H * W) for z in (q, k, v))
        else:
            q, k, v = (z.permute(0, 2, 1, 3, 4).reshape(b * t, c, H * W) for z in (q, k, v))
        a = torch.softmax(torch.bmm(q.permute(0, 2, 1), k) * c ** -0.5, dim=2)
        o = torch.bmm(v, a.permute(0, 2, 1))
        o = o.reshape(b, c, t, H, W) if kind == "AttnBlock3D" else o.reshape(b, t, c, H, W).permute(0, 2, 1, 3, 4)
        return h + conv(f"{name}.proj_out", o)

    def mid(prefix, h, kind):
        h = resnet(f"{prefix}.mid.block_1", h)
        return resnet(f"{prefix}.mid.block_2", attn(f"{prefix}.mid.attn_1", h, kind))

    h = conv("encoder.conv_in", x.double().cpu(), pad=1)
    for i in range(len(cfg.hidden_size_mult)):
        for j in range(cfg.num_res_blocks):
            h = resnet(f"encoder.down.{i}.block.{j}", h)
        if cfg.encoder_spatial_downsample[i]:
            h = conv(f"encoder.down.{i}.downsample.conv", F.pad(h, (0, 1, 0, 1)), stride=(1, 2, 2))
        if cfg.encoder_temporal_downsample[i]:
            h = F.avg_pool3d(torch.cat([h[:, :, :1], h[:, :, :1], h], dim=2), (3, 1, 1), (2, 1, 1))
    h = conv("encoder.conv_out", norm("encoder.norm_out", mid("encoder", h, cfg.encoder_attention)), pad=1)
    mean, logvar = conv("quant_conv", h).chunk(2, dim=1)

    h = conv("decoder.conv_in", conv("post_quant_conv", mean), pad=1)
    h = mid("decoder", h, cfg.decoder_attention)
    for i in reversed(range(len(cfg.hidden_size_mult))):
        for j in range(cfg.num_res_blocks + 1):
            h = resnet(f"decoder.up.{i}.block.{j}", h)
        if cfg.decoder_spatial_upsample[i]:
            h = conv(f"decoder.up.{i}.upsample.conv", F.interpolate(h, scale_factor=(1, 2, 2), mode="nearest"), pad=1)
        if cfg.decoder_temporal_upsample[i] and h.shape[2] > 1:
            up = F.interpolate(h[:, :, 1:], scale_factor=(2, 1, 1), mode="trilinear")
            h = torch.cat([h[:, :, :1], up], dim=2)
    rec = conv("decoder.conv_out", norm("decoder.norm_out", h), pad=1)
    return mean, logvar.clamp(-30, 20), rec


@pytest.mark.parametrize("attention", ["AttnBlock3D", "AttnBlock3DFix"])
@pytest.mark.parametrize("T", [1, 9])
def test_model_matches_spec_reference(attention, T):
    """The whole model in float64 against the from-spec reference: level order, resampler placement
    and kind, norms, shortcuts, the attention variant, the posterior split and clamp."""
    model = tiny_vae(encoder_attention=attention, decoder_attention=attention).double()
    x = clip(2, 3, T, 16, 8).double()
    with torch.no_grad():
        post = model.encode(x).latent_dist
        rec = model.decode(post.mean).sample
    mean, logvar, ref_rec = spec_reference_vae(model, x)
    assert_close_rel(post.mean, mean, 1e-10, "mean")
    assert_close_rel(post.logvar, logvar, 1e-10, "logvar")
    assert_close_rel(rec, ref_rec, 1e-10, "reconstruction")


@pytest.mark.parametrize("T", [1, 2, 3, 5, 6, 9, 17])
def test_time_downsample_matches_upstream(T):
    x = torch.randn(2, 3, T, 2, 3, dtype=torch.float64)
    # Upstream: replicate frame 0 twice in front, then AvgPool3d((3,1,1), stride (2,1,1)).
    ref = F.avg_pool3d(torch.cat([x[:, :, :1], x[:, :, :1], x], dim=2), (3, 1, 1), (2, 1, 1))
    out = TimeDownsample2x()(x)
    assert out.shape[2] == (T - 1) // 2 + 1
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("T", [1, 2, 3, 5, 9])
def test_time_upsample_matches_spec(T):
    x = torch.randn(2, 3, T, 2, 3, dtype=torch.float64)
    out = TimeUpsample2x()(x)
    if T == 1:
        assert torch.equal(out, x)
        return
    xp, n = x[:, :, 1:], T - 1
    frames = []
    for i in range(2 * n):  # spec B.1: out'[2m+1] = .75 x'[m] + .25 x'[m+1], out'[2m] = .25 x'[m-1] + .75 x'[m]
        m = i // 2
        if i % 2:
            frames.append(0.75 * xp[:, :, m] + 0.25 * xp[:, :, min(m + 1, n - 1)])
        else:
            frames.append(0.25 * xp[:, :, max(m - 1, 0)] + 0.75 * xp[:, :, m])
    ref = torch.stack([x[:, :, 0]] + frames, dim=2)
    assert out.shape[2] == 2 * T - 1
    torch.testing.assert_close(out, ref, rtol=1e-14, atol=1e-14)


def test_spatial_downsample_pads_bottom_right():
    torch.manual_seed(0)
    down = SpatialDownsample2x(4)
    x = torch.randn(1, 4, 3, 7, 10)
    with torch.no_grad():
        out = down(x)
        ref = F.conv3d(F.pad(x, (0, 1, 0, 1)), down.conv.conv.weight, down.conv.conv.bias, stride=(1, 2, 2))
    assert out.shape == (1, 4, 3, 3, 5)
    torch.testing.assert_close(out, ref)


# --- precision, memory, training, imports, backends ------------------------------------------------------


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 3e-2), (torch.bfloat16, 1.5e-1)], ids=["fp16", "bf16"])
def test_low_precision_inference(dtype, tol):
    model = tiny_vae()
    x = clip(1, 3, 5, 8, 16)
    with torch.no_grad():
        ref = model(x).sample
        low = copy.deepcopy(model).to(dtype)
        out = low(x.to(dtype)).sample
        latent = low.encode(x.to(dtype)).latent_dist
    assert out.dtype == dtype and latent.mean.dtype == dtype
    assert_close_rel(out, ref, tol, f"{dtype} reconstruction")


def test_inference_frees_intermediates():
    """Under no_grad, the output of a block is dropped once the next block has used it: at any time at
    most a couple of the per-block activations are alive, not the whole pyramid."""
    model = tiny_vae()
    stages = [m for name, m in model.named_modules()
              if name.count(".") <= 3 and isinstance(m, tuple(type(b) for b in (
                  model.encoder.mid.block_1, model.encoder.mid.attn_1, model.encoder.down[0].downsample,
                  model.decoder.up[1].upsample, TimeDownsample2x(), TimeUpsample2x())))]
    refs, alive = [], []

    def hook(module, inputs, output):
        refs.append(weakref.ref(output))
        alive.append(sum(r() is not None for r in refs))

    handles = [m.register_forward_hook(hook) for m in stages]
    x = clip(1, 3, 5, 8, 8)
    try:
        with torch.no_grad():
            model(x)
        peak_no_grad, n_calls = max(alive), len(alive)
        refs.clear(), alive.clear()
        gc.collect()
        with torch.enable_grad():
            model(x).sample.sum()
        peak_grad = max(alive)
    finally:
        for h in handles:
            h.remove()
    assert n_calls >= 15
    assert peak_no_grad <= 3, f"{peak_no_grad} block outputs alive at once under no_grad"
    assert peak_grad > 3  # with autograd they are saved for backward: the probe does see retention


def test_gradients_and_gradient_checkpointing():
    model = tiny_vae().train()
    x = clip(1, 3, 5, 8, 8)
    model(x).sample.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert grads["encoder.conv_in.conv.weight"].abs().sum() > 0
    model.zero_grad()
    model.enable_gradient_checkpointing()
    assert model.encoder.gradient_checkpointing and model.decoder.gradient_checkpointing
    model(x).sample.square().mean().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_import_osp_does_not_need_diffusers():
    code = (
        "import sys; sys.modules['diffusers'] = None\n"
        "import osp, osp.ops, osp.nn, osp.models\n"
        "try:\n    osp.models.CausalVideoVAE\nexcept ImportError:\n    print('lazy')\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "lazy"


def test_backends_agree():
    """A tiny VAE on the triton backends against the torch ones."""
    # One level (2x down in space and time, a shortcut conv) and the mid block: every block type, few
    # norms (interpreted kernels are slow on CPU).
    model = tiny_vae(
        hidden_size_mult=[2], encoder_resnet_blocks=["ResnetBlock3D"], decoder_resnet_blocks=["ResnetBlock3D"],
        encoder_spatial_downsample=["SpatialDownsample2x"], encoder_temporal_downsample=["TimeDownsample2x"],
        decoder_spatial_upsample=["SpatialUpsample2x"], decoder_temporal_upsample=["TimeUpsample2x"],
    )
    assert (model.spatial_compression, model.temporal_compression) == (2, 2)
    x = clip(1, 3, 3, 6, 6)
    with torch.no_grad():
        with osp.ops.use_backend("torch"):
            ref = model(x).sample
        with osp.ops.use_backend("triton"):  # every op that has a triton backend: convs, norms, attention
            out = model(x).sample
    assert_close_rel(out, ref, 1e-4, "triton vs torch")
