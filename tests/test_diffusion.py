"""osp.diffusion against float64 formulas written here and the spec's reference numbers (spec A)."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from osp.diffusion import (
    GaussianDiffusion,
    LossType,
    ModelMeanType,
    ModelVarType,
    create_diffusion,
    create_diffusion_T,
    discretized_gaussian_log_likelihood,
    normal_kl,
    space_timesteps,
    unwrap_model_output,
)

C = 2  # latent channels of the toy shapes (LatteT2V has 4; the split works for any C)
SHAPE = (3, C, 3, 2, 3)  # (B, C, F, h, w): small, odd sizes


# ------------------------------------------------------------------------------------------------
# float64 references, written from the spec independently of osp


def ref_schedule(T=1000, kept=None):
    """Float64 arrays of the linear schedule, optionally respaced to the kept original indices."""
    beta = np.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T)
    abar = np.cumprod(1.0 - beta)
    if kept is not None:
        abar = abar[list(kept)]
        beta = 1.0 - abar / np.concatenate([[1.0], abar[:-1]])
    abar_prev = np.concatenate([[1.0], abar[:-1]])
    post_var = beta * (1.0 - abar_prev) / (1.0 - abar)
    return {
        "beta": beta,
        "abar": abar,
        "abar_prev": abar_prev,
        "post_var": post_var,
        "post_logvar": np.log(np.concatenate([[post_var[1]], post_var[1:]])),
        "c1": beta * np.sqrt(abar_prev) / (1.0 - abar),
        "c2": (1.0 - abar_prev) * np.sqrt(1.0 - beta) / (1.0 - abar),
    }


def coef(arr, t, ndim=5):
    """arr[t] as a float64 tensor shaped (B, 1, ..., 1)."""
    return torch.from_numpy(np.asarray(arr)[t.cpu().numpy()]).view(-1, *([1] * (ndim - 1)))


def ref_cdf(u):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * u**3)))


def ref_log_likelihood(x, mean, log_scale):
    c = x - mean
    inv = torch.exp(-log_scale)
    cdf_plus, cdf_min = ref_cdf(inv * (c + 1 / 255)), ref_cdf(inv * (c - 1 / 255))
    lo = torch.log(cdf_plus.clamp(min=1e-12))
    hi = torch.log((1 - cdf_min).clamp(min=1e-12))
    mid = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, lo, torch.where(x > 0.999, hi, mid))


def ref_kl(m1, lv1, m2, lv2):
    return 0.5 * (-1.0 + lv2 - lv1 + torch.exp(lv1 - lv2) + (m1 - m2) ** 2 * torch.exp(-lv2))


def ref_terms(s, x0, eps, out, t):
    """Float64 LEARNED_RANGE / EPSILON training terms of one model output out (B, 2C, ...)."""
    x0, eps, out = x0.double(), eps.double(), out.double()
    sa, so = coef(np.sqrt(s["abar"]), t), coef(np.sqrt(1 - s["abar"]), t)
    x_t = sa * x0 + so * eps
    eps_hat, v = out[:, :C], out[:, C:]
    c1, c2 = coef(s["c1"], t), coef(s["c2"], t)
    true_mean = c1 * x0 + c2 * x_t
    true_logvar = coef(s["post_logvar"], t)
    frac = (v + 1) / 2
    logvar = frac * coef(np.log(s["beta"]), t) + (1 - frac) * true_logvar
    x0_hat = x_t / sa - torch.sqrt(1 / coef(s["abar"], t) - 1) * eps_hat
    mean = c1 * x0_hat + c2 * x_t
    dims = list(range(1, x0.dim()))
    kl = ref_kl(true_mean, true_logvar, mean, logvar).mean(dims) / math.log(2)
    nll = -ref_log_likelihood(x0, mean, 0.5 * logvar).mean(dims) / math.log(2)
    mse = ((eps - eps_hat) ** 2).mean(dims)
    return {"x_t": x_t, "kl": kl, "nll": nll, "mse": mse, "mean": mean, "logvar": logvar, "x0_hat": x0_hat}


def const_model(out):
    """A denoiser that ignores its input and returns out."""
    return lambda x, t, **kw: out


class Recorder:
    """A denoiser that records (t, x, kwargs) and returns a smooth function of x (2C channels)."""

    def __init__(self, learn_sigma=True):
        self.ts, self.xs, self.kwargs = [], [], []
        self.learn_sigma = learn_sigma

    def __call__(self, x, t, **kw):
        self.ts.append(t.clone())
        self.xs.append(x.clone())
        self.kwargs.append(kw)
        eps = 0.3 * torch.tanh(x)
        return torch.cat([eps, torch.sin(x)], 1) if self.learn_sigma else eps


# ------------------------------------------------------------------------------------------------
# schedule and respacing


def test_schedule_reference_numbers():
    d = create_diffusion("")
    assert d.num_timesteps == 1000 and d.timestep_map == list(range(1000))
    for name in (
        "betas",
        "alphas_cumprod",
        "posterior_variance",
        "posterior_log_variance_clipped",
        "posterior_mean_coef1",
    ):
        assert getattr(d, name).dtype == np.float64 and getattr(d, name).shape == (1000,)
    assert d.alphas_cumprod[0] == pytest.approx(0.9999, rel=1e-12)
    assert d.alphas_cumprod[499] == pytest.approx(0.0785872429, rel=1e-9)
    assert d.alphas_cumprod[999] == pytest.approx(4.0358298e-5, rel=1e-7)
    assert d.posterior_variance[0] == 0.0
    assert d.posterior_variance[1] == pytest.approx(5.4531877e-5, rel=1e-7)
    assert d.posterior_log_variance_clipped[0] == d.posterior_log_variance_clipped[1]
    assert d.posterior_log_variance_clipped[0] == pytest.approx(-9.8167251353, abs=1e-9)
    # β is recomputed from ᾱ even when unspaced: equal to the linspace up to rounding, not copied.
    dev = np.abs(d.betas - np.linspace(1e-4, 0.02, 1000)).max()
    assert 0 < dev < 1e-15


def test_schedule_arrays_match_float64_formulas():
    d, s = create_diffusion(""), ref_schedule()
    np.testing.assert_allclose(d.betas, s["beta"], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod, s["abar"], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_prev, s["abar_prev"], rtol=1e-12)
    np.testing.assert_allclose(d.alphas_cumprod_next, np.append(s["abar"][1:], 0.0), rtol=1e-12)
    np.testing.assert_allclose(d.posterior_variance, s["post_var"], rtol=1e-10)
    np.testing.assert_allclose(d.posterior_log_variance_clipped, s["post_logvar"], rtol=1e-12)
    np.testing.assert_allclose(d.posterior_mean_coef1, s["c1"], rtol=1e-10)
    np.testing.assert_allclose(d.posterior_mean_coef2, s["c2"], rtol=1e-10)
    np.testing.assert_allclose(d.sqrt_recipm1_alphas_cumprod, np.sqrt(1 / s["abar"] - 1), rtol=1e-10)


def test_respaced_250_reference_numbers():
    d = create_diffusion("250")
    assert d.num_timesteps == 250 and d.original_num_steps == 1000
    assert d.betas[0] == pytest.approx(1.0e-4, rel=1e-9)
    assert d.betas[1] == pytest.approx(5.990656e-4, rel=1e-6)
    assert d.betas[249] == pytest.approx(0.0775193450, rel=1e-9)
    full = create_diffusion("")
    np.testing.assert_allclose(d.alphas_cumprod, full.alphas_cumprod[d.timestep_map], rtol=1e-12)
    # 249 gaps: 246 of 4 and 3 of 5 (4.012 accumulated), ending at 999
    gaps = np.diff(d.timestep_map)
    assert d.timestep_map[0] == 0 and d.timestep_map[-1] == 999
    assert sorted(set(gaps.tolist())) == [4, 5] and (gaps == 4).sum() == 246 and (gaps == 5).sum() == 3


@pytest.mark.parametrize(
    "respacing, steps, expected",
    [
        ("", 1000, list(range(1000))),
        (None, 1000, list(range(1000))),
        ("250", 1000, [round(k * 999 / 249) for k in range(250)]),  # no ties here, so k*stride agrees
        ("50", 1000, [round(k * 999 / 49) for k in range(50)]),
        (250, 1000, [round(k * 999 / 249) for k in range(250)]),
        ([50], 1000, [round(k * 999 / 49) for k in range(50)]),
        ("ddim50", 1000, list(range(0, 1000, 20))),
        ("ddim250", 1000, list(range(0, 1000, 4))),
        ("10,15,20", 300, None),
        ("ddim8", 64, list(range(0, 64, 8))),
    ],
    ids=["empty", "none", "250", "50", "int-250", "list-50", "ddim50", "ddim250", "sections", "ddim8-of-64"],
)
def test_respacing_timesteps(respacing, steps, expected):
    d = create_diffusion(respacing, diffusion_steps=steps)
    if expected is None:
        expected = sorted(space_timesteps(steps, respacing))
    assert d.timestep_map == expected
    assert d.num_timesteps == len(expected)


@pytest.mark.parametrize(
    "steps, counts, expected",
    [
        (10, "5", [0, 2, 4, 7, 9]),  # cur = 4.5 rounds to even
        (16, "15", [0, 1, 2, 3, 4, 5, 6, 7, 9, 10, 11, 12, 13, 14, 15]),  # accumulated 7.4999.. -> 7
        (10, "2,1,3", [0, 3, 4, 7, 8, 9]),  # uneven split: sections of 4, 3, 3
    ],
    ids=["ties-to-even", "accumulated", "uneven-sections"],
)
def test_space_timesteps_rounding(steps, counts, expected):
    assert sorted(space_timesteps(steps, counts)) == expected


def test_respacing_spec_lists():
    fifty = sorted(space_timesteps(1000, "50"))
    assert fifty[:4] == [0, 20, 41, 61] and fifty[-3:] == [958, 979, 999]
    two50 = sorted(space_timesteps(1000, "250"))
    assert two50[:3] == [0, 4, 8] and two50[-3:] == [991, 995, 999]
    # accumulation matters: 7 * (15/14) rounds to 8, the accumulated sum to 7
    assert round(7 * (15 / 14)) == 8 and 7 in space_timesteps(16, "15") and 8 not in space_timesteps(16, "15")


def test_respacing_sections():
    steps = sorted(space_timesteps(300, "10,15,20"))
    assert len(steps) == 45
    assert steps[:10] == list(range(0, 100, 11))
    sec2, sec3 = [s for s in steps if 100 <= s < 200], [s for s in steps if s >= 200]
    assert len(sec2) == 15 and sec2[0] == 100 and sec2[-1] == 199
    assert len(sec3) == 20 and sec3[0] == 200 and sec3[-1] == 299


# ------------------------------------------------------------------------------------------------
# forward process, posterior, p_mean_variance


@pytest.fixture
def seeded():
    torch.manual_seed(0)


def test_q_sample_matches_formula(seeded):
    d, s = create_diffusion(""), ref_schedule()
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 499, 999])
    out = d.q_sample(x0, t, noise=eps)
    ref = coef(np.sqrt(s["abar"]), t) * x0.double() + coef(np.sqrt(1 - s["abar"]), t) * eps.double()
    assert out.dtype == torch.float32 and out.shape == SHAPE
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    # without noise, ε = randn_like(x0) from the global RNG, as upstream
    torch.manual_seed(5)
    drawn = d.q_sample(x0, t)
    torch.manual_seed(5)
    torch.testing.assert_close(drawn, d.q_sample(x0, t, noise=torch.randn_like(x0)), rtol=0, atol=0)


@pytest.mark.parametrize("respacing", ["", "250"], ids=["full", "respaced-250"])
def test_q_posterior_matches_formula(seeded, respacing):
    d = create_diffusion(respacing)
    s = ref_schedule(kept=d.timestep_map)
    x0, x_t = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 1, d.num_timesteps - 1])
    mean, var, logvar = d.q_posterior_mean_variance(x0, x_t, t)
    ref_mean = coef(s["c1"], t) * x0.double() + coef(s["c2"], t) * x_t.double()
    torch.testing.assert_close(mean.double(), ref_mean, rtol=1e-6, atol=1e-6)
    assert var.shape == logvar.shape == SHAPE and var.dtype == logvar.dtype == torch.float32
    torch.testing.assert_close(var.double(), coef(s["post_var"], t).expand(SHAPE), rtol=1e-6, atol=0)
    torch.testing.assert_close(logvar.double(), coef(s["post_logvar"], t).expand(SHAPE), rtol=1e-6, atol=0)
    assert (logvar[0] == logvar.new_tensor(np.float32(s["post_logvar"][1]))).all()  # t = 0 borrows β̃1


@pytest.mark.parametrize("respacing", ["", "250"], ids=["full", "respaced-250"])
def test_p_mean_variance_learned_range(seeded, respacing):
    d = create_diffusion(respacing)
    s = ref_schedule(kept=d.timestep_map)
    x0, eps = torch.randn(SHAPE), torch.randn(SHAPE)
    out = torch.cat([torch.randn(SHAPE), 3 * torch.rand(SHAPE) - 1.5], 1)  # v beyond [-1, 1]: not clamped
    t = torch.tensor([0, 7, d.num_timesteps - 1])
    r = ref_terms(s, x0, eps, out, t)
    got = d.p_mean_variance(const_model(out), r["x_t"].float(), t)
    assert set(got) == {"mean", "variance", "log_variance", "pred_xstart"}
    torch.testing.assert_close(got["log_variance"].double(), r["logvar"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got["variance"].double(), torch.exp(r["logvar"]), rtol=1e-5, atol=0)
    torch.testing.assert_close(got["pred_xstart"].double(), r["x0_hat"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["mean"].double(), r["mean"], rtol=1e-4, atol=1e-4)
    clipped = d.p_mean_variance(const_model(out), r["x_t"].float(), t, clip_denoised=True)["pred_xstart"]
    assert clipped.abs().max() <= 1 and not torch.equal(clipped, got["pred_xstart"])


def test_bf16_variance_fraction_rounds_in_bf16(seeded):
    d, s = create_diffusion(""), ref_schedule()
    out = torch.randn(SHAPE[0], 2 * C, *SHAPE[2:]).bfloat16()
    x = torch.randn(SHAPE)
    t = torch.tensor([3, 400, 999])
    got = d.p_mean_variance(const_model(out), x, t)["log_variance"]
    assert got.dtype == torch.float32
    frac = (out[:, C:] + 1) / 2  # rounded to bf16 before meeting the float32 logs (spec G2), and so is 1 - frac
    lb, lbt = coef(np.log(s["beta"]), t).float().double(), coef(s["post_logvar"], t).float().double()
    torch.testing.assert_close(got.double(), frac.double() * lb + (1 - frac).double() * lbt, rtol=1e-6, atol=1e-6)
    exact = ((out[:, C:].double() + 1) / 2) * lb + (1 - (out[:, C:].double() + 1) / 2) * lbt
    assert not torch.allclose(got.double(), exact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sigma_small", [False, True], ids=["fixed-large", "fixed-small"])
def test_fixed_variances(seeded, sigma_small):
    d, s = create_diffusion("", learn_sigma=False, sigma_small=sigma_small), ref_schedule()
    assert d.model_var_type == (ModelVarType.FIXED_SMALL if sigma_small else ModelVarType.FIXED_LARGE)
    x, out = torch.randn(SHAPE), torch.randn(SHAPE)
    t = torch.tensor([0, 1, 999])
    got = d.p_mean_variance(const_model(out), x, t)
    if sigma_small:
        var, logvar = s["post_var"], s["post_logvar"]
    else:
        var = np.concatenate([[s["post_var"][1]], s["beta"][1:]])
        logvar = np.log(var)
    torch.testing.assert_close(got["variance"].double(), coef(var, t).expand(SHAPE), rtol=1e-6, atol=0)
    torch.testing.assert_close(got["log_variance"].double(), coef(logvar, t).expand(SHAPE), rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------------------
# likelihood pieces


def test_normal_kl_matches_formula(seeded):
    m1, lv1, m2, lv2 = (torch.randn(4, 5, dtype=torch.float64) for _ in range(4))
    torch.testing.assert_close(normal_kl(m1, lv1, m2, lv2), ref_kl(m1, lv1, m2, lv2), rtol=1e-12, atol=1e-12)
    assert normal_kl(m1, lv1, m1, lv1).abs().max() < 1e-12


def test_decoder_log_likelihood_tails_and_floor():
    x = torch.tensor([-1.0, -0.9995, -0.999, -0.3, 0.0, 0.999, 0.9995, 1.0, 0.5], dtype=torch.float64)
    mean = torch.tensor([-0.99, -1.0, -0.995, -0.31, 0.01, 0.998, 1.0, 0.98, -0.5], dtype=torch.float64)
    log_scale = torch.full_like(x, math.log(0.01))
    got = discretized_gaussian_log_likelihood(x, means=mean, log_scales=log_scale)
    torch.testing.assert_close(got, ref_log_likelihood(x, mean, log_scale), rtol=1e-12, atol=1e-12)
    inv = 100.0
    # x < -0.999: the bin extends to -inf (log CDF of the upper edge)
    assert got[0].item() == pytest.approx(math.log(ref_cdf(inv * (x[0] - mean[0] + 1 / 255)).item()), rel=1e-12)
    # x > 0.999: the bin extends to +inf
    assert got[7].item() == pytest.approx(math.log(1 - ref_cdf(inv * (x[7] - mean[7] - 1 / 255)).item()), rel=1e-12)
    # exactly ±0.999 is an interior bin
    lo, hi = ref_cdf(inv * (x[2] - mean[2] + 1 / 255)), ref_cdf(inv * (x[2] - mean[2] - 1 / 255))
    assert got[2].item() == pytest.approx(math.log(lo - hi), rel=1e-12)
    # 100 standard deviations off: the probability is floored at 1e-12
    assert got[8].item() == pytest.approx(math.log(1e-12), rel=1e-12)


# ------------------------------------------------------------------------------------------------
# training losses


def _loss_inputs():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, C, 3, 2, 3, generator=g)
    x0[0, 0, 0] = torch.tensor([-1.2, 1.3, -0.9995])  # latents past ±0.999 hit the tails at t = 0
    eps = torch.randn(x0.shape, generator=g)
    out = torch.cat([torch.randn(x0.shape, generator=g), torch.rand(x0.shape, generator=g) * 2 - 1], 1)
    return x0, eps, out


@pytest.mark.parametrize("respacing", ["", "250"], ids=["full", "respaced-250"])
def test_training_losses_match_float64(respacing):
    d = create_diffusion(respacing)
    s = ref_schedule(kept=d.timestep_map)
    x0, eps, out = _loss_inputs()
    t = torch.tensor([0, 0, 1, d.num_timesteps - 1])
    terms = d.training_losses(const_model(out), x0, t, noise=eps)
    assert set(terms) == {"loss", "mse", "vb"}
    assert all(v.shape == (4,) and v.dtype == torch.float32 for v in terms.values())
    r = ref_terms(s, x0, eps, out, t)
    ref_vb = torch.where(t == 0, r["nll"], r["kl"])
    torch.testing.assert_close(terms["mse"].double(), r["mse"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["vb"].double(), ref_vb, rtol=2e-4, atol=1e-5)
    torch.testing.assert_close(terms["loss"], terms["mse"] + terms["vb"], rtol=0, atol=0)
    # t == 0 selects the decoder NLL; the two terms differ, so the selection is visible
    assert not torch.allclose(r["nll"][:2], r["kl"][:2], rtol=0.1)
    assert not torch.allclose(r["nll"][2:], r["kl"][2:], rtol=0.1)


def test_vb_gradients_reach_only_the_variance_channels():
    d, s = create_diffusion(""), ref_schedule()
    x0, eps, out = _loss_inputs()
    t = torch.tensor([0, 3, 500, 999])
    out = out.requires_grad_()
    d.training_losses(const_model(out), x0, t, noise=eps)["vb"].sum().backward()
    assert (out.grad[:, :C] == 0).all() and (out.grad[:, C:] != 0).any()
    # the v-gradient matches float64 autograd through the reference with ε̂ frozen
    out64 = out.detach().double().requires_grad_()
    frozen = torch.cat([out64[:, :C].detach(), out64[:, C:]], 1)
    r = ref_terms(s, x0, eps, frozen, t)
    torch.where(t == 0, r["nll"], r["kl"]).sum().backward()
    torch.testing.assert_close(out.grad.double(), out64.grad, rtol=1e-3, atol=1e-4)

    out.grad = None
    d.training_losses(const_model(out), x0, t, noise=eps)["mse"].sum().backward()
    assert (out.grad[:, C:] == 0).all() and (out.grad[:, :C] != 0).all()
    torch.testing.assert_close(
        out.grad[:, :C], 2 * (out[:, :C] - eps).detach() / (out[0, :C].numel()), rtol=1e-5, atol=1e-7
    )


def test_training_losses_joint_image_video():
    d = create_diffusion("")
    frames, use_image_num = 3, 2
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(2, C, frames + use_image_num, 2, 2, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    text = torch.randn(2, 1 + use_image_num, 5, 8, generator=g)
    seen = {}

    def model(x, t, encoder_hidden_states=None, use_image_num=0):
        seen.update(x=x.shape, text=encoder_hidden_states, use_image_num=use_image_num)
        return torch.zeros(x.shape[0], 2 * C, *x.shape[2:])

    terms = d.training_losses(
        model,
        x0,
        torch.tensor([10, 900]),
        model_kwargs={"encoder_hidden_states": text, "use_image_num": use_image_num},
        noise=eps,
    )
    assert seen["use_image_num"] == use_image_num and seen["text"] is text and seen["x"] == x0.shape
    torch.testing.assert_close(terms["mse"], (eps**2).mean((1, 2, 3, 4)))  # every frame, image frames included
    assert not torch.allclose(terms["mse"], (eps[:, :, :frames] ** 2).mean((1, 2, 3, 4)))


def test_training_losses_other_settings(seeded):
    x0, eps, out = _loss_inputs()
    t = torch.tensor([0, 2, 5, 9])
    base = create_diffusion("10", diffusion_steps=100)
    plain = base.training_losses(const_model(out), x0, t, noise=eps)
    rescaled = create_diffusion("10", diffusion_steps=100, rescale_learned_sigmas=True).training_losses(
        const_model(out), x0, t, noise=eps
    )
    assert rescaled.keys() == plain.keys()
    torch.testing.assert_close(rescaled["vb"], plain["vb"] * 10 / 1000)
    kl = create_diffusion("10", diffusion_steps=100, use_kl=True)
    assert kl.loss_type == LossType.RESCALED_KL
    torch.testing.assert_close(kl.training_losses(const_model(out), x0, t, noise=eps)["loss"], plain["vb"] * 10)

    fixed = create_diffusion("", learn_sigma=False)
    eps_hat = out[:, :C]
    terms = fixed.training_losses(const_model(eps_hat), x0, t, noise=eps)
    assert set(terms) == {"loss", "mse"}
    torch.testing.assert_close(terms["loss"], ((eps - eps_hat) ** 2).mean((1, 2, 3, 4)))
    xstart = create_diffusion("", learn_sigma=False, predict_xstart=True)
    assert xstart.model_mean_type == ModelMeanType.START_X
    torch.testing.assert_close(
        xstart.training_losses(const_model(eps_hat), x0, t, noise=eps)["mse"], ((x0 - eps_hat) ** 2).mean((1, 2, 3, 4))
    )
    assert torch.equal(xstart.p_mean_variance(const_model(eps_hat), x0, t)["pred_xstart"], eps_hat)


# ------------------------------------------------------------------------------------------------
# the model call


@pytest.mark.parametrize(
    "wrap",
    [lambda o: o, lambda o: SimpleNamespace(sample=o), lambda o: (o,), lambda o: (o, "extra"), lambda o: [o]],
    ids=["tensor", "sample-attr", "tuple", "tuple-extra", "list"],
)
def test_model_output_unwrapping(wrap):
    d = create_diffusion("")
    x0, eps, out = _loss_inputs()  # batch 4: indexing a tensor with [0] would take sample 0
    t = torch.tensor([0, 3, 500, 999])
    ref = d.training_losses(const_model(out), x0, t, noise=eps)
    got = d.training_losses(lambda x, t, **kw: wrap(out), x0, t, noise=eps)
    for k in ref:
        assert torch.equal(got[k], ref[k])
    pmv = d.p_mean_variance(lambda x, t, **kw: wrap(out), x0, t)
    assert torch.equal(pmv["mean"], d.p_mean_variance(const_model(out), x0, t)["mean"])
    assert unwrap_model_output(wrap(out)) is out


def test_unwrap_rejects_other_types():
    with pytest.raises(TypeError, match="dict"):
        unwrap_model_output({"x": torch.zeros(1)})


def test_respacing_shows_the_model_original_timesteps(device):
    d = create_diffusion("250")
    rec = Recorder()
    x = torch.randn(SHAPE, device=device)
    t = torch.tensor([0, 1, 249], device=device)
    d.p_mean_variance(rec, x, t)
    d.training_losses(rec, x, t)
    for seen in rec.ts:
        assert seen.dtype == torch.int64 and seen.device == x.device
        assert seen.tolist() == [0, 4, 999]

    rec = Recorder()
    ddim = create_diffusion("ddim10", diffusion_steps=100)
    ddim.ddim_sample_loop(rec, (2, C, 1, 2, 2), device=device)
    assert [s.tolist() for s in rec.ts] == [[i, i] for i in range(90, -1, -10)]
    unspaced = create_diffusion("", diffusion_steps=40)
    rec = Recorder()
    unspaced.p_sample_loop(rec, (1, C, 1, 1, 1), device=device)
    assert [s.tolist() for s in rec.ts] == [[i] for i in range(39, -1, -1)]


# ------------------------------------------------------------------------------------------------
# samplers


def test_p_sample_step_matches_formula():
    d = create_diffusion("250")
    s = ref_schedule(kept=d.timestep_map)
    g = torch.Generator().manual_seed(3)
    x0, eps, out = _loss_inputs()
    t = torch.tensor([0, 1, 100, 249])
    r = ref_terms(s, x0, eps, out, t)
    got = d.p_sample(const_model(out), r["x_t"].float(), t, generator=g)
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(3)).double()
    mask = (t != 0).double().view(-1, 1, 1, 1, 1)
    torch.testing.assert_close(
        got["sample"].double(), r["mean"] + mask * torch.exp(0.5 * r["logvar"]) * z, rtol=1e-4, atol=1e-4
    )
    assert torch.equal(got["sample"][0], d.p_mean_variance(const_model(out), r["x_t"].float(), t)["mean"][0])


@pytest.mark.parametrize("eta", [0.0, 0.7], ids=["eta0", "eta0.7"])
def test_ddim_step_matches_formula(eta):
    d = create_diffusion("ddim50")
    s = ref_schedule(kept=d.timestep_map)
    x0, eps, out = _loss_inputs()
    t = torch.tensor([0, 1, 20, 49])
    r = ref_terms(s, x0, eps, out, t)
    got = d.ddim_sample(const_model(out), r["x_t"].float(), t, eta=eta, generator=torch.Generator().manual_seed(4))
    z = torch.randn(x0.shape, generator=torch.Generator().manual_seed(4)).double()
    ab, abp = coef(s["abar"], t), coef(s["abar_prev"], t)
    eps_t = (r["x_t"] / torch.sqrt(ab) - r["x0_hat"]) / torch.sqrt(1 / ab - 1)
    sigma = eta * torch.sqrt((1 - abp) / (1 - ab)) * torch.sqrt(1 - ab / abp)
    mask = (t != 0).double().view(-1, 1, 1, 1, 1)
    ref = r["x0_hat"] * torch.sqrt(abp) + torch.sqrt(1 - abp - sigma**2) * eps_t + mask * sigma * z
    torch.testing.assert_close(got["sample"].double(), ref, rtol=1e-4, atol=1e-4)


LOOP_SHAPE = (2, C, 2, 2, 3)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_loops_reproducible_under_a_generator(loop, device):
    d = create_diffusion("ddim8", diffusion_steps=64)
    kw = {"eta": 0.5} if loop == "ddim_sample_loop" else {}

    def run(seed):
        return getattr(d, loop)(
            Recorder(), LOOP_SHAPE, generator=torch.Generator(device).manual_seed(seed), device=device, **kw
        )

    a, b, c = run(0), run(0), run(1)
    assert a.shape == LOOP_SHAPE and a.device.type == torch.device(device).type and torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # the initial noise comes from the generator
    rec = Recorder()
    getattr(d, loop)(rec, LOOP_SHAPE, generator=torch.Generator(device).manual_seed(0), device=device, **kw)
    assert torch.equal(
        rec.xs[0], torch.randn(LOOP_SHAPE, generator=torch.Generator(device).manual_seed(0), device=device)
    )
    # without a generator the global RNG is used, as upstream
    torch.manual_seed(9)
    g1 = getattr(d, loop)(Recorder(), LOOP_SHAPE, device=device, **kw)
    torch.manual_seed(9)
    g2 = getattr(d, loop)(Recorder(), LOOP_SHAPE, device=device, **kw)
    assert torch.equal(g1, g2)


@pytest.mark.parametrize("loop", ["p_sample_loop", "ddim_sample_loop"])
def test_loops_respect_given_noise_and_kwargs(loop):
    d = create_diffusion("ddim8", diffusion_steps=64)
    noise = torch.randn(LOOP_SHAPE, generator=torch.Generator().manual_seed(7))
    rec = Recorder()
    getattr(d, loop)(
        rec, LOOP_SHAPE, noise=noise, model_kwargs={"use_image_num": 1}, generator=torch.Generator().manual_seed(0)
    )
    assert torch.equal(rec.xs[0], noise)
    assert len(rec.xs) == 8 and all(k == {"use_image_num": 1} for k in rec.kwargs)


def test_ddim_eta0_is_deterministic():
    d = create_diffusion("ddim8", diffusion_steps=64)
    noise = torch.randn(LOOP_SHAPE, generator=torch.Generator().manual_seed(8))
    torch.manual_seed(0)
    a = d.ddim_sample_loop(Recorder(), LOOP_SHAPE, noise=noise)
    torch.manual_seed(1)
    b = d.ddim_sample_loop(Recorder(), LOOP_SHAPE, noise=noise, progress=True)
    assert torch.equal(a, b)
    c = d.ddim_sample_loop(Recorder(), LOOP_SHAPE, noise=noise, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, c)


def test_loop_output_has_no_grad():
    d = create_diffusion("ddim4", diffusion_steps=32)
    w = torch.ones((), requires_grad=True)
    out = d.p_sample_loop(lambda x, t, **kw: w * torch.cat([x, x], 1), LOOP_SHAPE)
    assert not out.requires_grad


# ------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"noise_schedule": "cosine"}, "cosine"),
        ({"timestep_respacing": "ddim999"}, "ddim999"),
        ({"timestep_respacing": "ddim1"}, "ddim1"),
        ({"timestep_respacing": "ddimx"}, "ddimx"),
        ({"timestep_respacing": "fast"}, "fast"),
        ({"timestep_respacing": "2000"}, "2000"),
        ({"timestep_respacing": "10,600"}, "600"),
        ({"timestep_respacing": "0"}, "no timestep"),
        ({"timestep_respacing": "-3"}, "non-negative"),
        ({"diffusion_steps": 0}, "diffusion_steps"),
        ({"diffusion_steps": 10}, ">= 20"),
    ],
    ids=[
        "schedule",
        "ddim999",
        "ddim1",
        "ddim-nonint",
        "respacing-word",
        "count>steps",
        "section>size",
        "zero-steps",
        "negative",
        "zero-diffusion-steps",
        "linear-too-few-steps",
    ],
)
def test_bad_factory_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        create_diffusion(**kwargs)


def test_bad_betas():
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        GaussianDiffusion(
            betas=[0.0, 0.1],
            model_mean_type=ModelMeanType.EPSILON,
            model_var_type=ModelVarType.FIXED_SMALL,
            loss_type=LossType.MSE,
        )


@pytest.mark.parametrize(
    "t, match",
    [
        (torch.tensor([0, 1, 1000]), r"\[0, 999\]"),
        (torch.tensor([-1, 1, 2]), r"\[0, 999\]"),
        (torch.tensor([0, 1]), r"shape \(3,\)"),
        (torch.tensor([0.0, 1.0, 2.0]), "integer"),
        (5, "integer"),
    ],
    ids=["t-too-large", "t-negative", "t-wrong-batch", "t-float", "t-int"],
)
def test_bad_timesteps(seeded, t, match):
    d = create_diffusion("")
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match=match):
        d.q_sample(x, t)
    with pytest.raises(ValueError, match=match):
        d.training_losses(Recorder(), x, t)


def test_bad_model_output_and_noise(seeded):
    d = create_diffusion("")
    x, t = torch.randn(SHAPE), torch.tensor([1, 2, 3])
    with pytest.raises(ValueError, match=r"expected \(3, 4, 3, 2, 3\)"):
        d.training_losses(const_model(torch.randn(SHAPE)), x, t)  # C channels, learn_sigma wants 2C
    with pytest.raises(ValueError, match="learn_sigma=False"):
        create_diffusion("", learn_sigma=False).p_mean_variance(Recorder(), x, t)
    with pytest.raises(ValueError, match="noise of shape"):
        d.q_sample(x, t, noise=torch.randn(1, 2))
    with pytest.raises(ValueError, match="noise of shape"):
        d.p_sample_loop(Recorder(), LOOP_SHAPE, noise=torch.randn(SHAPE))


def test_create_diffusion_t_is_the_same_factory():
    assert create_diffusion_T is create_diffusion
    d = create_diffusion_T("")
    assert d.model_var_type == ModelVarType.LEARNED_RANGE and d.model_mean_type == ModelMeanType.EPSILON
    assert d.loss_type == LossType.MSE
