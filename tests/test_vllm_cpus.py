"""Threads kvplane starts inside a vLLM worker are not bound to vLLM's compute core."""

from __future__ import annotations

import os
import threading

import pytest

from kvplane.integrations.vllm.cpus import unpinned

pytestmark = pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs CPU masks and at least two CPUs",
)


def _in_thread(fn):
    """Run ``fn`` on a fresh thread, as vLLM's pinned worker thread would, and return its
    result."""
    out = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(timeout=10)
    return out[0]


def test_threads_started_inside_run_on_every_cpu_and_the_caller_keeps_its_binding():
    every = frozenset(os.sched_getaffinity(0))
    compute = min(every)

    def pinned_caller():
        os.sched_setaffinity(0, {compute})  # what vLLM's CPU worker does to its process
        inherited = _in_thread(lambda: frozenset(os.sched_getaffinity(0)))
        with unpinned() as (before, inside):
            started = _in_thread(lambda: frozenset(os.sched_getaffinity(0)))
        return inherited, before, inside, started, frozenset(os.sched_getaffinity(0))

    inherited, before, inside, started, after = _in_thread(pinned_caller)
    assert inherited == {compute}  # the trap: a plain new thread inherits the binding
    assert before == {compute}
    assert inside == every
    assert started == every
    assert after == {compute}
