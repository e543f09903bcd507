"""Where kvplane's threads run inside a vLLM worker.

vLLM's CPU worker binds its process to the compute cores it gave OpenMP (on a 2-core machine:
one core), and every thread created afterwards inherits that mask. kvplane's threads (peer
transfers, the channel to the scheduler, tier writers, the controller link, the internal API)
would then share the model's one core and wait for each step, while the core vLLM reserved
sits idle. :func:`unpinned` lets the threads started inside it run on every CPU this process
may use; the calling thread's own binding is restored on exit.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

__all__ = ["unpinned"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def unpinned() -> Iterator[tuple[frozenset[int], frozenset[int]]]:
    """Widen the calling thread's CPU mask to every CPU (the kernel keeps it inside the
    cgroup's cpuset) for the body. Yields (the mask before, the mask inside); both empty
    where the platform has no CPU masks."""
    if not hasattr(os, "sched_setaffinity"):
        yield frozenset(), frozenset()
        return
    before = frozenset(os.sched_getaffinity(0))
    try:
        os.sched_setaffinity(0, range(os.cpu_count() or 1))
    except OSError as exc:
        log.debug("kvplane: cannot widen the CPU mask %s: %s", sorted(before), exc)
        yield before, before
        return
    try:
        yield before, frozenset(os.sched_getaffinity(0))
    finally:
        os.sched_setaffinity(0, before)
