"""The demo's child processes: started with ``python -m kvplane``, stopped by PID.

Every child writes its output to a log file in the demo's work directory, so a failure can
be explained by pointing at its log; stopping is SIGTERM, a bounded wait, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import NamedTuple

import kvplane
from kvplane.errors import Unavailable

__all__ = ["Child", "Children", "consecutive_free_ports", "free_ports"]

#: The directory holding the ``kvplane`` package: children import the same code as the demo.
_PACKAGE_ROOT = str(Path(kvplane.__file__).resolve().parent.parent)


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (held open together so they differ)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def consecutive_free_ports(n: int, host: str = "127.0.0.1", tries: int = 200) -> int:
    """The first of ``n`` consecutive ports free on ``host`` now, for a server that takes
    ``port_start + i`` (an internal API serves index i there). Drawn below the kernel's
    ephemeral range: a port from it may be handed to any outgoing connection (ZMQ, HTTP
    clients) between this check and the server's bind, so a free-port check there races."""
    low = _ephemeral_low() - n
    for _ in range(tries):
        first = random.randrange(10000, low)
        try:
            with contextlib.ExitStack() as held:
                for port in range(first, first + n):
                    s = held.enter_context(socket.socket())
                    s.bind((host, port))
            return first
        except OSError:
            continue
    raise Unavailable(f"no {n} consecutive free ports on {host}")


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return max(11000, int(f.read().split()[0]))
    except (OSError, ValueError, IndexError):
        return 32768


class Child(NamedTuple):
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Children:
    """A group of children; leaving the ``with`` block stops them all (reverse order)."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        full_env = dict(os.environ)
        for var in ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
            full_env.pop(var, None)
        full_env.update(env or {})
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_ROOT, full_env.get("PYTHONPATH", "")) if p
        )
        full_env["PYTHONUNBUFFERED"] = "1"
        log_path = self.workdir / f"{name}.log"
        with open(log_path, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "kvplane", *args],
                env=full_env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        child = Child(name, proc, log_path)
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        """Raises Unavailable naming the first child that exited, with its log's tail."""
        for child in self.children:
            if child.exited():
                raise Unavailable(
                    f"{child.name} exited with code {child.proc.returncode}; "
                    f"last lines of {child.log_path}:\n{child.log_tail()}"
                )

    def stop_all(self, timeout: float = 15.0) -> list[tuple[str, int | None]]:
        """Stop each child by PID, last started first, one after the other: a server's
        worker deregisters from the controller before the controller goes. SIGTERM, then
        SIGKILL after ``timeout`` seconds. Returns each child's name and exit code."""
        codes: list[tuple[str, int | None]] = []
        for child in reversed(self.children):
            if child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)
                try:
                    child.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    child.proc.kill()
                    child.proc.wait(5)
            codes.append((child.name, child.proc.returncode))
        return codes

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
