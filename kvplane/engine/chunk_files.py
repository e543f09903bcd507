"""Chunk files in a directory: one file per chunk, named by its key, written atomically.

Shared by the local disk tier and the shared-filesystem tier. A file holds exactly one
:mod:`~kvplane.engine.serde` frame. Writers write a hidden temp file in the same directory
and ``os.replace`` it onto the final name, so a reader (in this process or another one) sees
the old file, the new file or none, never half of one. No fsync: a chunk lost to a power cut
is a cache miss, and the checksum catches a torn file after a crash.
"""

from __future__ import annotations

import io
import logging
import os
import uuid
from pathlib import Path
from typing import BinaryIO, NamedTuple

from kvplane.engine import serde
from kvplane.engine.chunk import KVChunk, Landing
from kvplane.errors import CorruptChunk
from kvplane.keys import CacheKey

__all__ = [
    "SUFFIX",
    "TEMP_PREFIX",
    "ChunkFile",
    "WriteFailureLog",
    "chunk_path",
    "directory_from_url",
    "key_of",
    "read_chunk_file",
    "read_chunk_tokens",
    "remove_temp_files",
    "scan",
    "write_chunk_file",
]

SUFFIX = ".kvc"
TEMP_PREFIX = ".tmp-"


class ChunkFile(NamedTuple):
    key: CacheKey
    path: Path
    size: int
    mtime_ns: int


class WriteFailureLog:
    """Logs a tier's failed writes without flooding: the first of a run at WARNING, the
    rest at DEBUG, and one INFO line when writes succeed again (a full disk fails every
    write until space is freed; the tier counts each one)."""

    def __init__(self, logger: logging.Logger, tier: str) -> None:
        self._log = logger
        self._tier = tier
        self._failing = False  # a plain flag: a lost update costs one log line at most

    def failed(self, key: CacheKey, exc: OSError) -> None:
        level = logging.DEBUG if self._failing else logging.WARNING
        more = "" if self._failing else " (more failures at DEBUG until a write succeeds)"
        self._failing = True
        self._log.log(level, "%s: writing %s failed: %s%s", self._tier, key.to_str(), exc, more)

    def succeeded(self) -> None:
        if self._failing:
            self._failing = False
            self._log.info("%s: writes succeed again", self._tier)


def chunk_path(root: Path, key: CacheKey) -> Path:
    # to_str() percent-quotes the model name, so the name never holds a path separator.
    return root / (key.to_str() + SUFFIX)


def key_of(name: str) -> CacheKey | None:
    """The key a file name stands for, or None for anything that is not a chunk file."""
    if not name.endswith(SUFFIX) or name.startswith("."):
        return None
    try:
        return CacheKey.from_str(name[: -len(SUFFIX)])
    except ValueError:
        return None


def write_chunk_file(root: Path, key: CacheKey, chunk: KVChunk) -> int:
    """Write one chunk atomically; returns the file size. Raises OSError."""
    header, payload = serde.encode_parts(key, chunk)
    tmp = root / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex}"
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(payload)
        os.replace(tmp, chunk_path(root, key))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(header) + payload.nbytes


#: Bytes read (and hashed while still in cache) at a time when a payload lands in a buffer
#: of the caller's choosing.
_PIECE = 1 << 20


def read_chunk_file(path: Path, key: CacheKey, into: Landing | None = None) -> KVChunk:
    """Read and verify one chunk file. With ``into``, the payload is read straight into the
    buffer it hands out for the key (a CPU-tier page: no buffer of its own, no copy after),
    or into one of its own when it hands out none. Raises FileNotFoundError (gone) or
    CorruptChunk."""
    with open(path, "rb", buffering=0) as f:
        if into is not None:
            landed = _read_landed(f, key, into)
            if landed is not None:
                return landed
            f.seek(0)
        size = os.fstat(f.fileno()).st_size
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            n = f.readinto(view[got:])
            if not n:
                break
            got += n
    _, chunk = serde.decode(view[:got], expected_key=key)
    return chunk


def _read_landed(f: io.FileIO, key: CacheKey, into: Landing) -> KVChunk | None:
    """The chunk with its payload read into ``into``'s buffer; None when it gives none."""
    check = serde.PayloadCheck(_read_header(f))
    nbytes = check.header.payload_len
    buffer = into(key, nbytes)
    if buffer is None:
        return None
    view = memoryview(buffer).cast("B")[:nbytes]
    got = 0
    while got < nbytes:
        n = f.readinto(view[got : min(got + _PIECE, nbytes)])
        if not n:
            break
        check.update(view[got : got + n])
        got += n
    if f.read(1):
        raise CorruptChunk(f"chunk file {key.to_str()} runs on past its frame")
    return check.chunk(view[:got], expected_key=key)


def _read_header(f: BinaryIO | io.FileIO) -> bytes:
    """A frame's whole header from the start of ``f``. Raises CorruptChunk."""
    head = f.read(serde.PREFIX_SIZE)
    head += f.read(serde.header_size(head) - len(head))
    if len(head) != serde.header_size(head):
        raise CorruptChunk(f"chunk file truncated inside its header ({len(head)} bytes)")
    return head


def read_chunk_tokens(path: Path, key: CacheKey) -> int:
    """The token count in one chunk file's header, without reading its payload. Raises
    FileNotFoundError (gone) or CorruptChunk (unreadable header, or another key's)."""
    with open(path, "rb") as f:
        header = _read_header(f)
    parsed = serde.decode_header(header)
    if parsed.key != key:
        raise CorruptChunk(f"chunk file {path.name} holds key {parsed.key.to_str()}")
    return parsed.meta.num_tokens


def scan(root: Path) -> list[ChunkFile]:
    """Every chunk file directly in ``root`` (symlinks and other names are ignored)."""
    found: list[ChunkFile] = []
    with os.scandir(root) as entries:
        for entry in entries:
            key = key_of(entry.name)
            if key is None or entry.is_symlink() or not entry.is_file(follow_symlinks=False):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue
            found.append(ChunkFile(key, Path(entry.path), st.st_size, st.st_mtime_ns))
    return found


def remove_temp_files(root: Path) -> int:
    """Delete leftovers of interrupted writes (only safe when no other writer shares root)."""
    removed = 0
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name.startswith(TEMP_PREFIX):
                Path(entry.path).unlink(missing_ok=True)
                removed += 1
    return removed


def directory_from_url(url: str, scheme: str) -> Path:
    """``scheme:///abs/path``, ``scheme://rel/path``, ``scheme://host:port/path`` (the
    original's form; host and port are ignored) or a plain path -> the directory."""
    prefix = f"{scheme}://"
    if not url.startswith(prefix):
        return Path(url)
    rest = url[len(prefix) :]
    first, sep, tail = rest.partition("/")
    host, colon, port = first.rpartition(":")
    if sep and colon and host and port.isdigit():
        return Path("/" + tail)
    return Path(rest)
