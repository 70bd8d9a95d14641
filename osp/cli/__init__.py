"""Command line: ``osp COMMAND ...`` (also ``python -m osp COMMAND ...``).

One module per command in this package, each with ``register(subparsers)``, which adds its parser
and sets ``run=`` (a function of the parsed arguments returning the exit code) and, for a command
that hands its remaining arguments on, ``passthrough=True`` (they arrive as ``args.rest``). A new
command is a new module named in ``COMMANDS``.

A user mistake is one line on stderr naming the value and what was expected, and exit code 2:
a command raises ``UsageError`` (or its parser's ``error``) for it. Nothing in osp imports this
package.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, NoReturn, Optional, Sequence

# Module names under osp.cli, in the order ``osp --help`` lists them.
COMMANDS = ("info", "demo", "bench", "sample", "make-data", "cache-latents", "train-t2v", "train-vae", "reconstruct",
            "eval-vae")


class UsageError(Exception):
    """A user mistake: printed as one line on stderr, exit code 2."""


def device_arg(name: Optional[str]):
    """The torch.device of a ``--device`` flag (None: cuda when available, else cpu); a bad or
    unavailable device is a UsageError."""
    import torch

    name = name or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available here; expected --device cpu")
    return device


def check_clip_flags(args, positive: Sequence[str]) -> None:
    """The clip flags of upstream's VAE scripts (reconstruct, eval-vae): each of ``positive`` a
    positive int, --subset_size 0 (all) or positive, --crop_size no larger than --resolution."""
    for flag in positive:
        value = getattr(args, flag)
        if value < 1:
            raise UsageError(f"--{flag} {value}: expected a positive int")
    if args.subset_size < 0:
        raise UsageError(f"--subset_size {args.subset_size}: expected 0 (all) or a positive int")
    if args.crop_size > args.resolution:
        raise UsageError(f"--crop_size {args.crop_size} > --resolution {args.resolution}: expected a crop no "
                         "larger than the resized short side")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage block) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def parser() -> Parser:
    p = Parser(prog="osp", description="osp: fused kernels and models for Open-Sora-Plan v1.0-class text-to-video.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=Parser)
    for name in COMMANDS:
        importlib.import_module(f"{__name__}.{name.replace('-', '_')}").register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Run one command; returns its exit code (2 for a user mistake)."""
    p = parser()
    args, rest = p.parse_known_args(argv)
    if rest and not getattr(args, "passthrough", False):
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    args.rest = rest
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"osp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
