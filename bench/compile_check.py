"""Compile every Triton kernel for a GPU target without a GPU (``python -m bench.compile_check``).

The interpreter that runs the CPU tests checks arithmetic, not what the compiler rejects (loop-
carried type changes, int arguments equal to 1 that Triton turns into constants, dot shapes).
This compiles each kernel to a cubin for sm_90 with the installed triton and its ptxas, in bf16,
fp16 and fp32; ``--ones`` also recompiles (bf16) with each int argument specialized to 1, as a
launch with that value would. Exit code 1 when anything fails.

    python -m bench.compile_check [gn cc at mod tb] [--ones] [--dtypes bf16,fp16,fp32] [--arch 90]
    python -m bench.compile_check --nvcc [--arch 90]

``--nvcc`` instead compiles the compiled extension's CUDA kernels (csrc/**/*_cuda.cu, free of ATen)
with nvcc for the same target: nvcc from the CUDA toolkit or from pip wheels (nvidia-cuda-nvcc), found
on PATH, in $CUDA_HOME/bin or as $NVCC.
"""
from __future__ import annotations

import argparse
import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

FLOATS = {"eps", "qk_scale", "sm_scale"}


def _signature(fn, ptrs, consts):
    return {n: "constexpr" if n in consts else ptrs.get(n, "fp32" if n in FLOATS else "i32") for n in fn.arg_names}


def _compile(fn, ptrs, consts, target, one=None):
    consts = dict(consts)
    sig = _signature(fn, ptrs, consts)
    if one is not None:
        sig[one], consts[one] = "constexpr", 1
    try:
        triton.compile(ASTSource(fn, sig, consts), target=target)
        return None
    except Exception as exc:  # report and go on: the point is the list of failures
        cause = exc.__cause__ or exc.__context__ or exc
        return repr(cause)[-300:]


def kernels(dt: str, which):
    """(label, jit function, pointer types, constexprs) for every kernel in ``which``."""
    p = "*" + dt
    k = lambda name: importlib.import_module(f"osp.kernels.{name}")  # noqa: E731
    if "gn" in which:
        gn = k("group_norm")
        blocks = dict(BLOCK_S=64, BLOCK_G=1, BLOCK_CG=4)
        flags = dict(HAS_W=True, HAS_B=True, ACT=1)
        yield "gn_stats", gn._gn_stats_kernel, {"X": p, "PART": "*fp32"}, blocks
        yield "gn_apply", gn._gn_apply_kernel, {"X": p, "Y": p, "W": p, "B": p, "PART": "*fp32", "MEAN": "*fp32",
                                                "RSTD": "*fp32"}, dict(blocks, **flags, BLOCK_P=16)
        yield "gn_bwd_reduce", gn._gn_bwd_reduce_kernel, {"X": p, "DY": p, "W": p, "B": p, "MEAN": "*fp32",
                                                          "RSTD": "*fp32", "PDZ": "*fp32", "PDZX": "*fp32"}, dict(blocks, **flags)
        yield "gn_bwd_dx", gn._gn_bwd_dx_kernel, {"X": p, "DY": p, "DX": p, "W": p, "B": p, "MEAN": "*fp32",
                                                  "RSTD": "*fp32", "GA": "*fp32", "GB": "*fp32"}, dict(blocks, **flags)
    if "cc" in which:
        cc = k("causal_conv3d")
        base = dict(KT=3, KH=3, KW=3, UPCAST=False, IEEE=(dt == "fp32"))
        yield "cc_fwd", cc._fwd_kernel, {"X": p, "WT": p, "B": p, "R": p, "Y": p}, dict(
            base, HAS_BIAS=True, HAS_RES=True, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)
        yield "cc_dx", cc._dx_kernel, {"DY": p, "WT": p, "DX": p}, dict(base, BLOCK_M=128, BLOCK_N=64, BLOCK_K=32)
        yield "cc_dw", cc._dw_kernel, {"X": p, "DY": p, "PART": "*fp32"}, dict(base, BLOCK_CO=64, BLOCK_CI=64, BLOCK_P=64)
    if "at" in which:
        at = k("attention")
        c = dict(HAS_MASK=True, BLOCK_M=64, BLOCK_N=32, BLOCK_D0=64, BLOCK_D1=16, HAS_D1=True, UPCAST=False,
                 DOT_PREC="ieee" if dt == "fp32" else "tf32", OFF64=False)
        yield "at_fwd", at._attn_fwd_kernel, {"Q": p, "K": p, "V": p, "O": p, "LSE": "*fp32", "MASK": "*u8"}, c
        yield "at_delta", at._attn_bwd_delta_kernel, {"O": p, "DO": p, "DELTA": "*fp32"}, dict(
            BLOCK_M=64, BLOCK_D=128, OFF64=False)
        stats = {"LSE": "*fp32", "DELTA": "*fp32", "MASK": "*u8"}
        yield "at_dkdv", at._attn_bwd_dkdv_kernel, {**{n: p for n in "Q K V DO DK DV".split()}, **stats}, c
        yield "at_dq", at._attn_bwd_dq_kernel, {**{n: p for n in "Q K V DO DQ".split()}, **stats}, c
    if "mod" in which:
        md = k("modulation")
        c = dict(BLOCK_R=4, BLOCK_D=2048)
        yield "ln_mod_fwd", md._ln_mod_fwd_kernel, {"X": p, "SHIFT": p, "SCALE": p, "Y": p, "MEAN": "*fp32",
                                                    "RSTD": "*fp32"}, c
        yield "ln_mod_bwd", md._ln_mod_bwd_kernel, {"X": p, "SCALE": p, "DY": p, "MEAN": "*fp32", "RSTD": "*fp32",
                                                    "DX": p, "PSHIFT": "*fp32", "PSCALE": "*fp32"}, c
        yield "gated_fwd", md._gated_fwd_kernel, {"X": p, "GATE": p, "Y": p, "OUT": p}, c
        yield "gated_bwd", md._gated_bwd_kernel, {"DOUT": p, "GATE": p, "Y": p, "DY": p, "PGATE": "*fp32"}, c
    if "tb" in which:
        tb = k("tile_blend")
        yield "blend", tb._blend_kernel, {"OUT": p, "WSUM": "*fp32", "TILE": p}, dict(BLOCK_H=4, BLOCK_W=512)


def nvcc_path():
    """The nvcc to use, or None: $NVCC, then PATH, then $CUDA_HOME/bin."""
    for candidate in (os.environ.get("NVCC"), shutil.which("nvcc"),
                      os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def nvcc_check(arch: int) -> int:
    """Compile every csrc/**/*_cuda.cu for sm_<arch> with nvcc; the number of failures."""
    nvcc = nvcc_path()
    if nvcc is None:
        print("nvcc not found (set NVCC or CUDA_HOME, or pip install nvidia-cuda-nvcc-cu12)")
        return 1
    failed = 0
    sources = sorted((Path(__file__).resolve().parents[1] / "csrc").rglob("*_cuda.cu"))
    with tempfile.TemporaryDirectory() as tmp:
        for src in sources:
            cmd = [nvcc, "-std=c++17", "-O3", f"-gencode=arch=compute_{arch},code=sm_{arch}", "-Xptxas=-warn-spills",
                   "-Werror=all-warnings", "-c", str(src), "-o", os.path.join(tmp, src.stem + ".o")]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            ok = proc.returncode == 0
            failed += not ok
            print(f"{src.relative_to(src.parents[2])} sm_{arch}: {'ok' if ok else 'FAIL ' + (proc.stderr or proc.stdout)[-2000:]}",
                  flush=True)
    print(f"nvcc check: {len(sources)} file(s), {failed} failure(s)")
    return 1 if failed or not sources else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compile_check", description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="*", default=["gn", "cc", "at", "mod", "tb"])
    parser.add_argument("--ones", action="store_true", help="also specialize each int argument to 1 (bf16)")
    parser.add_argument("--dtypes", default="bf16,fp16,fp32", help="comma list of bf16, fp16, fp32")
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--nvcc", action="store_true", help="compile csrc/**/*_cuda.cu with nvcc instead")
    args = parser.parse_args(argv)
    if args.nvcc:
        return nvcc_check(args.arch)
    target = GPUTarget("cuda", args.arch, 32)
    failed = 0
    for dt in args.dtypes.split(","):
        for label, fn, ptrs, consts in kernels(dt, args.which):
            err = _compile(fn, ptrs, consts, target)
            failed += err is not None
            print(f"{label} {dt}: {'ok' if err is None else 'FAIL ' + err}", flush=True)
            if args.ones and dt == "bf16":
                for name in fn.arg_names:
                    if name in consts or name in ptrs or name in FLOATS:
                        continue
                    err = _compile(fn, ptrs, consts, target, one=name)
                    if err:
                        failed += 1
                        print(f"   {name}=1: FAIL {err}", flush=True)
    print(f"compile check: {failed} failure(s)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
