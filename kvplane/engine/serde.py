"""One framing of a chunk as bytes, shared by the disk, fs, remote and peer-to-peer tiers.

A frame is a fixed 32-byte prefix, the key, the metadata, then the payload::

    magic "KVPC" | format version u16 | flags u16 | key length u32 | meta length u32
    | payload length u64 | checksum u64            (little endian)
    key (CacheKey.to_str(), UTF-8) | ChunkMeta (msgpack) | payload bytes

The checksum is xxh3-64 over key, metadata and payload, so a flipped bit anywhere after the
prefix, a truncated file or a frame for another key is caught before any byte is served as
KV. Decoding raises :class:`~kvplane.errors.CorruptChunk`; callers treat that as a miss.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

import msgspec
import torch
import xxhash

from kvplane.engine.chunk import ChunkMeta, KVChunk
from kvplane.errors import CorruptChunk
from kvplane.keys import CacheKey

__all__ = [
    "FORMAT_VERSION",
    "MAGIC",
    "PREFIX_SIZE",
    "FrameHeader",
    "PayloadCheck",
    "decode",
    "decode_header",
    "encode",
    "encode_parts",
    "frame_len",
    "header_size",
    "payload_view",
]

MAGIC = b"KVPC"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<4sHHIIQQ")
PREFIX_SIZE = _PREFIX.size
# Generous bounds that still stop a garbage prefix from asking for gigabytes of header.
_MAX_KEY_BYTES = 64 * 1024
_MAX_META_BYTES = 16 * 1024 * 1024

_meta_encoder = msgspec.msgpack.Encoder()
_meta_decoder = msgspec.msgpack.Decoder(ChunkMeta)


class FrameHeader(NamedTuple):
    key: CacheKey
    meta: ChunkMeta
    payload_len: int
    checksum: int
    key_len: int
    #: bytes from the start of the frame to the first payload byte
    header_len: int

    @property
    def frame_len(self) -> int:
        return self.header_len + self.payload_len


def payload_view(chunk: KVChunk) -> memoryview:
    """The payload's bytes without a copy (the tensor must live on the CPU)."""
    payload = chunk.payload.detach()
    if not payload.is_contiguous():
        payload = payload.contiguous()
    return memoryview(payload.numpy()).cast("B")  # type: ignore[arg-type]


def _checksum(key_bytes: bytes, meta_bytes: bytes, payload: memoryview) -> int:
    h = xxhash.xxh3_64()
    h.update(key_bytes)
    h.update(meta_bytes)
    h.update(payload)
    return h.intdigest()


def encode_parts(key: CacheKey, chunk: KVChunk) -> tuple[bytes, memoryview]:
    """The header bytes and the payload view; write them back to back (no payload copy)."""
    key_bytes = key.to_str().encode()
    meta_bytes = _meta_encoder.encode(chunk.meta)
    payload = payload_view(chunk)
    prefix = _PREFIX.pack(
        MAGIC,
        FORMAT_VERSION,
        0,
        len(key_bytes),
        len(meta_bytes),
        payload.nbytes,
        _checksum(key_bytes, meta_bytes, payload),
    )
    return prefix + key_bytes + meta_bytes, payload


def frame_len(key: CacheKey, chunk: KVChunk) -> int:
    """The bytes :func:`encode_parts` will produce, without hashing the payload (a server
    announces sizes before it encodes each frame)."""
    meta_bytes = _meta_encoder.encode(chunk.meta)
    return PREFIX_SIZE + len(key.to_str().encode()) + len(meta_bytes) + chunk.nbytes


def encode(key: CacheKey, chunk: KVChunk) -> bytes:
    """The whole frame as one bytes object (one copy of the payload)."""
    header, payload = encode_parts(key, chunk)
    return header + payload


def _unpack_prefix(buf: memoryview) -> tuple[int, int, int, int]:
    if buf.nbytes < PREFIX_SIZE:
        raise CorruptChunk(f"frame truncated: {buf.nbytes} bytes, prefix needs {PREFIX_SIZE}")
    magic, version, _flags, key_len, meta_len, payload_len, checksum = _PREFIX.unpack_from(buf)
    if magic != MAGIC:
        raise CorruptChunk(f"bad magic {bytes(magic)!r}")
    if version != FORMAT_VERSION:
        raise CorruptChunk(f"unsupported frame format version {version}")
    if key_len > _MAX_KEY_BYTES or meta_len > _MAX_META_BYTES:
        raise CorruptChunk(f"implausible header sizes (key {key_len}, meta {meta_len})")
    return key_len, meta_len, payload_len, checksum


def header_size(prefix: bytes | bytearray | memoryview) -> int:
    """From the first PREFIX_SIZE bytes: how many bytes the whole header takes."""
    key_len, meta_len, _, _ = _unpack_prefix(memoryview(prefix).cast("B"))
    return PREFIX_SIZE + key_len + meta_len


def decode_header(buf: bytes | bytearray | memoryview) -> FrameHeader:
    """Parse the header (``buf`` holds at least :func:`header_size` bytes); no payload check."""
    view = memoryview(buf).cast("B")
    key_len, meta_len, payload_len, checksum = _unpack_prefix(view)
    end = PREFIX_SIZE + key_len + meta_len
    if view.nbytes < end:
        raise CorruptChunk(f"frame truncated inside its header ({view.nbytes} < {end} bytes)")
    try:
        key = CacheKey.from_str(bytes(view[PREFIX_SIZE : PREFIX_SIZE + key_len]).decode())
        meta = _meta_decoder.decode(view[PREFIX_SIZE + key_len : end])
    except (ValueError, UnicodeDecodeError, msgspec.DecodeError) as exc:
        raise CorruptChunk(f"unreadable frame header: {exc}") from None
    return FrameHeader(key, meta, payload_len, checksum, key_len, end)


class PayloadCheck:
    """The checksum of one frame computed while its payload arrives piece by piece (each
    piece hashed while still in cache), then the chunk; for receivers that land payloads
    in buffers of their own choosing."""

    def __init__(self, header_buf: bytes | bytearray | memoryview) -> None:
        head = memoryview(header_buf).cast("B")
        self.header = decode_header(head)
        if head.nbytes != self.header.header_len:
            raise CorruptChunk(f"header is {head.nbytes} bytes, it says {self.header.header_len}")
        key_end = PREFIX_SIZE + self.header.key_len
        self._hash = xxhash.xxh3_64()
        self._hash.update(head[PREFIX_SIZE:key_end])
        self._hash.update(head[key_end:])

    def update(self, piece: memoryview) -> None:
        self._hash.update(piece)

    def chunk(self, payload: memoryview, expected_key: CacheKey | None = None) -> KVChunk:
        """The chunk over ``payload`` (writable, every piece passed to :meth:`update`).
        Raises CorruptChunk for a checksum mismatch, a short payload or another key."""
        header = self.header
        if payload.nbytes != header.payload_len:
            raise CorruptChunk(
                f"payload is {payload.nbytes} bytes, header says {header.payload_len}"
            )
        if expected_key is not None and header.key != expected_key:
            raise CorruptChunk(
                f"frame holds {header.key.to_str()}, expected {expected_key.to_str()}"
            )
        if self._hash.intdigest() != header.checksum:
            raise CorruptChunk(f"checksum mismatch for {header.key.to_str()}")
        if not payload.nbytes:
            return KVChunk(header.meta, torch.empty(0, dtype=torch.uint8))
        return KVChunk(header.meta, torch.frombuffer(payload, dtype=torch.uint8))


def decode(
    buf: bytes | bytearray | memoryview, expected_key: CacheKey | None = None
) -> tuple[CacheKey, KVChunk]:
    """Verify and unpack one frame. The payload is a view of ``buf`` when it is writable
    (a bytearray read from a file), else a copy. Raises CorruptChunk."""
    view = memoryview(buf).cast("B")
    check = PayloadCheck(view[: header_size(view)])
    header = check.header
    if view.nbytes != header.frame_len:
        raise CorruptChunk(f"frame is {view.nbytes} bytes, its header says {header.frame_len}")
    payload = view[header.header_len :]
    check.update(payload)
    if payload.readonly:  # checked first, then copied: the copy is what the chunk owns
        payload = memoryview(bytearray(payload))
    return header.key, check.chunk(payload, expected_key)
