"""``kvplane engine``: one standalone engine process (a stand-in for one vLLM rank).

It lives beside :mod:`kvplane.process`, not in ``engine/``: it builds the whole process,
and ``engine/`` imports nothing above the engine."""

from __future__ import annotations

import argparse

from kvplane.config import help_lines
from kvplane.errors import ConfigError

__all__ = ["add_parser", "check_device"]


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
    from kvplane.process import EngineProcess

    config = load_config(args.config)
    EngineProcess(config, device=check_device(args.device)).run_forever()
    return 0


def check_device(name: str) -> str:
    """``name`` if the KV caches can live there; ConfigError saying why not otherwise."""
    import torch

    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise ConfigError(f"--device {name!r}: expected cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: no CUDA device is available on this machine")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(
            f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return name
