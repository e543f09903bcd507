"""The sockets between vLLM's scheduler process and its worker ranks (see :mod:`.messages`).

:class:`SchedulerChannel` (scheduler process) binds both endpoints and applies what
workers send to a :class:`~.held.HeldChunks` on its own thread; :class:`WorkerChannel`
(each rank) queues its tier events and sends them from one thread, and answers prefetch
requests on another. Nothing here blocks a scheduling step or a forward pass.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from kvplane.integrations.vllm.held import HeldChunks, TierChange
from kvplane.integrations.vllm.messages import (
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

_POLL_MS = 100
_BATCH = 512  # messages per frame from a worker


def _unlink_ipc(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        Path(endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


class SchedulerChannel:
    """Receives the workers' tier events into ``held``; publishes prefetch requests.

    ``held`` and everything read from it are guarded by :attr:`lock`.
    """

    def __init__(self, events_url: str, prefetch_url: str, held: HeldChunks) -> None:
        self.held = held
        self.lock = threading.Lock()
        self._answered = threading.Condition(self.lock)
        self._changes: list[TierChange] = []
        self._prefetch_done: dict[str, dict[int, int]] = {}
        self._ctx = zmq.Context()
        self._pull = self._ctx.socket(zmq.PULL)
        self._pub = self._ctx.socket(zmq.PUB)
        for sock, url in ((self._pull, events_url), (self._pub, prefetch_url)):
            sock.setsockopt(zmq.LINGER, 0)
            _unlink_ipc(url)  # a socket file left by a killed engine
            sock.bind(url)
        self._urls = (events_url, prefetch_url)
        self._pub_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kvplane-vllm-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._pull, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            try:
                messages = decode_to_scheduler(self._pull.recv(zmq.NOBLOCK))
            except zmq.ZMQError:
                continue
            except Exception:  # a bad frame must not stop the channel
                log.exception("kvplane: undecodable message from a worker")
                continue
            with self.lock:
                for message in messages:
                    self._apply(message)

    def _apply(self, message: ToScheduler) -> None:
        if isinstance(message, TierDelta):
            change = self.held.admit if message.admitted else self.held.evict
            self._changes += change(message.rank, message.location, message.hashes)
        elif isinstance(message, Snapshot):
            self._changes += self.held.drop_rank(message.rank)
            for location, hashes in message.tiers.items():
                self._changes += self.held.admit(message.rank, location, hashes)
        else:
            self._prefetch_done.setdefault(message.req_id, {})[message.rank] = message.held_tokens
            self._answered.notify_all()

    def take_changes(self) -> list[TierChange]:
        with self.lock:
            changes, self._changes = self._changes, []
        return changes

    def request_prefetch(self, req_id: str, token_ids: list[int]) -> None:
        with self._pub_lock:
            self._pub.send(encode(Prefetch(req_id, token_ids)))

    def prefetch_answers(self, req_id: str) -> int:
        """How many ranks reported the prefetch of ``req_id`` done."""
        with self.lock:
            return len(self._prefetch_done.get(req_id, {}))

    def wait_answers(self, req_id: str, world_size: int, timeout: float) -> int:
        """:meth:`prefetch_answers`, once all ``world_size`` ranks answered or ``timeout``
        passed. The wait releases the GIL and ends as the last answer lands, so this
        process's channel thread gets the GIL at once instead of after vLLM's loop gives it
        up (one switch interval, 5 ms, per message)."""
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
        self._stop.set()
        self._thread.join(timeout=2)
        self._pull.close()
        self._pub.close()
        self._ctx.term()
        for url in self._urls:
            _unlink_ipc(url)


class WorkerChannel:
    """One rank's side: :meth:`changed` and :meth:`snapshot` may be called from any thread
    (the rank's tier-event pump); a sender thread batches them to the scheduler in order.
    ``prefetch`` answers a scheduler's prefetch request on the prefetch thread and returns
    the tokens held afterwards."""

    def __init__(
        self,
        rank: int,
        events_url: str,
        prefetch_url: str,
        prefetch: Callable[[list[int]], int],
    ) -> None:
        self.rank = rank
        self._prefetch = prefetch
        self._queue: queue.SimpleQueue[ToScheduler | None] = queue.SimpleQueue()
        self._ctx = zmq.Context()
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 500)
        self._push.connect(events_url)  # queued until the scheduler binds
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.setsockopt(zmq.LINGER, 0)
        self._sub.setsockopt(zmq.SUBSCRIBE, b"")
        self._sub.connect(prefetch_url)
        self._stop = threading.Event()
        self._idle = threading.Event()  # clear while a prefetch runs
        self._idle.set()
        self._threads = [
            threading.Thread(target=self._send_loop, name="kvplane-vllm-send", daemon=True),
            threading.Thread(target=self._prefetch_loop, name="kvplane-vllm-prefetch", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def snapshot(self, tiers: dict[str, list[int]]) -> None:
        self._queue.put(Snapshot(self.rank, tiers))

    def changed(self, location: str, admitted: bool, chunk_hash: int) -> None:
        self._queue.put(TierDelta(self.rank, location, admitted, [chunk_hash]))

    def yield_to_prefetch(self, timeout: float) -> None:
        """Wait (GIL released) until no prefetch runs, at most ``timeout`` seconds.

        While the scheduler waits for a probe, vLLM steps without work hundreds of times a
        second; each step is Python in this process holding the GIL, which starves the
        prefetch thread's socket reads (a 1-second fetch became a 5-second timeout).
        """
        if not self._idle.is_set():
            self._idle.wait(timeout)

    def _send_loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch: list[ToScheduler] = [first]
            while len(batch) < _BATCH:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)
                    break
                batch.append(item)
            try:
                self._push.send(encode(_coalesce(batch)))
            except zmq.ZMQError:
                log.exception("kvplane: tier events to the scheduler lost")

    def _prefetch_loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sub, zmq.POLLIN)
        while not self._stop.is_set():
            if not poller.poll(_POLL_MS):
                continue
            try:
                request: Prefetch = decode_to_worker(self._sub.recv(zmq.NOBLOCK))
            except zmq.ZMQError:
                continue
            except Exception:
                log.exception("kvplane: undecodable prefetch request")
                continue
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
            self._queue.put(PrefetchDone(self.rank, request.req_id, held))

    def close(self) -> None:
        self._stop.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=2)
        self._push.close()
        self._sub.close()
        self._ctx.term()


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
