"""``kvplane`` command line: one table of subcommands, each in its own module.

Each module exposes ``add_parser(subparsers)`` that registers its parser and sets
``func(args) -> int``. Modules keep heavy imports (torch) inside ``func`` so that
``kvplane controller`` starts without them.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from kvplane import __version__
from kvplane.errors import KvplaneError

__all__ = ["SUBCOMMANDS", "main"]

SUBCOMMANDS = (
    "kvplane.engine_cli",
    "kvplane.controller.main",
    "kvplane.serve.cli",
    "kvplane.router.cli",
    "kvplane.demo.cli",
    "kvplane.status_cli",
    "kvplane.keygen_cli",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvplane", description="kvplane KV-cache layer")
    parser.add_argument("--version", action="version", version=f"kvplane {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMANDS:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s] kvplane %(levelname)s %(name)s: %(message)s"
    )
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KvplaneError as exc:
        print(f"kvplane {args.command}: error: {exc}", file=sys.stderr)
        return 2
