"""Benchmark machinery shared by the bench/bench_<op>.py suites.

A suite returns ``Case`` objects (inputs already built, callables ready to time); ``run_cases``
times each case and its baseline in the same run and turns them into rows (plain dicts, one per
case) carrying the speed, the bandwidth and compute rates, their share of the peaks measured in
the same run by ``measure_peaks``, and the ``environment`` (device, versions, git revision).
Rows are appended as JSON lines to bench/results/results.jsonl by real runs, and rendered by
``markdown_table`` and ``plot``.

Timing: on CUDA ``triton.testing.do_bench`` (median with 0.2/0.8 quantiles, L2 flushed between
runs, warm-up keeps compilation and autotuning out); on CPU (and on CUDA without triton) a wall
clock over repeats after one warm-up call, median, bounded to about a second per callable.
Triton is imported only to time on CUDA, so on CPU the caller stays free to set TRITON_INTERPRET=1
before anything imports it. Because the CPU wall clock does not flush caches, a CPU row whose
working set fits in the last-level cache says "in cache" (``in_cache``) instead of a share of the
copy peak, which is measured well past that cache.
"""
from __future__ import annotations

import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import torch

from osp.testing import memory
from osp.testing.memory import peak_cuda_mib, peak_rss_mib  # noqa: F401  (the suites' peak measurements)

RESULTS = Path(__file__).resolve().parent / "results" / "results.jsonl"
REPO = Path(__file__).resolve().parents[1]

# CPU wall-clock bounds: stop after this many seconds or repeats (at least one timed call).
_CPU_BUDGET_S = 1.0
_CPU_MAX_REPS = 50


@dataclass
class Case:
    """One measured configuration of one op.

    ``run`` and ``baseline`` are zero-argument callables over inputs built beforehand (random data);
    ``bytes`` counts the minimal traffic: each input read once and each output written once (for
    "fwd+bwd": the forward's x read and y write plus the backward's x read, dy read and dx write).
    ``flops`` is None for ops without arithmetic worth a rate (normalizations, copies).
    ``grad_to_none`` lists tensors whose ``.grad`` is reset before every timed call.
    ``data``: measurements beyond the timing (e.g. peak memory), stored in the row under "data".
    ``skip``: why the case cannot run here (a missing package); its row says "skipped" with this
    reason, times nothing and is no failure.
    """

    op: str
    shape: str
    dtype: str
    layout: str
    backend: str
    mode: str
    run: Callable[[], object]
    baseline: Optional[Callable[[], object]]
    baseline_name: str
    bytes: int
    flops: Optional[int] = None
    grad_to_none: List[torch.Tensor] = field(default_factory=list)
    note: str = ""
    data: Dict[str, object] = field(default_factory=dict)
    skip: str = ""


INTERPRETER_NOTE = "Triton interpreter: checks correctness, its timings are not speed"


def timed(fn: Callable, args: Sequence, dy: Optional[torch.Tensor] = None) -> Callable[[], object]:
    """A zero-argument call of ``fn(*args)``: the forward alone when dy is None, else forward and
    backward under the upstream gradient dy."""
    if dy is None:
        return lambda: fn(*args)
    return lambda: fn(*args).backward(dy)


def peak_rss_in_subprocess(module: str, *args: str, env=None) -> float:
    """Run ``python -m module --peak *args`` in a fresh interpreter in the checkout (so that bench
    modules are found); it prints {"peak_mib": ...} last (osp.testing.memory.print_peak)."""
    return memory.peak_rss_in_subprocess(module, *args, cwd=REPO, env=env)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _wall_clock(fn: Callable, device: str, grad_to_none: Sequence[torch.Tensor],
                reps: int = _CPU_MAX_REPS, warm_up: bool = True) -> List[float]:
    """Per-call wall times in ms after one warm-up call, within the CPU budget (at most ``reps``)."""
    if warm_up:
        fn()
        _sync(device)
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < reps and (not times or time.perf_counter() - start < _CPU_BUDGET_S):
        for t in grad_to_none:
            t.grad = None
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def time_ms(fn: Callable, device: str, grad_to_none: Sequence[torch.Tensor] = ()) -> Tuple[float, float, float]:
    """(median, 0.2 quantile, 0.8 quantile) of fn's run time in ms on ``device``."""
    if device.startswith("cuda") and importlib.util.find_spec("triton") is not None:
        import triton.testing

        # Calls of a second or more (whole tiled decodes) would take do_bench minutes (it estimates
        # with 5 calls before its repeats): time them with the wall clock, 2 more calls after these two.
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        first = (time.perf_counter() - t0) * 1e3
        if first > 1e3:
            times = [first] + _wall_clock(fn, device, grad_to_none, reps=2, warm_up=False)
            med, lo, hi = np.quantile(times, [0.5, 0.2, 0.8])
            return float(med), float(lo), float(hi)

        # Only arguments that triton 2.1 through 3.9 all accept; quantiles
        # take precedence over return_mode, so the median is asked for as the 0.5 quantile.
        med, lo, hi = triton.testing.do_bench(
            fn, warmup=25, rep=200, grad_to_none=list(grad_to_none) or None, quantiles=[0.5, 0.2, 0.8]
        )
        return float(med), float(lo), float(hi)
    med, lo, hi = np.quantile(_wall_clock(fn, device, grad_to_none), [0.5, 0.2, 0.8])
    return float(med), float(lo), float(hi)


def _size_bytes(text: str) -> Optional[int]:
    """'491520K', '32 MiB', '503316480' -> bytes; None when it is no size."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if not m:
        return None
    return int(float(m.group(1)) * 1024 ** " KMGT".index(m.group(2).upper() or " "))


def _sysfs_llc_bytes(root: Path) -> Optional[int]:
    """Sum of the highest-level data caches under root (/sys/devices/system/cpu), each instance
    (a set of CPUs sharing it) counted once."""
    instances: Dict[int, Dict[str, int]] = {}
    for index in root.glob("cpu[0-9]*/cache/index[0-9]*"):
        try:
            if (index / "type").read_text().strip() == "Instruction":
                continue
            level = int((index / "level").read_text())
            size = _size_bytes((index / "size").read_text())
            shared = (index / "shared_cpu_list").read_text().strip()
        except (OSError, ValueError):
            continue
        if size:
            instances.setdefault(level, {})[shared] = size
    return sum(instances[max(instances)].values()) if instances else None


def _lscpu_llc_bytes() -> Optional[int]:
    """The highest-level cache lscpu reports (in total over its instances), or None."""
    try:
        out = subprocess.run(["lscpu", "-B"], capture_output=True, text=True, timeout=10,
                             env=dict(os.environ, LC_ALL="C")).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    sizes = {}
    for m in re.finditer(r"^L(\d)\w* cache:\s*(\S+)", out, re.MULTILINE):
        size = _size_bytes(m.group(2))
        if size:
            sizes[int(m.group(1))] = size
    return sizes[max(sizes)] if sizes else None


def last_level_cache_bytes() -> Optional[int]:
    """Total bytes of the CPU's last-level caches (every instance: all sockets and core complexes),
    from /sys/devices/system/cpu, else lscpu; None when neither tells."""
    return _sysfs_llc_bytes(Path("/sys/devices/system/cpu")) or _lscpu_llc_bytes()


def _mem_available_bytes() -> Optional[int]:
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return None


def cpu_copy_bytes(llc_bytes: Optional[int], available: Optional[int] = None) -> int:
    """Bytes of each buffer of the CPU copy peak: twice the last-level cache, so that the copy's
    working set (source and destination) is four caches and streams from memory (at least 256 MiB,
    at most 2 GiB); 512 MiB when the cache size is unknown. Never more than a quarter of the
    available memory."""
    n = (512 << 20) if llc_bytes is None else min(max(2 * llc_bytes, 256 << 20), 2 << 30)
    if available:
        n = min(n, max(available // 4, 64 << 20))
    return n


def _copy_gbps(device: str, n_bytes: int) -> float:
    src = torch.randn(n_bytes // 4, device=device) if device.startswith("cuda") else torch.full((n_bytes // 4,), 1.5)
    dst = torch.empty_like(src)
    return 2 * n_bytes / time_ms(lambda: dst.copy_(src), device)[0] / 1e6


def _matmul_tflops(device: str, n: int, dtype: torch.dtype) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_ms(lambda: torch.matmul(a, b), device)[0] / 1e9


def measure_peaks(device: str) -> Dict[str, Optional[float]]:
    """Reachable peaks measured now: copy bandwidth (GB/s, read + write) and matmul TFLOP/s.

    GPU: a 1 GiB device-to-device copy and a bf16 8192^3 matmul (random inputs: zeros would flatter
    a power-aware GPU). CPU: a copy of ``cpu_copy_bytes`` (well past the last-level cache, whose
    size is recorded as ``llc_bytes`` for ``fits_in_cache``) and an fp32 2048^3 matmul.
    """
    cuda = device.startswith("cuda")
    llc = None if cuda else last_level_cache_bytes()
    copy_bytes = (1 << 30) if cuda else cpu_copy_bytes(llc, _mem_available_bytes())
    peaks = {
        "copy_gbps": _copy_gbps(device, copy_bytes),
        "copy_bytes": copy_bytes,
        "llc_bytes": llc,
        "matmul_tflops": _matmul_tflops(device, *((8192, torch.bfloat16) if cuda else (2048, torch.float32))),
    }
    _free(device)
    return peaks


def fits_in_cache(n_bytes: int, device: str, peaks: Dict[str, Optional[float]], pct_peak_bw: float) -> bool:
    """Whether a CPU row's bandwidth is no share of the memory's: its working set (``n_bytes``) fits
    in the last-level cache, which the wall clock does not flush between repeats (do_bench on CUDA
    does), or it beat the copy peak, which only the cache can do."""
    if device.startswith("cuda"):
        return False
    return n_bytes <= (peaks.get("llc_bytes") or 0) or pct_peak_bw > 100


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads)"


def _package_version(*names: str) -> str:
    """Installed version of the first distribution found, without importing it; "none" if absent."""
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "none"


def _git_revision() -> str:
    """Short HEAD plus "-dirty" when the tree has changes; OSP_REVISION overrides (a tree copied
    without .git); "unknown" when git cannot tell."""
    if os.environ.get("OSP_REVISION"):
        return os.environ["OSP_REVISION"]
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                                  check=True, timeout=30).stdout.strip()

        rev = git("rev-parse", "--short", "HEAD")
        return rev + ("-dirty" if git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: Optional[str] = None) -> Dict[str, object]:
    """Where a measurement was taken: device name, torch/triton versions, git revision, UTC time,
    whether Triton runs in its interpreter (TRITON_INTERPRET=1) and the 1-minute load average."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return {
        "device": _device_name(device),
        "torch": torch.__version__,
        "triton": _package_version("triton", "pytorch-triton"),
        "revision": _git_revision(),
        "timestamp": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "interpreter": os.environ.get("TRITON_INTERPRET", "0") == "1",
        # Other work on the machine skews CPU timings; the load says how much there was.
        "loadavg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }


def _free(device: str) -> None:
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def _error(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def run_cases(cases: Iterable[Case], device: str, peaks: Dict[str, float],
              env: Dict[str, object]) -> List[Dict[str, object]]:
    """Time every case and its baseline (each baseline callable once, shared by the cases that
    name it); a case that raises yields a row with an "error" field. Progress goes to stderr."""
    rows: List[Dict[str, object]] = []
    baseline_ms: Dict[Callable, float] = {}
    for case in cases:
        row: Dict[str, object] = {
            "op": case.op, "shape": case.shape, "dtype": case.dtype, "layout": case.layout,
            "backend": case.backend, "mode": case.mode, "bytes": case.bytes, "flops": case.flops,
            "baseline": case.baseline_name, "note": case.note,
        }
        if case.data:
            row["data"] = case.data
        if case.skip:
            row.update(skipped=case.skip, **env)
            row.update(peaks)
            rows.append(row)
            print(f"  {case.op} {case.shape} {case.backend} {case.mode}: skipped: {case.skip}", file=sys.stderr, flush=True)
            continue
        try:
            ms, lo, hi = time_ms(case.run, device, case.grad_to_none)
            gbps = case.bytes / ms / 1e6
            pct = 100 * gbps / peaks["copy_gbps"]
            in_cache = fits_in_cache(case.bytes, device, peaks, pct)
            row.update(ms=ms, ms_p20=lo, ms_p80=hi, gbps=gbps, pct_peak_bw=None if in_cache else pct,
                       in_cache=in_cache, tflops=None if case.flops is None else case.flops / ms / 1e9)
            if case.flops is not None:
                row["pct_peak_flops"] = 100 * row["tflops"] / peaks["matmul_tflops"]
        except Exception as exc:  # one broken case must not end the suite
            row["error"] = _error(exc)
        if case.baseline is not None and "error" not in row:
            try:
                if case.baseline not in baseline_ms:
                    baseline_ms[case.baseline] = time_ms(case.baseline, device, case.grad_to_none)[0]
                row.update(baseline_ms=baseline_ms[case.baseline], speedup=baseline_ms[case.baseline] / row["ms"])
            except Exception as exc:
                row["error"] = "baseline " + _error(exc)
        _free(device)
        row.update(env)
        row.update(peaks)
        rows.append(row)
        status = "; ".join(filter(None, [f"{row['ms']:.4g} ms" if "ms" in row else "", row.get("error")]))
        print(f"  {case.op} {case.shape} {case.dtype} {case.layout} {case.backend} {case.mode}: {status}",
              file=sys.stderr, flush=True)
    return rows


def append_rows(rows: Iterable[Dict[str, object]], path: Path = RESULTS) -> None:
    """Append rows as JSON lines (for real runs only), creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")


def load_rows(path: Path = RESULTS) -> List[Dict[str, object]]:
    """Every row of a results file, oldest first."""
    with Path(path).open() as f:
        return [json.loads(line) for line in f if line.strip()]


def _num(v: Optional[float], fmt: str = "{:#.3g}") -> str:
    if v is None:
        return "-"
    return f"{v:,.0f}" if abs(v) >= 100 else fmt.format(v)


def markdown_table(rows: Sequence[Dict[str, object]]) -> str:
    """A compact markdown table of rows, followed by the baselines' names."""
    head = ["op", "shape", "dtype", "layout", "backend", "mode", "ms", "GB/s", "%peak BW",
            "baseline ms", "speedup", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "ms" not in r:
            cells = (["skipped", "-", "-", "-", "-", r["skipped"]] if "skipped" in r
                     else ["error", "-", "-", "-", "-", r["error"]])
        else:
            s = r.get("speedup")
            speedup = "-" if s is None else f"{s:.2f}x" if s >= 0.1 else f"{s:.2g}x"
            cells = [_num(r["ms"]), _num(r["gbps"]), "in cache" if r.get("in_cache") else _num(r.get("pct_peak_bw"), "{:.1f}"),
                     _num(r.get("baseline_ms")), speedup, r.get("error") or r.get("note") or ""]
        fixed = [r["op"], r["shape"], r["dtype"], r["layout"], r["backend"], r["mode"]]
        lines.append("| " + " | ".join(str(c).replace("|", "/") for c in fixed + cells) + " |")
    baselines = sorted({(r["op"], r["baseline"]) for r in rows if r.get("baseline")})
    if baselines:
        lines.append("")
        lines.append("Baselines: " + "; ".join(f"{op}: {name}" for op, name in baselines) + ".")
    return "\n".join(lines)


def plot_rows(rows: Sequence[Dict[str, object]], out_png: Path) -> bool:
    """Horizontal bar chart of each row's speedup over its baseline; False if matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plot: matplotlib is not installed (pip install matplotlib, or the osp[plot] extra); no plot drawn",
              file=sys.stderr)
        return False
    rows = [r for r in rows if r.get("speedup") is not None]
    if not rows:
        print("plot: no rows with a speedup to draw", file=sys.stderr)
        return False
    labels = [f"{r['op']} {r['shape']} {r['dtype']} {r['layout']} {r['backend']} {r['mode']}" for r in rows]
    speedups = [r["speedup"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 1.5 + 0.3 * len(rows)))
    ax.barh(range(len(rows)), speedups, color=["tab:green" if s >= 1 else "tab:red" for s in speedups])
    ax.axvline(1.0, color="black", linewidth=0.8)
    if max(speedups) / max(min(speedups), 1e-12) > 100:  # interpreter rows sit orders of magnitude below
        ax.set_xscale("log")
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speedup over baseline (baseline ms / ms)")
    first = rows[0]
    interp = " (Triton interpreter: not speed)" if any(r.get("interpreter") for r in rows) else ""
    ax.set_title(f"{first['device']}, rev {first['revision']}{interp}", fontsize=9)
    fig.tight_layout()
    Path(out_png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return True


def plot(path_jsonl: Path, out_png: Path) -> bool:
    """Plot the speedups of the latest revision and device found in a results file (the newest
    row of each case when a case was measured more than once)."""
    rows = load_rows(path_jsonl)
    if not rows:
        print(f"plot: {path_jsonl} holds no rows", file=sys.stderr)
        return False
    last = rows[-1]
    latest: Dict[tuple, Dict[str, object]] = {}
    for r in rows:
        if r.get("revision") == last.get("revision") and r.get("device") == last.get("device"):
            latest[(r["op"], r["shape"], r["dtype"], r["layout"], r["backend"], r["mode"])] = r
    return plot_rows(list(latest.values()), out_png)
