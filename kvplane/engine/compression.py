"""Chunk codecs by method name: ``none``, ``zstd`` (lossless) and ``int8`` (lossy).

A compressed chunk keeps its raw ``shape``/``dtype`` in :class:`ChunkMeta` and records the
method in ``meta.compression`` (plus codec fields in ``meta.codec_info``), so every tier
stores it like any chunk and :func:`decompress` can always restore the raw layout.

``int8`` quantizes each row of the KV tensor (the ``head_size`` values of one layer, K or V,
token and head; MLA: of one layer and token) with its own scale ``s = absmax(row) / 127``:
``q = round(x / s)`` in ``[-127, 127]`` and ``x' = q * s``. The error bound, tested:
``|x - x'| <= s / 2`` per element before the cast back to the KV dtype, which adds at most
half an ulp of that dtype at ``|x'|`` (relative ``2**-8`` for bfloat16, ``2**-11`` for
float16, ``2**-24`` for float32; for subnormals half their fixed spacing, ``2**-25`` in
float16). Scales are float32, appended after the int8 values.
Non-finite values cannot be quantized and are refused.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple, Protocol

import torch
import zstandard

from kvplane.engine.chunk import KVChunk, dtype_from_name
from kvplane.engine.serde import payload_view
from kvplane.errors import BadRequest, CorruptChunk

__all__ = [
    "CODECS",
    "Codec",
    "CompressResult",
    "Int8Codec",
    "NoneCodec",
    "ZstdCodec",
    "compress",
    "decompress",
    "get_codec",
    "saved_bytes",
]


class CompressResult(NamedTuple):
    """What a compress/decompress pass over stored chunks did."""

    num_chunks: int
    num_tokens: int
    bytes_before: int
    bytes_after: int

    @property
    def bytes_saved(self) -> int:
        return self.bytes_before - self.bytes_after


class Codec(Protocol):
    name: ClassVar[str]
    lossless: ClassVar[bool]

    def encode(self, chunk: KVChunk) -> KVChunk:
        """An uncompressed chunk -> the same KV compressed with this method."""
        ...

    def decode(self, chunk: KVChunk) -> KVChunk:
        """A chunk compressed with this method -> an uncompressed copy."""
        ...


class NoneCodec:
    name: ClassVar[str] = "none"
    lossless: ClassVar[bool] = True

    def encode(self, chunk: KVChunk) -> KVChunk:
        return chunk

    def decode(self, chunk: KVChunk) -> KVChunk:
        return chunk


class ZstdCodec:
    name: ClassVar[str] = "zstd"
    lossless: ClassVar[bool] = True
    level: ClassVar[int] = 3

    def encode(self, chunk: KVChunk) -> KVChunk:
        data = zstandard.ZstdCompressor(level=self.level).compress(payload_view(chunk))
        meta = chunk.meta.with_compression(self.name, {"level": self.level})
        return KVChunk(meta, _tensor_of(data))

    def decode(self, chunk: KVChunk) -> KVChunk:
        raw = chunk.meta.raw_nbytes
        try:
            data = zstandard.ZstdDecompressor().decompress(payload_view(chunk), max_output_size=raw)
        except zstandard.ZstdError as exc:
            raise CorruptChunk(f"zstd chunk does not decode: {exc}") from None
        if len(data) != raw:
            raise CorruptChunk(f"zstd chunk decodes to {len(data)} bytes, expected {raw}")
        return KVChunk(chunk.meta.with_compression("none"), _tensor_of(data))


class Int8Codec:
    name: ClassVar[str] = "int8"
    lossless: ClassVar[bool] = False

    def encode(self, chunk: KVChunk) -> KVChunk:
        x = chunk.kv().to(torch.float32)
        cols = int(x.shape[-1]) if x.dim() else 1
        rows = x.reshape(-1, cols)
        if not bool(torch.isfinite(rows).all()):
            raise BadRequest("int8 compression cannot encode non-finite KV values")
        scale = rows.abs().amax(dim=1, keepdim=True) / 127.0
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = torch.round(rows / scale).clamp_(-127, 127).to(torch.int8)
        payload = torch.cat([q.view(-1).view(torch.uint8), scale.view(-1).view(torch.uint8)])
        info = {"granularity": "row", "cols": cols, "rows": int(rows.shape[0])}
        return KVChunk(chunk.meta.with_compression(self.name, info), payload)

    def decode(self, chunk: KVChunk) -> KVChunk:
        rows = int(chunk.meta.codec_info["rows"])
        cols = int(chunk.meta.codec_info["cols"])
        if chunk.nbytes != rows * cols + rows * 4:
            raise CorruptChunk(
                f"int8 chunk has {chunk.nbytes} bytes, expected {rows * cols + rows * 4}"
            )
        q = chunk.payload[: rows * cols].view(torch.int8).reshape(rows, cols)
        scale = chunk.payload[rows * cols :].clone().view(torch.float32).reshape(rows, 1)
        x = (q.to(torch.float32) * scale).to(dtype_from_name(chunk.meta.dtype))
        raw = x.reshape(chunk.meta.shape).contiguous().view(-1).view(torch.uint8)
        return KVChunk(chunk.meta.with_compression("none"), raw)


CODECS: dict[str, type[Codec]] = {c.name: c for c in (NoneCodec, ZstdCodec, Int8Codec)}


def get_codec(method: str) -> Codec:
    """The codec for ``method``; BadRequest naming the valid methods otherwise."""
    try:
        return CODECS[method]()
    except KeyError:
        raise BadRequest(
            f"unknown compression method {method!r}; valid methods: {sorted(CODECS)}"
        ) from None


def decompress(chunk: KVChunk) -> KVChunk:
    """The uncompressed chunk (the same object when it is not compressed)."""
    if chunk.meta.compression == "none":
        return chunk
    return get_codec(chunk.meta.compression).decode(chunk)


def compress(chunk: KVChunk, method: str) -> KVChunk:
    """``chunk`` stored with ``method`` (re-encoding from raw if it used another one)."""
    codec = get_codec(method)
    if chunk.meta.compression == method:
        return chunk
    return codec.encode(decompress(chunk))


def saved_bytes(chunk: KVChunk) -> int:
    """Raw size minus stored size (negative when a codec grew the chunk)."""
    return chunk.meta.raw_nbytes - chunk.nbytes


def _tensor_of(data: bytes) -> torch.Tensor:
    if not data:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)
