from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import pytest
import torch

from kvplane.engine import serde
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.p2p import P2PBackend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.p2p import ChunkServer, P2PClient, parse_peer_url, wire
from kvplane.engine.storage_manager import StorageManager
from kvplane.errors import BadRequest, Unavailable
from kvplane.keys import CacheKey
from tests.support import free_port
from tests.tier_cases import make_chunk, make_key, same_kv

FRAME = len(serde.encode(make_key(0), make_chunk(0)))


class Peer:
    """A chunk server over a dict, as an engine process would run one over its tiers."""

    def __init__(self, host: str = "127.0.0.1", **kw: int | float) -> None:
        self.store: dict[CacheKey, KVChunk] = {}
        self.locations: list[str | None] = []
        self.server = ChunkServer(host, 0, self.read, self.accept, **kw)  # type: ignore[arg-type]
        self.server.start()

    def read(self, key: CacheKey) -> contextlib.nullcontext[KVChunk | None]:
        return contextlib.nullcontext(self.store.get(key))

    def accept(self, key: CacheKey, chunk: KVChunk, location: str | None = None) -> bool:
        self.locations.append(location)
        self.store[key] = chunk
        return True


@pytest.fixture
def peers() -> Iterator[tuple[Peer, Peer]]:
    a, b = Peer(), Peer()
    yield a, b
    a.server.close()
    b.server.close()


def test_fetch_across_two_servers(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    a.store[make_key(1)] = make_chunk(1)
    b.store[make_key(2)] = make_chunk(2)
    client = P2PClient(timeout_s=2)
    got = client.fetch(a.server.url, [make_key(1), make_key(2)])
    assert same_kv(got[0], make_chunk(1)) and got[1] is None
    got = client.fetch(b.server.url, [make_key(2)])
    assert same_kv(got[0], make_chunk(2))
    assert client.fetch(a.server.url, []) == []


def test_fetch_receives_payloads_into_the_buffers_a_landing_gives(
    peers: tuple[Peer, Peer],
) -> None:
    a, _ = peers
    for i in range(3):
        a.store[make_key(i)] = make_chunk(i)
    given: dict[CacheKey, torch.Tensor] = {}
    asked: list[CacheKey] = []

    def into(key: CacheKey, nbytes: int) -> memoryview | None:
        asked.append(key)
        if key == make_key(1):
            return None  # a buffer of the client's own
        if key == make_key(2):
            return memoryview(bytearray(nbytes - 1))  # too small: not used
        given[key] = torch.empty(nbytes + 7, dtype=torch.uint8)
        return given[key].numpy().data

    keys = [make_key(0), make_key(1), make_key(2), make_key(9)]
    got = P2PClient(timeout_s=2).fetch(a.server.url, keys, into=into)
    assert [same_kv(got[i], make_chunk(i)) for i in range(3)] == [True] * 3 and got[3] is None
    assert asked == keys[:3]  # a miss (size 0) asks for no buffer
    first = got[0]
    assert first is not None and first.payload.data_ptr() == given[make_key(0)].data_ptr()


class RawPeer:
    """A chunk server that answers one fetch with the sizes and bytes it is given."""

    def __init__(self, sizes: list[int], data: bytes) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"127.0.0.1:{self.listener.getsockname()[1]}"
        self.thread = threading.Thread(target=self._serve, args=(sizes, data), daemon=True)
        self.thread.start()

    def _serve(self, sizes: list[int], data: bytes) -> None:
        conn, _ = self.listener.accept()
        with conn:
            deadline = wire.Deadline(5)
            wire.recv_message(conn, deadline)
            wire.send_message(conn, wire.FetchReply(sizes), deadline)
            wire.send_all(conn, data, deadline)
            conn.recv(1)  # until the client hangs up

    def close(self) -> None:
        self.listener.close()
        self.thread.join(5)


@pytest.mark.parametrize("landing", [False, True])
def test_a_corrupt_frame_is_a_miss_and_the_frames_after_it_still_read(landing: bool) -> None:
    """A flipped payload bit fails the checksum; a frame whose header does not add up to
    its announced size is read off the socket whole, so the next frame still lines up."""
    flipped = bytearray(serde.encode(make_key(0), make_chunk(0)))
    flipped[-1] ^= 0xFF
    padded = serde.encode(make_key(1), make_chunk(1)) + b"\0" * 10
    good = serde.encode(make_key(2), make_chunk(2))
    peer = RawPeer([len(flipped), len(padded), len(good)], bytes(flipped) + padded + good)
    into = (lambda key, n: torch.empty(n, dtype=torch.uint8).numpy().data) if landing else None
    try:
        keys = [make_key(0), make_key(1), make_key(2)]
        got = P2PClient(timeout_s=5).fetch(peer.url, keys, into=into)
    finally:
        peer.close()
    assert got[0] is None and got[1] is None and same_kv(got[2], make_chunk(2))


class CountingCPU(LocalCPUBackend):
    puts = 0

    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        self.puts += 1
        return super().put(key, chunk)


def test_prefetch_receives_into_cpu_pages_and_returns_every_page_it_did_not_keep() -> None:
    """Fetched chunks land in the CPU tier's own pages (no copy through ``put``); pages
    handed to a transfer that then failed go back to the pool."""
    items = {make_key(i): make_chunk(i) for i in range(4)}
    server = ChunkServer("127.0.0.1", 0, lambda key: contextlib.nullcontext(items.get(key)))
    server.start()
    cpu = CountingCPU(HostMemoryPool(make_chunk(0).nbytes, 8, pin=False))
    locate = [server.url]
    storage = StorageManager([cpu, P2PBackend(P2PClient(timeout_s=2), lambda _k: locate[0])])
    try:
        keys = [make_key(i) for i in range(6)]  # the peer holds the first four
        assert storage.prefetch(keys) == 4
        assert cpu.puts == 0 and sorted(cpu.keys()) == sorted(keys[:4])
        assert all(same_kv(cpu.get(k), items[k]) for k in keys[:4])
        assert cpu.pool.free_pages == 8 - 4
        locate[0] = f"127.0.0.1:{free_port()}"  # nobody there: the fetch fails
        assert storage.prefetch(keys) == 4 and cpu.pool.free_pages == 8 - 4
    finally:
        server.close()
        storage.close()


def test_push_moves_chunks_into_the_peer(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    items = [(make_key(i), make_chunk(i)) for i in range(5)]
    # A tiny limit forces several batches; every chunk still arrives.
    client = P2PClient(timeout_s=2, max_transfer_bytes=2 * FRAME)
    assert client.push(b.server.url, items) == [True] * 5
    assert client.push(b.server.url, items[:1], location="LocalDiskBackend") == [True]
    assert b.locations == [None] * 5 + ["LocalDiskBackend"]
    assert all(same_kv(b.store[k], c) for k, c in items)
    assert not a.store


def test_transfer_size_is_bounded_on_both_sides() -> None:
    small = Peer(max_transfer_bytes=2 * FRAME)
    try:
        for i in range(4):
            small.store[make_key(i)] = make_chunk(i)
        keys = [make_key(i) for i in range(4)]
        got = P2PClient(timeout_s=2).fetch(small.server.url, keys)
        assert [g is not None for g in got] == [True, True, False, False]
        # A client with a smaller budget refuses a reply announcing more.
        with pytest.raises(Unavailable, match="over the limit"):
            P2PClient(timeout_s=2, max_transfer_bytes=FRAME).fetch(small.server.url, keys)
        # A push bigger than the server accepts is refused as a whole.
        with pytest.raises(Unavailable):
            P2PClient(timeout_s=2, max_transfer_bytes=10 * FRAME).push(
                small.server.url, [(make_key(i), make_chunk(i)) for i in range(3)]
            )
        assert P2PClient(max_transfer_bytes=FRAME - 1).push(
            small.server.url, [(make_key(9), make_chunk(9))]
        ) == [False]
    finally:
        small.server.close()


def test_dead_peer_fails_fast() -> None:
    client = P2PClient(timeout_s=1)
    start = time.monotonic()
    with pytest.raises(Unavailable):
        client.fetch(f"127.0.0.1:{free_port()}", [make_key(1)])
    with pytest.raises(Unavailable):
        client.push(f"127.0.0.1:{free_port()}", [(make_key(1), make_chunk(1))])
    assert time.monotonic() - start < 30  # an outer bound: refused at once, not hung


def test_silent_peer_costs_one_deadline_not_a_hang() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)  # accepts connections, never answers
    try:
        url = f"127.0.0.1:{listener.getsockname()[1]}"
        start = time.monotonic()
        with pytest.raises(Unavailable, match="deadline"):
            P2PClient(timeout_s=0.5).fetch(url, [make_key(1)])
        assert time.monotonic() - start < 30  # an outer bound: the deadline, not a hang
    finally:
        listener.close()


def test_server_without_sink_refuses_pushes() -> None:
    server = ChunkServer("127.0.0.1", 0, lambda key: contextlib.nullcontext())
    server.start()
    try:
        with pytest.raises(Unavailable, match="not accepted"):
            P2PClient(timeout_s=2).push(server.url, [(make_key(1), make_chunk(1))])
    finally:
        server.close()


def test_server_answers_a_reply_sent_as_a_request_with_an_error() -> None:
    server = ChunkServer("127.0.0.1", 0, lambda key: contextlib.nullcontext())
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=2) as sock:
            deadline = wire.Deadline(2)
            wire.send_message(sock, wire.FetchReply([0]), deadline)
            assert wire.recv_message(sock, deadline) == wire.ErrorReply("unexpected FetchReply")
    finally:
        server.close()


def test_ipv6_loopback() -> None:
    try:
        peer = Peer("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    try:
        peer.store[make_key(1)] = make_chunk(1)
        assert peer.server.url.startswith("[::1]:")
        assert same_kv(
            P2PClient(timeout_s=2).fetch(peer.server.url, [make_key(1)])[0], make_chunk(1)
        )
    finally:
        peer.server.close()


def test_backend_fetches_from_the_located_peer_and_never_itself(peers: tuple[Peer, Peer]) -> None:
    a, b = peers
    b.store[make_key(1)] = make_chunk(1)
    asked: list[list[CacheKey]] = []

    def locate(keys):  # the controller lookup, in the engine
        asked.append(list(keys))
        return b.server.url if keys[0] in b.store else a.server.url

    backend = P2PBackend(P2PClient(timeout_s=2), locate, self_url=a.server.url)
    assert backend.contains(make_key(1))
    assert same_kv(backend.get(make_key(1)), make_chunk(1))
    got = backend.get_many([make_key(1), make_key(2)])
    assert same_kv(got[0], make_chunk(1)) and got[1] is None
    assert not backend.contains(make_key(3))  # located at ourselves: not asked
    assert asked[-1] == [make_key(3)]


def test_backend_survives_a_failing_locator_and_a_dead_peer() -> None:
    def broken(keys):
        raise Unavailable("controller down")

    assert P2PBackend(P2PClient(timeout_s=1), broken).get(make_key(1)) is None
    dead = P2PBackend(P2PClient(timeout_s=1), lambda keys: f"127.0.0.1:{free_port()}")
    assert dead.get(make_key(1)) is None and dead.fetch_errors == 1


def test_peer_url_forms() -> None:
    assert parse_peer_url("10.0.0.1:8200") == ("10.0.0.1", 8200)
    assert parse_peer_url("tcp://host:1") == ("host", 1)
    assert parse_peer_url("[::1]:9") == ("::1", 9)
    for bad in ("host", "host:0", "host:x", ":80"):
        with pytest.raises(BadRequest):
            parse_peer_url(bad)


def test_a_served_chunk_stays_held_while_sent_and_is_let_go_on_hang_up() -> None:
    """The server sends the tier's own bytes (no copy), so the tier's hold on them lasts
    until the last byte left, and ends when the connection does, however it ends."""
    tokens = 4096
    big = KVChunk.from_kv(torch.zeros(4, 2, tokens, 8, 128, dtype=torch.bfloat16), tokens)
    held: list[CacheKey] = []
    let_go = threading.Event()

    @contextlib.contextmanager
    def read(key: CacheKey) -> Iterator[KVChunk | None]:
        held.append(key)
        try:
            yield big
        finally:
            held.remove(key)
            let_go.set()

    server = ChunkServer("127.0.0.1", 0, read, timeout_s=10)
    server.start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
            deadline = wire.Deadline(10)
            wire.send_message(sock, wire.FetchRequest([make_key(1).to_str()]), deadline)
            reply = wire.recv_message(sock, deadline)
            assert isinstance(reply, wire.FetchReply) and reply.sizes[0] > big.nbytes
            wire.recv_exact(sock, 1 << 20, deadline)  # 1 of 64 MiB: the server is mid-send
            assert held == [make_key(1)]
        assert let_go.wait(10)
        assert held == []
    finally:
        server.close()
