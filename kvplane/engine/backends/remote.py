"""The remote tier on Redis or Valkey (``remote_url: redis://[:password@]host:port[/db]``,
``rediss://`` for TLS: the server certificate is verified against the system's CAs, or
against ``remote_tls_ca_file``).

Each chunk is one string value, a :mod:`~kvplane.engine.serde` frame, under
``kvplane:<CacheKey.to_str()>``. A put writes the SET command's bulk string as its two parts
(header, then the payload straight from the chunk's memory): the server sees one value, and
the client never joins them into a copy, which on a small machine costs as much as the send. Calls go through a blocking connection pool; every socket
operation and every wait for a pooled connection has the ``remote_timeout_s`` deadline, and
redis-py's own retries are off so a deadline means one deadline. A circuit breaker sits in
front: after a few failures in a row the tier stops calling the server (puts are dropped
and counted, gets miss at once) and lets one probe through every ``reset_after_s``; the
first probe that succeeds closes it, so the tier recovers by itself when the server returns.
Eviction is the server's (``maxmemory-policy``); this tier never evicts. A chunk's token
count is read from its header with GETRANGE, never with the payload.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable
from typing import NamedTuple, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from kvplane.engine import serde
from kvplane.engine.backends.base import StorageBackend, register_backend
from kvplane.engine.chunk import KVChunk
from kvplane.engine.circuit_breaker import BreakerPolicy, BreakerState, CircuitBreaker
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted
from kvplane.errors import ConfigError, CorruptChunk
from kvplane.keys import CacheKey

__all__ = ["KEY_PREFIX", "RemoteBackend", "RemoteStats"]

log = logging.getLogger(__name__)
KEY_PREFIX = "kvplane:"
#: Bytes a header read asks for first: the fixed prefix plus room for a typical key and
#: metadata, so one GETRANGE usually covers the whole header.
_HEAD_READ = 512
T = TypeVar("T")


class RemoteStats(NamedTuple):
    breaker: BreakerState
    times_opened: int
    errors: int
    dropped_puts: int
    skipped_gets: int
    corrupt: int


@register_backend
class RemoteBackend(StorageBackend):
    name = "RemoteBackend"

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 1.0,
        max_connections: int = 16,
        breaker: CircuitBreaker | None = None,
        tls_ca_file: str | None = None,
    ) -> None:
        """Set up the pool (no connection is made yet). ``tls_ca_file``: PEM CA bundle that
        verifies a ``rediss://`` server. Raises ConfigError for a bad URL or CA file."""
        super().__init__()
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"remote_url: {url.split('://')[0]!r} is not a Redis URL "
                "(expected redis://host:port or rediss://host:port)"
            )
        tls: dict[str, str] = {}
        if tls_ca_file is not None:
            tls["ssl_ca_certs"] = _check_ca_file(url, tls_ca_file)
        try:
            pool = redis.BlockingConnectionPool.from_url(
                url,
                **tls,
                max_connections=max_connections,
                timeout=timeout_s,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 0),
                retry_on_timeout=False,
            )
        except ValueError as exc:
            raise ConfigError(f"remote_url: {exc}") from None
        self._client = redis.Redis(connection_pool=pool)
        self.breaker = breaker or CircuitBreaker(
            BreakerPolicy(failure_threshold=3, reset_after_s=max(1.0, timeout_s))
        )
        self._lock = threading.Lock()
        self._errors = 0
        self._dropped = 0
        self._skipped = 0
        self._corrupt = 0

    # ------------------------------------------------------------------ contract
    def contains(self, key: CacheKey) -> bool:
        return self._call(lambda: bool(self._client.exists(_rkey(key))), False)

    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        header, payload = serde.encode_parts(key, chunk)
        ok = self._call(lambda: self._set_parts(_rkey(key), header, payload), False)
        if not ok:
            with self._lock:
                self._dropped += 1
            return False
        self._emit(ChunkAdmitted(key, self.name))
        return True

    def get(self, key: CacheKey) -> KVChunk | None:
        data = self._call(lambda: self._client.get(_rkey(key)), None)
        if not isinstance(data, bytes):
            return None
        try:
            _, chunk = serde.decode(data, expected_key=key)
        except CorruptChunk as exc:
            log.warning("remote tier: dropping corrupt value for %s: %s", key.to_str(), exc)
            with self._lock:
                self._corrupt += 1
            self.remove(key)
            return None
        return chunk

    def chunk_tokens(self, key: CacheKey) -> int:
        """The token count in the value's header, read with GETRANGE (the payload never
        crosses the wire): 0 when absent, unreadable, another key's, or the server fails."""
        name = _rkey(key)
        head = self._getrange(name, 0, _HEAD_READ)
        if not head:
            return 0
        try:
            size = serde.header_size(head)
            if size > len(head):  # a long key or metadata: fetch the rest of the header
                head += self._getrange(name, len(head), size - len(head))
            parsed = serde.decode_header(head)
        except CorruptChunk as exc:
            log.debug("remote tier: unreadable header for %s: %s", key.to_str(), exc)
            return 0
        return parsed.meta.num_tokens if parsed.key == key else 0

    def remove(self, key: CacheKey) -> bool:
        removed = self._call(lambda: bool(self._client.delete(_rkey(key))), False)
        if removed:
            self._emit(ChunkEvicted(key, self.name))
        return removed

    def keys(self) -> list[CacheKey]:
        def scan() -> list[CacheKey]:
            found = []
            for raw in self._client.scan_iter(match=KEY_PREFIX + "*", count=1000):
                text = raw.decode() if isinstance(raw, bytes) else str(raw)
                try:
                    found.append(CacheKey.from_str(text[len(KEY_PREFIX) :]))
                except ValueError:
                    continue
            return found

        return self._call(scan, [])

    @property
    def client(self) -> redis.Redis:
        """The pooled client (benchmarks compare raw SET/GET through the same one)."""
        return self._client

    def close(self) -> None:
        self._client.close()
        self._client.connection_pool.disconnect()

    def stats(self) -> RemoteStats:
        with self._lock:
            return RemoteStats(
                self.breaker.state,
                self.breaker.times_opened,
                self._errors,
                self._dropped,
                self._skipped,
                self._corrupt,
            )

    def counters(self) -> dict[str, float]:
        s = self.stats()
        return {
            "breaker_open": float(s.breaker is not BreakerState.CLOSED),
            "breaker_times_opened": float(s.times_opened),
            "errors": float(s.errors),
            "dropped_puts": float(s.dropped_puts),
            "skipped_gets": float(s.skipped_gets),
            "corrupt": float(s.corrupt),
        }

    # ------------------------------------------------------------------ internals
    def _set_parts(self, name: str, header: bytes, payload: memoryview) -> bool:
        """``SET name header+payload`` with the value sent as its parts (RESP bulk strings
        are length-prefixed and binary-safe). Raises redis errors like any client call."""
        key = name.encode()
        size = len(header) + payload.nbytes
        command = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n" % (len(key), key, size)
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([command + header, payload, b"\r\n"])
            reply = conn.read_response()
        except BaseException:
            conn.disconnect()  # a half-written command must not be reused
            raise
        finally:
            pool.release(conn)
        return reply in (b"OK", "OK", True)

    def _getrange(self, name: str, start: int, length: int) -> bytes:
        """Up to ``length`` bytes of the value from ``start`` (b"" when absent or failed)."""
        data = self._call(lambda: self._client.getrange(name, start, start + length - 1), None)
        return data if isinstance(data, bytes) else b""

    def _call(self, fn: Callable[[], T], fallback: T) -> T:
        """Run one Redis call behind the breaker; ``fallback`` when refused or failed."""
        if not self.breaker.allow():
            with self._lock:
                self._skipped += 1
            return fallback
        try:
            result = fn()
        except (redis.RedisError, OSError) as exc:
            before = self.breaker.state
            self.breaker.record_failure()
            with self._lock:
                self._errors += 1
            if before is BreakerState.CLOSED and self.breaker.state is BreakerState.OPEN:
                # Once per outage; the failed probes that follow are only counted.
                log.warning(
                    "remote tier: %d calls in a row failed (last: %s); not calling the server, "
                    "probing it every %.1fs",
                    self.breaker.policy.failure_threshold,
                    exc,
                    self.breaker.policy.reset_after_s,
                )
            else:
                log.debug("remote tier call failed: %s", exc)
            return fallback
        except BaseException:
            self.breaker.record_failure()  # never leave a half-open probe outstanding
            raise
        recovered = self.breaker.state is not BreakerState.CLOSED
        self.breaker.record_success()
        if recovered:
            log.info("remote tier: the server answers again; breaker closed")
        return result


def _check_ca_file(url: str, path: str) -> str:
    # Checked here, not at the first connection: there a bad file would look like a server
    # that is down (errors counted, breaker open) instead of a configuration mistake.
    if not url.startswith("rediss://"):
        raise ConfigError("remote_tls_ca_file: set, but remote_url is not a rediss:// (TLS) URL")
    if not os.path.isfile(path):
        raise ConfigError(f"remote_tls_ca_file: {path!r} is not a file")
    try:
        ssl.create_default_context(cafile=path)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"remote_tls_ca_file: {path!r} holds no usable CA certificate: {exc}"
        ) from None
    return path


def _rkey(key: CacheKey) -> str:
    return KEY_PREFIX + key.to_str()
