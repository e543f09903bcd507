"""Token chunking and chained prefix hashes. Pure: no torch, no I/O.

A prompt is cut into chunks of ``chunk_size`` tokens; the last partial chunk counts. Chunk
``i``'s hash is xxh3-64 over the previous chunk's hash (8 bytes, little endian; 0 for the
first chunk) followed by the chunk's tokens as little-endian int32. The hash therefore names
the whole prefix up to the end of the chunk, is the same in every process and on every
machine (no PYTHONHASHSEED), and depends on nothing but the tokens and the chunk size: the
controller computes it from a lookup's tokens alone.

A :class:`CacheKey` adds model name, world size, worker id and KV dtype, so different models
and ranks never collide in a shared store.
"""

from __future__ import annotations

from typing import Any, NamedTuple
from urllib.parse import quote, unquote

import numpy as np
import xxhash

__all__ = [
    "HASH_ALGORITHM",
    "MAX_TOKEN_ID",
    "TOKEN_ID_RANGE",
    "CacheKey",
    "chunk_hashes",
    "chunk_spans",
    "key_scheme_fingerprint",
    "to_token_array",
]

HASH_ALGORITHM = "xxh3_64-chained-int32le-v1"

MAX_TOKEN_ID = 2**31 - 1
"""Token ids are in ``[0, MAX_TOKEN_ID]``: no vocabulary has negative ids, and keys hash each
id as a little-endian int32. The one range every boundary that takes token ids checks
(:func:`to_token_array`; the controller's lean ``/lookup`` parser checks it in its own way)."""
TOKEN_ID_RANGE = f"[0, {MAX_TOKEN_ID}]"


def key_scheme_fingerprint(chunk_size: int) -> str:
    """What two processes must agree on for their chunk hashes to match."""
    return f"{HASH_ALGORITHM}/chunk_size={chunk_size}"


def to_token_array(tokens: Any) -> np.ndarray:
    """Tokens as a little-endian int32 array: accepts lists, numpy arrays and torch tensors.
    Raises ValueError unless they are one-dimensional integers in :data:`TOKEN_ID_RANGE`."""
    if hasattr(tokens, "detach"):  # a torch tensor, without importing torch here
        tokens = tokens.detach().cpu().numpy()
    arr = np.asarray(tokens)
    if arr.ndim != 1:
        raise ValueError(f"tokens must be one-dimensional, got shape {arr.shape}")
    if not arr.size:
        return arr.astype("<i4")
    kind, size = arr.dtype.kind, arr.dtype.itemsize
    if kind == "u" and size <= 2:
        return arr.astype("<i4", copy=False)  # in range by its type: no pass over the values
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"tokens must be integers, got dtype {arr.dtype}")
    # A token beyond int32 would wrap silently and collide with another token's key.
    low = int(arr.min())
    high = int(arr.max()) if kind == "u" or size > 4 else 0  # int32 and narrower fit above
    if low < 0 or high > MAX_TOKEN_ID:
        raise ValueError(f"token ids must be in {TOKEN_ID_RANGE} (int32, non-negative)")
    return arr.astype("<i4", copy=False)


def chunk_spans(num_tokens: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of each chunk, the last one possibly partial."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    return [(s, min(s + chunk_size, num_tokens)) for s in range(0, num_tokens, chunk_size)]


def chunk_hashes(tokens: Any, chunk_size: int) -> list[int]:
    """Chained 64-bit prefix hash of every chunk of ``tokens``."""
    if chunk_size <= 0:
        raise ValueError("chunk_size must be positive")
    data = to_token_array(tokens).tobytes()
    step = chunk_size * 4
    hashes: list[int] = []
    prev = 0
    hasher = xxhash.xxh3_64()
    for offset in range(0, len(data), step):
        hasher.reset()
        hasher.update(prev.to_bytes(8, "little"))
        hasher.update(data[offset : offset + step])
        prev = hasher.intdigest()
        hashes.append(prev)
    return hashes


class CacheKey(NamedTuple):
    """Where a chunk lives in storage: the prefix hash plus what makes KV incompatible."""

    model_name: str
    world_size: int
    worker_id: int
    kv_dtype: str
    chunk_hash: int

    def to_str(self) -> str:
        """Stable text form, safe as a file name and a Redis key."""
        model = quote(self.model_name, safe="")
        return f"{model}@{self.world_size}@{self.worker_id}@{self.kv_dtype}@{self.chunk_hash:016x}"

    @classmethod
    def from_str(cls, text: str) -> CacheKey:
        parts = text.split("@")
        if len(parts) != 5:
            raise ValueError(f"not a kvplane cache key: {text!r}")
        model, world, worker, dtype, digest = parts
        return cls(unquote(model), int(world), int(worker), dtype, int(digest, 16))
