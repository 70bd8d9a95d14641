"""Helpers shared by the VAE test modules: a tiny release-layout VAE, clips, relative errors, and the
fixture that makes fp32 mean fp32 (import ``exact_backend`` into a test module to apply it there)."""
import pytest
import torch

import osp
from osp.models import CausalVideoVAE
from parity import DEVICE
from spec_data import VAE_RELEASE_CONFIG as RELEASE_CONFIG


def tiny_config(**overrides):
    """Upstream's release layout (4 levels: 8x spatial, 4x temporal, upstream attention) at 32/32/64/64
    channels and one res block per encoder level."""
    cfg = dict(RELEASE_CONFIG, hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1)
    cfg.update(overrides)
    return cfg


def randomize_norms(model, scale=0.2):
    """Move every GroupNorm's affine away from (1, 0), so that a wrong mapping of norms shows."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.GroupNorm):
                m.weight.add_(torch.randn_like(m.weight) * scale)
                m.bias.add_(torch.randn_like(m.bias) * scale)
    return model


def tiny_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return randomize_norms(CausalVideoVAE.from_config(tiny_config(**overrides))).to(DEVICE).eval()


def clip(*shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) * 2 - 1).to(DEVICE)


def rel_err(out, ref):
    out, ref = out.double(), ref.double().to(out.device)
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_close_rel(out, ref, rel, name="out"):
    assert out.shape == ref.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = rel_err(out, ref)
    assert err <= rel, f"{name}: ||out-ref||/||ref|| = {err:.3e} > {rel:.1e}"


@pytest.fixture(autouse=True)
def exact_backend(monkeypatch):
    """fp32 means fp32 (no TF32 convs or matmuls on a GPU); on CPU every op runs its torch backend
    (the Triton interpreter is only used where a test asks for it)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        if DEVICE == "cpu":
            with osp.ops.use_backend("torch"):
                yield
        else:
            yield
    finally:
        torch.set_float32_matmul_precision(precision)
