"""``kvplane engine``: one standalone engine process (a stand-in for one vLLM rank)."""

from __future__ import annotations

import argparse

from kvplane.config import help_lines

__all__ = ["add_parser"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "engine",
        help="run one engine process with synthetic paged KV caches until SIGTERM/SIGINT",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys:\n  " + "\n  ".join(help_lines()),
    )
    p.add_argument(
        "--config", help="YAML config file (else $KVPLANE_CONFIG_FILE / $LMCACHE_CONFIG_FILE)"
    )
    p.add_argument("--device", default="cpu", help="device of the synthetic KV caches (cpu, cuda)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kvplane.config import load_config
    from kvplane.engine.runtime import EngineRuntime

    config = load_config(args.config)
    EngineRuntime(config, device=args.device).run_forever()
    return 0
