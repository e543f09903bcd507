"""An ordered, bounded outbox to the event log on NATS JetStream: the worker's wire
(``controller_nats_url``), and a replica's bridge for workers on its ZMQ ports.

The owner's thread :meth:`NatsOutbox.put`\\ s messages (register, heartbeat, numbered
reports, deregister); the outbox's own thread publishes them in order, each on its
subject (by default the worker's, :func:`kvplane.eventlog.worker_subject`), each
acknowledged by JetStream before the next goes, so the log holds a worker's messages in
the order it sent them. A publish that fails (no server, a lost ack) is retried with the same message id,
which the stream's duplicate window stores once.

While the server is away the outbox fills; it is bounded (``controller_nats_buffer``
messages). A message that does not fit is dropped and counted, and the outbox remembers
the loss: once the server is back and the outbox has room, :meth:`take_loss` tells the
worker to resync (register again with a new epoch and resend its full key set), so the
index converges to the engine's own keys.

Peer lookups are NATS requests (:meth:`request`, any thread), answered by one replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections import deque
from typing import Any

import msgspec

from kvplane.eventlog import PEER_LOOKUP_SUBJECT, STREAM
from kvplane.protocol import decode, encode

__all__ = ["NatsOutbox"]

log = logging.getLogger(__name__)

_RETRY_S = 0.25


class NatsOutbox:
    """A bounded, ordered outbox to the event log, with its own thread and connection."""

    def __init__(
        self,
        servers: str,
        subject: str,
        *,
        capacity: int,
        who: str = "worker",
        publish_timeout_s: float = 5.0,
    ) -> None:
        """``subject``: where :meth:`put` publishes unless told another."""
        self.servers = servers.split(",")
        self.subject = subject
        self.capacity = capacity
        self.dropped = 0
        self._who = who
        self._timeout = publish_timeout_s
        self._queue: deque[tuple[str, str, bytes]] = deque()  # (msg id, subject, data)
        self._lock = threading.Lock()
        self._lost = False
        self._boot = os.urandom(6).hex()  # message ids unique across restarts
        self._count = 0
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._nc: Any = None
        self.connected = False
        self._stop = False

    # --- the control thread's side -------------------------------------------------------------

    @property
    def answers(self) -> bool:
        """Peer lookups can be asked (PeerDirectory's test): while connected."""
        return self.connected

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, msg: msgspec.Struct | bytes, subject: str | None = None) -> bool:
        """Queue ``msg`` (a message, or one already encoded) for the log on ``subject``
        (default :attr:`subject`); False (dropped, counted, a resync due) when full."""
        data = msg if isinstance(msg, bytes) else encode(msg)
        with self._lock:
            if len(self._queue) >= self.capacity:
                self.dropped += 1
                self._lost = True
                return False
            self._count += 1
            self._queue.append((f"{self._boot}-{self._count}", subject or self.subject, data))
        if self._wake is not None:
            self._loop.call_soon_threadsafe(self._wake.set)
        return True

    def take_loss(self) -> bool:
        """True once after messages were dropped, when a resync can go out: connected,
        and at most half full."""
        with self._lock:
            if self._lost and self.connected and len(self._queue) <= self.capacity // 2:
                self._lost = False
                return True
            return False

    def drain(self, timeout_s: float) -> bool:
        """Wait until everything queued is published (at stop); whether it was."""
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._drained(), self._loop).result(timeout_s)
        return not self._queue

    def request(self, msg: msgspec.Struct, timeout_s: float) -> Any:
        """Ask the replicas (a peer lookup); the decoded reply, None without one in time."""
        if self._nc is None or not self.connected:
            return None
        future = asyncio.run_coroutine_threadsafe(
            self._nc.request(PEER_LOOKUP_SUBJECT, encode(msg), timeout=timeout_s), self._loop
        )
        try:
            return decode(future.result(timeout_s + 1.0).data)
        except Exception as exc:
            log.debug("%s: peer lookup unanswered: %s", self._who, exc)
            return None

    # --- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kvplane-outbox", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop = True
        if self._thread is None:
            return
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(self._close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    # --- the publishing thread -----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._wake = asyncio.Event()
        self._task = self._loop.create_task(self._publish_loop())
        self._loop.run_forever()

    async def _connect(self) -> Any:
        import nats

        async def down() -> None:
            self.connected = False
            if self._stop:
                return
            log.warning("%s: lost the NATS connection; buffering reports", self._who)

        async def back() -> None:
            self.connected = True
            log.info("%s: NATS connection back (%d messages queued)", self._who, len(self))

        while not self._stop:
            try:
                nc = await nats.connect(
                    self.servers,
                    name=f"kvplane-{self.subject}",
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    connect_timeout=2,
                    disconnected_cb=down,
                    reconnected_cb=back,
                )
                js = nc.jetstream(timeout=self._timeout)
                await js.stream_info(STREAM)  # created by the replicas, with their settings
                self._nc, self.connected = nc, True
                return js
            except Exception as exc:
                log.warning("%s: event log not reachable (%s); retrying", self._who, exc)
                await asyncio.sleep(1.0)
        return None

    async def _publish_loop(self) -> None:
        js = await self._connect()
        assert self._wake is not None
        while js is not None and not self._stop:
            if not self._queue:
                self._wake.clear()
                await self._wake.wait()
                continue
            msg_id, subject, data = self._queue[0]
            try:
                await js.publish(subject, data, headers={"Nats-Msg-Id": msg_id})
            except Exception as exc:  # no server or a lost ack: the same message again
                log.debug("%s: publish failed (%s); retrying", self._who, exc)
                await asyncio.sleep(_RETRY_S)
                continue
            with self._lock:
                self._queue.popleft()

    async def _drained(self) -> None:
        while self._queue and self.connected:
            await asyncio.sleep(0.01)

    async def _close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()
