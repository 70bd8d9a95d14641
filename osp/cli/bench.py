"""``osp bench ARGS...``: the benchmark suites of a source checkout, run as ``python -m bench ARGS...``.

The suites live in the checkout's bench/ folder, not in the installed package: this command finds
the checkout (the one this osp was imported from, else the current folder) and runs them there in
a subprocess. Arguments go to ``python -m bench`` (``osp bench --help`` lists them).
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import List, Optional

from . import UsageError

# The folder that holds this osp package: a source checkout's root when osp runs from one.
PACKAGE_PARENT = Path(__file__).resolve().parents[2]


def register(subparsers) -> None:
    p = subparsers.add_parser("bench", help="the benchmark suites of a source checkout (arguments go to python -m bench)",
                              description=__doc__, add_help=False)
    p.set_defaults(run=run, passthrough=True)


def _is_checkout(root: Path) -> bool:
    return (root / "bench" / "__main__.py").is_file() and (root / "osp" / "__init__.py").is_file()


def checkout() -> Optional[Path]:
    """The source checkout whose bench/ suites to run: this osp's own, else the current folder; None
    when neither is one (an installed osp)."""
    for root in (PACKAGE_PARENT, Path.cwd()):
        if _is_checkout(root):
            return root
    return None


def not_in_checkout() -> str:
    return (f"the benchmark suites are in a source checkout's bench/ folder, and neither this osp's folder "
            f"({PACKAGE_PARENT}) nor the current one ({Path.cwd()}) is a checkout; run it from the repository root")


def run_suites(argv: List[str]) -> int:
    """``python -m bench *argv`` in the checkout; its exit code. Raises UsageError outside a checkout."""
    root = checkout()
    if root is None:
        raise UsageError(not_in_checkout())
    sys.stdout.flush()  # our output before the child's
    return subprocess.run([sys.executable, "-m", "bench", *argv], cwd=root).returncode


def run(args) -> int:
    return run_suites(args.rest)
