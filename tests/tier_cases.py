"""How to build each tier for the shared contract suite (tests/test_tier_contract.py).

A :class:`TierCase` says what the tier can do (writable, evicting, persistent) and how to
break it (failure injection), so one suite runs against every tier.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvplane.engine import chunk_files
from kvplane.engine.backends.base import StorageBackend
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.disk import LocalDiskBackend
from kvplane.engine.backends.fs import FSConnectorBackend
from kvplane.engine.backends.p2p import P2PBackend
from kvplane.engine.backends.remote import RemoteBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.events import StorageEvent
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.p2p import ChunkServer, P2PClient
from kvplane.keys import CacheKey
from tests.redis_support import RedisServer

CHUNK_SHAPE = (2, 2, 16, 4, 8)  # layers, K/V, tokens, heads, head size: 8 KiB in bfloat16


def make_key(i: int, model: str = "test/model") -> CacheKey:
    return CacheKey(model, 1, 0, "bfloat16", 0x1000 + i)


def make_chunk(seed: int) -> KVChunk:
    g = torch.Generator().manual_seed(seed)
    kv = torch.randn(CHUNK_SHAPE, generator=g).to(torch.bfloat16)
    return KVChunk.from_kv(kv, CHUNK_SHAPE[2])


def same_kv(a: KVChunk | None, b: KVChunk) -> bool:
    return a is not None and a.meta == b.meta and torch.equal(a.payload, b.payload)


@dataclass
class TierCase:
    backend: StorageBackend
    #: how a chunk gets into the tier (``put``, or into the peer for the p2p tier)
    seed: Callable[[CacheKey, KVChunk], bool]
    #: make every stored chunk unreadable (corrupt files, stop the server, kill the peer);
    #: None for the CPU tier, which is this process's memory and has no fault of its own
    break_it: Callable[[], None] | None
    writable: bool = True
    #: chunks of make_chunk() size that fit; None: the tier does not evict
    capacity_chunks: int | None = None
    #: a fresh instance over the same storage (None: not persistent)
    reopen: Callable[[], StorageBackend] | None = None
    events: list[StorageEvent] = field(default_factory=list)


def _corrupt_files(root: Path) -> None:
    for f in chunk_files.scan(root):
        data = bytearray(f.path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.path.write_bytes(data)


def _frame_size() -> int:
    return len(chunk_files.serde.encode(make_key(0), make_chunk(0)))


@contextlib.contextmanager
def tier_case(kind: str, tmp_path: Path) -> Iterator[TierCase]:
    """Build the tier ``kind`` over fresh storage under ``tmp_path``; tear it all down."""
    builders = {"cpu": _cpu, "disk": _disk, "fs": _fs, "remote": _remote, "p2p": _p2p}
    with builders[kind](tmp_path) as case:
        case.backend.set_event_sink(case.events.append)
        try:
            yield case
        finally:
            case.backend.close()


@contextlib.contextmanager
def _cpu(tmp_path: Path) -> Iterator[TierCase]:
    pool = HostMemoryPool(make_chunk(0).nbytes, 4, pin=False)
    backend = LocalCPUBackend(pool)
    yield TierCase(
        backend,
        seed=backend.put,
        break_it=None,
        capacity_chunks=4,
    )


@contextlib.contextmanager
def _disk(tmp_path: Path) -> Iterator[TierCase]:
    root = tmp_path / "disk"
    capacity = 4 * _frame_size()
    backend = LocalDiskBackend(root, capacity)
    yield TierCase(
        backend,
        seed=backend.put,
        break_it=lambda: _corrupt_files(root),
        capacity_chunks=4,
        reopen=lambda: LocalDiskBackend(root, capacity),
    )


@contextlib.contextmanager
def _fs(tmp_path: Path) -> Iterator[TierCase]:
    root = tmp_path / "shared"
    backend = FSConnectorBackend(root)
    yield TierCase(
        backend,
        seed=backend.put,
        break_it=lambda: _corrupt_files(root),
        reopen=lambda: FSConnectorBackend(root),
    )


@contextlib.contextmanager
def _remote(tmp_path: Path) -> Iterator[TierCase]:
    server = RedisServer(tmp_path)
    server.start()
    try:
        backend = RemoteBackend(server.url, timeout_s=0.5)
        yield TierCase(
            backend,
            seed=backend.put,
            break_it=server.stop,
            reopen=lambda: RemoteBackend(server.url, timeout_s=0.5),
        )
    finally:
        server.stop()


@contextlib.contextmanager
def _p2p(tmp_path: Path) -> Iterator[TierCase]:
    store: dict[CacheKey, KVChunk] = {}

    def put(key: CacheKey, chunk: KVChunk, location: str | None = None) -> bool:
        store[key] = chunk
        return True

    peer = ChunkServer(
        "127.0.0.1", 0, lambda key: contextlib.nullcontext(store.get(key)), put, timeout_s=2.0
    )
    peer.start()
    try:

        def locate(keys: object) -> str | None:
            return peer.url if any(k in store for k in keys) else None  # type: ignore[attr-defined]

        backend = P2PBackend(P2PClient(timeout_s=1.0), locate)
        yield TierCase(backend, seed=put, break_it=peer.close, writable=False)
    finally:
        peer.close()
