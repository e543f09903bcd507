"""How the demo talks to a person: timestamped steps and small aligned tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import TextIO

__all__ = ["Printer", "format_table"]


def format_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain-text table, columns padded to their widest cell."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("    " + line.rstrip() for line in lines)


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
