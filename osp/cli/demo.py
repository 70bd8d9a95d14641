"""``osp demo`` (``make demo``): what osp does on this machine, with no downloads.

1. ``osp info``; 2. every op on every backend that can run here against its float64 reference,
forward and gradients, as a pass/fail table (on CPU the Triton kernels run in the interpreter);
3. a small CausalVideoVAE reconstructing a generated clip on every backend; 4. tiled decoding in
each mode against the untiled decode; 5. a quick benchmark (from a source checkout only).
"""
from __future__ import annotations

import os
import sys
import time

import torch


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="info, parity of every op and backend, the VAE, tiling, a quick benchmark",
                              description=__doc__)
    p.add_argument("--no-bench", action="store_true", help="skip the quick benchmark")
    p.set_defaults(run=run)


def run(args) -> int:
    return demo(bench=not args.no_bench)


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


def parity_table(device: str) -> bool:
    """The shared op cases (osp.testing.op_cases) on every fast backend and dtype that can run here."""
    from osp import ops
    from osp.testing.op_cases import CASES

    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    registry = ops.registered_ops()
    print(f"\n## Parity against the float64 reference on {device}\n")
    print("Each fast backend is held to: max|err| <= 2 x (torch's own error in that dtype) + a small floor.\n")
    print("| op | backend | dtype | case | output | max abs err | torch's err | bound | rel err | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for op_name, cases in CASES.items():
        op = registry.get(op_name)
        if op is None:
            print(f"| {op_name} | - | - | - | - | - | - | - | - | not run: no op of this name is registered |")
            all_ok = False
            continue
        for backend, b in op.backends.items():
            if backend == "torch":  # the eager torch path sets the bound; it is not checked against itself
                continue
            for dtype in dtypes:
                args, kwargs = op.probe(device, dtype)
                reason = b.why_not(*args, forced=True, **kwargs)
                dname = str(dtype).replace("torch.", "")
                if reason:
                    print(f"| {op_name} | {backend} | {dname} | - | - | - | - | - | - | not run: {reason} |")
                    continue
                for case in cases:
                    for out_name, p in case.check(backend, dtype, device):
                        all_ok &= p.ok
                        print(f"| {op_name} | {backend} | {dname} | {case.name} | {out_name} | {p.err:.2e} "
                              f"| {p.torch_err:.2e} | {p.bound:.2e} | {p.rel:.1e} | {'PASS' if p.ok else 'FAIL'} |")
    uncovered = [name for name in registry if name not in CASES]
    if uncovered:
        print(f"\nNo demo case for {', '.join(uncovered)}: the test suite covers {'them' if len(uncovered) > 1 else 'it'}.")
    return all_ok


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
        print(f"\n## VAE\n\nskipped: {exc}")
        return True
    frames, size = (17, 64) if device == "cuda" else (5, 16)
    torch.manual_seed(0)
    # Random weights (no downloads); CausalVideoVAE.from_pretrained loads upstream's release instead.
    vae = CausalVideoVAE(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1).to(device).eval()
    clip = _moving_pattern(frames, size, device)
    print(f"\n## VAE: reconstruct a {frames}x{size}x{size} generated clip (4x8x8 compression, random weights)\n")
    with torch.no_grad():
        ref = vae.double().decode(vae.encode(clip.double()).latent_dist.mode()).sample
        vae.float()
    print("| backend | latent | seconds | max abs diff vs float64 | rel diff | result |")
    print("|---|---|---|---|---|---|")
    ok = True
    conv = ops.registered_ops()["causal_conv3d"]  # the VAE's main op decides whether a backend can run
    args, kwargs = conv.probe(device, torch.float32)
    for backend in ("torch", "triton"):
        reason = conv.backends[backend].why_not(*args, forced=True, **kwargs)
        if reason:
            print(f"| {backend} | - | - | - | - | not run: {reason} |")
            continue
        start = time.perf_counter()
        with torch.no_grad(), ops.use_backend(backend):
            z = vae.encode(clip).latent_dist.mode()
            rec = vae.decode(z).sample
        seconds = time.perf_counter() - start
        err = (rec.double() - ref).abs().max().item()
        rel = ((rec.double() - ref).norm() / ref.norm()).item()
        good = rel < 1e-4  # fp32 through ~20 layers lands near 1e-6
        ok &= good
        note = " (interpreter)" if device == "cpu" and backend == "triton" else ""
        print(f"| {backend}{note} | {tuple(z.shape)} | {seconds:.1f} | {err:.2e} | {rel:.1e} | "
              f"{'PASS' if good else 'FAIL'} |")
    return ok


def tiling_section(device: str) -> None:
    """Tiled decoding: peak memory tiled vs untiled as the clip grows, then the seam PSNR of each mode."""
    try:
        import osp.models  # noqa: F401  (the VAE needs the models' optional dependencies)
        from osp.testing import vae_tiling as vt
    except ImportError as exc:
        print(f"\n## Tiled decoding\n\nskipped: {exc}")
        return
    # The CPU grid and model keep the demo short, on a GPU too; seams on a smaller clip than the bench's.
    spec = dict(vt.CPU, dtype=torch.bfloat16 if device == "cuda" else torch.float32, seam=(9, 128, 128), seam_tile=64)
    vae = vt.model(spec, device)
    print(f"\n## Tiled decoding (random-weight small VAE, {spec['tile']}-px tiles x {spec['frames']} frames)\n")
    where = "CUDA max allocated" if device == "cuda" else "peak RSS of a fresh process per decode"
    print(f"Peak memory of one decode ({where}), MiB; 'beyond' excludes the output itself. "
          "Work: latent positions decoded / latent positions (the overlap's recomputation).\n")
    print("| clip | output | untiled peak | untiled beyond | tiled peak | tiled beyond | work |")
    print("|---|---|---|---|---|---|---|")
    for clip in spec["memory"][:4]:
        out_mib = vt.output_mib(spec, clip)
        peaks = [vt.peak_mib(vae, spec, clip, v, device)[0] for v in ("untiled", "stream-tile")]
        cells = [f"{p:.0f} | {p - out_mib:.0f}" if p is not None else "out of memory | -" for p in peaks]
        work = vt.work_factor(vae, spec, vt.latent(vae, spec, clip, device), "stream-tile")
        print(f"| {vt.clip_name(clip)} | {out_mib:.1f} | {cells[0]} | {cells[1]} | {work:.2f}x |")
    clip, spec = spec["seam"], vt.seam_spec(spec)
    z = vt.latent(vae, spec, clip, device)
    print(f"\nSeams on a {vt.clip_name(clip)} clip in {spec['tile']}-px tiles: each mode against the untiled decode "
          "(PSNR on [-1, 1]; random weights make every PSNR low, compare the modes).\n")
    print("| mode | norm | time (s) | PSNR vs untiled (dB) | GroupNorm statistics off by (% of std) |")
    print("|---|---|---|---|---|")
    ref = ref_stats = None
    for variant in ["untiled"] + list(vt.VARIANTS):
        start = time.perf_counter()
        y, stats = vt.decode_recording(vae, spec, z, variant)  # the hooks cost little next to the decode
        seconds = time.perf_counter() - start
        y = y.float().cpu()
        if ref is None:
            ref, ref_stats = y, stats
        v = vt.VARIANTS.get(variant, dict(mode="untiled", norm="-"))
        psnr = "-" if variant == "untiled" else f"{vt.psnr(y, ref):.1f}"
        off = "-" if variant == "untiled" else f"{100 * vt.norm_stats_error(ref_stats, stats):.2f}"
        print(f"| {v['mode']} | {v['norm']} | {seconds:.1f} | {psnr} | {off} |")


def quick_bench(device: str) -> int:
    """``python -m bench --quick --no-save`` in the source checkout; skipped (0) outside one."""
    from .bench import checkout, not_in_checkout, run_suites

    print("\n## Quick benchmark\n")
    if checkout() is None:
        print(f"skipped: {not_in_checkout()}")
        return 0
    # On CPU, interpreter timings say nothing: time the torch paths against upstream-style ones,
    # on one thread (oneDNN's threads collapse when other processes share the cores).
    args = ["--quick", "--no-save"] + ([] if device == "cuda" else
                                       ["--ops", "group_norm,causal_conv3d,vae", "--threads", "1"])
    return run_suites(args)


def demo(bench: bool = True) -> int:
    """Print the demo's sections; 0 when every check passed (and the benchmark ran), else 1."""
    use_interpreter_on_cpu()  # before the first import of triton, which info's probes may cause
    from .info import info

    device = _device()
    print("# osp demo\n")
    print(info())
    ok = parity_table(device)
    print(f"\nparity: {'all PASS' if ok else 'FAILURES above'}")
    ok &= vae_section(device)
    tiling_section(device)
    rc = 0 if ok else 1
    if bench:
        rc = max(rc, min(quick_bench(device), 1))
    return rc
