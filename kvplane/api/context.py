"""What every app of one engine process's internal API reaches through ``app.state.ctx``."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from kvplane.config import EngineConfig
from kvplane.engine.chunk_statistics import ChunkStatistics

if TYPE_CHECKING:
    from kvplane.engine.runtime import EngineRuntime

__all__ = ["ApiContext", "SlotRecording", "role_of"]


class SlotRecording:
    """The ``record_slot`` switch: log slot mappings of store/retrieve calls when on."""

    def __init__(self) -> None:
        self._enabled = False
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        with self._lock:
            return self._enabled

    def set(self, enabled: bool) -> None:
        with self._lock:
            self._enabled = enabled


def role_of(index: int) -> str:
    """Index 0 is the scheduler; index i + 1 is worker i."""
    return "scheduler" if index == 0 else f"worker_{index - 1}"


@dataclass(frozen=True)
class ApiContext:
    """One app's view of its process. ``runtime`` is None in a process without an engine;
    the engine endpoints then answer 503. ``statistics`` and ``slot_recording`` are shared by
    the apps of one process."""

    index: int
    config: EngineConfig
    runtime: EngineRuntime | None
    statistics: ChunkStatistics
    slot_recording: SlotRecording

    @property
    def role(self) -> str:
        return role_of(self.index)
