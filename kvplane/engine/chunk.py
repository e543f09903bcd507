"""What a stored chunk is: its metadata and its payload bytes.

A chunk's raw KV is one contiguous tensor of all layers for its tokens:
``[num_layers, 2, num_tokens, num_kv_heads, head_size]`` (MLA: ``[num_layers, num_tokens,
head_size]``). Tiers store the payload as bytes, possibly compressed; ``meta`` says how to
read them back. ``payload`` is a 1-D ``torch.uint8`` tensor: a view into the host pool for
the CPU tier, or a tensor over bytes read from disk, Redis or a peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import msgspec
import torch

from kvplane.keys import CacheKey

__all__ = ["ChunkMeta", "KVChunk", "Landing", "dtype_from_name", "dtype_name"]

#: ``(key, payload bytes) -> buffer``: where a tier that receives chunks (the peer tier)
#: puts one's payload, a writable byte view of at least that size, or None for a buffer
#: of its own. The chunk returned for the key then views that buffer.
Landing = Callable[[CacheKey, int], memoryview | None]

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _DTYPES[_name] = getattr(torch, _name)


def dtype_from_name(name: str) -> torch.dtype:
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unsupported KV dtype {name!r}; supported: {sorted(_DTYPES)}") from None


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class ChunkMeta(msgspec.Struct, frozen=True):
    """How to read a payload back. Serialized (msgpack) into disk headers and wire frames."""

    shape: tuple[int, ...]
    dtype: str
    num_tokens: int
    compression: str = "none"
    #: codec-specific fields (e.g. the int8 scales' layout); empty for "none".
    codec_info: dict[str, Any] = {}

    @property
    def raw_nbytes(self) -> int:
        n = dtype_from_name(self.dtype).itemsize
        for d in self.shape:
            n *= d
        return n

    def with_compression(self, method: str, codec_info: dict[str, Any] | None = None) -> ChunkMeta:
        return msgspec.structs.replace(self, compression=method, codec_info=codec_info or {})


@dataclass(frozen=True)
class KVChunk:
    meta: ChunkMeta
    payload: torch.Tensor  # 1-D uint8

    @property
    def nbytes(self) -> int:
        return int(self.payload.numel())

    def kv(self) -> torch.Tensor:
        """The raw KV tensor (only for an uncompressed chunk); a view, no copy."""
        if self.meta.compression != "none":
            raise ValueError(f"chunk is compressed with {self.meta.compression!r}; decode it first")
        return (
            self.payload[: self.meta.raw_nbytes]
            .view(dtype_from_name(self.meta.dtype))
            .view(self.meta.shape)
        )

    @classmethod
    def from_kv(cls, kv: torch.Tensor, num_tokens: int) -> KVChunk:
        """Wrap a contiguous KV tensor (no copy)."""
        flat = kv.contiguous().view(-1).view(torch.uint8)
        meta = ChunkMeta(tuple(kv.shape), dtype_name(kv.dtype), num_tokens)
        return cls(meta, flat)

    def with_payload(self, payload: torch.Tensor) -> KVChunk:
        return replace(self, payload=payload)
