"""How a throwaway redis-server for the remote tier is launched: loopback only, nothing
persisted, files in a given directory. The storage benchmark and the tests start theirs from
this one command line so both measure and test against the same server settings."""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["redis_server_args", "redis_server_binary"]


def redis_server_binary() -> str:
    """``redis-server`` (or valkey's drop-in) on PATH, else the usual system path."""
    return shutil.which("redis-server") or shutil.which("valkey-server") or "/usr/bin/redis-server"


def redis_server_args(port: int, workdir: Path) -> list[str]:
    """argv for a plain-TCP server on 127.0.0.1:``port`` with no RDB/AOF persistence.

    ``--port`` and its value are always ``argv[1:3]`` so a TLS caller can swap them."""
    return [
        redis_server_binary(),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
        "--dir",
        str(workdir),
    ]
