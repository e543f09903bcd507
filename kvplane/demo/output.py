"""How the demo talks to a person: timestamped steps (tables: :mod:`kvplane.text_table`)."""

from __future__ import annotations

import sys
import time
from typing import TextIO

__all__ = ["Printer"]


class Printer:
    """Writes steps as ``[  12.3s] text``; ``progress`` rewrites one line on a terminal."""

    def __init__(self, stream: TextIO = sys.stdout) -> None:
        self.stream = stream
        self.t0 = time.monotonic()
        self._tty = stream.isatty()
        self._progress_open = False

    @property
    def is_tty(self) -> bool:
        return self._tty

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def step(self, text: str) -> None:
        self._end_progress()
        self.stream.write(f"[{self.elapsed():6.1f}s] {text}\n")
        self.stream.flush()

    def block(self, text: str) -> None:
        self._end_progress()
        self.stream.write(text + "\n")
        self.stream.flush()

    def progress(self, text: str) -> None:
        """On a terminal: redraw the current line; elsewhere: print only every change."""
        line = f"[{self.elapsed():6.1f}s] {text}"
        if self._tty:
            self.stream.write("\r" + line + "\033[K")
            self._progress_open = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def _end_progress(self) -> None:
        if self._progress_open:
            self.stream.write("\n")
            self._progress_open = False
