from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from kvplane.config import EngineConfig
from kvplane.engine.backends.remote import KEY_PREFIX, RemoteBackend
from kvplane.engine.circuit_breaker import BreakerPolicy, BreakerState, CircuitBreaker
from kvplane.engine.tiers import remote_backend
from kvplane.errors import ConfigError
from tests.redis_support import RedisServer, make_tls_files, needs_redis
from tests.support import wait_until
from tests.tier_cases import CHUNK_SHAPE, make_chunk, make_key, same_kv

pytestmark = needs_redis


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path)
    s.start()
    yield s
    s.stop()


class Clock:
    """The breaker's clock, moved by the test: the breaker reopens only when told."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def fast_breaker(clock: Clock | None = None) -> CircuitBreaker:
    policy = BreakerPolicy(failure_threshold=2, reset_after_s=0.2)
    return CircuitBreaker(policy, clock or time.monotonic)


def test_server_down_drops_puts_and_misses_fast_then_recovers(server: RedisServer) -> None:
    clock = Clock()
    remote = RemoteBackend(server.url, timeout_s=0.5, breaker=fast_breaker(clock))
    assert remote.put(make_key(1), make_chunk(1))
    server.stop()
    for i in range(20):
        assert remote.get(make_key(1)) is None
        assert not remote.put(make_key(i), make_chunk(i))
    assert remote.breaker.state is BreakerState.OPEN
    stats = remote.stats()
    # two calls went out and failed; the breaker answered the other 38 without a call
    assert (stats.errors, stats.times_opened, stats.skipped_gets) == (2, 1, 38)
    assert stats.dropped_puts == 20
    server.start()  # same port, empty (no persistence)
    assert not remote.put(make_key(2), make_chunk(2))  # still open: no call goes out
    clock.now += 0.2  # the reset time passes: the next call is the probe
    wait_until(lambda: remote.put(make_key(2), make_chunk(2)), timeout=5, what="recovery")
    assert remote.breaker.state is BreakerState.CLOSED
    assert same_kv(remote.get(make_key(2)), make_chunk(2))
    remote.close()


def test_hung_server_costs_one_timeout_then_the_breaker_answers(server: RedisServer) -> None:
    clock = Clock()
    remote = RemoteBackend(server.url, timeout_s=0.3, breaker=fast_breaker(clock))
    assert remote.put(make_key(1), make_chunk(1))
    assert server.proc is not None
    server.proc.send_signal(signal.SIGSTOP)
    try:
        assert remote.get(make_key(1)) is None  # a call that times out
        assert remote.stats().errors == 1
        assert remote.get(make_key(1)) is None  # the second failure opens the breaker
        assert remote.stats()[:3] == (BreakerState.OPEN, 1, 2)
        for _ in range(50):
            assert remote.get(make_key(1)) is None
        stats = remote.stats()
        assert (stats.errors, stats.skipped_gets) == (2, 50)  # no call went to the hung server
    finally:
        server.proc.send_signal(signal.SIGCONT)
    clock.now += 0.2
    wait_until(lambda: remote.get(make_key(1)) is not None, timeout=5, what="recovery")
    assert remote.breaker.state is BreakerState.CLOSED
    remote.close()


def test_password_in_url(tmp_path: Path) -> None:
    s = RedisServer(tmp_path, password="s3cret")
    s.start()
    try:
        good = RemoteBackend(s.url, timeout_s=0.5)
        assert good.put(make_key(1), make_chunk(1))
        assert same_kv(good.get(make_key(1)), make_chunk(1))
        bad = RemoteBackend(f"redis://:wrong@127.0.0.1:{s.port}", timeout_s=0.5)
        assert bad.get(make_key(1)) is None
        assert not bad.put(make_key(2), make_chunk(2))
        assert bad.stats().errors >= 1
        good.close()
        bad.close()
    finally:
        s.stop()


def test_corrupt_value_is_a_miss_and_deleted(server: RedisServer) -> None:
    remote = RemoteBackend(server.url, timeout_s=0.5)
    remote.put(make_key(1), make_chunk(1))
    raw = redis.Redis.from_url(server.url)
    name = KEY_PREFIX + make_key(1).to_str()
    value = bytearray(raw.get(name))  # type: ignore[arg-type]
    value[-1] ^= 1
    raw.set(name, bytes(value))
    assert remote.get(make_key(1)) is None
    assert raw.exists(name) == 0
    assert remote.stats().corrupt == 1
    raw.close()
    remote.close()


def test_other_redis_keys_are_not_ours(server: RedisServer) -> None:
    raw = redis.Redis.from_url(server.url)
    raw.set("unrelated", b"x")
    raw.set(KEY_PREFIX + "garbage", b"x")
    remote = RemoteBackend(server.url, timeout_s=0.5)
    remote.put(make_key(1), make_chunk(1))
    assert remote.keys() == [make_key(1)]
    raw.close()
    remote.close()


def test_not_a_redis_url() -> None:
    with pytest.raises(ConfigError, match="not a Redis URL"):
        RemoteBackend("http://127.0.0.1:1")


def test_stored_value_is_exactly_one_frame(server: RedisServer) -> None:
    import torch

    from kvplane.engine import serde
    from kvplane.engine.chunk import KVChunk

    big = KVChunk.from_kv(torch.randn(4, 2, 64, 8, 64).to(torch.bfloat16), 64)  # 2 MiB
    key = make_key(5, model="org/model name+ü")
    remote = RemoteBackend(server.url, timeout_s=2)
    assert remote.put(key, big)
    raw = redis.Redis.from_url(server.url)
    assert raw.get(KEY_PREFIX + key.to_str()) == serde.encode(key, big)
    assert same_kv(remote.get(key), big)
    assert remote.keys() == [key]
    raw.close()
    remote.close()


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[RedisServer]:
    s = RedisServer(tmp_path, tls=make_tls_files(tmp_path))
    s.start()
    yield s
    s.stop()


def test_rediss_round_trip_verified_against_the_configured_ca(tls_server: RedisServer) -> None:
    assert tls_server.tls is not None and tls_server.url.startswith("rediss://127.0.0.1:")
    cfg = EngineConfig(remote_url=tls_server.url, remote_tls_ca_file=str(tls_server.tls.ca_cert))
    remote = remote_backend(cfg)  # the engine's own wiring of the two keys
    assert isinstance(remote, RemoteBackend)
    key, chunk = make_key(1), make_chunk(1)
    assert not remote.contains(key)
    assert remote.put(key, chunk)
    assert remote.contains(key)
    assert same_kv(remote.get(key), chunk)
    assert remote.keys() == [key]
    assert remote.remove(key) and not remote.contains(key)
    assert remote.stats().errors == 0
    remote.close()

    # without the CA the self-signed chain is refused: TLS really verifies the server
    unverified = RemoteBackend(tls_server.url, timeout_s=1.0)
    assert not unverified.put(key, chunk)
    assert unverified.get(key) is None
    assert unverified.stats().errors >= 1
    unverified.close()


def test_tls_ca_file_mistakes_are_config_errors(tmp_path: Path) -> None:
    ca = make_tls_files(tmp_path).ca_cert
    with pytest.raises(ConfigError, match=r"remote_tls_ca_file: .* not a rediss://"):
        RemoteBackend("redis://127.0.0.1:1", tls_ca_file=str(ca))
    with pytest.raises(ConfigError, match=r"remote_tls_ca_file: .* is not a file"):
        RemoteBackend("rediss://127.0.0.1:1", tls_ca_file=str(tmp_path / "missing.pem"))
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(ConfigError, match="no usable CA certificate"):
        RemoteBackend("rediss://127.0.0.1:1", tls_ca_file=str(tmp_path / "junk.pem"))


def _bytes_sent(raw: redis.Redis) -> int:
    """The server's ``total_net_output_bytes``: every byte it has written to any client."""
    return int(raw.info("stats")["total_net_output_bytes"])


def test_chunk_tokens_reads_the_header_not_the_payload(server: RedisServer) -> None:
    """The count comes from a GETRANGE of the header: the server sends a small fraction of
    the payload (a plain GET, measured the same way, sends all of it)."""
    import torch

    from kvplane.engine import serde
    from kvplane.engine.chunk import KVChunk

    big = KVChunk.from_kv(torch.ones(2, 2, 48, 8, 128, dtype=torch.bfloat16), 45)  # 384 KiB
    long_key = make_key(2, model="org/" + "m" * 700)  # a header longer than the first read
    remote = RemoteBackend(server.url, timeout_s=2)
    assert remote.put(make_key(1), big) and remote.put(long_key, make_chunk(2))
    payload = big.payload.numel()
    raw = redis.Redis.from_url(server.url)
    before = _bytes_sent(raw)
    assert remote.chunk_tokens(make_key(1)) == 45
    header_read = _bytes_sent(raw) - before
    before = _bytes_sent(raw)
    assert remote.get(make_key(1)) is not None
    whole_read = _bytes_sent(raw) - before
    # each difference also holds one INFO reply (a few KiB), far below the payload
    assert whole_read > payload > 16 * header_read
    assert remote.chunk_tokens(long_key) == CHUNK_SHAPE[2]
    assert serde.header_size(raw.getrange(KEY_PREFIX + long_key.to_str(), 0, 31)) > 700
    raw.close()
    remote.close()


def test_chunk_tokens_of_a_missing_corrupt_or_misfiled_value_is_zero(
    server: RedisServer,
) -> None:
    remote = RemoteBackend(server.url, timeout_s=0.5, breaker=fast_breaker())
    raw = redis.Redis.from_url(server.url)
    assert remote.chunk_tokens(make_key(1)) == 0  # absent
    for i, value in enumerate((b"x", b"not a kvplane frame at all" * 4, b"KVPC" + bytes(28))):
        raw.set(KEY_PREFIX + make_key(10 + i).to_str(), value)
        assert remote.chunk_tokens(make_key(10 + i)) == 0
    assert remote.put(make_key(3), make_chunk(3))
    frame = raw.get(KEY_PREFIX + make_key(3).to_str())
    raw.set(KEY_PREFIX + make_key(4).to_str(), frame)  # another key's frame
    assert remote.chunk_tokens(make_key(4)) == 0
    assert remote.chunk_tokens(make_key(3)) == CHUNK_SHAPE[2]
    assert remote.stats().errors == 0  # bad values are not server failures
    server.stop()
    assert remote.chunk_tokens(make_key(3)) == 0  # the server is gone: 0, counted
    assert remote.stats().errors == 1
    raw.close()
    remote.close()
