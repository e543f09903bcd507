"""Which tiers an engine config asks for, built in one place, and this process's p2p node.

Order, highest first: ``LocalCPUBackend`` (``local_cpu``), ``LocalDiskBackend``
(``local_disk``), the ``remote_url`` tier (``RemoteBackend`` for redis:// rediss:// unix://,
``FSConnector`` for fs://), ``P2PBackend`` (``enable_p2p``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from kvplane.config import EngineConfig, rank_port
from kvplane.engine.backends.base import StorageBackend
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.disk import LocalDiskBackend
from kvplane.engine.backends.fs import FSConnectorBackend
from kvplane.engine.backends.p2p import P2PBackend, PeerLocator
from kvplane.engine.backends.remote import RemoteBackend
from kvplane.engine.chunk_files import directory_from_url
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.p2p import ChunkServer, P2PClient
from kvplane.engine.p2p.move import MoveRequest, MoveResult, move_chunks
from kvplane.engine.storage_manager import StorageManager
from kvplane.errors import ConfigError
from kvplane.keys import CacheKey

__all__ = ["GB", "REMOTE_SCHEMES", "P2PNode", "build_backends", "remote_backend"]

GB = 1 << 30

RemoteFactory = Callable[[str, EngineConfig], StorageBackend]


def _redis(url: str, config: EngineConfig) -> StorageBackend:
    return RemoteBackend(
        url, timeout_s=config.remote_timeout_s, tls_ca_file=config.remote_tls_ca_file
    )


def _fs(url: str, config: EngineConfig) -> StorageBackend:
    root = directory_from_url(url, "fs")
    try:
        return FSConnectorBackend(root)
    except OSError as exc:
        raise ConfigError(f"remote_url: cannot use directory {str(root)!r}: {exc}") from None


REMOTE_SCHEMES: dict[str, RemoteFactory] = {
    "redis": _redis,
    "rediss": _redis,
    "unix": _redis,
    "fs": _fs,
}


def remote_backend(config: EngineConfig) -> StorageBackend:
    """The tier ``remote_url`` names. Raises ConfigError listing the valid schemes."""
    url = config.remote_url or ""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    factory = REMOTE_SCHEMES.get(scheme)
    if factory is None:
        raise ConfigError(
            f"remote_url: unsupported scheme {scheme!r}; valid schemes: {sorted(REMOTE_SCHEMES)}"
        )
    return factory(url, config)


def _no_peer(keys: Sequence[CacheKey]) -> str | None:
    return None


def build_backends(
    config: EngineConfig,
    pool: HostMemoryPool | None,
    *,
    peer_locator: PeerLocator | None = None,
) -> list[StorageBackend]:
    """The configured tiers, highest first. Raises ConfigError for an unusable setting.

    ``peer_locator`` answers the p2p tier's "which peer holds these keys"; without one the
    tier finds no peer until :meth:`P2PBackend.set_peer_locator` (the composition root
    installs the controller worker's)."""
    backends: list[StorageBackend] = []
    if pool is not None:
        backends.append(LocalCPUBackend(pool))
    if config.local_disk:
        if config.max_local_disk_size <= 0:
            raise ConfigError("max_local_disk_size: must be > 0 GB when local_disk is set")
        root = directory_from_url(config.local_disk, "file")
        try:
            backends.append(LocalDiskBackend(root, int(config.max_local_disk_size * GB)))
        except OSError as exc:
            raise ConfigError(f"local_disk: cannot use directory {str(root)!r}: {exc}") from None
    if config.remote_url:
        backends.append(remote_backend(config))
    if config.enable_p2p:
        client = P2PClient(
            timeout_s=config.p2p_timeout_s, max_transfer_bytes=config.p2p_max_transfer_bytes
        )
        backends.append(P2PBackend(client, peer_locator or _no_peer))
    return backends


class P2PNode:
    """This process's peer-to-peer side, a service of the process: the chunk server over the
    local tiers (serves fetches, stores pushes), the client for ``move``, and the p2p tier's
    locator wiring. Binds on ``start()``: ``p2p_host`` and ``p2p_init_ports[worker_id]``
    (any free port when the list is null), ``worker_id`` being this process's rank."""

    name = "p2p"

    def __init__(self, config: EngineConfig, storage: StorageManager, *, worker_id: int) -> None:
        port = rank_port("p2p_init_ports", config.p2p_init_ports, worker_id) or 0
        self.client = P2PClient(
            timeout_s=config.p2p_timeout_s, max_transfer_bytes=config.p2p_max_transfer_bytes
        )
        self.server = ChunkServer(
            config.p2p_host,
            port,
            storage.read_local,
            storage.put_into,
            timeout_s=config.p2p_timeout_s,
            max_transfer_bytes=config.p2p_max_transfer_bytes,
        )
        self.storage = storage
        tier = storage.backends.get(P2PBackend.name)
        self.backend = tier if isinstance(tier, P2PBackend) else None

    @property
    def url(self) -> str:
        """``host:port`` peers dial (the worker's ``peer_init_url``); valid after start."""
        return self.server.url

    def set_peer_locator(self, peer_locator: PeerLocator) -> None:
        if self.backend is not None:
            self.backend.set_peer_locator(peer_locator)

    def move(self, request: MoveRequest, keys: Sequence[CacheKey] | None = None) -> MoveResult:
        """Push chunks of a local tier to a peer's tier: those of ``keys`` (None: all; see
        :func:`move_chunks`)."""
        return move_chunks(self.storage, self.client, request, keys)

    def bind(self) -> None:
        """Take the port now (``url`` is then final), before the worker registers it."""
        self.server.bind()
        if self.backend is not None:
            self.backend.self_url = self.server.url

    def start(self) -> None:
        self.server.start()
        if self.backend is not None:
            self.backend.self_url = self.server.url

    def stop(self) -> None:
        self.server.close()
