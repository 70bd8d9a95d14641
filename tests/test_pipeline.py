"""TextToVideoPipeline on tiny random models and a tiny local T5 (nothing downloaded).

text_mask="upstream" is checked against an independent re-implementation of upstream's
VideoGenPipeline steps (spec B.3-B.5: 300-token T5 encoding, truncation to k tokens with the
negative's pad states for one video, the mask multiply for batches, [neg, pos] order, no mask to the
transformer, guidance on all channels, the learned-sigma split, uint8 truncation); "mask" mode for
independence of batch composition; every sample_method, the PNDM call count and timesteps of spec
B.2, IDDPM's DiT-style guidance, text-to-image, determinism, offloading and tiling.
"""
import diffusers
import pytest
import torch

import osp
from osp.diffusion import create_diffusion, space_timesteps
from osp.models import CausalVideoVAE, LatteT2V, T5TextEncoder, TinyTextEncoder
from osp.pipelines import (
    SAMPLE_METHODS,
    UPSTREAM_SCHEDULERS,
    TextToVideoPipeline,
    make_scheduler,
    preprocess_captions,
)
from osp.data import captions as captions_module
from test_text import _tiny_t5

PROMPT, OTHER = "a red panda eats bamboo", "cat"
VIDEO_LENGTH, LATENT = 3, 4  # 3 latent frames -> 9 frames; 4x4 latents -> 32x32 pixels


@pytest.fixture(autouse=True)
def torch_backend():
    """CPU ops on their torch backend (the Triton interpreter is for the op tests), on one thread: these
    tensors are tiny, and on a busy 2-core machine a second thread only waits (40x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with osp.ops.use_backend("torch"):
            yield
    finally:
        torch.set_num_threads(threads)


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return CausalVideoVAE(hidden_size=32, hidden_size_mult=(1, 1, 2, 2), num_res_blocks=1).eval()


def tiny_transformer(seed=0, caption_channels=16):
    torch.manual_seed(seed)
    return LatteT2V(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=1,
                    cross_attention_dim=32, sample_size=LATENT, caption_channels=caption_channels,
                    video_length=VIDEO_LENGTH).eval()


@pytest.fixture(scope="module")
def t5_path(tmp_path_factory):
    return _tiny_t5(str(tmp_path_factory.mktemp("t5") / "t5"))


@pytest.fixture(scope="module")
def models(t5_path):
    return tiny_vae(), tiny_transformer(), T5TextEncoder(t5_path, dtype=torch.float32)


def make_pipe(models, scheduler="PNDM", **kw):
    vae, tr, enc = models
    return TextToVideoPipeline(vae, tr, enc, make_scheduler(scheduler), **kw)


def noise(b, frames=VIDEO_LENGTH, seed=5):
    return torch.randn(b, 4, frames, LATENT, LATENT, generator=torch.Generator().manual_seed(seed))


def record_calls(monkeypatch, transformer):
    """Record (timestep values, kwargs) of every transformer forward."""
    calls = []
    real = transformer.forward

    def spy(hidden_states, timestep=None, encoder_hidden_states=None, **kw):
        calls.append(dict(t=timestep.tolist(), x=tuple(hidden_states.shape), ehs=encoder_hidden_states, **kw))
        return real(hidden_states, timestep, encoder_hidden_states, **kw)

    monkeypatch.setattr(transformer, "forward", spy)
    return calls


# --- an independent re-implementation of upstream's VideoGenPipeline ------------------------------------


def upstream_videogen(t5_path, transformer, vae, scheduler, prompts, latents, steps, guidance, n=1, eta=0.0,
                      generator=None):
    """Upstream's encode_prompt (mask_feature=True, clean_caption on; the test prompts are already
    clean), __call__ and decode_latents, step by step, on transformers' T5 directly."""
    import inspect

    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(t5_path)
    t5 = transformers.T5EncoderModel.from_pretrained(t5_path).eval()
    B = len(prompts)
    with torch.no_grad():
        inputs = tok(prompts, padding="max_length", max_length=300, truncation=True, return_attention_mask=True,
                     add_special_tokens=True, return_tensors="pt")
        mask = inputs.attention_mask
        emb = t5(inputs.input_ids, attention_mask=mask)[0]
        L = emb.shape[1]
        emb = emb.repeat(1, n, 1).view(B * n, L, -1)
        mask = mask.view(B, -1).repeat(n, 1)
        uncond = tok([""] * B, padding="max_length", max_length=L, truncation=True, return_attention_mask=True,
                     add_special_tokens=True, return_tensors="pt")
        neg = t5(uncond.input_ids, attention_mask=uncond.attention_mask)[0]
        neg = neg.repeat(1, n, 1).view(B * n, L, -1)
        emb = emb.unsqueeze(1)  # mask_text_embeddings
        if emb.shape[0] == 1:
            keep = mask.sum().item()
            emb = emb[:, :, :keep]
        else:
            emb, keep = emb * mask[:, None, :, None], L
        emb = emb.squeeze(1)
        neg = neg[:, :keep]
        states = torch.cat([neg, emb], dim=0)

        scheduler.set_timesteps(steps)
        lat = latents * scheduler.init_noise_sigma
        params = set(inspect.signature(scheduler.step).parameters)
        extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in params}
        for t in scheduler.timesteps:
            x = scheduler.scale_model_input(torch.cat([lat] * 2), t)
            out = transformer(x, encoder_hidden_states=states, timestep=t[None].expand(x.shape[0]),
                              added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                              enable_temporal_attentions=True, return_dict=False)[0]
            uncond_out, text_out = out.chunk(2)
            out = uncond_out + guidance * (text_out - uncond_out)
            if transformer.config.out_channels // 2 == transformer.config.in_channels:
                out = out.chunk(2, dim=1)[0]
            lat = scheduler.step(out, t, lat, **extra, return_dict=False)[0]
        video = vae.decode(lat / 0.18215).sample.permute(0, 2, 1, 3, 4)  # b c t h w -> b t c h w
        video = ((video / 2.0 + 0.5).clamp(0, 1) * 255).to(dtype=torch.uint8).permute(0, 1, 3, 4, 2).contiguous()
        rounded = ((vae.decode(lat / 0.18215).sample / 2.0 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8)
    return lat, video, rounded.permute(0, 2, 3, 4, 1)


CASES = {"one video": ([PROMPT], 1), "two prompts": ([PROMPT, OTHER], 1), "one prompt, two videos": ([OTHER], 2)}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_upstream_mode_matches_upstream_videogen(models, t5_path, case):
    prompts, n = CASES[case]
    vae, tr, _ = models
    pipe = make_pipe(models, "PNDM")
    x = noise(len(prompts) * n)
    got = pipe(prompts if len(prompts) > 1 else prompts[0], num_inference_steps=4, num_videos_per_prompt=n,
               latents=x, progress=False, text_mask="upstream").video
    ref_lat, ref, rounded = upstream_videogen(t5_path, tr, vae, diffusers.PNDMScheduler(), prompts, x, 4, 7.5, n=n)
    got_lat = pipe(prompts, num_inference_steps=4, num_videos_per_prompt=n, latents=x, progress=False,
                   output_type="latent").video
    torch.testing.assert_close(got_lat, ref_lat, rtol=1e-5, atol=1e-5)
    assert got.shape == ref.shape == (len(prompts) * n, 9, 32, 32, 3) and got.dtype == torch.uint8
    diff = (got.int() - ref.int()).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() < 0.01  # one-level flips from float rounding only
    # The comparison can tell truncation from rounding: they disagree on many pixels.
    assert ((got.int() - rounded.int()).abs() > 0).float().mean() > 0.2


def test_upstream_mode_with_a_stochastic_scheduler(models, t5_path):
    """EulerAncestral: float timesteps, scale_model_input, init_noise_sigma, the generator in step()."""
    vae, tr, _ = models
    pipe = make_pipe(models, "EulerAncestralDiscrete")
    x = noise(1)
    got = pipe(PROMPT, num_inference_steps=3, latents=x, generator=torch.Generator().manual_seed(3), progress=False,
               output_type="latent").video
    ref, _, _ = upstream_videogen(t5_path, tr, vae, diffusers.EulerAncestralDiscreteScheduler(), [PROMPT], x, 3, 7.5,
                                  generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-4)


def test_upstream_mode_conditioning(models, monkeypatch):
    """One video: [neg, pos], both k tokens long, no mask; the negative's states past its </s> are T5's
    pad states. A batch: 300 tokens, zeros at the captions' pads, the negative whole."""
    _, tr, enc = models
    pipe = make_pipe(models, "DDIM")
    calls = record_calls(monkeypatch, tr)
    pipe(PROMPT, num_inference_steps=1, latents=noise(1), progress=False, output_type="latent")
    ehs = calls[0]["ehs"]
    k = len(PROMPT.split()) + 1
    pos, pmask = enc.encode([PROMPT], max_length=300, raw=True)
    neg, nmask = enc.encode([""], max_length=300, raw=True)
    assert ehs.shape == (2, k, 16) and calls[0]["encoder_attention_mask"] is None
    torch.testing.assert_close(ehs[1], pos[0, :k])
    torch.testing.assert_close(ehs[0], neg[0, :k])
    assert nmask[0, :k].tolist() == [1] + [0] * (k - 1) and ehs[0, 1:].abs().sum() > 0  # unmasked pad states
    calls.clear()
    pipe([PROMPT, OTHER], num_inference_steps=1, latents=noise(2), progress=False, output_type="latent")
    ehs = calls[0]["ehs"]
    assert ehs.shape == (4, 300, 16) and calls[0]["encoder_attention_mask"] is None
    assert ehs[3, 2:].abs().sum() == 0 and ehs[3, :2].abs().sum() > 0  # "cat" </s>, then zeros
    torch.testing.assert_close(ehs[0], neg[0])  # the whole 300-token negative


def test_mask_mode_is_independent_of_batch_composition(models, monkeypatch):
    pipe = make_pipe(models, "DDIM")
    x = noise(2)
    kw = dict(num_inference_steps=3, progress=False, output_type="latent")
    calls = record_calls(monkeypatch, pipe.transformer)
    both = pipe([PROMPT, OTHER], latents=x, text_mask="mask", **kw).video
    mask = calls[0]["encoder_attention_mask"]
    assert mask.shape == (4, 300) and mask.sum(1).tolist() == [1, 1, len(PROMPT.split()) + 1, 2]
    alone = pipe(OTHER, latents=x[1:], text_mask="mask", **kw).video
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-5)
    # Upstream's handling depends on the batch (truncation alone, zero rows in a batch).
    up_both = pipe([PROMPT, OTHER], latents=x, **kw).video
    up_alone = pipe(OTHER, latents=x[1:], **kw).video
    assert (up_both[1:] - up_alone).abs().max() > 1e-3


def test_generator_makes_runs_repeatable(models):
    pipe = make_pipe(models, "DDPM")  # DDPM draws noise in every step too
    kw = dict(num_inference_steps=3, progress=False)
    a = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).video
    b = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **kw).video
    c = pipe(PROMPT, generator=torch.Generator().manual_seed(1), **kw).video
    assert torch.equal(a, b) and not torch.equal(a, c)
    pt = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="pt", **kw).video
    np_ = pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kw).video
    assert pt.shape == (1, 9, 3, 32, 32) and pt.dtype == torch.float32 and 0 <= pt.min() and pt.max() <= 1
    assert np_.shape == (1, 9, 32, 32, 3) and (torch.from_numpy(np_) == pt.permute(0, 1, 3, 4, 2)).all()
    assert torch.equal((pt * 255).to(torch.uint8).permute(0, 1, 3, 4, 2), a)  # uint8 = truncated [0, 1] values


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # numpy 2 notices from inside diffusers
@pytest.mark.parametrize("method", SAMPLE_METHODS)
def test_every_sample_method_runs(models, method):
    pipe = make_pipe(models, method)
    lat = pipe([PROMPT, OTHER], num_inference_steps=4, generator=torch.Generator().manual_seed(0), progress=False,
               output_type="latents").video
    assert lat.shape == (2, 4, VIDEO_LENGTH, LATENT, LATENT) and torch.isfinite(lat).all()


def test_scheduler_configs_are_upstreams():
    """Written out in full; equal to the no-argument construction (diffusers 0.27.2's defaults, spec B.2)."""
    assert len(UPSTREAM_SCHEDULERS) == 10 and SAMPLE_METHODS[-1] == "IDDPM"
    heun = make_scheduler("HeunDiscrete")
    assert (heun.config.beta_start, heun.config.beta_end, heun.config.beta_schedule) == (0.00085, 0.012, "linear")
    assert make_scheduler("DPMSolverSinglestep").config.lower_order_final is False
    assert make_scheduler("PNDM").config.skip_prk_steps is False
    assert make_scheduler("DDIM").config.clip_sample is True and make_scheduler("DDPM").config.clip_sample is True
    assert make_scheduler("EulerDiscrete").config.timestep_spacing == "linspace"
    euler = make_scheduler("EulerDiscrete")
    euler.set_timesteps(50)
    assert abs(float(euler.init_noise_sigma) - 157.4073) < 1e-3
    with pytest.raises(ValueError, match="sample_method='Nope'.*PNDM"):
        make_scheduler("Nope")


def test_pndm_250_steps_is_259_calls_at_upstreams_timesteps(models, monkeypatch):
    pipe = make_pipe(models, "PNDM")
    calls = record_calls(monkeypatch, pipe.transformer)
    pipe(PROMPT, num_frames=1, num_inference_steps=250, latents=noise(1, frames=1), progress=False,
         output_type="latent")
    ts = [c["t"][0] for c in calls]
    assert len(calls) == 259 and all(c["x"][0] == 2 for c in calls)  # CFG: one batched forward per step
    assert ts[:12] == [996, 994, 994, 992, 992, 990, 990, 988, 988, 986, 986, 984]
    assert ts[12:] == list(range(984, -1, -4)) and len(ts[12:]) == 247


def test_iddpm_guides_the_noise_half_and_keeps_the_conditional_variance(models, monkeypatch):
    pipe = make_pipe(models, "IDDPM")
    tr = pipe.transformer
    calls = record_calls(monkeypatch, tr)
    x = noise(1)
    got = pipe(PROMPT, num_inference_steps=5, latents=x, generator=torch.Generator().manual_seed(2), progress=False,
               output_type="latent").video
    assert [c["t"] for c in calls] == [[t, t] for t in sorted(space_timesteps(1000, "5"), reverse=True)]
    states = calls[0]["ehs"]
    monkeypatch.undo()

    def dit_cfg(xt, t):  # DiT's forward_with_cfg, batch order [uncond, cond] as upstream's pipeline
        out = tr(torch.cat([xt, xt]), torch.cat([t, t]), states, return_dict=False)[0]
        u, c = out.chunk(2)
        eps = u[:, :4] + 7.5 * (c[:, :4] - u[:, :4])
        return torch.cat([eps, c[:, 4:]], dim=1)

    ref = create_diffusion("5").p_sample_loop(dit_cfg, tuple(x.shape), noise=x, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_text_to_image(models, monkeypatch):
    pipe = make_pipe(models, "DDIM")
    calls = record_calls(monkeypatch, pipe.transformer)
    img = pipe([PROMPT, OTHER], num_frames=1, num_inference_steps=2, progress=False,
               generator=torch.Generator().manual_seed(0)).video
    assert img.shape == (2, 1, 32, 32, 3) and img.dtype == torch.uint8
    assert all(c["enable_temporal_attentions"] is False and c["x"][2] == 1 for c in calls)
    calls.clear()
    pipe(PROMPT, num_inference_steps=1, progress=False, output_type="latent")
    assert calls[0]["enable_temporal_attentions"] is True and calls[0]["x"][2] == VIDEO_LENGTH


def test_sizes_and_bad_arguments(models):
    pipe = make_pipe(models)
    assert pipe.accepted_frames() == (1, 9) and pipe.resolve_size() == (9, 32, 32)
    assert pipe.resolve_size(1, 48, 64) == (1, 48, 64)
    lat = pipe(PROMPT, num_frames=1, height=48, width=64, num_inference_steps=4, progress=False,
               output_type="latent").video
    assert lat.shape == (1, 4, 1, 6, 8)
    bad = [
        (dict(num_frames=5), r"num_frames=5; this model samples 1 \(an image\) or 9.*\(1, 9\)"),
        (dict(num_frames=8), r"num_frames=8; expected 1 \+ 4k frames"),
        (dict(height=20), r"height=20; expected a positive multiple of 16"),
        (dict(width=0), r"width=0"),
        (dict(output_type="pil"), r"output_type='pil'; expected one of"),
        (dict(text_mask="none"), r"text_mask='none'; expected one of \('upstream', 'mask'\)"),
        (dict(num_videos_per_prompt=0), r"num_videos_per_prompt=0"),
        (dict(latents=torch.zeros(1, 4, 2, 4, 4)), r"latents of shape \(1, 4, 2, 4, 4\); expected \(1, 4, 3, 4, 4\)"),
        (dict(num_inference_steps=2), r"num_inference_steps=2 is not accepted by PNDMScheduler"),
    ]
    for kwargs, match in bad:
        with pytest.raises(ValueError, match=match):
            pipe(PROMPT, progress=False, **kwargs)
    with pytest.raises(ValueError, match="prompt"):
        pipe([], progress=False)


def test_offload_moves_the_text_encoder_off_after_encoding(models, monkeypatch):
    vae, tr, _ = models
    enc = TinyTextEncoder(out_channels=16, width=32, layers=1, heads=2)
    moves = []
    real_to = enc.to
    monkeypatch.setattr(enc, "to", lambda *a, **k: (moves.append(str(a[0]) if a else str(k)), real_to(*a, **k))[1])
    pipe = TextToVideoPipeline(vae, tr, enc, make_scheduler("DDIM"), offload_text_encoder=True)
    moves.clear()
    pipe(PROMPT, num_inference_steps=1, progress=False, output_type="latent")
    assert moves == [str(pipe.device), "cpu"]


def test_vae_tiling_is_honoured_and_silenced(models, monkeypatch):
    from osp.models.vae import tiling

    pipe = make_pipe(models, "DDIM")
    seen = []
    real = tiling.tiled_decode
    monkeypatch.setattr(tiling, "tiled_decode", lambda vae, cfg, z: (seen.append(cfg), real(vae, cfg, z))[1])
    with pytest.warns(UserWarning, match="receptive"):
        pipe.vae.enable_tiling(mode="stream", tile_sample_size=16, overlap=0.25, progress=True)
    try:
        tiled = pipe(PROMPT, num_inference_steps=1, progress=False, generator=torch.Generator().manual_seed(0)).video
    finally:
        pipe.vae.disable_tiling()
    assert seen and seen[0].mode == "stream" and seen[0].progress is False  # progress=False silences it
    assert pipe.vae._tiling is None
    untiled = pipe(PROMPT, num_inference_steps=1, progress=False, generator=torch.Generator().manual_seed(0)).video
    assert tiled.shape == untiled.shape


def test_from_pretrained_reads_the_released_layout(models, t5_path, tmp_path):
    vae, tr, _ = models
    vae.save_pretrained(tmp_path / "osp" / "vae")
    tr.save_pretrained(tmp_path / "osp" / "9x48x32")
    pipe = TextToVideoPipeline.from_pretrained(tmp_path / "osp", version="9x48x32", text_encoder=t5_path,
                                               scheduler="DDIM", torch_dtype=torch.float32)
    assert isinstance(pipe.scheduler, diffusers.DDIMScheduler) and isinstance(pipe.text_encoder, T5TextEncoder)
    assert pipe.default_size == (48, 32) and pipe.resolve_size() == (9, 48, 32)
    assert pipe.sources["transformer"].endswith("9x48x32") and pipe.sources["vae"].endswith("vae")
    lat = pipe(PROMPT, num_inference_steps=2, progress=False, output_type="latent").video
    assert lat.shape == (1, 4, VIDEO_LENGTH, 6, 4)
    tiny = TextToVideoPipeline.from_pretrained(vae_path=tmp_path / "osp" / "vae",
                                               transformer_path=tmp_path / "osp" / "9x48x32", text_encoder="tiny",
                                               scheduler=make_scheduler("IDDPM"))
    assert isinstance(tiny.text_encoder, TinyTextEncoder) and tiny.text_encoder.out_channels == 16
    with pytest.raises(ValueError, match="version='17x256'"):
        TextToVideoPipeline.from_pretrained(tmp_path / "osp", version="17x256", text_encoder="tiny")


def test_caption_cleaning(monkeypatch):
    monkeypatch.setattr(captions_module, "_WARNED", False)
    if captions_module.cleaning_unavailable() is None:
        assert preprocess_captions(["<b>Hello</b>  World https://x.com", " A  red Panda "]) == ["hello world",
                                                                                                "a red panda"]
    monkeypatch.setattr(captions_module, "cleaning_unavailable", lambda: "bs4 not installed")
    with pytest.warns(UserWarning, match="caption cleaning off: bs4 not installed"):
        assert preprocess_captions(["  <b>Hello</b> World "]) == ["<b>hello</b> world"]
