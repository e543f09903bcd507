"""Storage events as data: what a tier admitted or evicted, queued for whoever consumes it.

A tier hands each :class:`ChunkAdmitted` / :class:`ChunkEvicted` to its one sink, the
storage manager, on the thread that changed the tier. The storage manager applies freeze
(holding events back) and publishes the rest to an :class:`EventStream`. Every consumer
(the controller worker's reports, the vLLM connector's scheduler index) holds its own
:class:`Subscription`: a bounded, thread-safe queue it drains on its own thread with
:meth:`Subscription.take_events`, as vLLM's block pool is drained. Publishing never waits
for a consumer: a tier's writer thread or a request thread only appends to queues.

Overflow rule. A subscription holds at most ``capacity`` events. When one more arrives, the
pending events are discarded (counted in :attr:`Subscription.dropped`), the subscription is
marked as needing a resync (:meth:`Subscription.take_resync`), and queueing goes on with
the new event. Discarding all of them (not just the newest) frees the memory at once and
loses nothing the consumer could still use: after a loss it must rebuild its view from a
snapshot of the tiers (:meth:`StorageManager.snapshot`) anyway. Each event sets one
(chunk, tier) to held or not held, so events older than that snapshot, taken after it,
leave the view equal to the tiers' state: a consumer needs no barrier between the two.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from typing import NamedTuple

from kvplane.keys import CacheKey

__all__ = [
    "DEFAULT_CAPACITY",
    "ChunkAdmitted",
    "ChunkEvicted",
    "EventSink",
    "EventStream",
    "StorageEvent",
    "Subscription",
]


class ChunkAdmitted(NamedTuple):
    key: CacheKey
    location: str


class ChunkEvicted(NamedTuple):
    key: CacheKey
    location: str


StorageEvent = ChunkAdmitted | ChunkEvicted
EventSink = Callable[[StorageEvent], None]

#: Events one subscription holds before it overflows: a burst of this many admits or evicts
#: (a clear of a large tier) between two takes costs a resync, not memory without bound.
DEFAULT_CAPACITY = 65_536


class Subscription:
    """One consumer's queue of storage events, in the order they were published.

    Thread-safe. The publisher side only appends (under this queue's lock, never waiting for
    the consumer); the consumer takes from any one thread. After :meth:`close` nothing more
    is queued and every wait returns at once.
    """

    def __init__(
        self,
        name: str,
        capacity: int,
        *,
        on_close: Callable[[Subscription], None] | None = None,
        on_drop: Callable[[str, int], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"subscription {name!r}: capacity must be at least 1")
        self.name = name
        self.capacity = capacity
        self._on_close = on_close
        self._on_drop = on_drop
        self._ready = threading.Condition()
        self._events: deque[StorageEvent] = deque()
        self._resync = False
        self._dropped = 0
        self._closed = False

    # ------------------------------------------------------------------ consumer side
    def take_events(self, timeout: float | None = 0.0) -> list[StorageEvent]:
        """Every pending event, oldest first, removed from the queue. Waits up to
        ``timeout`` seconds (None: until something happens) while none is pending and no
        resync is due; returns ``[]`` when the wait ends empty or the subscription is closed.
        Check :meth:`take_resync` after a take: events may have been lost before these."""
        with self._ready:
            if timeout != 0.0:
                self._wait_locked(timeout)
            events = list(self._events)
            self._events.clear()
            return events

    def wait(self, timeout: float | None = None) -> bool:
        """Block until events are pending, a resync is due or the subscription is closed,
        or ``timeout`` seconds passed; whether events are pending or a resync is due."""
        with self._ready:
            return self._wait_locked(timeout)

    def take_resync(self) -> bool:
        """Whether events were lost (overflow) since the last call; clears the mark. On True
        the consumer must rebuild its view from a snapshot of the tiers (module docstring)."""
        with self._ready:
            resync, self._resync = self._resync, False
            return resync

    @property
    def dropped(self) -> int:
        """Events discarded by overflows since the subscription was made."""
        with self._ready:
            return self._dropped

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        """Events pending now."""
        with self._ready:
            return len(self._events)

    def close(self) -> None:
        """Stop receiving events (the stream forgets this subscription), discard what is
        pending and wake every waiter. Idempotent."""
        with self._ready:
            if self._closed:
                return
            self._closed = True
            self._events.clear()
            self._ready.notify_all()
        if self._on_close is not None:
            self._on_close(self)

    def _wait_locked(self, timeout: float | None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self._events or self._resync or self._closed):
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            self._ready.wait(left)
        return bool(self._events) or self._resync

    # ------------------------------------------------------------------ publisher side
    def offer(self, event: StorageEvent) -> None:
        """Queue ``event`` (the publisher's side; see the overflow rule above)."""
        lost = 0
        with self._ready:
            if self._closed:
                return
            if len(self._events) >= self.capacity:
                lost = len(self._events)
                self._dropped += lost
                self._events.clear()
                self._resync = True
            self._events.append(event)
            self._ready.notify_all()
        if lost and self._on_drop is not None:
            self._on_drop(self.name, lost)


class EventStream:
    """Fans published events out to every open subscription. Thread-safe; the caller
    publishes in one order (the storage manager holds its events lock), so every
    subscription sees the same order."""

    def __init__(self, *, on_drop: Callable[[str, int], None] | None = None) -> None:
        """``on_drop(name, n)``: ``n`` events of subscription ``name`` were discarded."""
        self._on_drop = on_drop
        self._lock = threading.Lock()
        self._subscriptions: tuple[Subscription, ...] = ()

    def subscribe(self, name: str, *, capacity: int = DEFAULT_CAPACITY) -> Subscription:
        """A new subscription that receives every event published from now on."""
        sub = Subscription(name, capacity, on_close=self._forget, on_drop=self._on_drop)
        with self._lock:
            self._subscriptions = (*self._subscriptions, sub)
        return sub

    def publish(self, event: StorageEvent) -> None:
        for sub in self._subscriptions:  # replaced whole on change: no lock needed to read
            sub.offer(event)

    def __len__(self) -> int:
        """Open subscriptions."""
        return len(self._subscriptions)

    def _forget(self, sub: Subscription) -> None:
        with self._lock:
            self._subscriptions = tuple(s for s in self._subscriptions if s is not sub)
