"""Cluster operations: fan a command out to an instance's workers, aggregate, record the event.

The executor knows no sockets: it is handed a ``transport`` that sends one command to one
worker under a deadline (the service supplies a ZMQ one; tests may supply their own). A
worker that does not answer in time yields its own error code, never a hang.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import Enum
from itertools import islice
from typing import NamedTuple

from kvplane.controller.registry import WorkerRecord
from kvplane.errors import Unavailable
from kvplane.protocol import Command, CommandReply, ErrorCode

__all__ = [
    "EventRecord",
    "EventStatus",
    "EventTable",
    "Executor",
    "FanOutResult",
    "Transport",
]

Transport = Callable[[WorkerRecord, Command, float], CommandReply]
"""Send one command to one worker and wait at most the given seconds for its reply.
Raises :class:`~kvplane.errors.Unavailable` when the worker does not answer in time."""


class EventStatus(str, Enum):
    RUNNING = "running"
    FINISHED = "finished"
    FAILED = "failed"
    NOT_FOUND = "not_found"


@dataclass
class EventRecord:
    event_id: str
    kind: str
    status: EventStatus
    created: float
    error: str = ""


class EventTable:
    """Recent events by id (bounded: the oldest are forgotten first). Thread-safe.

    Queries (:attr:`QUERIES`: lookups and the like, finished when they start) and operations
    (commands to workers) are bounded separately, ``capacity`` each, so a lookup storm (a
    router sends thousands a second) never pushes an operation out before a client asks
    ``/check_finish`` about it or the dashboard lists it."""

    QUERIES = frozenset({"lookup", "query_worker_info", "query_instance", "query_chunks"})

    def __init__(self, capacity: int = 10_000) -> None:
        self._capacity = capacity
        self._queries: OrderedDict[str, EventRecord] = OrderedDict()
        self._operations: OrderedDict[str, EventRecord] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def new_id(kind: str) -> str:
        return f"{kind}-{os.urandom(16).hex()}"  # uuid4 without its object: per lookup

    def start(self, kind: str, *, finished: bool = False, event_id: str | None = None) -> str:
        """Record a new event (``event_id``: one chosen elsewhere, e.g. by the replica that
        accepted an operation); its id."""
        event_id = event_id or self.new_id(kind)
        status = EventStatus.FINISHED if finished else EventStatus.RUNNING
        table = self._queries if kind in self.QUERIES else self._operations
        with self._lock:
            table[event_id] = EventRecord(event_id, kind, status, time.time())
            if len(table) > self._capacity:
                table.popitem(last=False)
        return event_id

    def finish(self, event_id: str, error: str = "") -> None:
        with self._lock:
            rec = self._operations.get(event_id) or self._queries.get(event_id)
            if rec is not None:
                rec.status = EventStatus.FAILED if error else EventStatus.FINISHED
                rec.error = error

    def get(self, event_id: str) -> EventRecord | None:
        with self._lock:
            return self._operations.get(event_id) or self._queries.get(event_id)

    def recent_operations(self, n: int = 50) -> list[EventRecord]:
        """Copies of the last ``n`` operations (no queries), newest first."""
        with self._lock:
            found = islice(reversed(self._operations.values()), n)
            return [dataclasses.replace(r) for r in found]


class FanOutResult(NamedTuple):
    replies: dict[int, CommandReply]  # by worker_id

    @property
    def ok(self) -> bool:
        return all(r.error_code == ErrorCode.OK for r in self.replies.values())

    @property
    def num_tokens(self) -> int:
        """Tokens every rank handled (ranks of one instance hold slices of the same tokens)."""
        return min((r.num_tokens for r in self.replies.values()), default=0)

    def error_summary(self) -> str:
        bad = [
            f"worker {wid}: {ErrorCode(r.error_code).name} {r.message}".strip()
            for wid, r in sorted(self.replies.items())
            if r.error_code != ErrorCode.OK
        ]
        return "; ".join(bad)


class Executor:
    """Runs commands on workers in parallel, each under ``timeout_s``."""

    def __init__(self, transport: Transport, timeout_s: float, max_parallel: int = 32) -> None:
        self._transport = transport
        self.timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(max_parallel, thread_name_prefix="kvplane-exec")

    def fan_out(
        self,
        workers: Sequence[WorkerRecord],
        make_command: Callable[[WorkerRecord], Command],
    ) -> FanOutResult:
        """Send each worker its command; a failed or silent worker gets an error reply."""
        futures = {w.worker_id: self._pool.submit(self._call, w, make_command(w)) for w in workers}
        return FanOutResult({wid: f.result() for wid, f in futures.items()})

    def submit(self, worker: WorkerRecord, command: Command) -> None:
        """Send one command without waiting for its outcome (still under the deadline)."""
        self._pool.submit(self._call, worker, command)

    def _call(self, worker: WorkerRecord, command: Command) -> CommandReply:
        try:
            return self._transport(worker, command, self.timeout_s)
        except Unavailable as exc:
            return CommandReply(error_code=ErrorCode.TIMEOUT, message=str(exc))
        except Exception as exc:  # a transport fault must not take the fan-out down
            return CommandReply(error_code=ErrorCode.UNREACHABLE, message=repr(exc))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
