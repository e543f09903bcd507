"""Shared test helpers: free loopback ports and child processes (:mod:`kvplane.children`),
bounded waits, threads joined with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from kvplane.children import (
    child_env,
    consecutive_free_ports,
    free_ports,
    kvplane_args,
    start_child,
    stop_process,
)

__all__ = [
    "REPO_ROOT",
    "consecutive_free_ports",
    "free_port",
    "free_ports",
    "kvplane_env",
    "kvplane_process",
    "read_request",
    "run_kvplane",
    "run_threads",
    "stop_process",
    "wait_for_unix_socket",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """The next HTTP/1.1 request on ``reader`` (a test server's): its head, blank line
    included, and its Content-Length body. Raises IncompleteReadError at the end."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.lower().split(b"\r\n")
    length = next((int(x.split(b":")[1]) for x in lines if x.startswith(b"content-length:")), 0)
    return head, await reader.readexactly(length)


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``check`` until it returns a truthy value (returned) or time runs out. An
    exception from ``check`` (the thing polled not up yet) is retried; a failed ``assert``
    in it fails the test at once."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")


def _accepts(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def wait_for_unix_socket(path: str, *, timeout: float = 60.0, what: str = "Unix socket") -> None:
    """Wait until a server accepts connections on the Unix socket ``path``. Polled with a
    socket closed after each try, not with httpx: httpcore leaves open the socket of a
    failed Unix connect, and the error ``wait_until`` keeps holds it in a reference cycle, so
    it is closed by some later garbage collection, with an "unclosed socket" ResourceWarning
    in whatever test runs then."""
    wait_until(lambda: _accepts(path), timeout=timeout, what=what)


def run_threads(target: Callable[[int], object], n: int, *, timeout: float) -> None:
    """Run ``target(0)`` .. ``target(n - 1)`` on ``n`` threads at once; fails the test if any
    is still running ``timeout`` seconds after its join began (a deadlock)."""
    threads = [threading.Thread(target=target, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    assert not any(t.is_alive() for t in threads), "deadlock"


def kvplane_env(**extra: str) -> dict[str, str]:
    return child_env(extra)


@contextlib.contextmanager
def kvplane_process(
    args: Sequence[str], *, log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m kvplane ARGS`` in its own process group, output to ``log_path``;
    always stopped with its group (SIGTERM, then SIGKILL)."""
    child = start_child(args[0], kvplane_args(args), log_path, env=env, cwd=REPO_ROOT)
    try:
        yield child.proc
    finally:
        child.stop()


def run_kvplane(args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kvplane ARGS`` to its end, stdout and stderr together as text; one that
    does not end in ``timeout`` seconds (a server that starts anyway) is killed and raises."""
    return subprocess.run(
        kvplane_args(args),
        cwd=REPO_ROOT,
        env=kvplane_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )
