"""The tiers inside a whole engine: built from config, promoted on retrieve, surviving a
restart, compressed in place, fetched from and moved to a peer engine."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from kvplane.config import EngineConfig
from kvplane.engine.kv.copies import gather
from kvplane.engine.p2p.move import MoveRequest
from kvplane.engine.tiers import build_backends
from kvplane.errors import BadRequest, ConfigError, Conflict, NotFound
from kvplane.process import EngineProcess
from tests.api_client import ENGINE_DEFAULTS
from tests.redis_support import RedisServer, needs_redis

TOKENS = list(range(500, 545))  # two full chunks and a partial one


def runtime(**overrides: object) -> EngineProcess:
    return EngineProcess(EngineConfig(**{**ENGINE_DEFAULTS, **overrides}))


def slots(rt: EngineProcess, seed: int, n: int = len(TOKENS)) -> torch.Tensor:
    return torch.randperm(rt.layout.num_slots, generator=torch.Generator().manual_seed(seed))[:n]


def kv_at(rt: EngineProcess, s: torch.Tensor) -> torch.Tensor:
    return gather(rt.layout, rt.kv_caches, s).float()


def test_tiers_are_built_in_order_from_config(tmp_path: Path) -> None:
    cfg = EngineConfig(
        **ENGINE_DEFAULTS,
        local_disk=f"file://{tmp_path / 'disk'}",
        max_local_disk_size=0.001,
        remote_url=f"fs://{tmp_path / 'shared'}",
        enable_p2p=True,
    )
    from kvplane.engine.memory_pool import HostMemoryPool

    tiers = build_backends(cfg, HostMemoryPool(4096, 2, pin=False))
    assert [t.name for t in tiers] == [
        "LocalCPUBackend",
        "LocalDiskBackend",
        "FSConnector",
        "P2PBackend",
    ]
    assert (tmp_path / "disk").is_dir() and (tmp_path / "shared").is_dir()
    for t in tiers:
        t.close()


def test_bad_tier_settings_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"valid schemes: \['fs', 'redis', 'rediss', 'unix'\]"):
        build_backends(EngineConfig(remote_url="s3://bucket"), None)
    with pytest.raises(ConfigError, match="max_local_disk_size"):
        build_backends(EngineConfig(local_disk=str(tmp_path)), None)
    with pytest.raises(ConfigError, match="p2p_init_ports"):
        runtime(enable_p2p=True, p2p_init_ports=[1234], worker_id=1)


def test_disk_tier_serves_after_cpu_clear_and_after_restart(tmp_path: Path) -> None:
    disk = dict(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    rt = runtime(**disk)
    s = slots(rt, 1)
    expected = kv_at(rt, s)
    assert rt.cache_engine.store(TOKENS, rt.kv_caches, s).num_chunks == 3
    assert rt.storage.flush(5)
    assert rt.cache_engine.clear(["LocalCPUBackend"]) == (3, len(TOKENS))  # 16 + 16 + 13
    assert rt.storage.locate(rt.cache_engine.keys_for(TOKENS)[0]) == "LocalDiskBackend"
    for cache in rt.kv_caches:
        cache.zero_()
    assert rt.cache_engine.retrieve(TOKENS, rt.kv_caches, s).num_tokens == len(TOKENS)
    assert torch.equal(kv_at(rt, s), expected)
    # promoted back into the CPU tier
    assert rt.storage.locate(rt.cache_engine.keys_for(TOKENS)[0]) == "LocalCPUBackend"
    rt.stop()

    again = runtime(**disk)  # a new process over the same directory: the cache survives
    assert again.cache_engine.lookup(TOKENS) == len(TOKENS)
    s2 = slots(again, 2)
    assert again.cache_engine.retrieve(TOKENS, again.kv_caches, s2).num_tokens == len(TOKENS)
    assert torch.equal(kv_at(again, s2), expected)
    # the disk tier counts a clear's tokens from its files' headers (a partial last chunk)
    assert again.cache_engine.clear(["LocalDiskBackend"]) == (3, len(TOKENS))
    again.stop()


def test_snapshot_lists_the_matching_hashes_of_every_tier(tmp_path: Path) -> None:
    rt = runtime(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    rt.cache_engine.store(TOKENS, rt.kv_caches, slots(rt, 3))
    assert rt.storage.flush(5)
    hashes = [k.chunk_hash for k in rt.cache_engine.keys_for(TOKENS)]
    everything = rt.storage.snapshot(lambda key: True)
    assert list(everything) == ["LocalCPUBackend", "LocalDiskBackend"]
    assert {tier: sorted(h) for tier, h in everything.items()} == {
        "LocalCPUBackend": sorted(hashes),
        "LocalDiskBackend": sorted(hashes),
    }
    assert rt.storage.snapshot(lambda key: key.chunk_hash == hashes[1]) == {
        "LocalCPUBackend": [hashes[1]],
        "LocalDiskBackend": [hashes[1]],
    }
    assert rt.storage.snapshot(lambda key: key.worker_id == 1) == {
        "LocalCPUBackend": [],
        "LocalDiskBackend": [],
    }
    rt.stop()


@needs_redis
def test_remote_tier_in_the_engine_and_a_dead_server(tmp_path: Path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    try:
        rt = runtime(remote_url=server.url, remote_timeout_s=0.3)
        s = slots(rt, 3)
        expected = kv_at(rt, s)
        rt.cache_engine.store(TOKENS, rt.kv_caches, s)
        assert rt.storage.flush(5)
        rt.cache_engine.clear(["LocalCPUBackend"])
        assert rt.cache_engine.lookup(TOKENS) == len(TOKENS)
        assert rt.cache_engine.retrieve(TOKENS, rt.kv_caches, s).num_tokens == len(TOKENS)
        assert torch.equal(kv_at(rt, s), expected)
        server.stop()
        start = time.monotonic()
        other = [t + 10_000 for t in TOKENS]
        rt.cache_engine.store(other, rt.kv_caches, s)  # CPU takes it; the remote write drops
        assert rt.cache_engine.lookup(other) == len(other)
        assert rt.cache_engine.lookup([1, 2, 3]) == 0
        assert time.monotonic() - start < 30  # each remote call ends at its 0.3 s deadline
        rt.stop()
    finally:
        server.stop()


@pytest.mark.parametrize("location", ["LocalCPUBackend", "LocalDiskBackend"])
def test_compress_in_place_and_retrieve_decodes(tmp_path: Path, location: str) -> None:
    rt = runtime(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    engine = rt.cache_engine
    s = slots(rt, 4)
    expected = kv_at(rt, s)
    engine.store(TOKENS, rt.kv_caches, s)
    rt.storage.flush(5)
    if location == "LocalDiskBackend":
        engine.clear(["LocalCPUBackend"])
    packed = engine.compress_chunks(TOKENS, "zstd", location)
    assert (packed.num_chunks, packed.num_tokens) == (3, len(TOKENS))
    key = engine.keys_for(TOKENS)[0]
    assert rt.storage.backends[location].get(key).meta.compression == "zstd"  # type: ignore[union-attr]
    assert engine.retrieve(TOKENS, rt.kv_caches, s).num_tokens == len(TOKENS)
    assert torch.equal(kv_at(rt, s), expected)  # lossless

    if location == "LocalDiskBackend":
        engine.clear(["LocalCPUBackend"])  # the retrieve promoted them
    raw = rt.layout.chunk_nbytes(16) * 2 + rt.layout.chunk_nbytes(13)
    q = engine.compress_chunks(None, "int8", location)  # re-encoded from zstd through raw
    # int8 values plus a float32 scale per 16-value row: 1/2 + 1/8 of bfloat16's bytes
    assert q.num_chunks == 3 and q.bytes_after == raw // 2 + raw // 8
    assert engine.retrieve(TOKENS, rt.kv_caches, s).num_tokens == len(TOKENS)
    got = kv_at(rt, s)
    step = expected.abs().amax(dim=-1, keepdim=True) / 127
    assert bool(((got - expected).abs() <= step / 2 + got.abs() * 2**-8 + 1e-6).all())

    first = engine.keys_for(TOKENS)[:1]
    assert engine.compress_chunks(TOKENS[:16], "zstd", location).num_chunks == 1
    tier = rt.storage.backends[location]
    assert [tier.get(k).meta.compression for k in engine.keys_for(TOKENS)] == [  # type: ignore[union-attr]
        "zstd",
        "int8",
        "int8",
    ]
    assert engine.decompress(method="zstd", location=location) == 16  # the zstd chunk only
    assert [tier.get(k).meta.compression for k in first] == ["none"]  # type: ignore[union-attr]
    assert engine.decompress(method="zstd", location=location) == 0
    with pytest.raises(BadRequest, match="valid methods"):
        engine.decompress(method="lz4", location=location)
    engine.compress_chunks(TOKENS[:16], "int8", location)

    back = engine.compress_chunks(TOKENS, "none", "LocalCPUBackend")
    assert back.num_chunks == 3 and back.bytes_saved < 0
    with pytest.raises(BadRequest, match="valid methods"):
        engine.compress(tokens=TOKENS, method="lz4", location=location)
    with pytest.raises(NotFound, match="not found"):
        engine.compress(tokens=TOKENS, method="zstd", location="NoSuchBackend")
    engine.frozen = True
    with pytest.raises(Conflict):
        engine.compress(tokens=TOKENS, method="zstd", location=location)
    rt.stop()


@pytest.fixture
def two_peers() -> Iterator[tuple[EngineProcess, EngineProcess]]:
    a = runtime(enable_p2p=True, p2p_host="127.0.0.1", lmcache_instance_id="a")
    b = runtime(enable_p2p=True, p2p_host="127.0.0.1", lmcache_instance_id="b")
    a.start()
    b.start()
    yield a, b
    a.stop()
    b.stop()


def test_lookup_fetches_the_missing_chunks_from_the_peer(two_peers) -> None:
    a, b = two_peers
    assert a.p2p is not None and b.p2p is not None
    holder: dict[str, str] = {}
    # Stands in for the controller: "a" holds whatever "a" stored.
    b.p2p.set_peer_locator(lambda keys: holder.get("url"))
    s = slots(a, 5)
    expected = kv_at(a, s)
    a.cache_engine.store(TOKENS, a.kv_caches, s)
    assert b.cache_engine.lookup(TOKENS) == 0  # nobody known yet
    holder["url"] = a.p2p.url
    assert b.cache_engine.lookup(TOKENS) == len(TOKENS)
    assert b.storage.locate(b.cache_engine.keys_for(TOKENS)[2]) == "LocalCPUBackend"
    s2 = slots(b, 6)
    assert b.cache_engine.retrieve(TOKENS, b.kv_caches, s2).num_tokens == len(TOKENS)
    assert torch.equal(kv_at(b, s2), expected)
    # a peer that has died: a miss within the deadline, not a hang
    a.p2p.stop()
    start = time.monotonic()
    assert b.cache_engine.lookup([t + 7 for t in TOKENS]) == 0
    assert time.monotonic() - start < 30  # an outer bound: a hang, not a speed


def test_move_and_copy_to_a_peer_tier(two_peers) -> None:
    a, b = two_peers
    assert a.p2p is not None and b.p2p is not None
    s = slots(a, 7)
    expected = kv_at(a, s)
    a.cache_engine.store(TOKENS, a.kv_caches, s)
    keys = a.cache_engine.keys_for(TOKENS)
    copied = a.p2p.move(
        MoveRequest(
            source_location="LocalCPUBackend",
            peer_url=b.p2p.url,
            target_location="LocalCPUBackend",
            copy=True,
        ),
        keys[:1],
    )
    assert (copied.num_chunks, copied.num_tokens) == (1, 16)
    assert a.storage.locate(keys[0]) == "LocalCPUBackend"
    moved = a.p2p.move(
        MoveRequest(
            source_location="LocalCPUBackend", peer_url=b.p2p.url, target_location="LocalCPUBackend"
        )
    )
    assert (moved.num_chunks, moved.num_tokens) == (3, len(TOKENS))
    assert a.cache_engine.lookup(TOKENS) == 0
    s2 = slots(b, 8)
    assert b.cache_engine.retrieve(TOKENS, b.kv_caches, s2).num_tokens == len(TOKENS)
    assert torch.equal(kv_at(b, s2), expected)


def test_controller_commands_reach_the_tiers(two_peers) -> None:
    """compress, decompress and move as the controller worker runs them."""
    from kvplane.protocol import CompressCommand, DecompressCommand, ErrorCode, MoveCommand
    from kvplane.worker.commands import CommandHandlers

    a, b = two_peers
    assert b.p2p is not None
    s = slots(a, 9)
    expected = kv_at(a, s)
    a.cache_engine.store(TOKENS, a.kv_caches, s)
    handlers = CommandHandlers(a.cache_engine)
    reply = handlers.handle(
        CompressCommand(event_id="e1", method="int8", location="LocalCPUBackend", tokens=TOKENS)
    )
    assert (reply.error_code, reply.num_tokens) == (ErrorCode.OK, len(TOKENS))
    # decompress honours its method: zstd touches none of these int8 chunks
    reply = handlers.handle(
        DecompressCommand(event_id="e2", method="zstd", location="LocalCPUBackend")
    )
    assert (reply.error_code, reply.num_tokens) == (ErrorCode.OK, 0)
    key = a.cache_engine.keys_for(TOKENS)[0]
    assert a.storage.backends["LocalCPUBackend"].get(key).meta.compression == "int8"  # type: ignore[union-attr]
    reply = handlers.handle(
        DecompressCommand(event_id="e2b", method="lz4", location="LocalCPUBackend")
    )
    assert reply.error_code == ErrorCode.BAD_REQUEST and "valid methods" in reply.message
    reply = handlers.handle(
        DecompressCommand(event_id="e2c", method="int8", location="LocalCPUBackend")
    )
    assert (reply.error_code, reply.num_tokens) == (ErrorCode.OK, len(TOKENS))
    assert a.storage.backends["LocalCPUBackend"].get(key).meta.compression == "none"  # type: ignore[union-attr]
    reply = handlers.handle(
        CompressCommand(event_id="e3", method="lz4", location="LocalCPUBackend")
    )
    assert reply.error_code == ErrorCode.BAD_REQUEST and "valid methods" in reply.message
    reply = handlers.handle(
        MoveCommand(
            event_id="e4",
            src_location="LocalCPUBackend",
            dst_instance_id="b",
            dst_location="LocalCPUBackend",
            dst_peer_url=b.p2p.url,
            tokens=TOKENS,
        )
    )
    assert (reply.error_code, reply.num_tokens) == (ErrorCode.OK, len(TOKENS))
    assert a.cache_engine.lookup(TOKENS) == 0
    s2 = slots(b, 10)
    assert b.cache_engine.retrieve(TOKENS, b.kv_caches, s2).num_tokens == len(TOKENS)
    step = expected.abs().amax(dim=-1, keepdim=True) / 127  # went through int8 once
    assert bool(((kv_at(b, s2) - expected).abs() <= step / 2 + expected.abs() * 2**-7 + 1e-6).all())


def test_move_without_p2p_is_unsupported() -> None:
    from kvplane.errors import Unsupported

    rt = runtime()
    with pytest.raises(Unsupported, match="enable_p2p"):
        rt.cache_engine.move(MoveRequest(source_location="LocalCPUBackend", peer_url="127.0.0.1:1"))
    rt.stop()


def test_worker_registers_the_bound_p2p_url() -> None:
    rt = runtime(
        enable_p2p=True,
        p2p_host="127.0.0.1",
        enable_controller=True,
        controller_pull_url="127.0.0.1:1",
    )
    assert rt.p2p is not None and not rt.p2p.url.endswith(":0")
    worker = next(s for s in rt.services if s.name == "controller worker")
    assert worker.peer_init_url == rt.p2p.url  # type: ignore[attr-defined]
    rt.stop()


def test_tier_internal_figures_are_in_the_engine_metrics(tmp_path: Path) -> None:
    from prometheus_client import generate_latest

    from kvplane.engine import chunk_files

    rt = runtime(local_disk=str(tmp_path / "disk"), max_local_disk_size=0.01)
    s = slots(rt, 11)
    rt.cache_engine.store(TOKENS, rt.kv_caches, s)
    assert rt.storage.flush(5)
    rt.cache_engine.clear(["LocalCPUBackend"])
    for f in chunk_files.scan(tmp_path / "disk"):
        f.path.write_bytes(f.path.read_bytes()[:-1])  # truncate every file
    assert rt.cache_engine.retrieve(TOKENS, rt.kv_caches, s).num_tokens == 0
    text = generate_latest(rt.metrics.registry).decode()
    assert 'kvplane_tier_stat{stat="corrupt",tier="LocalDiskBackend"} 1.0' in text
    assert 'kvplane_tier_stat{stat="chunks",tier="LocalDiskBackend"} 2.0' in text
    rt.stop()


def test_every_tier_reports_exactly_the_documented_figures(tmp_path: Path) -> None:
    """docs/metrics.md's table of ``kvplane_tier_stat`` stats is every tier's ``counters()``
    (the CPU and P2P tiers are checked on a running engine in test_operate.py)."""
    from kvplane.engine.backends.disk import LocalDiskBackend
    from kvplane.engine.backends.fs import FSConnectorBackend
    from kvplane.metric_specs import TIER_STATS

    for backend in (
        LocalDiskBackend(tmp_path / "disk", 2**20),
        FSConnectorBackend(tmp_path / "fs"),
    ):
        assert set(backend.counters()) == set(TIER_STATS[backend.name]), backend.name
        backend.close()
