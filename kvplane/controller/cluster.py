"""The operations behind the HTTP API: lookups and commands fanned out to workers.

:class:`Cluster` owns the lock that serializes access to the :class:`ControllerCore`: the
ingest thread holds it per message, lookups hold it only to probe the index (their chunk
hashes are computed before), so neither starves the other. Commands to workers run
without the lock, each under the executor's deadline.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple, Protocol

import msgspec
import numpy as np

from kvplane.controller.core import ControllerCore
from kvplane.controller.executor import EventStatus, EventTable, Executor
from kvplane.controller.index import Match
from kvplane.controller.log_apply import ReplicaView
from kvplane.controller.registry import WorkerKey, WorkerRecord
from kvplane.errors import BadRequest, Conflict, NotFound, Unavailable
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
    OperationRecord,
    OperationRequest,
    PinCommand,
)

__all__ = ["Cluster", "CommandFailed", "Done", "LookupStats", "OperationBus", "ReaderGate"]


class Done(NamedTuple):
    event_id: str
    num_tokens: int


class CommandFailed(Unavailable):
    """Some workers failed or did not answer; the ``event_id`` and each worker's error code
    are ``details`` of the JSON error body."""

    def __init__(self, message: str, event_id: str, codes: Mapping[int, int]) -> None:
        details = {"event_id": event_id, "error_codes": {str(w): c for w, c in codes.items()}}
        super().__init__(message, details=details)
        self.event_id = event_id
        self.codes = dict(codes)


class OperationBus(Protocol):
    """Where a replica's operations go (:mod:`kvplane.controller.opbus`): run once by the
    lease holder, their state readable on every replica."""

    def submit(self, op: OperationRequest) -> OperationRecord:
        """Queue ``op`` (its ``event_id`` filled in), wait for its outcome; raises as
        :meth:`Cluster.execute`, or Unavailable when the outcome is not known in time."""
        ...

    def status(self, event_id: str) -> EventStatus | None:
        """The operation's state as every replica sees it; None if not an operation's."""
        ...


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
        self.bus: OperationBus | None = None  # set on a replica: operations go through it
        # Set on a replica: where it stands in the event log, for /status.
        self.log_position: Callable[[], ReplicaView] | None = None

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
        if self.bus is not None:
            status = self.bus.status(event_id)
            if status is not None:
                return status
        rec = self.events.get(event_id)
        return EventStatus.NOT_FOUND if rec is None else rec.status

    # --- commands ----------------------------------------------------------------------------
    #
    # Each command is an OperationRequest: run here (:meth:`execute`), or, on a replica,
    # handed to the operation bus, which has the lease holder run it once and waits for
    # the record it leaves (the same errors come back either way).

    def health(self, instance_id: str) -> tuple[str, dict[int, int]]:
        rec = self.submit(OperationRequest(event_id="", kind="health", instance_id=instance_id))
        return rec.request.event_id, dict(rec.error_codes)

    def clear(self, instance_id: str, location: str | None) -> Done:
        return self._done(
            OperationRequest(event_id="", kind="clear", instance_id=instance_id, location=location)
        )

    def pin(self, instance_id: str, location: str | None, tokens: list[int]) -> Done:
        return self._done(
            OperationRequest(
                event_id="", kind="pin", instance_id=instance_id, location=location, tokens=tokens
            )
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
        return self._done(
            OperationRequest(
                event_id="",
                kind="decompress" if decompress else "compress",
                instance_id=instance_id,
                method=method,
                location=location,
                tokens=tokens,
            )
        )

    def move(
        self,
        src: tuple[str, str],
        dst: tuple[str, str],
        tokens: list[int] | None,
        copy: bool,
    ) -> Done:
        """Each source rank sends its chunks to the same rank of the destination instance."""
        return self._done(
            OperationRequest(
                event_id="",
                kind="move",
                instance_id=src[0],
                location=src[1],
                dst_instance_id=dst[0],
                dst_location=dst[1],
                tokens=tokens,
                copy=copy,
            )
        )

    def submit(self, op: OperationRequest) -> OperationRecord:
        """Run ``op`` here, or through the operation bus when there is one; its finished
        record. Raises what the operation raised (NotFound, a refusal, CommandFailed)."""
        if self.bus is None:
            return self.execute(op)
        return self.bus.submit(op)

    def execute(self, op: OperationRequest) -> OperationRecord:
        """Fan ``op`` out to its instance's workers here (an empty ``event_id`` gets a new
        one); the finished record, or the error as :meth:`submit` says."""
        workers = self.workers(op.instance_id)
        make = self._commands(op, workers)
        event_id = self.events.start(op.kind, event_id=op.event_id or None)
        op = msgspec.structs.replace(op, event_id=event_id)
        result = self.executor.fan_out(workers, lambda w: make(event_id, w))
        summary = result.error_summary()
        self.events.finish(event_id, summary)
        codes = {w: int(r.error_code) for w, r in result.replies.items()}
        record = OperationRecord(
            request=op, status="finished", num_tokens=result.num_tokens, error_codes=codes
        )
        if result.ok or op.kind == "health":  # health reports its codes, never raises
            return record
        failed = {r.error_code for r in result.replies.values()} - {ErrorCode.OK}
        refusal = REFUSALS.get(failed.pop()) if len(failed) == 1 else None
        if refusal is not None:
            raise refusal(f"{op.kind} on instance {op.instance_id!r}: {summary}")
        raise CommandFailed(f"{op.kind} on instance {op.instance_id!r}: {summary}", event_id, codes)

    def _done(self, op: OperationRequest) -> Done:
        rec = self.submit(op)
        return Done(rec.request.event_id, rec.num_tokens)

    def _commands(
        self, op: OperationRequest, workers: Sequence[WorkerRecord]
    ) -> Callable[[str, WorkerRecord], Command]:
        """How to build ``op``'s command for each worker; raises Conflict for a move whose
        destination lacks a source rank, BadRequest for an unknown kind."""
        if op.kind == "health":
            return lambda e, w: HealthCommand(event_id=e)
        if op.kind == "clear":
            locations = [op.location] if op.location else None
            return lambda e, w: ClearCommand(event_id=e, locations=locations)
        if op.kind == "pin":
            tokens = op.tokens or []
            return lambda e, w: PinCommand(event_id=e, tokens=tokens, location=op.location)
        if op.kind in ("compress", "decompress"):
            kind = DecompressCommand if op.kind == "decompress" else CompressCommand
            method, location = op.method or "", op.location or ""
            return lambda e, w: kind(event_id=e, method=method, location=location, tokens=op.tokens)
        if op.kind == "move" and op.dst_instance_id is not None:
            dst_ranks = {w.worker_id: w for w in self.workers(op.dst_instance_id)}
            missing = [w.worker_id for w in workers if w.worker_id not in dst_ranks]
            if missing:
                raise Conflict(
                    f"destination instance {op.dst_instance_id!r} lacks rank(s) {missing}"
                )
            dst_id, dst_location = op.dst_instance_id, op.dst_location or ""
            return lambda e, w: MoveCommand(
                event_id=e,
                src_location=op.location or "",
                dst_instance_id=dst_id,
                dst_location=dst_location,
                dst_peer_url=dst_ranks[w.worker_id].peer_init_url,
                tokens=op.tokens,
                copy=op.copy,
            )
        raise BadRequest(f"unknown operation kind {op.kind!r}")
