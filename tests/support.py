"""Shared test helpers: free loopback ports, child processes stopped by PID, bounded waits,
threads joined with a deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from kvplane.demo.processes import consecutive_free_ports, free_ports

__all__ = [
    "REPO_ROOT",
    "consecutive_free_ports",
    "free_port",
    "free_ports",
    "kvplane_env",
    "kvplane_process",
    "run_kvplane",
    "run_threads",
    "stop_process",
    "wait_until",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``check`` until it returns a truthy value (returned) or time runs out."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the thing polled may not be up yet
            last_exc = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last error: {last_exc!r}")


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
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    for name in ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
        env.pop(name, None)
    env.update(extra)
    return env


@contextlib.contextmanager
def kvplane_process(
    args: Sequence[str], *, env: dict[str, str] | None = None, log_path: Path | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``python -m kvplane ARGS``; always stopped by PID (SIGTERM, then SIGKILL)."""
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvplane", *args],
        cwd=REPO_ROOT,
        env=env or kvplane_env(),
        stdout=out,
        stderr=subprocess.STDOUT,
    )
    try:
        yield proc
    finally:
        stop_process(proc)
        if log_path:
            out.close()  # type: ignore[union-attr]


def run_kvplane(args: Sequence[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kvplane ARGS`` to its end, stdout and stderr together as text; one that
    does not end in ``timeout`` seconds (a server that starts anyway) is killed and raises."""
    return subprocess.run(
        [sys.executable, "-m", "kvplane", *args],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
        check=False,
    )


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode
