"""osp train-vae (osp.train.vae, osp.train.vae_loss, osp.train.vae_data): upstream's loss terms (spec
E.2) against float64 hand computations, the adaptive weight against explicit autograd, disc_start's
switching in Lightning's doubled steps and osp's batches, the hinge loss, the PatchGAN; then short CPU
runs of a tiny CausalVideoVAE on 5x32x32 clips: what trains and what must not, exact resume, the
non-finite guard, the scaling factor written into the config, a start from a tiny diffusers
AutoencoderKL through the CLI on real mp4 files, and the CLI's one-line mistakes.
"""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

import osp
from osp.cli import main as osp_main
from osp.models import CausalVideoVAE
from osp.models.vae.distribution import DiagonalGaussianDistribution
from osp.train import vae as vt
from osp.train.rng import derive_seed
from osp.train.vae_data import ClipDataset, VideoFolderDataset, center_crop_offsets, crop_transform
from osp.train.vae_loss import (
    LPIPSWithDiscriminator,
    NLayerDiscriminator,
    adaptive_weight,
    disc_start_from_batches,
    frames,
    hinge_d_loss,
    lightning_step,
)
from spec_data import VAE_RELEASE_CONFIG

pytest.importorskip("accelerate")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def torch_backend():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with osp.ops.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


class MeanSquare(torch.nn.Module):
    """A stand-in perceptual distance (x, y) -> (N, 1, 1, 1): the per-frame mean squared difference."""

    def forward(self, x, y):
        return (x - y).pow(2).mean(dim=(1, 2, 3), keepdim=True)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return CausalVideoVAE.from_config(dict(VAE_RELEASE_CONFIG, hidden_size=32, hidden_size_mult=[1, 1, 2, 2],
                                           num_res_blocks=1))


def clips(n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 5, 32, 32, generator=g) * 2 - 1


# --- the loss -------------------------------------------------------------------------------------------------


def test_frames_are_b_t_major():
    x = torch.arange(2 * 3 * 4 * 2 * 2, dtype=torch.float64).view(2, 3, 4, 2, 2)
    f = frames(x)
    assert f.shape == (8, 3, 2, 2)
    assert torch.equal(f[1 * 4 + 2], x[1, :, 2])  # frame (b=1, t=2)
    with pytest.raises(ValueError, match=r"expected a clip \(b, c, t, h, w\)"):
        frames(torch.zeros(2, 3))


def test_hinge_known_values():
    real = torch.tensor([2.0, 0.5, -1.0], dtype=torch.float64)
    fake = torch.tensor([-2.0, 0.0, 1.5], dtype=torch.float64)
    # relu(1 - real) = 0, 0.5, 2 (mean 5/6); relu(1 + fake) = 0, 1, 2.5 (mean 7/6); half their sum = 1
    assert hinge_d_loss(real, fake).item() == pytest.approx(1.0, abs=1e-15)
    assert hinge_d_loss(torch.full((4,), 1.0), torch.full((4,), -1.0)).item() == 0.0


def test_patchgan_layout_and_init():
    torch.manual_seed(0)
    d = NLayerDiscriminator(3, n_layers=3)
    m = d.main
    convs = [(i, l) for i, l in enumerate(m) if isinstance(l, torch.nn.Conv2d)]
    assert [i for i, _ in convs] == [0, 2, 5, 8, 11]  # upstream's loss.discriminator.main.<i> keys
    assert [(l.in_channels, l.out_channels, l.stride[0], l.bias is not None) for _, l in convs] == [
        (3, 64, 2, True), (64, 128, 2, False), (128, 256, 2, False), (256, 512, 1, False), (512, 1, 1, True)]
    assert all(l.kernel_size == (4, 4) and l.padding == (1, 1) for _, l in convs)
    assert [i for i, l in enumerate(m) if isinstance(l, torch.nn.BatchNorm2d)] == [3, 6, 9]
    assert all(l.negative_slope == 0.2 for l in m if isinstance(l, torch.nn.LeakyReLU))
    w = torch.cat([l.weight.flatten() for _, l in convs])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    bn_w = torch.cat([l.weight for l in m if isinstance(l, torch.nn.BatchNorm2d)])
    assert abs(bn_w.mean().item() - 1.0) < 5e-3 and abs(bn_w.std().item() - 0.02) < 5e-3
    assert all(torch.all(l.bias == 0) for l in m if isinstance(l, torch.nn.BatchNorm2d))
    assert d(torch.zeros(2, 3, 32, 32)).shape == (2, 1, 2, 2)


def loss_case(logvar=0.3, pw=0.7):
    """A float64 loss with a stand-in perceptual term, clips (2, 3, 2, 32, 32), a posterior, and a
    reconstruction that depends on a 'last layer' W."""
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(disc_start=2001, logvar_init=logvar, kl_weight=1e-3, perceptual_weight=pw,
                                  perceptual=MeanSquare()).double().eval()  # BN on running stats: deterministic
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 2, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    W = torch.nn.Parameter(torch.randn(3, 3, generator=g, dtype=torch.float64) * 0.5 + torch.eye(3, dtype=torch.float64))
    h = torch.rand(2, 3, 2, 32, 32, generator=g, dtype=torch.float64) * 2 - 1
    recon = torch.einsum("oc,bcthw->bothw", W, h)
    moments = torch.randn(2, 8, 1, 4, 4, generator=g, dtype=torch.float64)
    return loss, x, recon, W, DiagonalGaussianDistribution(moments), moments


def test_generator_terms_against_the_spec_in_float64():
    loss, x, recon, W, post, moments = loss_case()
    total, log = loss.generator_loss(x, recon, post, global_step=2002, last_layer=W)
    b, t = 2, 2
    xf = x.permute(0, 2, 1, 3, 4).reshape(b * t, 3, 32, 32)
    rf = recon.permute(0, 2, 1, 3, 4).reshape(b * t, 3, 32, 32)
    p = ((xf - rf) ** 2).mean(dim=(1, 2, 3)).view(-1, 1, 1, 1)
    rec = (xf - rf).abs() + 0.7 * p
    lv = float(torch.tensor(0.3, dtype=torch.float32))  # logvar is a float32 Parameter (upstream's too)
    nll_loss = (rec / torch.exp(torch.tensor(lv, dtype=torch.float64)) + lv).sum() / (b * t)
    mu, logv = moments[:, :4], moments[:, 4:].clamp(-30, 20)
    kl = 0.5 * (mu ** 2 + logv.exp() - 1 - logv).sum() / b  # summed over every latent element, / b
    g_loss = -loss.discriminator(rf).mean()
    assert log["nll_loss"].item() == pytest.approx(nll_loss.item(), rel=1e-12)
    assert log["kl_loss"].item() == pytest.approx(kl.item(), rel=1e-12)
    assert log["rec_loss"].item() == pytest.approx(rec.mean().item(), rel=1e-12)
    assert log["g_loss"].item() == pytest.approx(g_loss.item(), rel=1e-12)
    assert log["logvar"].item() == lv
    # the adaptive weight from explicit gradients of the two terms w.r.t. W
    gn = torch.autograd.grad(nll_loss, W, retain_graph=True)[0]
    gg = torch.autograd.grad(g_loss, W, retain_graph=True)[0]
    lam = (gn.norm() / (gg.norm() + 1e-4)).clamp(0, 1e4) * 0.5
    assert log["d_weight"].item() == pytest.approx(lam.item(), rel=1e-10)
    assert total.item() == pytest.approx((nll_loss + 1e-3 * kl + lam * g_loss).item(), rel=1e-12)
    # lambda is detached: the total's gradient w.r.t. W is that of nll + kl + lam * g with lam constant
    gt = torch.autograd.grad(total, W, retain_graph=True)[0]
    torch.testing.assert_close(gt, gn + lam.detach() * gg, rtol=1e-10, atol=1e-12)


def test_fused_generator_loss_has_upstreams_value_and_gradients():
    loss, x, recon, W, _, moments = loss_case()
    moments = moments.clone().requires_grad_(True)
    post = DiagonalGaussianDistribution(moments)
    for step in (2000, 2002):  # adversarial term off, then on
        total, log = loss.generator_loss(x, recon, post, step, last_layer=W)
        ref = torch.autograd.grad(total, (W, moments), retain_graph=True)
        value, flog, surrogate = loss.generator_loss_fused(x, recon, post, step, W)
        assert value.item() == pytest.approx(total.item(), rel=1e-12)
        assert {k: v.item() for k, v in flog.items()} == pytest.approx({k: v.item() for k, v in log.items()}, rel=1e-10)
        got = torch.autograd.grad(surrogate, (W, moments), retain_graph=True)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_adaptive_weight_clamps_and_scales():
    W = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    nll = (W * 3.0).sum()  # gradient norm 3 * sqrt(3)
    g = (W * 0.0).sum()  # zero gradient: ratio 3 sqrt(3) / 1e-4 > 1e4, clamped
    assert adaptive_weight(nll, g, W, 0.5).item() == pytest.approx(0.5e4)
    g2 = (W * 2.0).sum()
    assert adaptive_weight(nll, g2, W, 0.5).item() == pytest.approx(0.5 * 3 * 3 ** 0.5 / (2 * 3 ** 0.5 + 1e-4))


def test_no_adaptive_weight_without_gradients():
    loss, x, recon, W, post, _ = loss_case()
    with torch.no_grad():
        total, log = loss.generator_loss(x, recon, post, global_step=5000, last_layer=W)
    assert log["d_weight"].item() == 0.0 and total.item() == pytest.approx(log["nll_loss"].item() + 1e-3 * log["kl_loss"].item())


def test_disc_start_switches_as_upstream():
    """disc_start 2001 in Lightning units (two per batch): the generator's term from batch 1001, the
    discriminator from batch 1000; osp's --disc_start 1001 (batches) is the same threshold."""
    assert disc_start_from_batches(1001) == 2001
    assert [lightning_step(k, False) for k in (0, 1000, 1001)] == [0, 2000, 2002]
    assert [lightning_step(k, True) for k in (999, 1000)] == [1999, 2001]
    loss, x, recon, W, post, _ = loss_case()
    gen = {k: loss.generator_loss(x, recon, post, lightning_step(k, False), last_layer=W) for k in (1000, 1001)}
    assert gen[1000][1]["disc_factor"].item() == 0.0 and gen[1001][1]["disc_factor"].item() == 1.0
    # while off, lambda is still computed (and logged), the loss has no adversarial term
    assert gen[1000][1]["d_weight"].item() > 0
    base = gen[1000][1]["nll_loss"] + 1e-3 * gen[1000][1]["kl_loss"]
    assert gen[1000][0].item() == pytest.approx(base.item(), rel=1e-12)
    assert gen[1001][0].item() == pytest.approx((base + gen[1001][1]["d_weight"] * gen[1001][1]["g_loss"]).item(),
                                                rel=1e-12)
    d = {k: loss.discriminator_loss(x, recon, lightning_step(k, True)) for k in (999, 1000)}
    assert d[999][0].item() == 0.0
    real = loss.discriminator(frames(x))
    fake = loss.discriminator(frames(recon))
    assert d[1000][0].item() == pytest.approx(hinge_d_loss(real, fake).item(), rel=1e-12)
    assert d[1000][0].item() > 0


def test_loss_settings_follow_flags_then_config_then_release():
    cfg = vt.VAETrainConfig()
    assert vt.loss_settings(cfg, {}) == {"disc_start": 2001, "kl_weight": 1e-6, "disc_weight": 0.5,
                                         "logvar_init": 0.0, "lr": 1e-5}
    raw = {"loss_params": {"disc_start": 11, "kl_weight": 1e-4}, "lr": 3e-4}
    assert vt.loss_settings(cfg, raw)["disc_start"] == 11 and vt.loss_settings(cfg, raw)["lr"] == 3e-4
    cfg = vt.VAETrainConfig(disc_start=5, kl_weight=0.0, lr=1e-3)
    s = vt.loss_settings(cfg, raw)
    assert (s["disc_start"], s["kl_weight"], s["lr"]) == (9, 0.0, 1e-3)


def test_time_parameters_get_their_own_learning_rate():
    vae = tiny_vae()
    groups = vt.autoencoder_param_groups(vae, 1e-5, 1e-4)
    names = {id(p): n for n, p in vae.named_parameters()}
    assert [g["lr"] for g in groups] == [1e-5, 1e-4]
    assert all("time" in names[id(p)] for p in groups[1]["params"])
    assert len(groups[0]["params"]) + len(groups[1]["params"]) == len(list(vae.parameters()))


# --- one step ------------------------------------------------------------------------------------------------


def make_step(vae, loss, lr=1e-3):
    opt_ae = torch.optim.Adam(vt.autoencoder_param_groups(vae, lr, lr), betas=(0.5, 0.9))
    opt_d = torch.optim.Adam(loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    return vt.TrainStep(vt.Autoencode(vae), vae, loss, vt.DiscriminatorPair(loss.discriminator), opt_ae, opt_d)


def test_fused_step_gives_the_autoencoder_upstreams_gradients():
    vae = tiny_vae().double().train()  # float64: upstream's order and the fused one agree to its rounding
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual=MeanSquare()).double().train()
    ae, x, W = vt.Autoencode(vae), clips(1).double(), vae.decoder.conv_out.conv.weight
    params = list(vae.parameters())
    grads = {}
    for fused in (False, True):
        recon, moments = ae(x, torch.Generator().manual_seed(0))
        post = DiagonalGaussianDistribution(moments)
        with vt.frozen(loss.discriminator) as d:
            if fused:
                _, _, target = loss.generator_loss_fused(x, recon, post, 10, W, discriminator=d)
            else:
                target, _ = loss.generator_loss(x, recon, post, 10, last_layer=W, discriminator=d)
        grads[fused] = torch.autograd.grad(target, params)
    for (n, _), a, b in zip(vae.named_parameters(), grads[True], grads[False]):
        assert (a - b).norm() <= 1e-9 * b.norm() + 1e-12, n


def test_a_non_finite_loss_skips_both_updates():
    vae = tiny_vae().train()
    loss = LPIPSWithDiscriminator(disc_start=0, perceptual=MeanSquare()).train()
    step = make_step(vae, loss)
    before = [p.detach().clone() for p in list(vae.parameters()) + list(loss.discriminator.parameters())]
    x = clips(1)
    x[0, 0, 0, 0, 0] = float("nan")
    out = step(x, 3, torch.Generator().manual_seed(0))
    assert out["ae_skipped"] and out["disc_skipped"]
    after = list(vae.parameters()) + list(loss.discriminator.parameters())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert not step.opt_ae.state and not step.opt_disc.state
    out = step(clips(1), 3, torch.Generator().manual_seed(0))
    assert not out["ae_skipped"] and not out["disc_skipped"]
    assert not torch.equal(before[0], next(vae.parameters()))


# --- training runs ------------------------------------------------------------------------------------------


def run(tmp, steps, resume=None, **kw):
    kw = dict(dict(output_dir=str(tmp), max_steps=steps, save_steps=2, batch_size=2, num_workers=0, precision="32",
                   disc_start=2, video_num_frames=5, resolution=32, lr=1e-3, time_lr=1e-3, scaling_clips=3), **kw)
    cfg = vt.VAETrainConfig(resume_from_checkpoint=resume, **kw)
    return vt.train(cfg, dataset=ClipDataset(clips(6)), eval_dataset=ClipDataset(clips(2, seed=5)), vae=tiny_vae(),
                    perceptual=MeanSquare())


def log_records(out):
    with open(os.path.join(out, vt.LOG_NAME), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def disc_weights(folder):
    return {k: v for k, v in load_file(os.path.join(folder, "model_1.safetensors")).items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """4 steps in one go (checkpoints at 2 and 4)."""
    out = tmp_path_factory.mktemp("straight")
    with osp.ops.use_backend("torch"):
        torch.set_num_threads(1)
        result = run(out, 4)
    return out, result


def test_what_trains_and_what_does_not(straight):
    out, result = straight
    recs = [r for r in log_records(out) if "event" not in r]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(map(lambda r: all(isinstance(v, float) and v == v for k, v in r.items() if k in (
        "aeloss", "discloss", "nll_loss", "kl_loss", "g_loss", "d_weight")), recs))
    # --disc_start 2 (batches): the discriminator from batch 1 (step 2), the generator's term from batch 2
    assert [r["disc_factor"] for r in recs] == [0.0, 0.0, 1.0, 1.0]
    assert recs[0]["disc_loss"] == 0.0 and recs[1]["disc_loss"] > 0
    ck2, ck4 = os.path.join(out, "checkpoint-2"), os.path.join(out, "checkpoint-4")
    torch.manual_seed(derive_seed(1006, vt.INIT, 1))
    fresh = LPIPSWithDiscriminator(perceptual=MeanSquare()).discriminator.state_dict()
    d2, d4 = disc_weights(ck2), disc_weights(ck4)
    # batch 0 left the discriminator's weights at their seeded init (f = 0), batch 1 moved them
    assert any(not torch.equal(d2[k], fresh[k.replace("discriminator.", "", 1)]) for k in d2)
    # and it trained on at batches 2 and 3
    assert any(not torch.equal(d4[k], d2[k]) for k in d2)
    # the autoencoder moved every step; logvar stayed
    init = {"vae." + k: v for k, v in tiny_vae().state_dict().items()}
    w2, w4 = load_file(os.path.join(ck2, "model.safetensors")), load_file(os.path.join(ck4, "model.safetensors"))
    assert not torch.equal(w2["vae.decoder.conv_out.conv.weight"], init["vae.decoder.conv_out.conv.weight"])
    assert not torch.equal(w4["vae.encoder.conv_in.conv.weight"], w2["vae.encoder.conv_in.conv.weight"])
    assert torch.load(os.path.join(ck4, vt.LOSS_STATE_NAME))["logvar"].item() == 0.0
    assert all(r["logvar"] == 0.0 for r in recs)
    evals = [r for r in log_records(out) if r.get("event") == "eval"]
    assert [r["step"] for r in evals] == [2, 4] and all(0 < r["psnr"] < 100 for r in evals)


def test_disc_untouched_before_disc_start(tmp_path):
    run(tmp_path, 2, disc_start=3, save_steps=1)  # discriminator from batch 2: batches 0 and 1 leave it
    torch.manual_seed(derive_seed(1006, vt.INIT, 1))
    fresh = LPIPSWithDiscriminator(perceptual=MeanSquare()).discriminator.state_dict()
    for step in (1, 2):
        d = disc_weights(os.path.join(tmp_path, f"checkpoint-{step}"))
        assert all(torch.equal(v, fresh[k.replace("discriminator.", "", 1)]) for k, v in d.items())


def test_exact_resume(straight, tmp_path):
    out, _ = straight
    first = run(tmp_path, 2)
    assert first["step"] == 2
    second = run(tmp_path, 4, resume="latest")
    assert second["step"] == 4
    a, b = os.path.join(out, "checkpoint-4"), os.path.join(tmp_path, "checkpoint-4")
    for name in ("model.safetensors", "model_1.safetensors"):
        wa, wb = load_file(os.path.join(a, name)), load_file(os.path.join(b, name))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    for name in ("optimizer.bin", "optimizer_1.bin"):
        sa, sb = (torch.load(os.path.join(p, name), weights_only=False)["state"] for p in (a, b))
        assert sa.keys() == sb.keys()
        assert all(torch.equal(sa[i][k], sb[i][k]) for i in sa for k in sa[i]), name
    la = [r for r in log_records(out) if "event" not in r]
    lb = [r for r in log_records(tmp_path) if "event" not in r]
    assert [(r["step"], r["aeloss"], r["discloss"]) for r in la] == [(r["step"], r["aeloss"], r["discloss"]) for r in lb]


def test_scaling_factor_is_one_over_the_latent_std(straight):
    out, result = straight
    model = os.path.join(out, "model")
    with open(os.path.join(model, "config.json")) as f:
        sf = json.load(f)["scaling_factor"]
    assert sf == pytest.approx(result["scaling_factor"], rel=1e-12)
    vae = CausalVideoVAE.from_pretrained(model)
    assert vae.config.scaling_factor == pytest.approx(sf)
    # independently: posterior samples of the first 3 training clips, in batches of 2, on the seeded generator
    g = torch.Generator().manual_seed(derive_seed(1006, vt.SCALING))
    data = clips(6)[:3]
    with torch.no_grad():
        z = [vae.encode(data[i:i + 2]).latent_dist.sample(g).double().flatten() for i in (0, 2)]
    std = torch.cat(z).std().item()
    assert sf == pytest.approx(1 / std, rel=1e-5)
    assert sf != pytest.approx(0.18215, rel=0.05)
    loss_w = load_file(os.path.join(model, vt.LOSS_WEIGHTS_NAME))
    assert "loss.logvar" in loss_w and "loss.discriminator.main.0.weight" in loss_w


def test_bf16_run_and_the_nonfinite_guard(tmp_path, monkeypatch):
    real = LPIPSWithDiscriminator.generator_loss_fused  # the trainer's generator loss

    def poisoned(self, *args, **kw):
        value, log, surrogate = real(self, *args, **kw)
        if args[3] == lightning_step(1, False):  # batch 1
            value = value * float("nan")
        return value, log, surrogate

    monkeypatch.setattr(LPIPSWithDiscriminator, "generator_loss_fused", poisoned)
    result = run(tmp_path / "a", 3, precision="bf16")
    assert result["nonfinite_skips"] == 1
    recs = [r for r in log_records(tmp_path / "a") if "event" not in r]
    assert [r["ae_skipped"] for r in recs] == [False, True, False]
    assert [r["disc_skipped"] for r in recs] == [False, True, False]
    assert [r["nonfinite_skips"] for r in recs] == [0, 1, 1]
    assert recs[1]["aeloss"] != recs[1]["aeloss"] and all(r["aeloss"] == r["aeloss"] for r in (recs[0], recs[2]))
    monkeypatch.setattr(LPIPSWithDiscriminator, "generator_loss_fused",
                        lambda self, *a, **k: (lambda v, lg, sg: (v * float("nan"), lg, sg))(*real(self, *a, **k)))
    with pytest.raises(vt.NonFiniteLossError, match=r"2 consecutive batches with a non-finite loss"):
        run(tmp_path / "b", 5, max_nonfinite=2)


# --- data, the image-VAE start and the command line --------------------------------------------------------------


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_videos")
    from osp.data.synthetic import make_dataset

    make_dataset(str(root / "train"), num_videos=4, num_frames=6, size=(36, 40), seed=0)
    return root


def test_folder_dataset_crops_without_resizing(videos):
    from osp.data.video import VideoReader

    ds = VideoFolderDataset(str(videos / "train"), num_frames=5, resolution=32, seed=3)
    assert len(ds) == 4 and all(p.endswith(".mp4") for p in ds.files)
    item = ds[(0, 1)]
    v = item["video"]
    assert v.shape == (3, 5, 32, 32) and v.dtype == torch.float32
    # 6 frames, window 5: begin in [0, 0] (upstream's -1), indices 0..4; crop offsets round(4/2), round(8/2)
    assert center_crop_offsets(36, 40, 32) == (2, 4)
    with VideoReader(ds.files[1]) as r:
        raw = torch.from_numpy(r.read([0, 1, 2, 3, 4]))
    ref = raw[:, 2:34, 4:36].permute(3, 0, 1, 2).double() / 255 * 2 - 1
    torch.testing.assert_close(v.double(), ref, rtol=0, atol=1e-6)
    assert center_crop_offsets(33, 33, 32) == (0, 0)  # round(0.5) = 0: Python's round, ties to even
    with pytest.raises(ValueError, match=r"frames of 20x40 are smaller than the 32x32 crop"):
        crop_transform(torch.zeros(1, 20, 40, 3, dtype=torch.uint8), 32)
    small = VideoFolderDataset(str(videos / "train"), num_frames=5, resolution=48)
    with pytest.raises(ValueError, match=r"no usable video among 4.*smaller than the 48x48 crop"):
        small[0]


def tiny_autoencoder_kl(path):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    kl = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                       up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(32, 32, 64, 64),
                       layers_per_block=1, latent_channels=4, norm_num_groups=32, sample_size=32)
    kl.save_pretrained(path)
    return kl


def test_cli_from_a_tail_inflated_autoencoder_kl(videos, tmp_path, capsys):
    kl = tiny_autoencoder_kl(tmp_path / "kl")
    cfg = vt.VAETrainConfig(init_from_image_vae=str(tmp_path / "kl"), init="tail")
    vae, raw, loss_sd = vt.build_vae(cfg, lambda m: None)
    img = clips(1)[:, :, :1]
    with torch.no_grad():
        ours = vae.decode(vae.encode(img).latent_dist.mode()).sample[:, :, 0]
        ref = kl.decode(kl.encode(img[:, :, 0]).latent_dist.mode()).sample
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4)  # tail init: images reproduce the image VAE
    out = tmp_path / "run"
    code = osp_main(["train-vae", "--video_path", str(videos / "train"), "--init_from_image_vae", str(tmp_path / "kl"),
                     "--init", "tail", "--perceptual_weight", "0", "--max_steps", "1", "--video_num_frames", "5",
                     "--resolution", "32", "--num_workers", "0", "--precision", "32", "--output_dir", str(out),
                     "--eval_video_path", str(videos / "train"), "--eval_num_clips", "1", "--scaling_clips", "2",
                     "--device", "cpu"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"trained VAE: {out / 'model'}" in printed and "eval at step 1 on 1 held-out clips" in printed
    with open(out / "model" / "config.json") as f:
        config = json.load(f)
    assert config["scaling_factor"] != 0.18215 and config["_class_name"] == "CausalVideoVAE"
    again = CausalVideoVAE.from_pretrained(str(out / "model"))
    assert again.config.encoder_temporal_downsample == vae.config.encoder_temporal_downsample


@pytest.mark.parametrize("extra, message", [
    ([], r"no model: expected --load_from_checkpoint"),
    (["--model_config", "CFG", "--video_num_frames", "4"], r"--video_num_frames 4: expected 1 \+ 4k frames"),
    (["--model_config", "CFG", "--precision", "16"], r"argument --precision: invalid choice: '16'"),
    (["--model_config", "CFG", "--video_path", "NOPE"], r"--video_path '.*NOPE' is not a folder"),
    (["--model_config", "CFG", "--init_from_image_vae", "NOPE"], r"--init_from_image_vae '.*NOPE' does not exist"),
    (["--model_config", "CFG", "--load_from_checkpoint", "CFG", "--init_from_image_vae", "CFG"],
     r"--load_from_checkpoint and --init_from_image_vae both given"),
    (["--model_config", "CFG", "--perceptual_weight", "1"], r"--perceptual_weight 1.0: LPIPS\(net='vgg'\) needs local "
                                                          r"weight files .*vgg_lpips.pth"),
    (["--model_config", "CFG", "--resolution", "36"], r"--resolution 36: expected a multiple of 8"),
    (["--model_config", "CFG", "--batch_size", "0"], r"--batch_size 0: expected an integer >= 1"),
])
def test_cli_mistakes_are_one_line_and_exit_2(videos, tmp_path, capsys, monkeypatch, extra, message):
    import re

    monkeypatch.setenv("OSP_WEIGHTS_DIR", str(tmp_path / "no_weights"))
    cfg = tmp_path / "config.json"
    cfg.write_text(json.dumps(dict(VAE_RELEASE_CONFIG, hidden_size=32, hidden_size_mult=[1, 1, 2, 2],
                                   num_res_blocks=1)))
    extra = [str(cfg) if e == "CFG" else (str(tmp_path / e) if e == "NOPE" else e) for e in extra]
    args = ["train-vae", "--output_dir", str(tmp_path / "out"), "--num_workers", "0", "--max_steps", "1",
            "--video_path", str(videos / "train")]
    if "--video_num_frames" not in extra:
        args += ["--video_num_frames", "5"]
    try:
        code = osp_main(args + extra)
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and re.search(message, err), err


# --- the benchmark suite -------------------------------------------------------------------------------------------


def test_bench_suite_quick_cases_run_on_cpu():
    from bench import bench_vae_train

    cases = bench_vae_train.cases("cpu", True)
    assert cases and all(c.op == "vae_train_step" for c in cases)
    for c in cases:
        c.run()
        c.baseline()
        assert c.data["first_loss"]["osp"] == pytest.approx(c.data["first_loss"]["upstream-style"], rel=1e-3)
