"""What every app of one engine process's internal API reaches through ``app.state.ctx``."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import torch

from kvplane.api.slot_syntax import format_ranges, to_ranges
from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.chunk_statistics import ChunkStatistics
from kvplane.engine.engine import Engine
from kvplane.engine.facts import EngineFacts

__all__ = ["ApiContext", "SlotRecording", "role_of"]

log = logging.getLogger("kvplane.api.kvcache")


class SlotRecording:
    """The ``record_slot`` switch: when on, log the slot mapping of every store/retrieve the
    engine runs (serving path and API alike) as ranges, e.g. ``store slot_mapping=[0,255]``."""

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

    def record(self, op: str, slots: torch.Tensor) -> None:
        if self.enabled:
            log.info("%s slot_mapping=%s", op, format_ranges(to_ranges(slots.tolist())))


def role_of(index: int) -> str:
    """Index 0 is the scheduler; index i + 1 is worker i."""
    return "scheduler" if index == 0 else f"worker_{index - 1}"


@dataclass(frozen=True)
class ApiContext:
    """One app's view of its process. ``config_store`` is the process's config (``POST /conf``
    updates it; :attr:`config` is the current one), ``facts`` what the host decided about the
    engine (``/meta`` of a process without one). ``engine`` is None in a process without an
    engine (a scheduler); the engine endpoints then answer 503. ``statistics`` and
    ``slot_recording`` are shared by the apps of one process."""

    index: int
    config_store: ConfigStore
    facts: EngineFacts
    engine: Engine | None
    statistics: ChunkStatistics
    slot_recording: SlotRecording

    @property
    def config(self) -> EngineConfig:
        """The config now; a route reads it once per request for a consistent view."""
        return self.config_store.current

    @property
    def role(self) -> str:
        return role_of(self.index)

    @property
    def runtime(self) -> Engine | None:
        """The name ``/run_script`` scripts used for :attr:`engine` before it was a handle
        (docs/internal_api.md); the handle has the attributes they read."""
        return self.engine
