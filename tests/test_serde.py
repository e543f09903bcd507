from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.engine import serde
from kvplane.engine.chunk import KVChunk
from kvplane.errors import CorruptChunk
from kvplane.keys import CacheKey

shapes = st.tuples(
    st.integers(1, 3), st.just(2), st.integers(0, 9), st.integers(1, 3), st.integers(1, 8)
)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
keys = st.builds(
    CacheKey,
    st.text(min_size=1, max_size=20),
    st.integers(1, 8),
    st.integers(0, 7),
    st.sampled_from(["bfloat16", "float16"]),
    st.integers(0, 2**64 - 1),
)


def chunk_of(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> KVChunk:
    kv = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dtype)
    return KVChunk.from_kv(kv, shape[2])


@settings(max_examples=60, deadline=None)
@given(keys, shapes, dtypes, st.integers(0, 1000), st.booleans())
def test_round_trip_is_byte_exact(key, shape, dtype, seed, writable) -> None:
    chunk = chunk_of(shape, dtype, seed)
    frame = serde.encode(key, chunk)
    got_key, got = serde.decode(bytearray(frame) if writable else frame, expected_key=key)
    assert got_key == key
    assert got.meta == chunk.meta
    assert torch.equal(got.payload, chunk.payload)
    assert torch.equal(got.kv(), chunk.kv())


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_a_flipped_byte_is_caught_or_harmless(data) -> None:
    key = CacheKey("m", 1, 0, "bfloat16", 42)
    chunk = chunk_of((1, 2, 4, 2, 4), torch.bfloat16, 3)
    frame = bytearray(serde.encode(key, chunk))
    i = data.draw(st.integers(0, len(frame) - 1))
    frame[i] ^= data.draw(st.integers(1, 255))
    try:
        got_key, got = serde.decode(frame, expected_key=key)
    except CorruptChunk:
        return
    # Only the unused flags field may change without consequence.
    assert 6 <= i < 8
    assert got_key == key and torch.equal(got.payload, chunk.payload)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_truncated_or_extended_frames_are_corrupt(data) -> None:
    frame = serde.encode(
        CacheKey("m", 1, 0, "bfloat16", 1), chunk_of((1, 2, 3, 1, 4), torch.float16, 0)
    )
    cut = data.draw(st.integers(0, len(frame) - 1))
    with pytest.raises(CorruptChunk):
        serde.decode(frame[:cut])
    with pytest.raises(CorruptChunk):
        serde.decode(frame + b"\0")


def test_a_frame_for_another_key_is_refused() -> None:
    frame = serde.encode(
        CacheKey("m", 1, 0, "bfloat16", 1), chunk_of((1, 2, 3, 1, 4), torch.float16, 0)
    )
    with pytest.raises(CorruptChunk, match="expected"):
        serde.decode(frame, expected_key=CacheKey("m", 1, 0, "bfloat16", 2))


def test_header_is_readable_from_its_prefix() -> None:
    key = CacheKey("m", 1, 0, "bfloat16", 9)
    chunk = chunk_of((2, 2, 5, 2, 4), torch.bfloat16, 1)
    frame = serde.encode(key, chunk)
    size = serde.header_size(frame[: serde.PREFIX_SIZE])
    header = serde.decode_header(frame[:size])
    assert (header.key, header.meta, header.frame_len) == (key, chunk.meta, len(frame))


@settings(max_examples=50, deadline=None)
@given(keys, shapes, dtypes, st.integers(0, 1000), st.lists(st.integers(1, 5000), max_size=8))
def test_a_payload_checked_piece_by_piece_is_the_frame_decode_reads(
    key, shape, dtype, seed, cuts
) -> None:
    """A receiver that hashes the payload as its pieces land (PayloadCheck) gets the chunk
    ``decode`` gets, whatever the pieces; ``frame_len`` is the frame's length unhashed."""
    chunk = chunk_of(shape, dtype, seed)
    header, payload = serde.encode_parts(key, chunk)
    assert serde.frame_len(key, chunk) == len(header) + payload.nbytes
    check = serde.PayloadCheck(header)
    landed = memoryview(bytearray(payload.nbytes))
    at = 0
    for cut in [*cuts, payload.nbytes]:
        end = min(payload.nbytes, at + cut)
        landed[at:end] = payload[at:end]
        check.update(landed[at:end])
        at = end
    got = check.chunk(landed, expected_key=key)
    assert torch.equal(got.payload, serde.decode(header + bytes(payload))[1].payload)
    assert got.meta == chunk.meta
    if payload.nbytes:
        flipped = memoryview(bytearray(payload))
        flipped[-1] ^= 1
        bad = serde.PayloadCheck(header)
        bad.update(flipped)
        with pytest.raises(CorruptChunk, match="checksum"):
            bad.chunk(flipped)
    with pytest.raises(CorruptChunk, match="expected"):
        serde.PayloadCheck(header).chunk(
            landed, expected_key=key._replace(chunk_hash=key.chunk_hash ^ 1)
        )
