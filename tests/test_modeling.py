"""What osp's models share (osp.models.modeling): upstream configs with missing fields, loading errors
a user can act on, the dtype rule, lazy subpackages, and the tiling defaults a new user meets."""
import logging
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("diffusers")

from osp.models import CausalVideoVAE, LatteT2V  # noqa: E402
from spec_data import VAE_RELEASE_CONFIG  # noqa: E402
from vae_helpers import clip, exact_backend, tiny_config, tiny_vae  # noqa: E402,F401

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Upstream CausalVAEModel's constructor defaults, written out from the numerics spec's table B.7.
SPEC_B7_DEFAULTS = {
    "hidden_size": 128, "z_channels": 4, "hidden_size_mult": [1, 2, 4, 4], "attn_resolutions": [],
    "dropout": 0.0, "resolution": 256, "double_z": True, "embed_dim": 4, "num_res_blocks": 2,
    "q_conv": "CausalConv3d", "encoder_conv_in": "CausalConv3d", "encoder_conv_out": "CausalConv3d",
    "decoder_conv_in": "CausalConv3d", "decoder_conv_out": "CausalConv3d",
    "encoder_attention": "AttnBlock3D", "decoder_attention": "AttnBlock3D",
    "encoder_mid_resnet": "ResnetBlock3D", "decoder_mid_resnet": "ResnetBlock3D",
    "encoder_resnet_blocks": ["ResnetBlock3D"] * 4, "decoder_resnet_blocks": ["ResnetBlock3D"] * 4,
    "encoder_spatial_downsample": ["SpatialDownsample2x"] * 3 + [""],
    "encoder_temporal_downsample": ["", "TimeDownsample2x", "TimeDownsample2x", ""],
    "decoder_spatial_upsample": [""] + ["SpatialUpsample2x"] * 3,
    "decoder_temporal_upsample": ["", "", "TimeUpsample2x", "TimeUpsample2x"],
}


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


@pytest.mark.parametrize("field", sorted(SPEC_B7_DEFAULTS))
def test_missing_upstream_vae_field_takes_upstreams_default(field):
    cfg = {k: v for k, v in VAE_RELEASE_CONFIG.items() if k != field}
    with torch.device("meta"):
        vae = CausalVideoVAE.from_config(cfg)
    assert _plain(getattr(vae.config, field)) == SPEC_B7_DEFAULTS[field], field


def test_every_upstream_default_is_listed_once():
    from osp.models.vae.model import UPSTREAM_DEFAULTS

    assert {k: _plain(v) for k, v in UPSTREAM_DEFAULTS.items()} == SPEC_B7_DEFAULTS


def test_osp_configs_keep_osps_defaults():
    with torch.device("meta"):
        vae = CausalVideoVAE.from_config({"hidden_size": 128})
    assert vae.config.decoder_attention == "AttnBlock3DFix"
    assert _plain(vae.config.encoder_temporal_downsample) == ["TimeDownsample2x"] * 2 + [""] * 2


def test_upstream_folder_without_decoder_attention_decodes_as_upstream(tmp_path):
    """The user's case: a config.json lacking decoder_attention must decode with upstream's attention."""
    full = tiny_vae()
    cfg = {k: v for k, v in tiny_config().items() if k != "decoder_attention"}
    full.save_pretrained(tmp_path)
    import json

    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = CausalVideoVAE.from_pretrained(tmp_path).to(full.device)
    assert loaded.config.decoder_attention == "AttnBlock3D"
    z = torch.randn(1, 4, 3, 4, 4, generator=torch.Generator().manual_seed(0)).to(full.device)
    with torch.no_grad():
        torch.testing.assert_close(loaded.decode(z).sample, full.decode(z).sample, rtol=0, atol=0)


# --- loading errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_weights_name_the_file(tmp_path, fmt):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path, safe_serialization=fmt == "safetensors")
    path = tmp_path / f"diffusion_pytorch_model.{fmt}"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.\w+'? is incomplete or corrupt"):
        CausalVideoVAE.from_pretrained(tmp_path)


@pytest.mark.parametrize("env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": "http://127.0.0.1:9"}],
                         ids=["offline", "unreachable-hub"])
def test_missing_path_says_where_it_looked_quickly(tmp_path, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(tmp_path)
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"owner/no-such-model.*absolute: .*is not a local folder"):
        CausalVideoVAE.from_pretrained("owner/no-such-model")
    assert time.monotonic() - start < 10


# --- one dtype rule ---------------------------------------------------------------------------------


def test_vae_computes_in_its_parameter_dtype():
    vae = tiny_vae().to(torch.bfloat16)
    x = clip(1, 3, 5, 16, 16)  # float32
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        assert post.mean.dtype == torch.bfloat16
        assert vae.decode(post.mean.float()).sample.dtype == torch.bfloat16


def test_latte_computes_in_its_parameter_dtype():
    model = LatteT2V(num_attention_heads=2, attention_head_dim=16, num_layers=1, cross_attention_dim=32,
                     sample_size=8, caption_channels=24, video_length=5).to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.randn(1, 4, 5, 8, 8), torch.tensor([3]), torch.randn(1, 6, 24)).sample
    assert out.dtype == torch.bfloat16


def test_vae_under_autocast_is_close_to_fp32():
    """Training's setting: fp32 weights, bf16 autocast. The ops follow autocast as torch's do."""
    vae = tiny_vae()
    x = clip(1, 3, 5, 16, 16)
    with torch.no_grad():
        ref = vae(x).sample
        with torch.autocast(x.device.type, dtype=torch.bfloat16):
            out = vae(x).sample
    assert torch.isfinite(out).all()
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < 5e-2, err


def test_latte_forward_takes_keywords_after_captions():
    model = LatteT2V(num_attention_heads=2, attention_head_dim=16, num_layers=1, cross_attention_dim=32,
                     sample_size=8, caption_channels=24, video_length=5)
    x, t, ehs, mask = torch.randn(1, 4, 5, 8, 8), torch.tensor([3]), torch.randn(1, 6, 24), torch.ones(1, 6)
    with pytest.raises(TypeError, match="positional"):
        model(x, t, ehs, mask)
    assert model(x, t, ehs, encoder_attention_mask=mask).sample.shape == (1, 8, 5, 8, 8)


def test_subpackages_are_reachable_after_import_osp():
    code = "import osp; print(osp.models.CausalVideoVAE.__name__, osp.diffusion.create_diffusion.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["CausalVideoVAE", "create_diffusion"]


# --- tiling defaults ---------------------------------------------------------------------------------


def test_tiling_defaults_to_the_fast_mode_and_warns_on_small_tiles():
    vae = tiny_vae()
    vae.enable_tiling()
    assert (vae._tiling.mode, vae._tiling.norm) == ("stream", "tile")
    with pytest.warns(UserWarning, match=r"tile_sample_size=32 gives tiles of 4 latents.*expected tile_sample_size >= "):
        vae.enable_tiling(tile_sample_size=32)


def test_tiled_decode_logs_progress_without_a_terminal(caplog, monkeypatch):
    vae = tiny_vae()
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    with pytest.warns(UserWarning):
        vae.enable_tiling(tile_sample_size=32, overlap=0.25)
    z = torch.randn(1, 4, 2, 6, 6, generator=torch.Generator().manual_seed(0)).to(vae.device)
    with caplog.at_level(logging.INFO, logger="osp.models.vae.tiling"), torch.no_grad():
        vae.decode(z)
    lines = [r.getMessage() for r in caplog.records if r.name == "osp.models.vae.tiling"]
    assert lines and lines[-1].startswith("tiled decode: ") and "tile steps" in lines[-1], lines
