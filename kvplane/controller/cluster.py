"""The operations behind the HTTP API: lookups and commands fanned out to workers.

:class:`Cluster` owns the lock that serializes access to the :class:`ControllerCore`: the
ingest thread holds it per message, lookups hold it only to probe the index (their chunk
hashes are computed before), so neither starves the other. Commands to workers run
without the lock, each under the executor's deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from kvplane.controller.core import ControllerCore
from kvplane.controller.executor import EventStatus, EventTable, Executor, FanOutResult
from kvplane.controller.index import Match
from kvplane.controller.registry import WorkerKey, WorkerRecord
from kvplane.errors import Conflict, NotFound, Unavailable
from kvplane.keys import chunk_hashes
from kvplane.protocol import (
    REFUSALS,
    ClearCommand,
    Command,
    CompressCommand,
    DecompressCommand,
    ErrorCode,
    HealthCommand,
    MoveCommand,
    PinCommand,
)

__all__ = ["Cluster", "CommandFailed", "Done", "LookupStats", "ReaderGate"]


class Done(NamedTuple):
    event_id: str
    num_tokens: int


class CommandFailed(Unavailable):
    """Some workers failed or did not answer; the ``event_id`` and each worker's error code
    are ``details`` of the JSON error body."""

    def __init__(self, message: str, event_id: str, result: FanOutResult) -> None:
        codes = {str(w): int(r.error_code) for w, r in result.replies.items()}
        super().__init__(message, details={"event_id": event_id, "error_codes": codes})


class LookupStats:
    """Running totals of the lookups answered: how many, tokens asked, tokens matched (the
    best instance's prefix), seconds spent. Written only by the event loop that answers
    /lookup, so the adds take no lock; readers call :meth:`totals`."""

    __slots__ = ("lookups", "seconds", "tokens_asked", "tokens_matched")

    def __init__(self) -> None:
        self.lookups = self.tokens_asked = self.tokens_matched = 0
        self.seconds = 0.0

    def record(self, asked: int, matched: int, seconds: float) -> None:
        self.lookups += 1
        self.tokens_asked += asked
        self.tokens_matched += matched
        self.seconds += seconds

    def totals(self) -> tuple[int, int, int, float]:
        """``(lookups, tokens_asked, tokens_matched, seconds)``."""
        return self.lookups, self.tokens_asked, self.tokens_matched, self.seconds


class ReaderGate:
    """Lets the ingest thread step aside while lookups run.

    Under the GIL a CPU-bound thread takes about half the interpreter from any other, so
    a lookup during an admit burst would run at half speed. The ingest thread calls
    :meth:`wait_for_readers` between messages (bounded, so a lookup storm slows ingestion
    but never stops it)."""

    def __init__(self) -> None:
        self._readers = 0
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()

    def reading(self) -> ReaderGate:
        """``with gate.reading():`` around a lookup (the gate is its own context manager:
        a generator-based one would cost a lookup more than the gate itself)."""
        return self

    def __enter__(self) -> None:
        with self._lock:
            self._readers += 1
            self._idle.clear()

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._readers -= 1
            if not self._readers:
                self._idle.set()

    def wait_for_readers(self, timeout: float) -> None:
        self._idle.wait(timeout)


class Cluster:
    """Thread-safe facade over the core, the event table and the executor."""

    def __init__(
        self, core: ControllerCore, executor: Executor, clock: Callable[[], float] = time.time
    ) -> None:
        self.core = core
        self.lock = threading.Lock()
        self.gate = ReaderGate()
        self.events = EventTable()
        self.executor = executor
        self.clock = clock
        self.lookup_stats = LookupStats()

    # --- reads -------------------------------------------------------------------------------

    def lookup(self, tokens: Sequence[int] | np.ndarray) -> tuple[str, dict[str, Match]]:
        sizes = self.core.index.chunk_sizes()  # lock-free by contract
        arr = np.asarray(tokens, dtype="<i4")  # once, for every chunk size in use
        hashes = {cs: chunk_hashes(arr, cs) for cs in sizes}
        with self.lock:
            found = self.core.index.match(hashes, len(tokens))
        return self.events.start("lookup", finished=True), found

    def workers(
        self, instance_id: str, worker_ids: Sequence[int] | None = None
    ) -> list[WorkerRecord]:
        """The instance's workers (optionally only ``worker_ids``); NotFound names what is
        missing."""
        with self.lock:
            found = self.core.registry.workers(instance_id)
        if not found:
            raise NotFound(f"unknown instance_id {instance_id!r}")
        if worker_ids is None:
            return found
        by_id = {w.worker_id: w for w in found}
        missing = sorted(set(worker_ids) - set(by_id))
        if missing:
            raise NotFound(f"instance {instance_id!r} has no worker(s) {missing}")
        return [by_id[i] for i in worker_ids]

    def chunks(
        self, instance_id: str, worker_ids: Sequence[int] | None = None
    ) -> dict[int, dict[str, list[int]]]:
        """What the index credits to each of the instance's workers: worker_id -> tier ->
        sorted chunk hashes (an audit of the index against the engines' own key lists).
        NotFound as :meth:`workers`."""
        wanted = [w.worker_id for w in self.workers(instance_id, worker_ids)]
        with self.lock:  # only the copy under the lock; sorting is the caller's thread's
            found = {i: self.core.index.chunks(WorkerKey(instance_id, i)) for i in wanted}
        return {i: {loc: sorted(hs) for loc, hs in tiers.items()} for i, tiers in found.items()}

    def instance_by_ip(self, ip: str) -> str:
        with self.lock:
            found = self.core.registry.instance_by_ip(ip)
        if found is None:
            raise NotFound(f"no instance has a worker at ip {ip!r}")
        return found

    def check_finish(self, event_id: str) -> EventStatus:
        rec = self.events.get(event_id)
        return EventStatus.NOT_FOUND if rec is None else rec.status

    # --- commands ----------------------------------------------------------------------------

    def health(self, instance_id: str) -> tuple[str, dict[int, int]]:
        workers = self.workers(instance_id)
        event_id = self.events.start("health")
        result = self.executor.fan_out(workers, lambda w: HealthCommand(event_id=event_id))
        self.events.finish(event_id, result.error_summary())
        return event_id, {w: int(r.error_code) for w, r in result.replies.items()}

    def clear(self, instance_id: str, location: str | None) -> Done:
        locations = [location] if location else None
        return self._run(
            "clear", instance_id, lambda e, w: ClearCommand(event_id=e, locations=locations)
        )

    def pin(self, instance_id: str, location: str | None, tokens: list[int]) -> Done:
        return self._run(
            "pin",
            instance_id,
            lambda e, w: PinCommand(event_id=e, tokens=tokens, location=location),
        )

    def compress(
        self,
        instance_id: str,
        method: str,
        location: str,
        tokens: list[int] | None,
        *,
        decompress: bool = False,
    ) -> Done:
        kind = DecompressCommand if decompress else CompressCommand
        return self._run(
            "decompress" if decompress else "compress",
            instance_id,
            lambda e, w: kind(event_id=e, method=method, location=location, tokens=tokens),
        )

    def move(
        self,
        src: tuple[str, str],
        dst: tuple[str, str],
        tokens: list[int] | None,
        copy: bool,
    ) -> Done:
        """Each source rank sends its chunks to the same rank of the destination instance."""
        dst_ranks = {w.worker_id: w for w in self.workers(dst[0])}
        src_ranks = self.workers(src[0])
        missing = [w.worker_id for w in src_ranks if w.worker_id not in dst_ranks]
        if missing:
            raise Conflict(f"destination instance {dst[0]!r} lacks rank(s) {missing}")

        def command(event_id: str, w: WorkerRecord) -> Command:
            return MoveCommand(
                event_id=event_id,
                src_location=src[1],
                dst_instance_id=dst[0],
                dst_location=dst[1],
                dst_peer_url=dst_ranks[w.worker_id].peer_init_url,
                tokens=tokens,
                copy=copy,
            )

        return self._run("move", src[0], command)

    def _run(
        self, kind: str, instance_id: str, make: Callable[[str, WorkerRecord], Command]
    ) -> Done:
        workers = self.workers(instance_id)
        event_id = self.events.start(kind)
        result = self.executor.fan_out(workers, lambda w: make(event_id, w))
        summary = result.error_summary()
        self.events.finish(event_id, summary)
        if result.ok:
            return Done(event_id, result.num_tokens)
        codes = {r.error_code for r in result.replies.values()} - {ErrorCode.OK}
        refusal = REFUSALS.get(codes.pop()) if len(codes) == 1 else None
        if refusal is not None:
            raise refusal(f"{kind} on instance {instance_id!r}: {summary}")
        raise CommandFailed(f"{kind} on instance {instance_id!r}: {summary}", event_id, result)
