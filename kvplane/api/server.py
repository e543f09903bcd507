"""Running internal API servers: one uvicorn per app, each in its own thread.

An engine process serves one app per role it plays: index 0 is the scheduler, index i + 1
worker i. A server listens on ``internal_api_server_host:port_start + index`` or, when
``internal_api_server_socket_path_prefix`` is set, on the Unix socket ``{prefix}_{port}``
(owner-only permissions). :class:`InternalApiService` is the service
:class:`kvplane.process.EngineProcess` starts and stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import uvicorn
from fastapi import FastAPI

from kvplane.api.app import build_app
from kvplane.api.context import ApiContext, SlotRecording
from kvplane.api.discovery import CATEGORIES
from kvplane.config import ConfigStore, EngineConfig
from kvplane.engine.chunk_statistics import AutoExit, ChunkStatistics
from kvplane.engine.engine import Engine
from kvplane.engine.facts import EngineFacts
from kvplane.errors import ConfigError, Conflict, Unavailable
from kvplane.web.auth import is_loopback

__all__ = [
    "Address",
    "ApiServer",
    "InternalApiService",
    "exposure_warning",
    "process_indices",
    "served_indices",
    "server_address",
]

log = logging.getLogger(__name__)


class Address(NamedTuple):
    """Where one server listens: TCP ``host:port``, or the Unix socket ``uds``."""

    host: str
    port: int
    uds: str | None

    def __str__(self) -> str:
        return f"unix:{self.uds}" if self.uds else f"{self.host}:{self.port}"


def server_address(config: EngineConfig, index: int) -> Address:
    port = config.internal_api_server_port_start + index
    prefix = config.internal_api_server_socket_path_prefix
    return Address(config.internal_api_server_host, port, f"{prefix}_{port}" if prefix else None)


def process_indices(facts: EngineFacts) -> list[int]:
    """Roles of an engine process: worker ``worker_id`` (index worker_id + 1); rank 0 also
    plays the scheduler (index 0), as there is no separate scheduler process."""
    worker_index = facts.worker_id + 1
    return [0, worker_index] if facts.worker_id == 0 else [worker_index]


def served_indices(config: EngineConfig, indices: Sequence[int]) -> list[int]:
    """``indices`` filtered by ``internal_api_server_include_index_list`` (null = all)."""
    include = config.internal_api_server_include_index_list
    return [i for i in indices if include is None or i in include]


class ApiServer:
    """One app on one address; uvicorn runs in a daemon thread until :meth:`stop`."""

    def __init__(self, app: FastAPI, address: Address) -> None:
        self.app = app
        self.address = address
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self._failure: BaseException | None = None

    @property
    def port(self) -> int:
        """The TCP port actually bound (differs from the address when it asked for 0)."""
        if self._sock is None or self.address.uds:
            return self.address.port
        return int(self._sock.getsockname()[1])

    def start(self, timeout: float = 10.0) -> None:
        """Bind (errors surface here, in the caller), then serve; returns once serving."""
        self._sock = _bind(self.address)
        config = uvicorn.Config(
            self.app,
            log_config=None,  # leave the process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=2,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._run, name=f"kvplane-api-{self.address}", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise Unavailable(
                    f"internal API server on {self.address} did not start: {self._failure!r}"
                )
            time.sleep(0.01)
        log.info("internal API server listening on %s", self.address)

    def _run(self) -> None:
        assert self._server is not None and self._sock is not None
        try:
            self._server.run(sockets=[self._sock])
        except BaseException as exc:  # uvicorn reports start-up failure with SystemExit
            self._failure = exc

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving and release the port or socket file. Idempotent."""
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout)
            if self._thread.is_alive():
                self._server.force_exit = True
                self._thread.join(timeout)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self.address.uds:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.address.uds)
        self._server = None
        self._thread = None


def _bind(address: Address) -> socket.socket:
    if address.uds:
        return _bind_unix(Path(address.uds))
    if address.port > 65535:  # getaddrinfo would quietly take it modulo 65536
        raise ConfigError(
            f"internal_api_server_port_start: port {address.port} of this role is beyond 65535"
        )
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise ConfigError(
            f"internal_api_server_host: cannot resolve {address.host!r}: {exc}"
        ) from None
    family, _, _, _, sockaddr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise Conflict(
            f"internal API server cannot bind {address}: {exc.strerror or exc}"
        ) from None
    return sock


# sun_path holds 108 bytes on Linux, the terminating NUL included.
_MAX_UNIX_PATH = 107


def _bind_unix(path: Path) -> socket.socket:
    size = len(os.fsencode(path))
    if size > _MAX_UNIX_PATH:
        raise ConfigError(
            f"internal_api_server_socket_path_prefix: socket path {str(path)!r} is {size} "
            f"bytes; a Unix socket path may have at most {_MAX_UNIX_PATH}"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise ConfigError(
            f"internal_api_server_socket_path_prefix: cannot create directory "
            f"{str(path.parent)!r}: {exc.strerror or exc}"
        ) from None
    if path.is_symlink() or path.exists():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise Conflict(f"internal API socket path {path} exists and is not a socket")
        if _socket_is_live(path):
            raise Conflict(f"internal API socket {path} is in use by another server")
        path.unlink()  # stale: left by a process that died
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise Conflict(f"internal API server cannot bind {path}: {exc.strerror or exc}") from None
    # The API can change the engine: only the owner may connect.
    os.chmod(path, 0o600)
    return sock


def _socket_is_live(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except OSError:
            return False
        return True


class InternalApiService:
    """The internal API servers of one process (a service of :mod:`kvplane.process`).

    Builds one app per served index, sharing the process's chunk statistics and
    record-slot switch; ``start`` raises if any server cannot bind (those already started
    are stopped again). ``config_store`` is the process's config, which ``POST /conf``
    changes; ``facts`` the host's facts (the engine's, when there is one). ``engine`` is None
    in a process without one (the scheduler). The constructor registers nothing: whoever
    builds the service feeds ``statistics`` and ``slot_recording`` from the engine and
    subscribes :meth:`on_config_change` to the config store.
    """

    name = "internal_api_server"

    def __init__(
        self,
        config_store: ConfigStore,
        facts: EngineFacts,
        engine: Engine | None = None,
        *,
        indices: Sequence[int] | None = None,
        categories: tuple[str, ...] = CATEGORIES,
        statistics: ChunkStatistics | None = None,
    ) -> None:
        self.config_store = config_store
        self.facts = facts
        self.engine = engine
        config = config_store.current
        self.indices = served_indices(
            config, process_indices(facts) if indices is None else indices
        )
        self.categories = categories
        self.statistics = statistics or ChunkStatistics(_auto_exit(config))
        self.slot_recording = SlotRecording()
        self.servers: dict[int, ApiServer] = {}

    @property
    def config(self) -> EngineConfig:
        """The config now."""
        return self.config_store.current

    def on_config_change(self, config: EngineConfig, changed: frozenset[str]) -> None:
        """Follow a runtime config update (the chunk statistics' auto-exit keys)."""
        if any(name.startswith("chunk_statistics_auto_exit_") for name in changed):
            self.statistics.set_auto_exit(_auto_exit(config))

    def context(self, index: int) -> ApiContext:
        return ApiContext(
            index, self.config_store, self.facts, self.engine, self.statistics, self.slot_recording
        )

    def start(self) -> None:
        warning = exposure_warning(self.config)
        if warning:
            log.warning("%s", warning)
        try:
            for index in self.indices:
                server = ApiServer(
                    build_app(self.context(index), self.categories),
                    server_address(self.config, index),
                )
                server.start()
                self.servers[index] = server
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for index in sorted(self.servers, reverse=True):
            self.servers.pop(index).stop()


def exposure_warning(config: EngineConfig) -> str | None:
    """A warning when the API listens beyond loopback with no token to guard it."""
    host = config.internal_api_server_host
    if config.internal_api_server_socket_path_prefix or config.internal_api_server_token:
        return None
    if is_loopback(host):
        return None
    return (
        f"internal API server binds {host} without internal_api_server_token: anyone who "
        "can reach it can change this engine"
    )


def _auto_exit(config: EngineConfig) -> AutoExit:
    return AutoExit(
        config.chunk_statistics_auto_exit_timeout_hours,
        config.chunk_statistics_auto_exit_target_unique_chunks,
    )
