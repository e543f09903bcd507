"""A real redis-server on a free loopback port, stopped by PID; restartable on the same port."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from tests.support import free_port, stop_process, wait_until

REDIS_BIN = shutil.which("redis-server") or shutil.which("valkey-server") or "/usr/bin/redis-server"


def redis_available() -> bool:
    return Path(REDIS_BIN).exists()


needs_redis = pytest.mark.skipif(not redis_available(), reason="redis-server is not installed")


class RedisServer:
    def __init__(self, workdir: Path, password: str | None = None) -> None:
        self.port = free_port()
        self.workdir = workdir
        self.password = password
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [
            REDIS_BIN,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(self._accepts, timeout=10, what="redis-server to accept connections")

    def _accepts(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return bool(s.recv(64))

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self.proc = None
