"""``python -m bench``: run the benchmark suites bench/bench_<op>.py and report them.

Usage: python -m bench [--ops group_norm,...] [--quick] [--interpret] [--threads N] [--no-save]
                       [--results PATH] [--plot PNG] [--markdown PATH]

The device is CUDA when available, else CPU. On CPU the Triton rows run only with --interpret,
through Triton's interpreter: they check that the kernels run, not how fast. Rows are appended to bench/results/results.jsonl unless --no-save.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import List, Optional

BENCH_DIR = Path(__file__).resolve().parent
CPU_NOTE = "CPU run: Triton rows run in the interpreter and are not speed; GPU speed claims need a GPU run."


def available_ops() -> List[str]:
    """Op names of the suites found next to this file (bench_<op>.py)."""
    return sorted(p.stem[len("bench_"):] for p in BENCH_DIR.glob("bench_*.py"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description="Run the benchmark suites bench/bench_<op>.py and report them.")
    p.add_argument("--ops", help=f"comma list of ops to run (default: all of {', '.join(available_ops())})")
    p.add_argument("--quick", action="store_true", help="a few cases per op (the first shape)")
    p.add_argument("--interpret", action="store_true",
                   help="on CPU, set TRITON_INTERPRET=1 and run the Triton rows through the interpreter")
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (default: torch's own); 1 keeps CPU timings steady on a busy machine")
    p.add_argument("--no-save", action="store_true", help="do not append the rows to the results file")
    p.add_argument("--results", type=Path, default=None,
                   help="results file to append to (default: bench/results/results.jsonl)")
    p.add_argument("--plot", type=Path, metavar="PNG", help="draw this run's speedups into PNG (needs matplotlib)")
    p.add_argument("--markdown", type=Path, metavar="PATH", help="also write the markdown table to PATH")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run the suites; 0 when every case ran, 1 when some failed, 2 on a bad request."""
    args = _parser().parse_args(argv)
    known = available_ops()
    ops = [o.strip() for o in args.ops.split(",") if o.strip()] if args.ops else known
    unknown = [o for o in ops if o not in known]
    if unknown:
        print(f"error: unknown op(s) {', '.join(unknown)}; expected some of {', '.join(known)}", file=sys.stderr)
        return 2

    import torch

    if args.threads is not None:
        if args.threads < 1:
            print(f"error: --threads {args.threads}; expected a positive int", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.interpret and device == "cpu":
        # The interpreter is chosen when triton is imported, so it must be set before any import.
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            print("error: triton is already imported, too late for --interpret; "
                  "set TRITON_INTERPRET=1 in the environment instead", file=sys.stderr)
            return 2
        os.environ["TRITON_INTERPRET"] = "1"
    elif args.interpret:
        print("--interpret ignored: on a GPU Triton runs compiled", file=sys.stderr)

    from . import harness

    env = harness.environment(device)
    print(f"osp bench on {device}: {env['device']}")
    print(f"torch {env['torch']}, triton {env['triton']}, revision {env['revision']}, {env['timestamp']}, "
          f"TRITON_INTERPRET={int(env['interpreter'])}, load {env['loadavg_1m']}")
    peaks = harness.measure_peaks(device)
    llc = peaks["llc_bytes"]
    cache = "" if device == "cuda" else (
        f"; last-level cache {llc / 2**20:.0f} MiB, rows whose working set fits in it say 'in cache'" if llc
        else "; last-level cache size unknown")
    print(f"peaks measured now: copy {peaks['copy_gbps']:.1f} GB/s (read + write, {peaks['copy_bytes'] / 2**20:.0f} MiB"
          f"{cache}), matmul {peaks['matmul_tflops']:.2f} TFLOP/s ({'bf16' if device == 'cuda' else 'fp32'})")
    if device == "cpu":
        print(CPU_NOTE)
        if not args.interpret:
            print("Triton rows skipped: add --interpret to run them through the interpreter.")
    sys.stdout.flush()  # the header before the per-case progress on stderr

    rows, failed = [], False
    for op in ops:
        print(f"{op}:", file=sys.stderr, flush=True)
        try:
            cases = importlib.import_module(f"{__package__}.bench_{op}").cases(device, args.quick)
            if device == "cpu" and not args.interpret:  # even where TRITON_INTERPRET=1 is already set
                cases = [c for c in cases if c.backend.split("-")[0] != "triton"]  # triton, triton-unfused
        except Exception as exc:  # a broken suite must not hide the others
            print(f"  error: suite {op} could not build its cases: {type(exc).__name__}: {exc}", file=sys.stderr)
            failed = True
            continue
        rows += harness.run_cases(cases, device, peaks, env)
        del cases  # the inputs of this suite
    failed = failed or any("error" in r for r in rows)

    table = harness.markdown_table(rows)
    print()
    print(table)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(table + "\n")
        print(f"markdown table written to {args.markdown}")
    if not args.no_save and rows:
        path = args.results or harness.RESULTS
        harness.append_rows(rows, path)
        print(f"{len(rows)} rows appended to {path}")
    if args.plot and harness.plot_rows(rows, args.plot):
        print(f"plot written to {args.plot}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
