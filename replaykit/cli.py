"""The ``replaykit`` command line.

Each subcommand lives next to the code it drives: a module listed in
``SUBCOMMANDS`` exposes ``add_cli(subparsers)``, which registers its parser and
sets ``func`` to a handler taking the parsed namespace and returning an exit code.
Modules are imported only when the command line is built, so ``--help`` stays
in one place and a subcommand's heavy imports happen inside its handler.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from . import __version__

# Order here is the order in ``replaykit --help``.
SUBCOMMANDS: list[str] = [
    "replaykit.data",
    "replaykit.distill.cli",
    "replaykit.evaluate",
    "replaykit.viz",
    "replaykit.demo",
    "edge.cli",
]


class CLIError(Exception):
    """A user-facing error: printed without a traceback, exit code 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="replaykit",
        description="Continual learning with distilled replay: distill, replay, export to ONNX, retrain on device.",
    )
    parser.add_argument("--version", action="version", version=f"replaykit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_cli(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "device_side", False):  # a device command keeps its resident set small instead
        from .runtime import keep_freed_memory

        keep_freed_memory()
    try:
        return int(args.func(args) or 0)
    except (CLIError, ValueError, FileNotFoundError) as exc:
        print(f"replaykit {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
