"""Faults in the storage tiers, each against real processes: nothing wrong is served, nothing
acknowledged is lost, and the engine keeps serving.

- the disk (and shared-directory) tier's filesystem fills up in the middle of a write;
- Redis is killed in the middle of a store and restarted, or hangs (SIGSTOP);
- a p2p peer is killed in the middle of a transfer.

The controller killed during an admit burst is ``tests/test_faults_controller.py``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from kvplane.engine import chunk_files, serde
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.p2p import P2PBackend
from kvplane.engine.backends.remote import RemoteBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.circuit_breaker import BreakerState
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.p2p import ChunkServer, P2PClient
from kvplane.engine.storage_manager import StorageManager
from kvplane.keys import chunk_hashes
from tests.engine_support import SMALL_KV, EngineProc
from tests.redis_support import RedisServer, needs_redis
from tests.support import free_port, wait_until
from tests.tier_cases import make_key, same_kv

pytestmark = pytest.mark.slow

# --------------------------------------------------------------------------- disk full


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``path`` for the block; unmounted after it."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (a disk that fills up) needs root")
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not permitted here: {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30, check=False)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` with one file until ``leave`` bytes are free."""
    st = os.statvfs(directory)
    size = (st.f_bavail * st.f_frsize - leave) // st.f_frsize * st.f_frsize
    filler = directory / "filler"
    with open(filler, "wb") as f:
        f.write(bytes(size))
    st = os.statvfs(directory)
    assert 0 < st.f_bavail * st.f_frsize <= leave + st.f_frsize
    return filler


BIG_KV = SMALL_KV | {"kv_num_heads": 4, "kv_head_size": 128}  # 4 KiB per token
DISK_CHUNK = 64  # tokens: 256 KiB of KV per chunk, 7 of them fit in 2 MiB


def test_disk_full_mid_write_refuses_counts_and_serves_what_it_has(tmp_path: Path) -> None:
    """Both chunk-file tiers (local disk, shared directory) on a 2 MiB tmpfs each, the tiers'
    own limits larger: the filesystem fills in the middle of a chunk's write."""
    n = 3 * DISK_CHUNK
    first = chunk_hashes(list(range(0, n)), DISK_CHUNK)
    second = chunk_hashes(list(range(1000, 1000 + n)), DISK_CHUNK)
    with contextlib.ExitStack() as stack:
        disk = stack.enter_context(tmpfs(tmp_path / "disk", "2m"))
        shared = stack.enter_context(tmpfs(tmp_path / "shared", "2m"))
        engine = EngineProc(
            tmp_path, "disk-full", chunk_size=DISK_CHUNK, **BIG_KV, max_local_cpu_size=0.05,
            local_disk=f"file://{disk}", max_local_disk_size=0.01, remote_url=f"fs://{shared}",
        )  # fmt: skip
        stack.enter_context(engine)
        engine.launch().wait_ready()
        tiers = ("LocalDiskBackend", "FSConnector")

        def lower_tiers_hold(hashes: list[int]) -> bool:
            held = engine.chunks()
            return all(set(held[t]) == set(hashes) for t in tiers)

        assert engine.store(0, n, slots=f"[0,{n - 1}]") == n
        wait_until(lambda: lower_tiers_hold(first), timeout=30, what="first prompt on disk")
        kv_first = engine.checksums(f"[0,{n - 1}]", DISK_CHUNK)
        frame = next(f.size for f in chunk_files.scan(disk))
        fillers = [fill(d, leave=frame // 2) for d in (disk, shared)]

        # every write of the second prompt runs out of space half way through its chunk
        assert engine.store(1000, 1000 + n, slots=f"[200,{200 + n - 1}]") == n
        wait_until(
            lambda: all(engine.tier_stat(t, "write_errors") == 3 for t in tiers),
            timeout=30, what="three refused writes per tier",
        )  # fmt: skip
        kv_second = engine.checksums(f"[200,{200 + n - 1}]", DISK_CHUNK)
        log = engine.log.read_text()  # one warning per run of failures, the rest at DEBUG
        assert log.count("disk tier: writing") == 1 and log.count("fs tier: writing") == 1
        assert lower_tiers_hold(first)
        for d, filler in zip((disk, shared), fillers, strict=True):
            files = sorted(p.name for p in d.iterdir() if p != filler)
            assert len(files) == 3, files  # no temp file left, no second-prompt file
            for name in files:  # every file left is a whole, verified chunk
                key = chunk_files.key_of(name)
                assert key is not None and key.chunk_hash in first
                chunk_files.read_chunk_file(d / name, key)

        # what the tiers have is served byte-exact; what they refused is a miss
        engine.clear("LocalCPUBackend")
        assert engine.retrieve(0, n, slots=f"[2000,{2000 + n - 1}]") == n
        assert engine.checksums(f"[2000,{2000 + n - 1}]", DISK_CHUNK) == kv_first
        assert engine.retrieve(1000, 1000 + n, slots=f"[2400,{2400 + n - 1}]") == 0
        engine.call("PUT", "/bypass/add", backend_name="LocalDiskBackend")
        engine.clear("LocalCPUBackend")
        assert engine.retrieve(0, n, slots=f"[2800,{2800 + n - 1}]") == n  # from the fs tier
        assert engine.checksums(f"[2800,{2800 + n - 1}]", DISK_CHUNK) == kv_first
        engine.call("PUT", "/bypass/remove", backend_name="LocalDiskBackend")

        # space again: the same engine writes the second prompt, and reads it back
        for filler in fillers:
            filler.unlink()
        engine.clear("LocalCPUBackend")
        assert engine.store(1000, 1000 + n, slots=f"[200,{200 + n - 1}]") == n
        wait_until(lambda: lower_tiers_hold(first + second), timeout=30, what="second prompt")
        engine.clear("LocalCPUBackend")
        assert engine.retrieve(1000, 1000 + n, slots=f"[3200,{3200 + n - 1}]") == n
        assert engine.checksums(f"[3200,{3200 + n - 1}]", DISK_CHUNK) == kv_second
        for t in tiers:
            assert engine.tier_stat(t, "write_errors") == 3
            assert engine.tier_stat(t, "corrupt") == 0
        assert engine.log.read_text().count("writes succeed again") == 2


# --------------------------------------------------------------------------- Redis


def big_chunk(seed: int) -> KVChunk:
    """1 MiB of bfloat16 KV: a SET that is still on its way when the server dies."""
    g = torch.Generator().manual_seed(seed)
    return KVChunk.from_kv(torch.randn(4, 2, 64, 8, 128, generator=g).to(torch.bfloat16), 64)


@needs_redis
def test_redis_killed_mid_store_keeps_every_acknowledged_chunk(tmp_path: Path) -> None:
    """A store burst into a Redis that keeps what it acknowledges (AOF, fsync always); the
    server is stopped while a SET is on its way, killed, and restarted. Every put the tier
    acknowledged is there afterwards, byte-exact; the others are absent or whole."""
    timeout = 2.0
    server = RedisServer(tmp_path, extra_args=["--appendonly", "yes", "--appendfsync", "always"])
    server.start()
    remote = RemoteBackend(server.url, timeout_s=timeout)  # breaker: 3 failures, probe every 2 s
    items = [(make_key(i), big_chunk(i)) for i in range(16)]
    acked: list[int] = []
    refused: list[tuple[int, float]] = []
    in_put: list[tuple[int, float]] = []  # the put under way: (index, start)

    stopped = threading.Event()  # the fifth put waits for the stop: never too late for it

    def writer() -> None:
        for i, (key, chunk) in enumerate(items):
            if i == 4:
                stopped.wait(30)
            start = time.monotonic()
            in_put[:] = [(i, start)]
            ok = remote.put(key, chunk)
            in_put.clear()
            (acked.append(i) if ok else refused.append((i, time.monotonic() - start)))

    thread = threading.Thread(target=writer, daemon=True)
    try:
        thread.start()
        wait_until(lambda: len(acked) == 4, timeout=30, what="four acknowledged puts")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        stopped.set()
        # a put blocked on the stopped server: its SET is on its way, unanswered
        wait_until(
            lambda: in_put and time.monotonic() - in_put[0][1] > 0.2, timeout=10, what="a put"
        )
        cut = in_put[0][0]
        server.kill()
        thread.join(30)
        assert not thread.is_alive()
    finally:
        server.kill()
    assert cut in dict(refused) and acked == list(range(cut))
    assert [i for i, _ in refused] == list(range(cut, len(items)))
    # each refused put took at most one deadline; once the breaker opened, none at all
    assert max(seconds for _, seconds in refused) < timeout + 2.0
    stats = remote.stats()
    assert stats.breaker is BreakerState.OPEN and stats.times_opened >= 1
    assert stats.errors >= 3 and stats.dropped_puts == len(refused)
    assert remote.get(items[0][0]) is None

    server.start()  # same port and directory: the server reloads what it acknowledged
    try:
        wait_until(lambda: remote.get(items[0][0]) is not None, timeout=15, what="recovery")
        assert remote.breaker.state is BreakerState.CLOSED
        for i, (key, chunk) in enumerate(items):
            got = remote.get(key)
            if i in acked:
                assert same_kv(got, chunk), f"acknowledged chunk {i} lost or changed"
            else:
                assert got is None or same_kv(got, chunk), f"chunk {i} is not whole"
        assert remote.stats().corrupt == 0
        assert remote.put(items[cut][0], items[cut][1])
        assert same_kv(remote.get(items[cut][0]), items[cut][1])
    finally:
        remote.close()
        server.stop()


@needs_redis
def test_hung_then_killed_redis_costs_each_call_one_deadline_and_recovers(
    tmp_path: Path,
) -> None:
    """An engine on Redis: the server hangs (SIGSTOP), is resumed, then killed and restarted.
    Every API call stays within one remote deadline; the breaker opens, so later calls
    answer at once; the engine serves from its CPU tier meanwhile and uses Redis again
    afterwards, never restarted."""
    deadline = 0.5
    margin = 2.5  # for a busy machine; a hung call without the deadline would block
    chunk = 16
    server = RedisServer(tmp_path)
    server.start()
    engine = EngineProc(
        tmp_path, "on-redis", chunk_size=chunk, **SMALL_KV, max_local_cpu_size=0.01,
        remote_url=server.url, remote_timeout_s=deadline,
    )  # fmt: skip
    with engine, contextlib.ExitStack() as stack:
        stack.callback(server.stop)
        engine.launch().wait_ready()
        n = 4 * chunk
        first = chunk_hashes(list(range(n)), chunk)

        def in_redis(hashes: list[int]) -> bool:
            return set(hashes) <= set(engine.chunks()["RemoteBackend"])

        def timed(call: Callable[..., int], *args: Any) -> int:
            start = time.monotonic()
            result = call(*args)
            assert time.monotonic() - start < deadline + margin, call
            return result

        def stat(name: str) -> float:
            return engine.tier_stat("RemoteBackend", name)

        assert engine.store(0, n, slots=f"[0,{n - 1}]") == n
        wait_until(lambda: in_redis(first), timeout=30, what="the prompt in Redis")
        kv_first = engine.checksums(f"[0,{n - 1}]", chunk)
        engine.clear("LocalCPUBackend")

        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)
        try:
            for _ in range(3):  # each retrieve waits out one GET, then misses
                assert timed(engine.retrieve, 0, n, f"[1000,{1000 + n - 1}]") == 0
            assert stat("breaker_open") == 1 and stat("breaker_times_opened") == 1
            assert stat("errors") == 3
            for _ in range(5):  # the breaker answers (at most one probe per second waits)
                assert timed(engine.retrieve, 0, n, f"[1000,{1000 + n - 1}]") == 0
            assert stat("skipped_gets") >= 1
            # stores still land in the CPU tier and are served from it
            assert timed(engine.store, 5000, 5000 + n, f"[300,{300 + n - 1}]") == n
            assert timed(engine.retrieve, 5000, 5000 + n, f"[1400,{1400 + n - 1}]") == n
            wait_until(lambda: stat("dropped_puts") >= 3, timeout=30, what="puts dropped")
        finally:
            server.proc.send_signal(signal.SIGCONT)

        # resumed: the next probe closes the breaker; the chunks Redis kept are served
        wait_until(
            lambda: timed(engine.retrieve, 0, n, f"[1000,{1000 + n - 1}]") == n,
            timeout=30, interval=0.2, what="Redis used again",
        )  # fmt: skip
        assert engine.checksums(f"[1000,{1000 + n - 1}]", chunk) == kv_first
        assert stat("breaker_open") == 0

        # killed while the engine stores, then restarted empty on the same port
        for i in range(8):
            if i == 2:
                server.kill()
            assert timed(engine.store, 10_000 + i * n, 10_000 + (i + 1) * n) == n
        engine.clear("LocalCPUBackend")
        assert timed(engine.retrieve, 0, n, f"[1000,{1000 + n - 1}]") == 0
        server.start()
        fresh = iter(range(20_000, 10**6, n))
        landed: list[int] = []

        def a_store_reaches_redis() -> bool:
            start = next(fresh)
            assert engine.store(start, start + n, slots=f"[0,{n - 1}]") == n
            wait_until(
                lambda: engine.metric("kvplane_tier_queue_depth", tier="RemoteBackend") == 0,
                timeout=30, what="the write queue drained",
            )  # fmt: skip
            if in_redis(chunk_hashes(list(range(start, start + n)), chunk)):
                landed.append(start)
            return bool(landed)

        wait_until(a_store_reaches_redis, timeout=30, interval=0.2, what="stores reach Redis")
        engine.clear("LocalCPUBackend")
        start = landed[0]
        assert engine.retrieve(start, start + n, slots=f"[1800,{1800 + n - 1}]") == n
        assert engine.checksums(f"[1800,{1800 + n - 1}]", chunk) == kv_first
        assert stat("breaker_open") == 0 and stat("corrupt") == 0
        log = engine.log.read_text()  # one warning per outage, one line when it ends
        assert log.count("not calling the server") == 2
        assert log.count("the server answers again") == 2


# --------------------------------------------------------------------------- p2p


class PausingSocket:
    """The receiver's end of a peer transfer that stops reading once ``pause_after`` bytes
    came in, until ``resume`` is set: a test-only hook that makes the peer's kill land in
    the middle of the transfer (the peer is blocked sending then, its socket buffers full)."""

    def __init__(self, sock: socket.socket, pause_after: int) -> None:
        self.sock = sock
        self.pause_after = pause_after
        self.received = 0
        self.paused = threading.Event()
        self.resume = threading.Event()

    def recv_into(self, buffer: memoryview, nbytes: int) -> int:
        if self.received >= self.pause_after and not self.paused.is_set():
            self.paused.set()
            self.resume.wait(60)
        got = self.sock.recv_into(buffer, nbytes)
        self.received += got
        return got

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)

    def __enter__(self) -> PausingSocket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()


class PausingClient(P2PClient):
    """A real client whose connections are :class:`PausingSocket`\\ s."""

    def __init__(self, pause_after: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.pause_after = pause_after
        self.sockets: list[PausingSocket] = []

    def _connect(self, peer_url: str, deadline: Any) -> Any:
        sock = PausingSocket(super()._connect(peer_url, deadline), self.pause_after)
        self.sockets.append(sock)
        return sock


def test_p2p_peer_killed_mid_transfer_is_a_miss_never_a_partial_chunk(tmp_path: Path) -> None:
    """A peer engine holds 48 chunks of 1 MiB; the receiver (a storage manager with a CPU
    tier and the p2p tier, in this process) fetches them in one transfer, and the peer is
    killed with SIGKILL after the first 1.5 MiB arrived. The receiver keeps nothing of that
    transfer, counts the failed fetch, and goes on fetching from a live peer."""
    items = [(make_key(i), big_chunk(i)) for i in range(48)]
    keys = [k for k, _ in items]
    total = sum(len(serde.encode(k, c)) for k, c in items)
    port = free_port()
    peer = EngineProc(
        tmp_path, "peer", chunk_size=256, **BIG_KV, max_local_cpu_size=0.06,
        enable_p2p=True, p2p_host="127.0.0.1", p2p_init_ports=[port], p2p_timeout_s=120,
    )  # fmt: skip
    with peer:
        peer.launch().wait_ready()
        url = f"127.0.0.1:{port}"
        assert P2PClient(timeout_s=60).push(url, items, location="LocalCPUBackend") == [True] * 48
        assert peer.proc is not None

        client = PausingClient(pause_after=3 << 19, timeout_s=60)
        locate = [url]
        p2p = P2PBackend(client, lambda _keys: locate[0])
        cpu = LocalCPUBackend(HostMemoryPool(items[0][1].nbytes, 64, pin=False))
        storage = StorageManager([cpu, p2p])
        held: list[int] = []
        fetch = threading.Thread(target=lambda: held.append(storage.prefetch(keys)), daemon=True)
        fetch.start()
        wait_until(lambda: client.sockets and client.sockets[0].paused.is_set(), timeout=60)
        peer.proc.kill()  # mid-transfer: the peer is blocked sending the rest
        peer.proc.wait(30)
        client.sockets[0].resume.set()
        client.pause_after = 2 * total  # later transfers run through
        fetch.join(60)
        assert not fetch.is_alive()

    received = client.sockets[0].received
    assert 3 << 19 <= received < total, (received, total)  # the kill cut the transfer
    assert held == [0] and cpu.keys() == []  # the chunks that did arrive are not kept either
    assert cpu.pool.free_pages == 64  # nor the pages they were received into
    assert p2p.fetch_errors == 1
    assert storage.get(keys[0]) is None and p2p.fetch_errors == 2  # a dead peer: a miss

    # the receiver goes on: the next peer it is pointed to serves it, byte-exact
    live = dict(items[:4])
    server = ChunkServer("127.0.0.1", 0, lambda key: contextlib.nullcontext(live.get(key)))
    server.start()
    try:
        locate[0] = server.url
        assert storage.prefetch(keys[:4]) == 4
        for key, chunk in items[:4]:
            assert same_kv(cpu.get(key), chunk)
    finally:
        server.close()
        storage.close()
