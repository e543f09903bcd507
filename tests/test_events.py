"""Storage events as data: subscriptions' order, fan-out, waiting, the overflow rule, and the
storage manager's stream (freeze held back, a slow consumer never blocking a tier)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted, EventStream
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.storage_manager import StorageManager
from kvplane.keys import CacheKey

CPU = "LocalCPUBackend"


def key(i: int) -> CacheKey:
    return CacheKey("m", 1, 0, "float32", i)


def admitted(*ids: int) -> list[ChunkAdmitted]:
    return [ChunkAdmitted(key(i), CPU) for i in ids]


def test_every_subscription_gets_every_event_in_order_from_when_it_subscribed():
    stream = EventStream()
    early = stream.subscribe("early")
    stream.publish(ChunkAdmitted(key(0), CPU))
    late = stream.subscribe("late")
    stream.publish(ChunkEvicted(key(0), CPU))
    stream.publish(ChunkAdmitted(key(1), CPU))
    assert early.take_events() == [
        ChunkAdmitted(key(0), CPU),
        ChunkEvicted(key(0), CPU),
        ChunkAdmitted(key(1), CPU),
    ]
    assert late.take_events() == [ChunkEvicted(key(0), CPU), ChunkAdmitted(key(1), CPU)]
    assert early.take_events() == [] and len(early) == 0


def test_overflow_discards_the_pending_events_counts_them_and_asks_for_a_resync():
    drops: list[tuple[str, int]] = []
    stream = EventStream(on_drop=lambda name, n: drops.append((name, n)))
    slow = stream.subscribe("slow", capacity=3)
    fast = stream.subscribe("fast", capacity=3)
    for i in range(3):
        stream.publish(ChunkAdmitted(key(i), CPU))
    assert fast.take_events() == admitted(0, 1, 2)
    assert not slow.take_resync()
    stream.publish(ChunkAdmitted(key(3), CPU))  # slow is full: 0..2 are lost, 3 is kept
    stream.publish(ChunkAdmitted(key(4), CPU))
    assert (slow.dropped, len(slow)) == (3, 2)
    assert drops == [("slow", 3)]
    assert slow.take_events() == admitted(3, 4)
    assert slow.take_resync() is True
    assert slow.take_resync() is False  # told once per loss
    assert fast.take_events() == admitted(3, 4) and fast.dropped == 0 and not fast.take_resync()


def test_a_consumer_that_never_takes_never_blocks_the_publisher():
    stream = EventStream()
    stuck = stream.subscribe("stuck", capacity=10)

    def publish() -> None:
        for i in range(10_000):
            stream.publish(ChunkAdmitted(key(i), CPU))

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    publisher.join(timeout=60)  # a publisher waiting for the consumer would still be alive
    assert not publisher.is_alive()
    assert len(stuck) <= 10 and stuck.dropped + len(stuck) == 10_000
    assert stuck.take_resync()


def test_take_events_waits_for_an_event_from_another_thread():
    stream = EventStream()
    sub = stream.subscribe("waiter")
    assert sub.take_events(timeout=0.05) == []  # nothing came
    assert sub.wait(timeout=0.01) is False
    timer = threading.Timer(0.05, stream.publish, [ChunkAdmitted(key(7), CPU)])
    timer.start()
    try:
        assert sub.take_events(timeout=10) == admitted(7)
    finally:
        timer.cancel()


def test_close_wakes_a_waiter_and_stops_delivery():
    stream = EventStream()
    sub = stream.subscribe("closing")
    stream.publish(ChunkAdmitted(key(1), CPU))
    got: list[object] = []
    sub.take_events()
    waiter = threading.Thread(target=lambda: got.append(sub.take_events(timeout=None)))
    waiter.start()
    time.sleep(0.05)
    sub.close()
    waiter.join(timeout=5)
    assert not waiter.is_alive() and got == [[]]
    assert sub.closed and len(stream) == 0
    stream.publish(ChunkAdmitted(key(2), CPU))
    assert sub.take_events(timeout=None) == [] and sub.wait(timeout=None) is False
    sub.close()  # idempotent


def test_capacity_must_be_positive():
    with pytest.raises(ValueError, match="capacity"):
        EventStream().subscribe("none", capacity=0)


def cpu_storage() -> tuple[StorageManager, LocalCPUBackend]:
    cpu = LocalCPUBackend(HostMemoryPool(64, 8, pin=False))
    return StorageManager([cpu]), cpu


def chunk() -> KVChunk:
    return KVChunk.from_kv(torch.zeros(1, 1, 4, 1, 2), 4)


def test_the_storage_manager_queues_tier_events_holds_them_while_frozen_and_counts_losses():
    storage, cpu = cpu_storage()
    sub = storage.subscribe("test", capacity=2)
    assert cpu.put(key(1), chunk())
    assert sub.take_events() == admitted(1)
    storage.frozen = True
    assert cpu.remove(key(1))
    assert cpu.put(key(1), chunk())  # the last event per chunk and tier is what is held
    assert sub.take_events() == []
    storage.frozen = False
    assert sub.take_events() == admitted(1)
    for i in (2, 3, 4):
        assert cpu.put(key(i), chunk())
    assert sub.take_events() == admitted(4) and sub.take_resync()
    assert storage.metrics.events_dropped.labels("test")._value.get() == 2
    storage.close()
