"""The benchmark suites' own machinery (bench/ is not installed: imported from the checkout) and the
tiled-decode measurements they share with the demo (osp.testing.vae_tiling): the upstream-style conv
keeps up with osp.ops.causal_conv3d's arguments, the measurements (statistics error, work factor) say
what they claim, and CPU rows whose working set fits in the cache are marked instead of given an
impossible share of the copy peak."""
import inspect
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import osp  # noqa: E402
from bench import bench_vae, harness  # noqa: E402
from osp.testing import vae_tiling  # noqa: E402


def test_upstream_style_conv_takes_every_op_argument():
    ours = set(inspect.signature(osp.ops.causal_conv3d).parameters)
    assert ours <= set(inspect.signature(bench_vae._upstream_conv).parameters)


@pytest.mark.parametrize("history", [False, True])
def test_upstream_style_conv_equals_the_reference(history):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 3, 4, 6, 5, generator=g), torch.randn(4, 3, 3, 3, 3, generator=g)
    h = torch.randn(1, 3, 2, 6, 5, generator=g) if history else None
    out = bench_vae._upstream_conv(x, w, padding=1, history=h)
    ref = osp.ops.causal_conv3d_reference(x, w, padding=1, history=h)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_work_factor_counts_the_tiles():
    spec = dict(vae_tiling.CPU, tile=64)  # 8 latents, overlap 2
    vae = vae_tiling.model(spec, "cpu")
    z = torch.zeros(1, 4, 3, 16, 16)
    # stream: 3 tiles of 6-7 latents overlapping by 2 (20 of 16 per axis); osp-v1.0: tiles at every
    # 6 latents, clipped at the border (8 + 8 + 4 = 20 of 16)
    assert vae_tiling.work_factor(vae, spec, z, "stream-tile") == pytest.approx((20 / 16) ** 2)
    assert vae_tiling.work_factor(vae, spec, z, "osp-v1.0") == pytest.approx((20 / 16) ** 2)
    assert vae_tiling.work_factor(vae, spec, z, "untiled") == 1


def test_statistics_error_ranks_global_before_tile():
    """The statistics the untiled decode uses have error 0 against themselves; global statistics are
    closer to them than per-tile ones."""
    spec = dict(vae_tiling.CPU, tile=64)
    with osp.ops.use_backend("torch"):
        vae = vae_tiling.model(spec, "cpu")
        z = vae_tiling.latent(vae, spec, (5, 128, 64), "cpu")
        ref, ref_stats = vae_tiling.decode_recording(vae, spec, z, "untiled")
        assert vae_tiling.norm_stats_error(ref_stats, ref_stats) == 0
        errs = {v: vae_tiling.norm_stats_error(ref_stats, vae_tiling.decode_recording(vae, spec, z, v)[1])
                for v in ("stream-tile", "stream-global")}
    assert 0 < errs["stream-global"] < errs["stream-tile"], errs


def _case(n_bytes):
    x = torch.ones(64)
    return harness.Case(op="copy", shape=str(n_bytes), dtype="float32", layout="-", backend="torch", mode="fwd",
                        run=x.clone, baseline=None, baseline_name="", bytes=n_bytes)


def test_cpu_rows_in_cache_say_so_instead_of_a_share_of_peak():
    # A copy peak so high that no row beats it: only the working set decides.
    peaks = dict(copy_gbps=1e12, copy_bytes=2 << 20, llc_bytes=1 << 20, matmul_tflops=1.0)
    small, large = harness.run_cases([_case(1 << 19), _case(4 << 20)], "cpu", peaks, {})
    assert small["in_cache"] and small["pct_peak_bw"] is None
    assert not large["in_cache"] and 0 < large["pct_peak_bw"] < 100
    table = harness.markdown_table([small, large]).splitlines()
    assert "| in cache |" in table[2] and "in cache" not in table[3]


def test_a_share_above_the_copy_peak_is_never_printed():
    """Beating the copy peak on CPU can only come from the cache, even past its measured size (or
    with no size known); on CUDA, which flushes L2 between timed calls, rows keep their share."""
    assert harness.fits_in_cache(64 << 20, "cpu", dict(llc_bytes=1 << 20), pct_peak_bw=137.0)
    assert harness.fits_in_cache(64 << 20, "cpu", dict(llc_bytes=None), pct_peak_bw=137.0)
    assert not harness.fits_in_cache(64 << 20, "cpu", dict(llc_bytes=1 << 20), pct_peak_bw=60.0)
    assert not harness.fits_in_cache(1 << 10, "cuda", dict(llc_bytes=None), pct_peak_bw=60.0)


def _fake_cache(root, cpu, index, level, kind, size, shared):
    d = root / f"cpu{cpu}" / "cache" / f"index{index}"
    d.mkdir(parents=True)
    for name, text in dict(level=str(level), type=kind, size=size, shared_cpu_list=shared).items():
        (d / name).write_text(text + "\n")


def test_last_level_cache_counts_every_instance_once(tmp_path):
    # Two sockets of two cpus: a private L1/L2 per cpu, one 32 MiB L3 per socket.
    for cpu in range(4):
        _fake_cache(tmp_path, cpu, 0, 1, "Instruction", "64K", str(cpu))
        _fake_cache(tmp_path, cpu, 1, 2, "Unified", "2048K", str(cpu))
        _fake_cache(tmp_path, cpu, 2, 3, "Unified", "32768K", "0-1" if cpu < 2 else "2-3")
    assert harness._sysfs_llc_bytes(tmp_path) == 64 << 20
    assert harness._sysfs_llc_bytes(tmp_path / "missing") is None


def test_cpu_copy_buffer_streams_past_the_cache():
    assert harness.cpu_copy_bytes(480 << 20) >= 2 * (480 << 20)
    assert harness.cpu_copy_bytes(4 << 20) == 256 << 20
    assert harness.cpu_copy_bytes(None) == 512 << 20
    assert harness.cpu_copy_bytes(480 << 20, available=1 << 30) == 256 << 20


# --- bench/bench_sampling.py: the CFG step and end-to-end sampling suite --------------------------------


def test_sampling_prompt_has_k_tokens_after_cleaning():
    from osp.models import TinyTextEncoder
    from osp.pipelines import preprocess_captions

    from bench import bench_sampling

    enc = TinyTextEncoder(out_channels=8, width=8, layers=1, heads=2)
    for k in (24, 120):
        caption = preprocess_captions([bench_sampling.prompt_of(k)])
        assert int(enc.tokenize(caption, max_length=300)[1].sum()) == k


def test_sampling_cases_build_and_one_of_each_runs(monkeypatch):
    """The CPU case list builds (the fresh-process peak stubbed out: the next test runs it); the step
    row and the end-to-end row time osp against the upstream-style path, which samples the same video."""
    pytest.importorskip("diffusers")
    from bench import bench_sampling

    peaks_asked = []
    monkeypatch.setattr(bench_sampling, "peak_rss_in_subprocess",
                        lambda module, side, threads: peaks_asked.append(side) or 10.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = bench_sampling.cases("cpu", quick=True)
        step = next(c for c in cases if c.op == "t2v_cfg_step" and c.backend == "auto")
        sample = next(c for c in cases if c.op == "t2v_sample")
        assert {c.backend for c in cases if c.op == "t2v_cfg_step"} >= {"auto", "torch"}
        assert sorted(peaks_asked) == ["osp", "upstream"]
        # the same video from the same weights, noise and prompt (uint8 truncation may differ by one)
        assert sample.data["video_max_abs_diff"] <= 1 and sample.data["model_calls"] == 13
        assert sample.data["k"] == bench_sampling.CPU_STEPS[0]["k"]
        assert step.data["max_abs_diff_vs_twin"] <= 1e-4 * max(1.0, step.data["ref_abs_max"])
        peaks = dict(copy_gbps=10.0, copy_bytes=1 << 30, llc_bytes=1 << 20, matmul_tflops=0.1)
        rows = harness.run_cases([step, sample], "cpu", peaks, {})
    finally:
        torch.set_num_threads(threads)
    for row in rows:
        assert "error" not in row, row
        assert row["ms"] > 0 and row["baseline_ms"] > 0 and row["speedup"] > 0 and row["tflops"] > 0
    assert rows[1]["data"]["peak_ratio"] == 1.0 and "(1.00x)" in rows[1]["note"]


def test_sampling_peak_runs_in_a_fresh_process():
    pytest.importorskip("diffusers")
    from bench import bench_sampling

    assert bench_sampling.peak_rss_in_subprocess("bench.bench_sampling", "osp", "1") > 0


def test_sampling_without_diffusers_is_skipped_rows_not_errors(monkeypatch):
    from bench import bench_sampling

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    cases = bench_sampling.cases("cpu", quick=False)
    assert {c.op for c in cases} == {"t2v_cfg_step", "t2v_sample"}
    rows = harness.run_cases(cases, "cpu", dict(copy_gbps=1.0, copy_bytes=1, llc_bytes=1, matmul_tflops=1.0), {})
    assert all("error" not in r and "diffusers" in r["skipped"] for r in rows)
    assert "| skipped |" in harness.markdown_table(rows)


# --- bench/bench_training.py: the training step and data loader suite ----------------------------------------


def _training_inputs(n):
    from bench import bench_training

    spec = dict(bench_training.CPU_STEPS[0], images=n)
    torch.manual_seed(0)
    from osp.models import LatteT2V

    model = LatteT2V.from_preset(spec["preset"], **spec["overrides"])
    return spec, model, bench_training.step_inputs(spec, dict(model.config), "cpu")


@pytest.mark.parametrize("images", [0, 4])
def test_training_flops_are_the_forward_matmuls_times_three(images):
    """step_flops / 3 is every multiply-add of osp's forward (torch backend, SDPA's math path, which
    the counter sees as matmuls), with images (no temporal blocks) and without."""
    pytest.importorskip("diffusers")
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bench import bench_training

    spec, model, inputs = _training_inputs(images)
    with osp.ops.use_backend("torch"), torch.no_grad(), sdpa_kernel(SDPBackend.MATH), \
            FlopCounterMode(display=False) as counter:
        model(inputs["z"], inputs["t"], **inputs["kwargs"])
    S = spec["size"]
    flops = bench_training.step_flops(dict(model.config), spec["batch"], spec["frames"], images, S, S,
                                      spec["caption_len"])
    assert flops == 3 * counter.get_total_flops()


@pytest.mark.parametrize("images", [0, 4])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_training_upstream_forward_equals_osp(images, checkpointing):
    """upstream_forward (upstream's joint image-video forward over the diffusers twin) computes what
    osp's LatteT2V computes from the same weights, and so do their gradients; without images it is
    diffusers' own forward."""
    pytest.importorskip("diffusers")
    from bench import bench_training
    from bench.bench_latte import _twin

    spec, model, inputs = _training_inputs(images)
    model.train()
    twin = _twin(model).train()
    kw = inputs["kwargs"]
    x, t = inputs["z"], inputs["t"]
    out = model(x, t, **kw).sample
    ref = bench_training.upstream_forward(twin, x, t, kw["encoder_hidden_states"], kw["encoder_attention_mask"],
                                          images, checkpointing=checkpointing)
    torch.testing.assert_close(ref, out, rtol=1e-4, atol=1e-4 * float(out.detach().abs().max()))
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    ours, theirs = dict(model.named_parameters()), dict(twin.named_parameters())
    for name in ("pos_embed.proj.weight", "transformer_blocks.1.attn2.to_k.weight",
                 "temporal_transformer_blocks.0.ff.net.0.proj.weight", "caption_projection.linear_1.weight"):
        torch.testing.assert_close(theirs[name].grad, ours[name].grad, rtol=1e-4,
                                   atol=1e-4 * float(ours[name].grad.abs().max()))
    if images == 0:
        mask = kw["encoder_attention_mask"]
        bias = ((1 - mask.float()) * -10000.0)[:, None].repeat_interleave(spec["frames"], 0)
        with torch.no_grad():
            own = twin(x, t, kw["encoder_hidden_states"], bias).sample
        torch.testing.assert_close(ref.detach(), own, rtol=1e-5, atol=1e-5 * float(own.abs().max()))


def test_training_cases_run_on_cpu():
    """The quick CPU suite: a step row, osp against the twin from the same weights (same first loss),
    with samples/s recorded as the harness times it, and a loader row from the synthetic mp4s with
    clips/s and its ratio to the step's clip rate (the same clip size)."""
    pytest.importorskip("diffusers")
    pytest.importorskip("av")
    from bench import bench_training

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cases = bench_training.cases("cpu", quick=True)
        assert [c.op for c in cases] == [bench_training.STEP_OP, bench_training.LOADER_OP]
        step, loader = cases
        loss = step.data["first_loss"]
        assert loss["osp"] == pytest.approx(loss["twin"], rel=1e-4)
        peaks = dict(copy_gbps=10.0, copy_bytes=1 << 30, llc_bytes=1 << 20, matmul_tflops=0.1)
        rows = harness.run_cases(cases, "cpu", peaks, {})
    finally:
        torch.set_num_threads(threads)
        del cases  # the loader's workers and its temporary folder
    for row in rows:
        assert "error" not in row, row
    step_row, loader_row = rows
    assert step_row["ms"] > 0 and step_row["speedup"] > 0 and step_row["tflops"] > 0
    b = step_row["data"]["batch"]
    # the recorded rate is the batch over the median synchronized step: close to batch / the harness's median
    assert 0.5 < step_row["data"]["samples_per_s"] * step_row["ms"] / (1e3 * b) < 2
    assert step_row["data"]["twin_samples_per_s"] > 0
    data = loader_row["data"]
    assert data["workers"] == bench_training.worker_counts()[-1] and data["clips_per_s"] > 0
    # one clip a sample: the step's clip rate is its samples/s
    assert data["step"] and data["step_clips_per_s"] == pytest.approx(step_row["data"]["samples_per_s"])
    assert data["ratio_to_step"] == pytest.approx(data["clips_per_s"] / data["step_clips_per_s"])


def test_training_worker_counts_are_capped_by_the_cpus():
    from bench import bench_training

    assert bench_training.worker_counts(1) == [0]
    assert bench_training.worker_counts(2) == [0, 2]
    assert bench_training.worker_counts(16) == [0, 2, 4]


@pytest.mark.parametrize("missing", ["diffusers", "av", "osp.data"])
def test_training_without_a_package_is_skipped_rows_not_errors(monkeypatch, missing):
    from bench import bench_training

    monkeypatch.setitem(sys.modules, missing, None)  # importing it now raises ImportError
    monkeypatch.setattr(bench_training, "_step_case", lambda *a: pytest.fail("a step case was built"))
    other = "_missing_loader" if missing == "diffusers" else "_missing_diffusers"
    monkeypatch.setattr(bench_training, other, lambda: "stubbed")  # the other half skipped too: nothing runs
    cases = bench_training.cases("cpu", quick=False)
    assert {c.op for c in cases} == {bench_training.STEP_OP, bench_training.LOADER_OP}
    rows = harness.run_cases(cases, "cpu", dict(copy_gbps=1.0, copy_bytes=1, llc_bytes=1, matmul_tflops=1.0), {})
    assert all("error" not in r and r["skipped"] for r in rows)
    word = {"diffusers": "diffusers", "av": "PyAV", "osp.data": "osp.data"}[missing]
    half = bench_training.STEP_OP if missing == "diffusers" else bench_training.LOADER_OP
    assert all(word in r["skipped"] for r in rows if r["op"] == half)
    assert "| skipped |" in harness.markdown_table(rows)


def test_training_steps_under_bf16_autocast(monkeypatch):
    """Both sides' steps under bf16 autocast over fp32 weights with bf16 caption states, as the GPU
    rows run them (here on the CPU's autocast): the first losses agree to bf16 precision."""
    pytest.importorskip("diffusers")
    from bench import bench_training

    monkeypatch.setattr(bench_training, "_amp", lambda device: lambda: torch.autocast("cpu", dtype=torch.bfloat16))
    ours, twin, _ = bench_training.build_sides(bench_training.CPU_STEPS[0], "cpu")
    kwargs = ours.inputs["kwargs"]  # shared by both sides
    kwargs["encoder_hidden_states"] = kwargs["encoder_hidden_states"].bfloat16()
    assert float(ours.step()) == pytest.approx(float(twin.step()), rel=1e-2)
    assert all(p.dtype == torch.float32 for p in ours.params + twin.params)


def test_training_gpu_loader_clips_match_the_first_gpu_step():
    """The GPU loader reads the clips the first GPU step trains on (so its row gets the ratio), and
    every configuration's latents are its clip through the 4x8x8 VAE."""
    from bench import bench_training

    loader = bench_training.GPU_LOADER
    assert f"{loader['frames']}x{loader['size']}x{loader['size']}" == bench_training.GPU_STEPS[0]["clip"]
    for spec in bench_training.GPU_STEPS + bench_training.CPU_STEPS:
        frames, h, w = (int(v) for v in spec["clip"].split("x"))
        assert spec["frames"] == (frames - 1) // 4 + 1 and spec["size"] * 8 == h == w


def test_training_shm_shortfall(tmp_path):
    from bench import bench_training

    assert bench_training.shm_shortfall(0, 1 << 60, str(tmp_path)) is None
    assert "--shm-size" in bench_training.shm_shortfall(4, 1 << 60, str(tmp_path))
    assert bench_training.shm_shortfall(4, 1, str(tmp_path)) is None
    assert bench_training.shm_shortfall(4, 1 << 60, str(tmp_path / "missing")) is None
