"""The sockets between vLLM's scheduler process and its worker ranks (see :mod:`.messages`).

:class:`SchedulerChannel` (scheduler process) binds a ROUTER and applies what workers send
to a :class:`~.held.HeldChunks` on its own thread; :class:`WorkerChannel` (each rank)
connects a DEALER, says :class:`~.messages.Hello`, then sends its queued tier events from
one thread and runs prefetch requests on another. Nothing here blocks a scheduling step or
a forward pass.

No probe is lost to a connection that is not up yet (the slow joiner of PUB/SUB): the
scheduler sends a rank a probe only over the connection that rank said hello on, and keeps
the probes for a rank it has not heard from until it does. Each socket is used by its I/O
thread alone; other threads hand it messages through an :class:`_Outbox`.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import zmq

from kvplane.integrations.vllm.held import HeldChunks, TierChange
from kvplane.integrations.vllm.messages import (
    Hello,
    Prefetch,
    PrefetchDone,
    Snapshot,
    TierDelta,
    ToScheduler,
    decode_to_scheduler,
    decode_to_worker,
    encode,
)

__all__ = ["SchedulerChannel", "WorkerChannel"]

log = logging.getLogger(__name__)

_BATCH = 512  # messages per frame from a worker
_WAITING_PROBES = 256  # probes kept per rank that has not said hello yet
_STOP = None

T = TypeVar("T")


def _unlink_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


class _Outbox(Generic[T]):
    """A queue any thread may put into, with a file descriptor (an eventfd) that a ZMQ
    poller watches, so one I/O thread waits on its socket and its outbox at once."""

    def __init__(self) -> None:
        self._items: queue.SimpleQueue[T | None] = queue.SimpleQueue()
        self._fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def fileno(self) -> int:
        return self._fd

    def put(self, item: T | None) -> None:
        self._items.put(item)
        os.eventfd_write(self._fd, 1)

    def take(self, limit: int) -> tuple[list[T], bool]:
        """Up to ``limit`` items, and whether the stop marker was reached."""
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fd)
        items: list[T] = []
        while len(items) < limit:
            try:
                item = self._items.get_nowait()
            except queue.Empty:
                return items, False
            if item is None:
                return items, True
            items.append(item)
        os.eventfd_write(self._fd, 1)  # more left: wake the next poll
        return items, False

    def close(self) -> None:
        os.close(self._fd)


class SchedulerChannel:
    """Receives the workers' tier events into ``held``; sends prefetch requests (probes)
    to every rank of ``held.world_size``.

    ``held`` and everything read from it are guarded by :attr:`lock`.
    """

    def __init__(self, url: str, held: HeldChunks) -> None:
        self.held = held
        self.lock = threading.Lock()
        self._answered = threading.Condition(self.lock)
        self._changes: list[TierChange] = []
        self._prefetch_done: dict[str, dict[int, int]] = {}  # outstanding probes only
        self._outbox: _Outbox[tuple[str, bytes]] = _Outbox()
        self._ranks: dict[int, bytes] = {}  # rank -> its connection (I/O thread only)
        self._waiting: dict[int, collections.deque[tuple[str, bytes]]] = {}
        self._ctx = zmq.Context()
        self._router = self._ctx.socket(zmq.ROUTER)
        self._router.setsockopt(zmq.LINGER, 0)
        self._router.setsockopt(zmq.ROUTER_MANDATORY, 1)
        _unlink_ipc(url)  # a socket file left by a killed engine
        self._router.bind(url)
        self._url = url
        self._thread = threading.Thread(target=self._run, name="kvplane-vllm-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._router, zmq.POLLIN)
        poller.register(self._outbox.fileno(), zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._router in ready:
                self._receive()
            if self._outbox.fileno() in ready:
                probes, stop = self._outbox.take(_BATCH)
                for req_id, frame in probes:
                    for rank in range(self.held.world_size):
                        self._send(rank, req_id, frame)
                if stop:
                    return

    def _receive(self) -> None:
        while True:
            try:
                peer, data = self._router.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:  # not [identity, payload]
                continue
            try:
                messages = decode_to_scheduler(data)
            except Exception:  # a bad frame must not stop the channel
                log.exception("kvplane: undecodable message from a worker")
                continue
            hellos = [m.rank for m in messages if isinstance(m, Hello)]
            with self.lock:
                for message in messages:
                    if not isinstance(message, Hello):
                        self._apply(message)
            for rank in hellos:
                self._ranks[rank] = peer
                self._send_waiting(rank)

    def _send(self, rank: int, req_id: str, frame: bytes) -> None:
        peer = self._ranks.get(rank)
        if peer is not None:
            try:
                self._router.send_multipart([peer, frame], zmq.NOBLOCK)
                return
            except zmq.ZMQError as exc:  # gone (EHOSTUNREACH) or full: keep it for a hello
                log.warning("kvplane: probe %s to rank %d not sent: %s", req_id, rank, exc)
                self._ranks.pop(rank, None)
        waiting = self._waiting.setdefault(rank, collections.deque(maxlen=_WAITING_PROBES))
        waiting.append((req_id, frame))

    def _send_waiting(self, rank: int) -> None:
        waiting = self._waiting.pop(rank, None) or ()
        for req_id, frame in waiting:
            with self.lock:
                outstanding = req_id in self._prefetch_done
            if outstanding:
                self._send(rank, req_id, frame)

    def _apply(self, message: ToScheduler) -> None:
        if isinstance(message, TierDelta):
            change = self.held.admit if message.admitted else self.held.evict
            self._changes += change(message.rank, message.location, message.hashes)
        elif isinstance(message, Snapshot):
            self._changes += self.held.drop_rank(message.rank)
            for location, hashes in message.tiers.items():
                self._changes += self.held.admit(message.rank, location, hashes)
        elif isinstance(message, PrefetchDone):
            answers = self._prefetch_done.get(message.req_id)
            if answers is not None:  # a forgotten probe's late answer is dropped
                answers[message.rank] = message.held_tokens
                self._answered.notify_all()

    def take_changes(self) -> list[TierChange]:
        with self.lock:
            changes, self._changes = self._changes, []
        return changes

    def request_prefetch(self, req_id: str, token_ids: list[int]) -> None:
        with self.lock:
            self._prefetch_done[req_id] = {}
        self._outbox.put((req_id, encode(Prefetch(req_id, token_ids))))

    def wait_answers(self, req_id: str, world_size: int, timeout: float) -> int:
        """How many ranks answered the probe ``req_id``, once all ``world_size`` did or
        ``timeout`` passed. The wait releases the GIL and ends as the last answer lands, so
        this process's channel thread gets the GIL at once instead of after vLLM's loop
        gives it up (one switch interval, 5 ms, per message)."""
        with self._answered:
            self._answered.wait_for(
                lambda: len(self._prefetch_done.get(req_id, {})) >= world_size, timeout
            )
            return len(self._prefetch_done.get(req_id, {}))

    def probed_tokens(self, req_id: str, world_size: int) -> int:
        """The prefix every rank reported holding after the prefetch (0 if one is missing)."""
        with self.lock:
            answers = self._prefetch_done.get(req_id, {})
            if len(answers) < world_size:
                return 0
            return min(answers.values())

    def forget_prefetch(self, req_id: str) -> None:
        with self.lock:
            self._prefetch_done.pop(req_id, None)

    def close(self) -> None:
        self._outbox.put(_STOP)
        self._thread.join(timeout=2)
        self._router.close()
        self._ctx.term()
        self._outbox.close()
        _unlink_ipc(self._url)


class WorkerChannel:
    """One rank's side: :meth:`changed` and :meth:`snapshot` may be called from any thread
    (the rank's tier-event pump); the I/O thread sends them to the scheduler in order.
    ``prefetch`` answers a scheduler's prefetch request on the prefetch thread and returns
    the tokens held afterwards."""

    def __init__(self, rank: int, url: str, prefetch: Callable[[list[int]], int]) -> None:
        self.rank = rank
        self._prefetch = prefetch
        self._outbox: _Outbox[ToScheduler] = _Outbox()
        self._requests: queue.SimpleQueue[Prefetch | None] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        self._dealer = self._ctx.socket(zmq.DEALER)
        self._dealer.setsockopt(zmq.LINGER, 500)
        self._dealer.connect(url)  # queued until the scheduler binds
        self._idle = threading.Event()  # clear while a prefetch runs
        self._idle.set()
        self._threads = [
            threading.Thread(target=self._io_loop, name="kvplane-vllm-send", daemon=True),
            threading.Thread(target=self._prefetch_loop, name="kvplane-vllm-prefetch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def snapshot(self, tiers: dict[str, list[int]]) -> None:
        self._outbox.put(Snapshot(self.rank, tiers))

    def changed(self, location: str, admitted: bool, chunk_hash: int) -> None:
        self._outbox.put(TierDelta(self.rank, location, admitted, [chunk_hash]))

    def yield_to_prefetch(self, timeout: float) -> None:
        """Wait (GIL released) until no prefetch runs, at most ``timeout`` seconds.

        While the scheduler waits for a probe, vLLM steps without work hundreds of times a
        second; each step is Python in this process holding the GIL, which starves the
        prefetch thread's socket reads (a 1-second fetch became a 5-second timeout).
        """
        if not self._idle.is_set():
            self._idle.wait(timeout)

    def _io_loop(self) -> None:
        self._send([Hello(self.rank)])
        poller = zmq.Poller()
        poller.register(self._dealer, zmq.POLLIN)
        poller.register(self._outbox.fileno(), zmq.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._dealer in ready:
                self._receive()
            if self._outbox.fileno() in ready:
                batch, stop = self._outbox.take(_BATCH)
                if batch:
                    self._send(_coalesce(batch))
                if stop:
                    self._requests.put(None)
                    return

    def _send(self, messages: list[ToScheduler]) -> None:
        try:
            self._dealer.send(encode(messages))
        except zmq.ZMQError:
            log.exception("kvplane: tier events to the scheduler lost")

    def _receive(self) -> None:
        while True:
            try:
                data = self._dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                self._requests.put(decode_to_worker(data))
            except Exception:
                log.exception("kvplane: undecodable prefetch request")

    def _prefetch_loop(self) -> None:
        while (request := self._requests.get()) is not None:
            started = time.perf_counter()
            self._idle.clear()
            try:
                held = self._prefetch(request.token_ids)
            except Exception:  # a failed fetch is a miss, never an error in vLLM
                log.exception("kvplane: prefetch of %s failed", request.req_id)
                held = 0
            finally:
                self._idle.set()
            log.debug(
                "prefetch %s: %d tokens held after %.1f ms",
                request.req_id,
                held,
                (time.perf_counter() - started) * 1e3,
            )
            self._outbox.put(PrefetchDone(self.rank, request.req_id, held))

    def close(self) -> None:
        self._outbox.put(_STOP)
        for thread in self._threads:
            thread.join(timeout=2)
        self._dealer.close()
        self._ctx.term()
        self._outbox.close()


def _coalesce(batch: list[ToScheduler]) -> list[ToScheduler]:
    """Merge runs of single-chunk deltas of one tier and direction, keeping order."""
    out: list[ToScheduler] = []
    for item in batch:
        last = out[-1] if out else None
        if (
            isinstance(item, TierDelta)
            and isinstance(last, TierDelta)
            and (last.location, last.admitted) == (item.location, item.admitted)
        ):
            out[-1] = TierDelta(item.rank, item.location, item.admitted, last.hashes + item.hashes)
        else:
            out.append(item)
    return out
