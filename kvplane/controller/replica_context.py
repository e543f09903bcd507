"""What the lease holder and the operation bus read of their replica: a Protocol, so
they do not import the replica that builds them."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from kvplane.controller.cluster import Cluster
from kvplane.controller.log_apply import LogApplier
from kvplane.controller.settings import ControllerConfig

__all__ = ["ReplicaContext"]

T = TypeVar("T")


class ReplicaContext(Protocol):
    settings: ControllerConfig
    replica_id: str
    cluster: Cluster
    applier: LogApplier
    js: Any  # the JetStream context; None until connected
    snapshot_seq: int  # the newest snapshot loaded or written
    caught_up_at: float  # monotonic time the log last showed no lag

    @property
    def stale(self) -> bool: ...

    def call(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """Run ``coro`` on the replica's loop from another thread; Unavailable on timeout."""
        ...
