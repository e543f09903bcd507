"""``kvplane`` command line: one subcommand per module, registered in :data:`SUBCOMMANDS`."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

__all__ = ["SUBCOMMANDS", "build_parser", "main"]

# name -> module exposing ``add_parser(subparsers)``; the module sets ``run`` as default.
SUBCOMMANDS: dict[str, str] = {
    "controller": "kvplane.controller.main",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvplane", description="KV-cache layer for LLM serving")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS.values():
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.run(args))
