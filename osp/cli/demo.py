"""``osp demo`` (``make demo``): osp end to end on this machine, in minutes, with nothing downloaded.

1. ``osp info``; 2. every op on every backend that can run here against its float64 reference,
forward and gradients (one summary line per op and backend; the failing rows in full); 3. a small
CausalVideoVAE reconstructing a generated clip on every backend; 4. tiled decoding in each mode
against the untiled decode; 5. training: synthetic captioned clips (osp make-data), a latent cache
(osp cache-latents), a tiny LatteT2V trained from scratch (osp train-t2v, EMA and caption dropout),
mp4 samples (osp sample); 6. a measured check that the model learned the prompt, against the
untrained model; 7. a quick benchmark (from a source checkout; not with --quick or --no-bench).

Everything it writes goes to --output_dir (default ./osp-demo), which it prints. --quick runs
every section tiny (the test suite runs it) and skips the benchmark.
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Dict, List, Optional, Tuple

import torch

from . import UsageError

# Measured wall time of `make demo` on a 2-core x86_64 CPU VM with no GPU (see the closing summary).
BUDGET_FULL = "about 7 minutes"
BUDGET_QUICK = "about 1 minute"


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="osp end to end: ops and their parity, the VAE, tiling, training a tiny "
                                           "text-to-video model and checking it learned, a quick benchmark",
                              description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help="every section tiny (well under a minute on CPU; what the test suite runs); no benchmark")
    p.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    p.add_argument("--output_dir", default="osp-demo",
                   help="folder for everything the demo writes (default ./osp-demo; a previous demo's outputs there "
                        "are replaced, a folder holding other files is refused)")
    p.add_argument("--train_steps", type=int, default=None,
                   help="training steps (default 1500, or 300 with --quick)")
    p.set_defaults(run=run)


def run(args) -> int:
    if args.train_steps is not None and args.train_steps < 1:
        raise UsageError(f"--train_steps {args.train_steps}: expected a positive integer")
    return demo(bench=not args.no_bench and not args.quick, quick=args.quick, output_dir=args.output_dir,
                train_steps=args.train_steps)


def use_interpreter_on_cpu() -> None:
    """Without CUDA the Triton kernels run only in Triton's interpreter, which triton chooses when it
    is first imported: set TRITON_INTERPRET=1 now unless the environment says otherwise."""
    if torch.cuda.is_available() or "TRITON_INTERPRET" in os.environ:
        return
    if "triton" in sys.modules:
        print("osp demo: warning: triton was imported before the demo could set TRITON_INTERPRET=1; "
              "the Triton rows will not run on this CPU (set TRITON_INTERPRET=1 in the environment)",
              file=sys.stderr)
        return
    os.environ["TRITON_INTERPRET"] = "1"


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


# --- 2. parity ------------------------------------------------------------------------------------------


def parity_table(device: str) -> bool:
    """The shared op cases (osp.testing.op_cases) on every fast backend and dtype that can run here:
    one line per op and backend; every row of a failing op and backend."""
    from osp import ops
    from osp.testing.op_cases import CASES

    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    registry = ops.registered_ops()
    print(f"\n## 2. Parity against the float64 reference on {device}\n")
    print("Each fast backend is held to max|err| <= 2 x (torch's own error in that dtype) + a small floor, on the "
          "output and every gradient; worst: the largest err / bound (< 1 passes).\n")
    all_ok = True
    failed_rows: List[str] = []
    for op_name, cases in CASES.items():
        op = registry.get(op_name)
        if op is None:
            print(f"{op_name:22s} not run: no op of this name is registered")
            all_ok = False
            continue
        for backend, b in op.backends.items():
            if backend == "torch":  # the eager torch path sets the bound; it is not checked against itself
                continue
            ran: List[str] = []
            skipped: Dict[str, List[str]] = {}
            checks = passed = 0
            worst = 0.0
            for dtype in dtypes:
                args, kwargs = op.probe(device, dtype)
                reason = b.why_not(*args, forced=True, **kwargs)
                dname = str(dtype).replace("torch.", "")
                if reason:
                    skipped.setdefault(reason, []).append(dname)
                    continue
                ran.append(dname)
                for case in cases:
                    for out_name, p in case.check(backend, dtype, device):
                        checks += 1
                        passed += bool(p.ok)
                        worst = max(worst, p.err / p.bound if p.bound > 0 else float("inf"))
                        if not p.ok:
                            failed_rows.append(f"| {op_name} | {backend} | {dname} | {case.name} | {out_name} | "
                                               f"{p.err:.2e} | {p.torch_err:.2e} | {p.bound:.2e} | {p.rel:.1e} |")
            all_ok &= passed == checks
            parts = []
            if ran:
                parts.append(f"{'PASS' if passed == checks else 'FAIL'} {passed}/{checks} checks "
                             f"({', '.join(ran)}; worst {worst:.2f})")
            parts += [f"not run ({', '.join(d)}): {r}" for r, d in skipped.items()]
            print(f"{op_name:22s} {backend:10s} " + "; ".join(parts))
    if failed_rows:
        print("\nFailing checks:\n")
        print("| op | backend | dtype | case | output | max abs err | torch's err | bound | rel err |")
        print("|---|---|---|---|---|---|---|---|---|")
        print("\n".join(failed_rows))
    uncovered = [name for name in registry if name not in CASES]
    if uncovered:
        them = "them" if len(uncovered) > 1 else "it"
        print(f"\nNo demo case for {', '.join(uncovered)}: the test suite covers {them}.")
    return all_ok


# --- 3. VAE ---------------------------------------------------------------------------------------------


def _moving_pattern(frames: int, size: int, device: str) -> torch.Tensor:
    """A (1, 3, frames, size, size) clip in [-1, 1] whose stripes drift over time."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    clip = torch.stack([torch.sin(6 * (xx + t)), torch.cos(5 * (yy - t)), torch.sin(4 * xx * yy + 3 * t)])
    return clip[None].to(device)


def vae_section(device: str) -> bool:
    """Reconstruct a generated clip with a small CausalVideoVAE on every backend; they must agree."""
    from osp import ops

    try:
        from osp.models import CausalVideoVAE
    except ImportError as exc:
        print(f"\n## 3. VAE\n\nskipped: {exc}")
        return True
    frames, size = (17, 64) if device == "cuda" else (5, 16)
    torch.manual_seed(0)
    # Random weights (no downloads); CausalVideoVAE.from_pretrained loads upstream's release instead.
    vae = CausalVideoVAE(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1).to(device).eval()
    clip = _moving_pattern(frames, size, device)
    print(f"\n## 3. VAE: reconstruct a {frames}x{size}x{size} generated clip on every backend (4x8x8 compression, "
          "random weights)\n")
    with torch.no_grad():
        ref = vae.double().decode(vae.encode(clip.double()).latent_dist.mode()).sample
        vae.float()
    print("| backend | latent | seconds | max abs diff vs float64 | rel diff | result |")
    print("|---|---|---|---|---|---|")
    ok = True
    conv = ops.registered_ops()["causal_conv3d"]  # the VAE's main op decides whether a backend can run
    args, kwargs = conv.probe(device, torch.float32)
    for backend in ("torch", "auto", "triton"):
        # "auto": no backend forced, each op's first usable one (the compiled extension where built)
        reason = None if backend == "auto" else conv.backends[backend].why_not(*args, forced=True, **kwargs)
        if reason:
            print(f"| {backend} | - | - | - | - | not run: {reason} |")
            continue
        start = time.perf_counter()
        forced = contextlib.nullcontext() if backend == "auto" else ops.use_backend(backend)
        with torch.no_grad(), forced:
            z = vae.encode(clip).latent_dist.mode()
            rec = vae.decode(z).sample
        seconds = time.perf_counter() - start
        err = (rec.double() - ref).abs().max().item()
        rel = ((rec.double() - ref).norm() / ref.norm()).item()
        good = rel < 1e-4  # fp32 through ~20 layers lands near 1e-6
        ok &= good
        notes = {"triton": " (interpreter)" if device == "cpu" else "", "auto": " (each op's first usable)"}
        note = notes.get(backend, "")
        print(f"| {backend}{note} | {tuple(z.shape)} | {seconds:.1f} | {err:.2e} | {rel:.1e} | "
              f"{'PASS' if good else 'FAIL'} |")
    return ok


# --- 4. tiling ------------------------------------------------------------------------------------------


def tiling_section(device: str, quick: bool = False) -> None:
    """Tiled decoding: each mode against the untiled decode on one clip (seam PSNR, time, GroupNorm
    statistics), then the peak memory of the untiled and the default tiled decode (not with quick)."""
    try:
        import osp.models  # noqa: F401  (the VAE needs the models' optional dependencies)
        from osp.testing import vae_tiling as vt
    except ImportError as exc:
        print(f"\n## 4. Tiled decoding\n\nskipped: {exc}")
        return
    clip, tile = ((5, 64, 64), 32) if quick else ((9, 128, 128), 64)
    spec = dict(vt.CPU, dtype=torch.bfloat16 if device == "cuda" else torch.float32, seam=clip, seam_tile=tile)
    vae = vt.model(spec, device)
    seam = vt.seam_spec(spec)
    z = vt.latent(vae, seam, clip, device)
    print(f"\n## 4. Tiled decoding: a {vt.clip_name(clip)} clip in {tile}-px tiles, each mode against the untiled "
          "decode\n")
    print("Random-weight small VAE (res blocks damped as in a trained one): every PSNR is low, compare the modes.\n")
    print("| mode | norm | time (s) | PSNR vs untiled (dB) | GroupNorm statistics off by (% of std) |")
    print("|---|---|---|---|---|")
    ref = ref_stats = None
    for variant in ["untiled"] + list(vt.VARIANTS):
        start = time.perf_counter()
        y, stats = vt.decode_recording(vae, seam, z, variant)  # the hooks cost little next to the decode
        seconds = time.perf_counter() - start
        y = y.float().cpu()
        if ref is None:
            ref, ref_stats = y, stats
        v = vt.VARIANTS.get(variant, dict(mode="untiled", norm="-"))
        psnr = "-" if variant == "untiled" else f"{vt.psnr(y, ref):.1f}"
        off = "-" if variant == "untiled" else f"{100 * vt.norm_stats_error(ref_stats, stats):.2f}"
        print(f"| {v['mode']} | {v['norm']} | {seconds:.1f} | {psnr} | {off} |")
    if quick:
        return
    where = "CUDA max allocated" if device == "cuda" else "peak RSS of a fresh process"
    peaks = [vt.peak_mib(vae, spec, clip, v, device)[0] for v in ("untiled", "stream-tile")]
    cells = [f"{p:.0f} MiB" if p is not None else "out of memory" for p in peaks]
    print(f"\nPeak memory of one {vt.clip_name(clip)} decode ({where}; the output itself is "
          f"{vt.output_mib(spec, clip):.1f} MiB): untiled {cells[0]}, tiled in {spec['tile']}-px tiles (stream, tile "
          f"norm) {cells[1]}.")


# --- 7. bench -------------------------------------------------------------------------------------------


def quick_bench(device: str) -> int:
    """``python -m bench --quick --no-save`` in the source checkout; skipped (0) outside one."""
    from .bench import checkout, not_in_checkout, run_suites

    print("\n## 7. Quick benchmark\n")
    if checkout() is None:
        print(f"skipped: {not_in_checkout()}")
        return 0
    # On CPU, interpreter timings say nothing: time the torch paths against upstream-style ones,
    # on one thread (oneDNN's threads collapse when other processes share the cores).
    args = ["--quick", "--no-save"] + ([] if device == "cuda" else
                                       ["--ops", "group_norm,causal_conv3d,vae", "--threads", "1"])
    return run_suites(args)


# --- the demo -------------------------------------------------------------------------------------------


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{int(seconds // 60)} min {seconds % 60:02.0f} s"


def demo(bench: bool = True, quick: bool = False, output_dir: str = "osp-demo",
         train_steps: Optional[int] = None) -> int:
    """Print the demo's sections; 0 when every check passed (and, without quick, the model learned and
    the benchmark ran), else 1."""
    use_interpreter_on_cpu()  # before the first import of triton, which info's probes may cause
    from . import _demo_train as story
    from .info import info

    start = time.perf_counter()
    plan = story.plan_for(quick, train_steps)
    try:
        root = story.prepare_output_dir(output_dir, plan)
    except story.OutputDirError as exc:
        raise UsageError(str(exc)) from None
    device = _device()
    budget = BUDGET_QUICK if quick else BUDGET_FULL
    print("# osp demo" + (" --quick" if quick else "") + "\n")
    print(f"Time budget: {budget} on 2 CPU cores{' (a GPU is faster)' if device == 'cuda' else ''}"
          + ("" if quick else f"; `osp demo --quick` runs every section tiny in {BUDGET_QUICK}") + ". "
          "Nothing is downloaded.")
    print(f"Everything it writes goes to {root} (called $OUT below).")
    print("Sections: 1 info, 2 op parity, 3 VAE on every backend, 4 tiled decoding, 5 training a tiny VAE and a tiny "
          "text-to-video model on its latents (data, VAE, cache, train, sample), 6 did it learn the prompt?"
          + (", 7 quick benchmark" if bench else "") + ".\n")
    times: List[Tuple[str, float]] = []

    def timed(name: str, t0: float) -> float:
        now = time.perf_counter()
        times.append((name, now - t0))
        return now

    t = time.perf_counter()
    print("## 1. osp info\n")
    print(info())
    t = timed("info", t)
    ok = parity_table(device)
    print(f"\nparity: {'all PASS' if ok else 'FAILURES above'}")
    t = timed("parity", t)
    ok &= vae_section(device)
    t = timed("VAE", t)
    tiling_section(device, quick)
    t = timed("tiling", t)
    try:
        record = story.run_training_story(root, plan, torch.device(device))
    except story.StoryError as exc:
        print(f"osp demo: {exc}", file=sys.stderr)
        return 1
    for name, seconds in record["timings"].items():
        times.append((name, seconds))
    t = time.perf_counter()
    rc = 0 if ok else 1
    if not quick and not record["learned"]:
        rc = 1
    if bench:
        rc = max(rc, min(quick_bench(device), 1))
        t = timed("benchmark", t)
    total = time.perf_counter() - start
    print("\n## Summary\n")
    print("time per section: " + ", ".join(f"{name} {_minutes(s)}" for name, s in times)
          + f"; total {_minutes(total)} (budget {budget})")
    vae = record["vae"]
    print(f"parity and VAE: {'all PASS' if ok else 'FAILURES above'}; trained VAE held-out PSNR "
          f"{vae['before']['psnr']:.2f} -> {vae['after']['psnr']:.2f} dB, SSIM {vae['before']['ssim']:.3f} -> "
          f"{vae['after']['ssim']:.3f}; learned-prompt check: {record['verdict']}")
    print(f"outputs in {root}: data/ and heldout/ (clips and captions), vae_init/, vae/ (train-vae's run: model/, "
          f"train_log.jsonl), cache/, untrained/ and train/ (checkpoints, model/, model_ema/, train_log.jsonl), "
          f"samples/ ({len(record['mp4s'])} mp4s), learned_prompt.json")
    story.finish(root, plan, {"seconds": total, "sections": dict(times), "exit_code": rc,
                              "learned": record["learned"], "verdict": record["verdict"]})
    return rc
