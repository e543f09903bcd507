"""Start-up progress of ``kvplane serve`` as log lines (stderr): numbered steps, what each
is doing and how big it is, how long it took, and a "still ..." line every few seconds
while a long one (an 8B model's weights, a large pinned slab) runs.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["StartupSteps", "mib"]


def mib(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


class StartupSteps:
    """``with steps.step("allocating KV caches (...)"):`` logs ``start-up 2/4: allocating KV
    caches (...)`` before and ``start-up 2/4: done in 0.31 s`` after; ``note`` adds a line
    to the current step (a result worth knowing, e.g. the parameter count)."""

    def __init__(self, total: int, logger: logging.Logger, *, tick_s: float = 5.0) -> None:
        self.total, self.log, self.tick_s = total, logger, tick_s
        self.done = 0

    @contextmanager
    def step(self, text: str) -> Iterator[None]:
        number = f"{self.done + 1}/{self.total}"
        self.log.info("start-up %s: %s", number, text)
        start = time.monotonic()
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(self.tick_s):
                self.log.info(
                    "start-up %s: still %s (%.0f s)", number, text, time.monotonic() - start
                )

        ticker = threading.Thread(target=tick, name="kvplane-startup-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
        self.done += 1
        self.log.info("start-up %s: done in %.2f s", number, time.monotonic() - start)

    def note(self, text: str) -> None:
        self.log.info("start-up %d/%d: %s", self.done + 1, self.total, text)
