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
