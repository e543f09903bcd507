"""The peer directory: which other instance's chunk server holds a run of chunks, per the
controller. The p2p tier's locator (wired by the composition root); called from engine
threads on a p2p miss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from kvplane.keys import CacheKey
from kvplane.protocol import PeerLookupReply, PeerLookupRequest, pack_hashes

__all__ = ["PeerDirectory", "Requester"]


class Requester(Protocol):
    """Request/reply with the controller: ZMQ's ControllerLink or NATS's NatsOutbox."""

    @property
    def answers(self) -> bool: ...

    def request(self, msg: Any, timeout_s: float) -> Any: ...


class PeerDirectory:
    """Asks the controller, over ``link``, for the peer holding chunks (one request each)."""

    def __init__(
        self,
        link: Requester,
        *,
        instance_id: str,
        worker_id: int,
        chunk_size: int,
        timeout_s: float,
        registered: Callable[[], bool],
    ) -> None:
        """``registered``: whether the worker is registered now (an unregistered rank's
        controller does not know it, and a pull-only controller cannot answer)."""
        self._link = link
        self._instance_id = instance_id
        self._worker_id = worker_id
        self._chunk_size = chunk_size
        self._timeout_s = timeout_s
        self._registered = registered

    def locate(self, keys: Sequence[CacheKey]) -> str | None:
        """The chunk-server URL of another instance's same rank holding ``keys`` from the
        first one on; None when none does, or the controller does not answer within the
        timeout (``p2p_timeout_s``), has no reply port, or does not know this worker."""
        if not self._link.answers or not keys or not self._registered():
            return None
        req = PeerLookupRequest(
            instance_id=self._instance_id,
            worker_id=self._worker_id,
            hashes=pack_hashes([k.chunk_hash for k in keys]),
            chunk_size=self._chunk_size,
        )
        reply = self._link.request(req, self._timeout_s)
        if not isinstance(reply, PeerLookupReply) or not reply.num_chunks:
            return None
        return reply.peer_init_url
