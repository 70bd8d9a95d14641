"""``osp demo`` (``make demo``): what osp does on this machine, with no downloads.

1. ``osp info``; 2. every op on every backend that can run here against its float64 reference,
forward and gradients, as a pass/fail table (on CPU the Triton kernels run in the interpreter);
3. a small CausalVideoVAE reconstructing a generated clip on every backend; 4. tiled decoding in
each mode against the untiled decode; 5. a quick benchmark.
"""
from __future__ import annotations

import os
import sys
from typing import Callable, Dict, List

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: on CPU the kernels can only run in the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402

from osp import ops  # noqa: E402
from osp.cli import info  # noqa: E402
from osp.testing import parity  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(case: str, run: Callable, torch_fn: Callable, tensors: Dict[str, torch.Tensor]) -> List[tuple]:
    """Parity rows for the output and every input gradient of ``run(*tensors)``.

    ``torch_fn`` is the plain PyTorch formula: evaluated in the tested dtype it sets the tolerance,
    evaluated on float64 copies it is the reference.
    """
    names = list(tensors)
    leaves = [t.detach().requires_grad_(True) for t in tensors.values()]
    out = run(*leaves)
    dy = torch.randn(out.shape, device=out.device).to(out.dtype)
    torch_out = torch_fn(*leaves)
    leaves64 = [t.detach().double().requires_grad_(True) for t in leaves]
    ref = torch_fn(*leaves64)
    rows = [(case, "out", parity(out, ref.detach(), torch_out))]
    grads = torch.autograd.grad(out, leaves, dy)
    torch_grads = torch.autograd.grad(torch_out, leaves, dy)
    ref_grads = torch.autograd.grad(ref, leaves64, dy.double())
    for name, g, tg, rg in zip(names, grads, torch_grads, ref_grads):
        rows.append((case, f"d{name}", parity(g, rg, tg)))
    return rows


def _randn(*shape, dtype, scale=1.0, shift=0.0):
    return (torch.randn(shape, device=DEVICE) * scale + shift).to(dtype)


def check_group_norm(backend: str, dtype: torch.dtype) -> List[tuple]:
    """GroupNorm+SiLU on a small VAE-like clip, channels_last_3d; grads of x, weight, bias."""
    x = _randn(2, 64, 5, 12, 10, dtype=dtype, scale=2, shift=1).to(memory_format=torch.channels_last_3d)
    return _rows("2x64x5x12x10 G=32 silu ndhwc",
                 lambda x, w, b: ops.group_norm(x, 32, w, b, 1e-6, act="silu", backend=backend),
                 lambda x, w, b: F.silu(F.group_norm(x, 32, w, b, 1e-6)),
                 dict(x=x, weight=_randn(64, dtype=dtype), bias=_randn(64, dtype=dtype)))


def check_causal_conv3d(backend: str, dtype: torch.dtype) -> List[tuple]:
    """k=3 causal conv with spatial padding 1 and a residual; grads of x, weight, bias, residual."""
    def upstream(x, w, b, r):  # replicate the first frame kt-1 times, then conv3d
        x = torch.cat([x[:, :, :1]] * 2 + [x], dim=2)
        return F.conv3d(x, w, b, padding=(0, 1, 1)) + r

    x = _randn(1, 8, 5, 9, 7, dtype=dtype).to(memory_format=torch.channels_last_3d)
    return _rows("1x8->12x5x9x7 k3 p1 +residual ndhwc",
                 lambda x, w, b, r: ops.causal_conv3d(x, w, b, padding=1, residual=r, backend=backend), upstream,
                 dict(x=x, weight=_randn(12, 8, 3, 3, 3, dtype=dtype, scale=0.2), bias=_randn(12, dtype=dtype),
                      residual=_randn(1, 12, 5, 9, 7, dtype=dtype)))


def check_attention(backend: str, dtype: torch.dtype) -> List[tuple]:
    """Cross-attention with a key padding mask, head dim 72; grads of q, k, v."""
    mask = torch.ones(2, 19, dtype=torch.bool, device=DEVICE)
    mask[0, 11:] = False

    def plain(q, k, v):
        logits = (q @ k.transpose(-1, -2)) / 72 ** 0.5
        return logits.masked_fill(~mask[:, None, None, :], float("-inf")).softmax(-1) @ v

    return _rows("q 2x2x24x72, kv 19 masked", lambda q, k, v: ops.attention(q, k, v, key_padding_mask=mask,
                                                                          backend=backend),
                 plain, dict(q=_randn(2, 2, 24, 72, dtype=dtype), k=_randn(2, 2, 19, 72, dtype=dtype),
                             v=_randn(2, 2, 19, 72, dtype=dtype)))


def check_layer_norm_modulate(backend: str, dtype: torch.dtype) -> List[tuple]:
    """LN + adaLN modulation, one (shift, scale) row per batch entry; grads of x, shift, scale."""
    return _rows("x 4x17x72, mods 4x1x72",
                 lambda x, sh, sc: ops.layer_norm_modulate(x, sh, sc, backend=backend),
                 lambda x, sh, sc: F.layer_norm(x, (72,), eps=1e-6) * (1 + sc) + sh,
                 dict(x=_randn(4, 17, 72, dtype=dtype, scale=2), shift=_randn(4, 1, 72, dtype=dtype, scale=0.5),
                      scale=_randn(4, 1, 72, dtype=dtype, scale=0.5)))


def check_gated_residual(backend: str, dtype: torch.dtype) -> List[tuple]:
    """x + gate * y; grads of x, gate, y."""
    return _rows("x 4x17x72, gate 4x1x72", lambda x, g, y: ops.gated_residual(x, g, y, backend=backend),
                 lambda x, g, y: x + g * y,
                 dict(x=_randn(4, 17, 72, dtype=dtype), gate=_randn(4, 1, 72, dtype=dtype),
                      y=_randn(4, 17, 72, dtype=dtype)))


# Per op: check(backend, dtype) -> [(case, output name, Parity)].
CHECKS: Dict[str, Callable[[str, torch.dtype], List[tuple]]] = {
    "group_norm": check_group_norm,
    "causal_conv3d": check_causal_conv3d,
    "attention": check_attention,
    "layer_norm_modulate": check_layer_norm_modulate,
    "gated_residual": check_gated_residual,
}


def parity_table() -> bool:
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE == "cuda" else [])
    registry = ops.registered_ops()
    print(f"\n## Parity against the float64 reference on {DEVICE}\n")
    print("Each fast backend is held to: max|err| <= 2 x (torch's own error in that dtype) + a small floor.\n")
    print("| op | backend | dtype | case | output | max abs err | torch's err | bound | rel err | result |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    all_ok = True
    for op_name, check in CHECKS.items():
        op = registry[op_name]
        for backend, b in op.backends.items():
            if backend == "torch":  # the eager torch path sets the bound; it is not checked against itself
                continue
            for dtype in dtypes:
                args, kwargs = op.probe(DEVICE, dtype)
                reason = b.why_not(*args, forced=True, **kwargs)
                dname = str(dtype).replace("torch.", "")
                if reason:
                    print(f"| {op_name} | {backend} | {dname} | - | - | - | - | - | - | not run: {reason} |")
                    continue
                for case, out_name, p in check(backend, dtype):
                    all_ok &= p.ok
                    print(f"| {op_name} | {backend} | {dname} | {case} | {out_name} | {p.err:.2e} | {p.torch_err:.2e} "
                          f"| {p.bound:.2e}"
                          f" | {p.rel:.1e} | {'PASS' if p.ok else 'FAIL'} |")
    return all_ok


def _moving_pattern(frames: int, size: int) -> torch.Tensor:
    """A (1, 3, frames, size, size) clip in [-1, 1] whose stripes drift over time."""
    t = torch.linspace(0, 1, frames)[:, None, None]
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing="ij")
    clip = torch.stack([torch.sin(6 * (xx + t)), torch.cos(5 * (yy - t)), torch.sin(4 * xx * yy + 3 * t)])
    return clip[None].to(DEVICE)


def vae_section() -> bool:
    """Reconstruct a generated clip with a small CausalVideoVAE on every backend; they must agree."""
    import time

    try:
        from osp.models import CausalVideoVAE
    except ImportError as exc:
        print(f"\n## VAE\n\nskipped: {exc}")
        return True
    frames, size = (17, 64) if DEVICE == "cuda" else (5, 16)
    torch.manual_seed(0)
    # Random weights (no downloads); CausalVideoVAE.from_pretrained loads upstream's release instead.
    vae = CausalVideoVAE(hidden_size=32, hidden_size_mult=[1, 1, 2, 2], num_res_blocks=1).to(DEVICE).eval()
    clip = _moving_pattern(frames, size)
    print(f"\n## VAE: reconstruct a {frames}x{size}x{size} generated clip (4x8x8 compression, random weights)\n")
    with torch.no_grad():
        ref = vae.double().decode(vae.encode(clip.double()).latent_dist.mode()).sample
        vae.float()
    print("| backend | latent | seconds | max abs diff vs float64 | rel diff | result |")
    print("|---|---|---|---|---|---|")
    ok = True
    conv = ops.registered_ops()["causal_conv3d"]  # the VAE's main op decides whether a backend can run
    args, kwargs = conv.probe(DEVICE, torch.float32)
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
        note = " (interpreter)" if DEVICE == "cpu" and backend == "triton" else ""
        print(f"| {backend}{note} | {tuple(z.shape)} | {seconds:.1f} | {err:.2e} | {rel:.1e} | "
              f"{'PASS' if good else 'FAIL'} |")
    return ok


def _bench_suite(name: str):
    """A benchmark suite module of the source checkout (bench/ is not installed), or None."""
    import importlib
    import sys
    from pathlib import Path

    for root in (Path.cwd(), Path(__file__).resolve().parents[1]):
        if (root / "bench" / "__main__.py").exists():
            if str(root) not in sys.path:
                sys.path.insert(0, str(root))
            return importlib.import_module(f"bench.{name}")
    return None


def tiling_section() -> None:
    """Tiled decoding: peak memory tiled vs untiled as the clip grows, then the seam PSNR of each mode."""
    import time

    b = _bench_suite("bench_vae_tiling")
    if b is None:
        print("\n(tiled decoding section skipped: run from a source checkout, which has bench/)")
        return
    # The CPU grid and model keep the demo short, on a GPU too; seams on a smaller clip than the bench's.
    spec = dict(b.CPU, dtype=torch.bfloat16 if DEVICE == "cuda" else torch.float32, seam=(9, 128, 128), seam_tile=64)
    vae = b.model(spec, DEVICE)
    print(f"\n## Tiled decoding (random-weight small VAE, {spec['tile']}-px tiles x {spec['frames']} frames)\n")
    where = "CUDA max allocated" if DEVICE == "cuda" else "peak RSS of a fresh process per decode"
    print(f"Peak memory of one decode ({where}), MiB; 'beyond' excludes the output itself. "
          "Work: latent positions decoded / latent positions (the overlap's recomputation).\n")
    print("| clip | output | untiled peak | untiled beyond | tiled peak | tiled beyond | work |")
    print("|---|---|---|---|---|---|---|")
    for clip in spec["memory"][:4]:
        out_mib = 3 * clip[0] * clip[1] * clip[2] * torch.finfo(spec["dtype"]).bits / 8 / 2**20
        peaks = [b.peak_mib(vae, spec, clip, v, DEVICE)[0] for v in ("untiled", "stream-tile")]
        cells = [f"{p:.0f} | {p - out_mib:.0f}" if p is not None else "out of memory | -" for p in peaks]
        work = b.work_factor(vae, spec, b.latent(vae, spec, clip, DEVICE), "stream-tile")
        print(f"| {b.clip_name(clip)} | {out_mib:.1f} | {cells[0]} | {cells[1]} | {work:.2f}x |")
    clip, spec = spec["seam"], b.seam_spec(spec)
    z = b.latent(vae, spec, clip, DEVICE)
    print(f"\nSeams on a {b.clip_name(clip)} clip in {spec['tile']}-px tiles: each mode against the untiled decode "
          "(PSNR on [-1, 1]; random weights make every PSNR low, compare the modes).\n")
    print("| mode | norm | time (s) | PSNR vs untiled (dB) | GroupNorm statistics off by (% of std) |")
    print("|---|---|---|---|---|")
    ref = ref_stats = None
    for variant in ["untiled"] + list(b.VARIANTS):
        start = time.perf_counter()
        y, stats = b.decode_recording(vae, spec, z, variant)  # the hooks cost little next to the decode
        seconds = time.perf_counter() - start
        y = y.float().cpu()
        if ref is None:
            ref, ref_stats = y, stats
        v = b.VARIANTS.get(variant, dict(mode="untiled", norm="-"))
        psnr = "-" if variant == "untiled" else f"{b.psnr(y, ref):.1f}"
        off = "-" if variant == "untiled" else f"{100 * b.norm_stats_error(ref_stats, stats):.2f}"
        print(f"| {v['mode']} | {v['norm']} | {seconds:.1f} | {psnr} | {off} |")


def run(bench: bool = True) -> int:
    print("# osp demo\n")
    print(info())
    ok = parity_table()
    print(f"\nparity: {'all PASS' if ok else 'FAILURES above'}")
    ok &= vae_section()
    tiling_section()
    rc = 0 if ok else 1
    if bench:
        from osp.cli import _bench_main

        print("\n## Quick benchmark\n")
        # On CPU, interpreter timings say nothing: time the torch paths against upstream-style ones,
        # on one thread (oneDNN's threads collapse when other processes share the cores).
        args = ["--quick", "--no-save"] + ([] if DEVICE == "cuda" else
                                           ["--ops", "group_norm,causal_conv3d,vae", "--threads", "1"])
        rc = max(rc, _bench_main(args))
    return rc


if __name__ == "__main__":
    sys.exit(run())
