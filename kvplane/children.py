"""Child processes: started in their own process group with their output in a log file,
watched until a health URL answers or they exit, stopped with their whole group.

One way for everything that runs kvplane (or vLLM) as a child: the demo, the vLLM launcher,
benchmarks and tests. Stopping is SIGTERM to the group, a bounded wait, then SIGKILL to what
is left, so no grandchild (vLLM's EngineCore, a worker rank) outlives its parent. Failures
name the child and quote the tail of its log.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

import kvplane
from kvplane.errors import Unavailable

__all__ = [
    "PACKAGE_ROOT",
    "Child",
    "Children",
    "child_env",
    "consecutive_free_ports",
    "free_ports",
    "kvplane_args",
    "log_tail",
    "process_group_alive",
    "start_child",
    "stop_process",
]

#: The directory holding the ``kvplane`` package: children import the same code as the parent.
PACKAGE_ROOT = Path(kvplane.__file__).resolve().parent.parent
LOG_TAIL_LINES = 20


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct ports free right now (held open together so they differ)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with contextlib.ExitStack() as held:
        socks = [held.enter_context(socket.socket(family)) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]


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


def child_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment for a child that runs this checkout's kvplane: no config
    file inherited, unbuffered output, ``extra`` last."""
    env = dict(os.environ)
    for name in ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE"):
        env.pop(name, None)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(PACKAGE_ROOT), env.get("PYTHONPATH", "")) if p
    )
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra or {})
    return env


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


class Child:
    """One started child: its name, process and log file."""

    def __init__(self, name: str, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.name = name
        self.proc = proc
        self.log_path = log_path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc.poll() is not None

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        return log_tail(self.log_path, lines)

    def check_alive(self, lines: int = LOG_TAIL_LINES) -> None:
        """Raises Unavailable if the child exited, with its log's last ``lines``."""
        if self.exited():
            raise Unavailable(
                f"{self.name} exited with code {self.proc.returncode}; last lines of "
                f"{self.log_path}:\n{self.log_tail(lines)}"
            )

    def wait_healthy(
        self, url: str, *, timeout: float, interval: float = 0.1, lines: int = LOG_TAIL_LINES
    ) -> None:
        """Poll ``url`` until it answers 200. Raises Unavailable if the child exits first,
        TimeoutError after ``timeout`` seconds, each with the log's last ``lines``."""
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive(lines)
            if _answers_200(url):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{self.name} did not answer {url} within {timeout:.0f}s; last lines of "
                    f"{self.log_path}:\n{self.log_tail(lines)}"
                )
            time.sleep(interval)

    def stop(self, timeout: float = 10.0) -> int | None:
        """Stop the child's group (:func:`stop_process`); its exit code."""
        return stop_process(self.proc, timeout)


def _answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5.0) as resp:
            return int(resp.status) == 200
    except (OSError, ValueError, http.client.HTTPException):  # not up yet
        return False


def start_child(
    name: str,
    args: Sequence[str],
    log_path: Path,
    *,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> Child:
    """Run ``args`` in a new process group (session), stdout and stderr to ``log_path``
    (replaced), stdin closed. ``env`` is the whole environment (default :func:`child_env`)."""
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            list(args),
            cwd=cwd,
            env=dict(env) if env is not None else child_env(),
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    return Child(name, proc, log_path)


def kvplane_args(args: Sequence[str]) -> list[str]:
    """The command line of ``kvplane ARGS`` run by this python."""
    return [sys.executable, "-m", "kvplane", *args]


def process_group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count where psutil
    is installed; without it a zombie counts until it is reaped)."""
    try:
        import psutil
    except ImportError:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        return True
    for p in psutil.process_iter(["status"]):
        try:
            if os.getpgid(p.pid) == pgid and p.info["status"] != psutil.STATUS_ZOMBIE:
                return True
        except (ProcessLookupError, psutil.Error):
            continue
    return False


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int | None:
    """SIGTERM to the process's group when it leads one (:func:`start_child`), else to the
    process alone; SIGKILL to what is left after ``timeout`` seconds. Returns the exit code."""
    try:
        group = os.getpgid(proc.pid) == proc.pid
    except ProcessLookupError:
        group = False
    if not group:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    while process_group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if proc.poll() is None or process_group_alive(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
        end = time.monotonic() + 10
        while process_group_alive(proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
    return proc.returncode


class Children:
    """Several ``kvplane`` children with their logs in one folder; leaving the ``with``
    block stops them all, last started first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def start(self, name: str, args: Sequence[str], env: Mapping[str, str] | None = None) -> Child:
        """``kvplane ARGS`` as ``name``, logging to ``WORKDIR/NAME.log``; ``env`` is added to
        :func:`child_env`'s."""
        child = start_child(
            name, kvplane_args(args), self.workdir / f"{name}.log", env=child_env(env)
        )
        self.children.append(child)
        return child

    def check_alive(self) -> None:
        """Raises Unavailable naming the first child that exited, with its log's tail."""
        for child in self.children:
            child.check_alive()

    def stop_all(self, timeout: float = 15.0) -> list[tuple[str, int | None]]:
        """Stop each child, last started first, one after the other: a server's worker
        deregisters from the controller before the controller goes. Returns each child's
        name and exit code."""
        return [(child.name, child.stop(timeout)) for child in reversed(self.children)]

    def __enter__(self) -> Children:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()
