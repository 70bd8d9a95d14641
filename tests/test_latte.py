"""osp.models.LatteT2V (and LatteClass, Latte): upstream's state-dict names and shapes, the numerics
of spec section A against a plain-torch float64 reference written here from the spec's formulas,
a cross-check against diffusers' LatteTransformer3DModel with the spec's two fixes, joint
image-video training, gradient checkpointing, strict checkpoints, presets and argument errors."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("diffusers")

from parity import assert_parity  # noqa: E402

import osp  # noqa: E402
from osp.models import Latte, LatteClass, LatteT2V  # noqa: E402
from osp.models.dit import LATTE_T2V_XL_122, PRESETS  # noqa: E402
from spec_data import LATTE_T2V_2_LAYER_KEYS  # noqa: E402

# A tiny LatteT2V: 2 layers, 2 heads x 16, latent 8x8, 5 frames, 24-channel captions.
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2, caption_channels=24,
            video_length=5, norm_eps=1e-6)


def tiny(seed=0, **overrides):
    torch.manual_seed(seed)
    model = LatteT2V(**{**TINY, **overrides}).eval()
    # Fresh tables are randn/sqrt(D); larger ones exercise the modulation harder.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                p.normal_(0, 0.5)
    return model


def inputs(b=2, frames=5, H=8, W=8, L=7, groups=1, C=24, seed=1, masks=("partial", "partial")):
    """Latents, timesteps, captions and a 0/1 float mask; masks[i] says how sample i's captions are
    padded: "partial" (some tokens), "full" (no token at all), "none" (every token)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, frames, H, W, generator=g)
    t = torch.tensor([17.0, 803.0, 402.0, 0.0][:b])
    ehs = torch.randn(b, groups, L, C, generator=g)
    mask = torch.ones(b, groups, L)
    for i, kind in enumerate(masks[:b]):
        if kind == "partial":
            for j in range(groups):
                mask[i, j, 3 + (i + j) % (L - 3):] = 0
        elif kind == "full":
            mask[i, -1] = 0
    if groups == 1:
        ehs, mask = ehs[:, 0], mask[:, 0]
    return x, t, ehs, mask


# --- the float64 reference, written from spec section A alone -------------------------------------

def _sincos(dim, pos):
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = pos.reshape(-1).double()[:, None] * omega[None]
    return torch.cat([out.sin(), out.cos()], 1).float()


def _pos2d(D, Hp, Wp, sample_h, p):
    base, s = sample_h // p, max(sample_h // 64, 1)
    v = torch.arange(Hp, dtype=torch.float32) / (Hp / base) / s
    u = torch.arange(Wp, dtype=torch.float32) / (Wp / base) / s
    uu, vv = u[None, :].expand(Hp, Wp), v[:, None].expand(Hp, Wp)
    return torch.cat([_sincos(D // 2, uu), _sincos(D // 2, vv)], 1)


def _temp(D, vl):
    return _sincos(D, torch.arange(vl, dtype=torch.float32) / max(vl // 5, 1))


def _ln(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(((x - mu) ** 2).mean(-1, keepdim=True) + eps)


def _gelu_tanh(x):
    return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def reference(sd, cfg, x, t, ehs, mask, use_image_num=0, dtype=torch.float64, temporal=True):
    """Upstream LatteT2V's inference forward as the spec states it, in ``dtype``: per-frame
    repeats, the -10000 additive caption bias, the temporal embedding before temporal block 0."""
    W = {k: v.to(dtype) for k, v in sd.items()}
    Hh, hd, p, Cout = cfg["num_attention_heads"], cfg["attention_head_dim"], cfg["patch_size"], cfg["out_channels"]
    D, vl, eps = Hh * hd, cfg["video_length"], cfg["norm_eps"]
    sample_h = cfg["sample_size"] if isinstance(cfg["sample_size"], int) else cfg["sample_size"][0]

    def lin(h, name):
        return h @ W[name + ".weight"].T + W[name + ".bias"]

    def attn(xq, xkv, pre, bias=None):
        N, Lq, _ = xq.shape
        q = lin(xq, pre + ".to_q").view(N, Lq, Hh, hd).transpose(1, 2)
        k = lin(xkv, pre + ".to_k").view(N, -1, Hh, hd).transpose(1, 2)
        v = lin(xkv, pre + ".to_v").view(N, -1, Hh, hd).transpose(1, 2)
        s = q @ k.transpose(-1, -2) / math.sqrt(hd)
        if bias is not None:
            s = s + bias[:, None]  # (N, 1, 1, L) over heads and queries
        o = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(N, Lq, D)
        return lin(o, pre + ".to_out.0")

    def block(X, pre, tau_rows, ctx=None, bias=None):
        N = X.shape[0]
        m = (W[pre + ".scale_shift_table"][None] + tau_rows.view(N, 6, D)).chunk(6, 1)
        sh1, sc1, g1, sh2, sc2, g2 = m
        h = _ln(X, eps) * (1 + sc1) + sh1
        X = X + g1 * attn(h, h, pre + ".attn1")
        if ctx is not None:
            X = X + attn(X, ctx, pre + ".attn2", bias)
        h = _ln(X, eps) * (1 + sc2) + sh2
        return X + g2 * lin(_gelu_tanh(lin(h, pre + ".ff.net.0.proj")), pre + ".ff.net.2")

    b, C, Ft, H, Wd = x.shape
    n = use_image_num
    Fv, Hp, Wp = Ft - n, H // p, Wd // p
    T = Hp * Wp
    frames = x.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * Ft, C, H, Wd)
    tok = F.conv2d(frames, W["pos_embed.proj.weight"], W["pos_embed.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    tok = tok + _pos2d(D, Hp, Wp, sample_h, p).to(dtype)

    lam = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
    arg = t.float()[:, None] * lam[None]
    phi = torch.cat([arg.cos(), arg.sin()], 1).to(dtype)
    e = lin(F.silu(lin(phi, "adaln_single.emb.timestep_embedder.linear_1")), "adaln_single.emb.timestep_embedder.linear_2")
    tau = lin(F.silu(e), "adaln_single.linear")

    if ehs.dim() == 3:
        ehs, mask = ehs[:, None], mask[:, None]
    c = lin(_gelu_tanh(lin(ehs.to(dtype), "caption_projection.linear_1")), "caption_projection.linear_2")
    bias = (1 - mask.to(dtype)) * -10000.0
    idx = [0] * Fv + [1 + j for j in range(n)]
    c_s = c[:, idx].reshape(b * Ft, -1, D)
    bias_s = bias[:, idx].reshape(b * Ft, 1, -1)
    tau_s, tau_t = tau.repeat_interleave(Ft, 0), tau.repeat_interleave(T, 0)

    X = tok
    for i in range(cfg["num_layers"]):
        X = block(X, f"transformer_blocks.{i}", tau_s, c_s, bias_s)
        if not temporal:
            continue
        X = X.view(b, Ft, T, D).permute(0, 2, 1, 3)
        V = X[:, :, :Fv].reshape(b * T, Fv, D)
        if i == 0:
            V = V + _temp(D, vl).to(dtype)
        V = block(V, f"temporal_transformer_blocks.{i}", tau_t).view(b, T, Fv, D)
        X = torch.cat([V, X[:, :, Fv:]], 2).permute(0, 2, 1, 3).reshape(b * Ft, T, D)
    e_s = e.repeat_interleave(Ft, 0)
    shift, scale = W["scale_shift_table"][0] + e_s, W["scale_shift_table"][1] + e_s
    X = lin(_ln(X) * (1 + scale[:, None]) + shift[:, None], "proj_out")
    out = X.view(b * Ft, Hp, Wp, p, p, Cout).permute(0, 5, 1, 3, 2, 4).reshape(b * Ft, Cout, H, Wd)
    return out.view(b, Ft, Cout, H, Wd).transpose(1, 2)


# --- structure --------------------------------------------------------------------------------------

def test_state_dict_matches_upstream_key_list():
    with torch.device("meta"):
        model = LatteT2V.from_preset("LatteT2V-XL/122", num_layers=2)
    assert model.proj_out.weight.device.type == "meta"  # no memory, no init
    got = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert got == LATTE_T2V_2_LAYER_KEYS  # names, shapes and order
    # y_embedding is a persistent buffer, not a parameter; the sin-cos tables are not saved.
    assert "caption_projection.y_embedding" not in dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    assert {"pos_embed.pos_embed", "temp_pos_embed"} <= set(buffers)
    assert buffers["pos_embed.pos_embed"].shape == (1, 256, 1152)
    assert buffers["temp_pos_embed"].shape == (1, 5, 1152)


def test_presets():
    with torch.device("meta"):
        xl = LatteT2V.from_preset("LatteT2V-XL/122")
        big = LatteT2V.from_preset("LatteT2V-XL/122-65x512x512", num_layers=1)
    assert len(xl.state_dict()) == 16 + 34 * 28 == 968
    n = sum(p.numel() for p in xl.parameters())
    assert 1.0e9 < n < 1.1e9, n
    assert dict(xl.config)["video_length"] == 5 and list(xl.config.sample_size) == [32, 32]
    assert big.config.video_length == 17 and list(big.config.sample_size) == [64, 64]
    assert big.temp_pos_embed.shape == (1, 17, 1152) and big.pos_embed.pos_embed.shape == (1, 1024, 1152)
    assert LATTE_T2V_XL_122["num_layers"] == 28 and LATTE_T2V_XL_122["caption_channels"] == 4096
    assert set(PRESETS) >= {"LatteT2V-XL/122", "LatteT2V-XL/122-65x256x256", "LatteT2V-XL/122-65x512x512"}
    with pytest.raises(ValueError, match="unknown preset"):
        LatteT2V.from_preset("LatteT2V-XXL/9")


def test_sincos_tables_follow_the_spec():
    model = tiny(sample_size=8, video_length=17)
    # s_t = 17 // 5 = 3: positions f / 3, sin half then cos half.
    assert torch.equal(model.temp_pos_embed[0], _temp(32, 17))
    assert torch.equal(model.pos_embed.pos_embed[0], _pos2d(32, 4, 4, 8, 2))
    # Another grid is computed from scratch with the configured base size, not interpolated.
    assert torch.equal(model.pos_embed.table(3, 5, torch.device("cpu"))[0], _pos2d(32, 3, 5, 8, 2))


# --- numerics ----------------------------------------------------------------------------------------

CASES = {
    # id: (config overrides, input kwargs, forward kwargs)
    "17f-8x8-partial": (dict(), dict(), dict()),
    "vl10-6x10-fullmask": (dict(video_length=10), dict(frames=10, H=6, W=10, masks=("partial", "full")), dict()),
    "joint-2images": (dict(), dict(frames=7, groups=3, masks=("full", "partial")), dict(use_image_num=2)),
    "t2i-no-temporal": (dict(), dict(frames=1, b=3, masks=("none", "partial", "full")),
                        dict(enable_temporal_attentions=False)),
    "one-token-per-frame": (dict(), dict(H=2, W=2), dict()),
}


def _run(model, x, t, ehs, mask, **kw):
    with torch.no_grad():
        return model(x, t, ehs, encoder_attention_mask=mask, **kw).sample


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_matches_float64_reference(case):
    overrides, in_kw, fw = CASES[case]
    model = tiny(**overrides)
    x, t, ehs, mask = inputs(**in_kw)
    cfg = dict(model.config)
    sd = model.state_dict()
    ref_kw = dict(use_image_num=fw.get("use_image_num", 0), temporal=fw.get("enable_temporal_attentions", True))
    ref64 = reference(sd, cfg, x, t, ehs, mask, **ref_kw)
    ref32 = reference(sd, cfg, x, t, ehs, mask, dtype=torch.float32, **ref_kw)
    with osp.ops.use_backend("torch"):
        out = _run(model, x, t, ehs, mask, **fw)
    assert out.shape == ref64.shape
    assert_parity(out, ref64, ref32)
    # float64 end to end: the same algorithm, not just close at fp32 precision.
    with osp.ops.use_backend("torch"):
        out64 = _run(model.double(), x.double(), t, ehs.double(), mask, **fw)
    assert (out64 - ref64).abs().max() <= 1e-9 * ref64.abs().max()


def _reference_grads(model, x, t, ehs, mask, g):
    """{name: grad} of sum(reference(...) * g) over parameters and "x", in float64 and float32."""
    cfg, grads = dict(model.config), {}
    for dtype in (torch.float64, torch.float32):
        sd = {k: v.detach().to(dtype).requires_grad_(k in dict(model.named_parameters()))
              for k, v in model.state_dict().items()}
        xr = x.detach().to(dtype).clone().requires_grad_()
        (reference(sd, cfg, xr, t, ehs, mask, dtype=dtype) * g.to(dtype)).sum().backward()
        grads[dtype] = {k: v.grad for k, v in sd.items() if v.grad is not None}
        grads[dtype]["x"] = xr.grad
    return grads


def _check_grads(model, x, t, ehs, mask, g, device="cpu"):
    """Our output and gradients (model run on ``device``) against the reference's on CPU."""
    grads = _reference_grads(model, x, t, ehs, mask, g)
    model = model.to(device)
    xo = x.to(device).requires_grad_()
    out = model(xo, t.to(device), ehs.to(device), encoder_attention_mask=mask.to(device)).sample
    (out * g.to(device)).sum().backward()
    ours = {k: p.grad.cpu() for k, p in model.named_parameters()}
    ours["x"] = xo.grad.cpu()
    assert set(ours) == set(grads[torch.float64])
    for k, v in ours.items():
        assert_parity(v, grads[torch.float64][k], grads[torch.float32][k], name=k)
    return out.detach().cpu()


def test_triton_backends(device):
    """One small forward and backward with every Triton backend forced (compiled on a GPU,
    interpreted on CPU)."""
    pytest.importorskip("triton")
    model = tiny(num_layers=1)
    x, t, ehs, mask = inputs(b=1, frames=5, H=4, W=4, L=5, masks=("partial",))
    g = torch.randn(1, 8, 5, 4, 4, generator=torch.Generator().manual_seed(5))
    cfg = dict(model.config)
    ref64 = reference(model.state_dict(), cfg, x, t, ehs, mask)
    ref32 = reference(model.state_dict(), cfg, x, t, ehs, mask, dtype=torch.float32)
    with osp.ops.use_backend("triton"):
        out = _check_grads(model, x, t, ehs, mask, g, device=device)
    assert_parity(out, ref64, ref32)


def test_gradients_match_float64_reference():
    model = tiny()
    x, t, ehs, mask = inputs(masks=("partial", "full"))
    g = torch.randn(2, 8, 5, 8, 8, generator=torch.Generator().manual_seed(5))
    with osp.ops.use_backend("torch"):
        _check_grads(model, x, t, ehs, mask, g)


def test_diffusers_cross_check_with_the_two_fixes():
    """Spec A.0: diffusers' LatteTransformer3DModel with upstream's temp_pos_embed (s_t = 2 here)
    and the prepared (b*F, 1, L) -10000 bias gives upstream's output."""
    from diffusers import LatteTransformer3DModel

    vl = 10
    model = tiny(video_length=vl)
    twin = LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2, dropout=0.0,
        cross_attention_dim=32, attention_bias=True, sample_size=8, patch_size=2, activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        caption_channels=24, video_length=vl).eval()
    sd = {k: v for k, v in model.state_dict().items() if k != "caption_projection.y_embedding"}
    twin.load_state_dict(sd, strict=True)
    twin.temp_pos_embed = _temp(32, vl)[None]  # fix 1
    for H, W, masks, tol in ((8, 8, ("partial", "partial"), 1e-6), (6, 10, ("partial", "full"), 3e-5)):
        x, t, ehs, mask = inputs(frames=vl, H=H, W=W, masks=masks)
        bias = ((1 - mask) * -10000.0)[:, None].repeat_interleave(vl, 0)  # fix 2
        with torch.no_grad(), osp.ops.use_backend("torch"):
            want = twin(x, t, ehs, bias).sample
        got = _run(model, x, t, ehs, mask)
        # A fully masked caption: upstream's fp32 rounding of (score - 10000) is its only residue.
        assert ((got - want).norm() / want.norm()).item() < tol, (H, W, masks)


def test_joint_images_equal_separate_spatial_only_runs():
    """Images of joint training see only the spatial blocks and their own caption."""
    model = tiny()
    n = 2
    x, t, ehs, mask = inputs(frames=5 + n, groups=1 + n, masks=("partial", "full"))
    with osp.ops.use_backend("torch"):
        joint = _run(model, x, t, ehs, mask, use_image_num=n)
        b = x.shape[0]
        imgs = x[:, :, 5:].transpose(1, 2).reshape(b * n, 4, 1, 8, 8)
        alone = _run(model, imgs, t.repeat_interleave(n), ehs[:, 1:].reshape(b * n, 7, 24),
                     mask[:, 1:].reshape(b * n, 7), enable_temporal_attentions=False)
    assert joint.shape == (2, 8, 7, 8, 8)
    torch.testing.assert_close(joint[:, :, 5:], alone.view(b, n, 8, 8, 8).transpose(1, 2), rtol=1e-5, atol=1e-5)
    # The video frames do not depend on the images.
    with osp.ops.use_backend("torch"):
        video = _run(model, x[:, :, :5], t, ehs[:, 0], mask[:, 0])
    torch.testing.assert_close(joint[:, :, :5], video, rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, ehs, mask = inputs(frames=6, groups=2)
    grads = []
    for ckpt in (False, True):
        model = tiny(dropout=0.0).train()
        if ckpt:
            model.enable_gradient_checkpointing()
            assert model.is_gradient_checkpointing
        with osp.ops.use_backend("torch"):
            model(x, t, ehs, encoder_attention_mask=mask, use_image_num=1).sample.square().mean().backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=1e-6, atol=1e-7, msg=k)


def test_bfloat16_model_runs_close_to_reference():
    model = tiny()
    x, t, ehs, mask = inputs()
    ref64 = reference(model.state_dict(), dict(model.config), x, t, ehs, mask)
    with osp.ops.use_backend("torch"):
        out = _run(model.to(torch.bfloat16), x, t, ehs, mask)
    assert out.dtype == torch.bfloat16
    assert ((out.double() - ref64).norm() / ref64.norm()).item() < 3e-2


# --- checkpoints ---------------------------------------------------------------------------------------

UPSTREAM_CONFIG_FIELDS = {
    "_class_name": "LatteT2V", "_diffusers_version": "0.27.2", "activation_fn": "gelu-approximate",
    "attention_mode": "xformers", "attention_type": "default", "double_self_attention": False, "dropout": 0.0,
    "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000, "num_vector_embeds": None, "only_cross_attention": False,
    "upcast_attention": False, "use_linear_projection": False, "some_training_flag": True,
}


def _write_upstream_dir(path, model, state_dict=None, fmt="safetensors"):
    os.makedirs(path, exist_ok=True)
    cfg = {**UPSTREAM_CONFIG_FIELDS, **{k: v for k, v in TINY.items()}, "sample_size": [8, 8]}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    sd = {k: v.contiguous() for k, v in (state_dict or model.state_dict()).items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file(sd, os.path.join(path, "diffusion_pytorch_model.safetensors"))
    else:
        torch.save(sd, os.path.join(path, "diffusion_pytorch_model.bin"))
    return path


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_loads_an_upstream_directory(tmp_path, fmt):
    model = tiny()
    path = _write_upstream_dir(str(tmp_path / "17x256x256"), model, fmt=fmt)
    loaded = LatteT2V.from_pretrained(path)
    assert not loaded.training
    assert loaded.temp_pos_embed.device.type == "cpu" and torch.equal(loaded.temp_pos_embed, model.temp_pos_embed)
    assert torch.equal(loaded.pos_embed.pos_embed, model.pos_embed.pos_embed)
    x, t, ehs, mask = inputs()
    with osp.ops.use_backend("torch"):
        torch.testing.assert_close(_run(loaded, x, t, ehs, mask), _run(model, x, t, ehs, mask), rtol=0, atol=0)


def test_save_pretrained_round_trip(tmp_path):
    model = tiny(video_length=10)
    model.save_pretrained(str(tmp_path))
    assert os.path.exists(tmp_path / "diffusion_pytorch_model.safetensors")
    loaded = LatteT2V.from_pretrained(str(tmp_path))
    assert dict(loaded.config)["video_length"] == 10
    sd, sd2 = model.state_dict(), loaded.state_dict()
    assert list(sd) == list(sd2) and all(torch.equal(sd[k], sd2[k]) for k in sd)
    half = LatteT2V.from_pretrained(str(tmp_path), torch_dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in half.state_dict().values())


def test_strict_loading_names_the_bad_keys(tmp_path):
    model = tiny()
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "caption_projection.y_embedding"}
    with pytest.raises(ValueError, match=r"missing keys \(1\): caption_projection.y_embedding"):
        LatteT2V.from_pretrained(_write_upstream_dir(str(tmp_path / "a"), model, missing))
    extra = {**sd, "pos_embed.pos_embed": model.pos_embed.pos_embed}
    with pytest.raises(ValueError, match=r"unexpected keys \(1\): pos_embed.pos_embed"):
        LatteT2V.from_pretrained(_write_upstream_dir(str(tmp_path / "b"), model, extra))
    wrong = {**sd, "proj_out.bias": torch.zeros(33)}
    with pytest.raises(ValueError, match="proj_out.bias: \\(33,\\) in the checkpoint"):
        LatteT2V.from_pretrained(_write_upstream_dir(str(tmp_path / "c"), model, wrong))
    with pytest.raises(ValueError, match=r"unknown arguments or config fields \['not_a_field'\]"):
        LatteT2V.from_pretrained(str(tmp_path / "a"), not_a_field=1)


def test_config_errors():
    with pytest.raises(ValueError, match="cross_attention_dim"):
        LatteT2V(**{**TINY, "cross_attention_dim": 48})
    with pytest.raises(ValueError, match="norm_type"):
        LatteT2V(**{**TINY, "norm_type": "ada_norm_zero"})
    with pytest.raises(ValueError, match="sample_size"):
        LatteT2V(**{**TINY, "sample_size": 9})
    with pytest.raises(ValueError, match="compress_kv_factor"):
        LatteT2V.from_config({**TINY, "compress_kv_factor": 2})
    # Fields without effect here are accepted.
    assert LatteT2V.from_config({**TINY, **UPSTREAM_CONFIG_FIELDS}).config.video_length == 5


@pytest.mark.parametrize("bad, match", [
    (dict(x=torch.randn(2, 3, 5, 8, 8)), "hidden_states has shape"),
    (dict(x=torch.randn(2, 4, 5, 7, 8)), "multiples of patch_size"),
    (dict(x=torch.randn(2, 4, 4, 8, 8)), "video_length is 5"),
    (dict(t=torch.zeros(3)), "timestep has shape"),
    (dict(ehs=torch.randn(2, 7, 25)), "encoder_hidden_states has shape"),
    (dict(ehs=None), "encoder_hidden_states is required"),
    (dict(mask=torch.ones(2, 6)), "encoder_attention_mask has shape"),
    (dict(use_image_num=5), "at least one video frame"),
    (dict(use_image_num=1, x=torch.randn(2, 4, 6, 8, 8)), "encoder_hidden_states has shape"),
    (dict(attention_mask=torch.ones(2, 16)), "attention_mask must be None"),
], ids=["channels", "odd-H", "frames", "timestep", "caption-width", "no-caption", "mask", "images", "image-captions",
        "self-mask"])
def test_bad_arguments_raise_value_errors(bad, match):
    model = tiny()
    x, t, ehs, mask = inputs()
    kw = {**dict(x=x, t=t, ehs=ehs, mask=mask), **bad}
    extra = {k: kw.pop(k) for k in ("use_image_num", "attention_mask") if k in kw}
    with pytest.raises(ValueError, match=match):
        model(kw["x"], kw["t"], kw["ehs"], encoder_attention_mask=kw["mask"], **extra)


def test_return_dict_false_and_scalar_timestep():
    model = tiny()
    x, _, ehs, mask = inputs()
    with osp.ops.use_backend("torch"), torch.no_grad():
        (a,) = model(x, 500, ehs, encoder_attention_mask=mask, return_dict=False)
        b = model(x, torch.tensor([500, 500]), ehs, encoder_attention_mask=mask).sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


# --- the class-conditional and unconditional variants ------------------------------------------------

SMALL = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
             sample_size=8, video_length=5)


@pytest.mark.parametrize("norm_type", ["ada_norm_zero", "ada_norm_single"])
def test_latte_class(norm_type):
    torch.manual_seed(0)
    model = LatteClass(**SMALL, num_classes=10, norm_type=norm_type)
    x = torch.randn(2, 4, 5 + 1, 8, 8)
    labels = torch.tensor([3, 10])  # 10 = no label
    with osp.ops.use_backend("torch"):
        out = model(x, torch.tensor([1, 999]), labels, use_image_num=1).sample
        assert out.shape == (2, 8, 6, 8, 8)
        if norm_type == "ada_norm_zero":
            assert torch.count_nonzero(out) == 0  # adaLN-Zero: a new model predicts zeros
            with torch.no_grad():  # leave the identity start so the label matters
                for p in model.parameters():
                    p.add_(0.05 * torch.randn_like(p))
        model.eval()
        with torch.no_grad():
            y1 = model(x[:, :, :5], 5, torch.tensor([3, 4])).sample
            y2 = model(x[:, :, :5], 5, torch.tensor([3, 4]), force_drop_ids=torch.tensor([0, 1])).sample
        assert torch.equal(y1[0], y2[0]) and not torch.allclose(y1[1], y2[1])
        model.train()
        model(x[:, :, :5], torch.tensor([1, 2]), labels).sample.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(ValueError, match="class_labels"):
        model(x[:, :, :5], 5, None)


def test_latte_unconditional(tmp_path):
    torch.manual_seed(0)
    model = Latte(**SMALL)
    x = torch.randn(1, 4, 5, 8, 8)
    with osp.ops.use_backend("torch"), torch.no_grad():
        out = model(x, torch.tensor([7])).sample
    assert out.shape == (1, 8, 5, 8, 8) and torch.isfinite(out).all()
    model.save_pretrained(str(tmp_path))
    loaded = Latte.from_pretrained(str(tmp_path))
    with osp.ops.use_backend("torch"), torch.no_grad():
        torch.testing.assert_close(loaded(x, torch.tensor([7])).sample, out, rtol=0, atol=0)
    assert "num_classes" not in dict(loaded.config)
