"""kvplane.children, the one way every program here starts, watches and stops a child
process, and the tests' bounded wait: real processes, real signals."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from kvplane.children import free_ports, process_group_alive, start_child
from kvplane.errors import Unavailable
from tests.support import wait_until

# A child that starts a grandchild in its group and ignores SIGTERM: stop must still end both.
STUBBORN = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)']); "
    "print('up', flush=True); time.sleep(600)"
)


def test_stop_ends_the_whole_group_even_when_sigterm_is_ignored(tmp_path: Path) -> None:
    child = start_child("stubborn", [sys.executable, "-c", STUBBORN], tmp_path / "s.log")
    wait_until(lambda: "up" in child.log_tail(), timeout=30, what="the child's output")
    assert process_group_alive(child.pid)
    child.stop(timeout=1.0)
    assert child.exited()
    assert not process_group_alive(child.pid)


def test_a_child_that_exits_before_it_is_healthy_fails_with_its_log_tail(tmp_path: Path) -> None:
    script = "import sys; print('config key nope is unknown', flush=True); sys.exit(3)"
    child = start_child("bad", [sys.executable, "-c", script], tmp_path / "b.log")
    (port,) = free_ports(1)
    with pytest.raises(Unavailable) as failed:
        child.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=60)
    assert "bad exited with code 3" in str(failed.value)
    assert "config key nope is unknown" in str(failed.value)


def test_a_child_that_never_answers_times_out_naming_the_url(tmp_path: Path) -> None:
    child = start_child(
        "mute", [sys.executable, "-c", "import time; time.sleep(600)"], tmp_path / "m.log"
    )
    (port,) = free_ports(1)
    try:
        with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}/health"):
            child.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=0.5)
    finally:
        child.stop()


def test_wait_until_fails_at_once_on_a_failed_assert_and_retries_other_errors() -> None:
    calls = []

    def broken() -> bool:
        calls.append(1)
        raise AssertionError("wrong answer")

    started = time.monotonic()
    with pytest.raises(AssertionError, match="wrong answer"):
        wait_until(broken, timeout=30)
    assert len(calls) == 1 and time.monotonic() - started < 5

    tries = iter([ConnectionError("not up"), ConnectionError("not up"), "ready"])

    def flaky() -> str:
        item = next(tries)
        if isinstance(item, Exception):
            raise item
        return item

    assert wait_until(flaky, timeout=30, interval=0.01) == "ready"
