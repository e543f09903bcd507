"""The peer-to-peer tier: on a local miss, find which peer holds the chunks and fetch them.

``peer_locator(keys)`` (wired by the composition root to the controller worker's lookup)
names one peer's chunk-server URL that holds the given keys, or None. The tier keeps
nothing itself: ``put`` is refused and ``keys()`` is empty; fetched chunks reach the CPU
tier through the storage manager's promotion. A peer that is down, slow or the wrong answer
is a miss within the transfer deadline. Chunks move to peers on purpose with
:meth:`P2PClient.push` (the controller's ``move``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from kvplane.engine.backends.base import StorageBackend, register_backend
from kvplane.engine.chunk import KVChunk, Landing
from kvplane.engine.p2p.client import P2PClient
from kvplane.errors import KvplaneError
from kvplane.keys import CacheKey

__all__ = ["P2PBackend", "PeerLocator"]

log = logging.getLogger(__name__)

PeerLocator = Callable[[Sequence[CacheKey]], str | None]


@register_backend
class P2PBackend(StorageBackend):
    name = "P2PBackend"
    fetch_only = True

    def __init__(
        self, client: P2PClient, peer_locator: PeerLocator, *, self_url: str | None = None
    ) -> None:
        """``self_url``: this process's own chunk-server URL, never fetched from."""
        super().__init__()
        self.client = client
        self.peer_locator = peer_locator
        self.self_url = self_url
        self.fetch_errors = 0

    def set_peer_locator(self, peer_locator: PeerLocator) -> None:
        """Late wiring: the controller worker starts after the tiers are built."""
        self.peer_locator = peer_locator

    def counters(self) -> dict[str, float]:
        return {"fetch_errors": float(self.fetch_errors)}

    def contains(self, key: CacheKey) -> bool:
        return self._locate([key]) is not None

    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        return False

    def get(self, key: CacheKey) -> KVChunk | None:
        return self.get_many([key])[0]

    def get_many(
        self, keys: Sequence[CacheKey], into: Landing | None = None
    ) -> list[KVChunk | None]:
        """Fetch several chunks from the one peer the locator names, in one transfer."""
        start = time.perf_counter()
        peer = self._locate(keys)
        if peer is None:
            return [None] * len(keys)
        located = time.perf_counter()
        try:
            chunks = self.client.fetch(peer, keys, into=into)
        except KvplaneError as exc:
            self.fetch_errors += 1
            log.info("p2p tier: fetch from %s failed: %s", peer, exc)
            return [None] * len(keys)
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "p2p tier: %s located in %.1f ms; %d of %d chunks, %d bytes, in %.1f ms",
                peer,
                (located - start) * 1e3,
                sum(c is not None for c in chunks),
                len(keys),
                sum(c.nbytes for c in chunks if c is not None),
                (time.perf_counter() - located) * 1e3,
            )
        return chunks

    def remove(self, key: CacheKey) -> bool:
        return False

    def keys(self) -> list[CacheKey]:
        return []

    def _locate(self, keys: Sequence[CacheKey]) -> str | None:
        if not keys:
            return None
        try:
            peer = self.peer_locator(keys)
        except (KvplaneError, OSError) as exc:
            log.info("p2p tier: peer lookup failed: %s", exc)
            return None
        if peer is None or peer == self.self_url:
            return None
        return peer
