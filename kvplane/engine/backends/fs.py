"""The shared-filesystem tier (``remote_url: fs://path``) and the load-fs-chunks operation.

Several instances (processes, machines over NFS) point at one directory. The directory is the
only state: no in-memory index, so a chunk another instance wrote is visible to the next
``contains``/``get`` here. Writes are atomic renames, so a reader never sees half a file.
This tier does not evict: the directory's size is the operator's (or a cron job's) business,
as with any shared store.

The tier's name is ``FSConnector``, the seeds' name for it, so ``/bypass/add``,
``/cache/clear?locations=`` and controller lookups use ``FSConnector``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from kvplane.config import load_config
from kvplane.engine import chunk_files
from kvplane.engine.backends.base import StorageBackend, register_backend
from kvplane.engine.chunk import KVChunk, Landing
from kvplane.engine.events import ChunkAdmitted, ChunkEvicted
from kvplane.errors import BadRequest, ConfigError, CorruptChunk
from kvplane.keys import CacheKey

__all__ = [
    "FSConnectorBackend",
    "FsLoadResult",
    "fs_root_from_config_file",
    "load_fs_chunks",
    "load_fs_chunks_from_config",
]

log = logging.getLogger(__name__)


@register_backend
class FSConnectorBackend(StorageBackend):
    name = "FSConnector"
    lands_payloads = True

    def __init__(self, root: str | Path) -> None:
        """Use (creating it if needed) the shared directory ``root``. Raises OSError."""
        super().__init__()
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._corrupt = 0
        self._write_errors = 0
        self._write_log = chunk_files.WriteFailureLog(log, "fs tier")

    def counters(self) -> dict[str, float]:
        with self._lock:
            return {"corrupt": float(self._corrupt), "write_errors": float(self._write_errors)}

    def chunk_tokens(self, key: CacheKey) -> int:
        try:
            return chunk_files.read_chunk_tokens(chunk_files.chunk_path(self.root, key), key)
        except (CorruptChunk, OSError):
            return 0  # gone or unreadable: a clear removes it all the same

    def contains(self, key: CacheKey) -> bool:
        return chunk_files.chunk_path(self.root, key).is_file()

    def put(self, key: CacheKey, chunk: KVChunk) -> bool:
        try:
            chunk_files.write_chunk_file(self.root, key, chunk)
        except OSError as exc:  # the directory is full, gone or read-only: refused, counted
            with self._lock:
                self._write_errors += 1
            self._write_log.failed(key, exc)
            return False
        self._write_log.succeeded()
        self._emit(ChunkAdmitted(key, self.name))
        return True

    def get(self, key: CacheKey, into: Landing | None = None) -> KVChunk | None:
        """The chunk; with ``into``, its payload read straight into the buffer ``into``
        hands out (see :func:`kvplane.engine.chunk_files.read_chunk_file`)."""
        path = chunk_files.chunk_path(self.root, key)
        try:
            return chunk_files.read_chunk_file(path, key, into)
        except FileNotFoundError:
            return None
        except (CorruptChunk, OSError) as exc:
            log.warning("fs tier: dropping unreadable chunk file %s: %s", path.name, exc)
            with self._lock:
                self._corrupt += 1
            self.remove(key)
            return None

    def get_many(
        self, keys: Sequence[CacheKey], into: Landing | None = None
    ) -> list[KVChunk | None]:
        return [self.get(k, into) for k in keys]

    def remove(self, key: CacheKey) -> bool:
        try:
            chunk_files.chunk_path(self.root, key).unlink()
        except FileNotFoundError:
            return False
        self._emit(ChunkEvicted(key, self.name))
        return True

    def keys(self) -> list[CacheKey]:
        return [f.key for f in chunk_files.scan(self.root)]


class FsLoadResult(NamedTuple):
    loaded_chunks: int
    total_files: int
    failed_keys: list[str]


def load_fs_chunks(
    root: str | Path,
    sink: StorageBackend,
    *,
    max_chunks: int | None = None,
    max_failed_keys: int = 10,
) -> FsLoadResult:
    """Copy chunk files of the shared directory ``root`` into ``sink`` (the CPU tier).

    Only regular files directly in ``root`` whose names are chunk keys are considered, so
    no path (symlink, ``..``) leads outside it. Newest files load first; at most
    ``max_chunks`` load (None: all). A file that is unreadable, corrupt or refused by the
    sink counts as failed; the first ``max_failed_keys`` of their keys are reported.
    Raises BadRequest when ``root`` is not a directory.
    """
    base = Path(root)
    if not base.is_dir():
        raise BadRequest(f"FS chunk directory {str(base)!r} does not exist")
    real_base = base.resolve()
    files = sorted(chunk_files.scan(base), key=lambda f: f.mtime_ns, reverse=True)
    loaded = 0
    failed: list[str] = []
    for f in files:
        if max_chunks is not None and loaded >= max_chunks:
            break
        ok = False
        if Path(os.path.realpath(f.path)).parent == real_base:
            try:
                ok = sink.put(f.key, chunk_files.read_chunk_file(f.path, f.key))
            except (CorruptChunk, OSError) as exc:
                log.warning("load-fs-chunks: skipping %s: %s", f.path.name, exc)
        if ok:
            loaded += 1
        elif len(failed) < max(0, max_failed_keys):
            failed.append(f.key.to_str())
    return FsLoadResult(loaded, len(files), failed)


def fs_root_from_config_file(config_path: str | Path) -> Path:
    """The ``fs://`` directory an engine config file names.

    Raises BadRequest ("Configuration file not found", not an fs:// remote_url, ...)."""
    path = Path(config_path)
    if not path.is_file():
        raise BadRequest("Configuration file not found")
    try:
        cfg = load_config(path, env={})
    except ConfigError as exc:
        raise BadRequest(f"Invalid configuration: {exc}") from None
    url = cfg.remote_url or ""
    if not url.startswith("fs://"):
        raise BadRequest("Configuration has no fs:// remote_url (FSConnector is not configured)")
    return chunk_files.directory_from_url(url, "fs")


def load_fs_chunks_from_config(
    config_path: str | Path,
    sink: StorageBackend,
    *,
    max_chunks: int | None = None,
    max_failed_keys: int = 10,
) -> FsLoadResult:
    """``POST /cache/load-fs-chunks``: read the config file, load its fs directory's chunks.

    Raises BadRequest for a missing or invalid config file or a missing directory."""
    if max_chunks is not None and max_chunks < 0:
        raise BadRequest("max_chunks must be >= 0")
    root = fs_root_from_config_file(config_path)
    return load_fs_chunks(root, sink, max_chunks=max_chunks, max_failed_keys=max_failed_keys)
