from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.engine.chunk import KVChunk
from kvplane.engine.compression import CODECS, compress, decompress, get_codec, saved_bytes
from kvplane.errors import BadRequest, CorruptChunk
from kvplane.protocol import COMPRESSION_METHODS

shapes = st.one_of(
    st.tuples(
        st.integers(1, 3), st.just(2), st.integers(1, 9), st.integers(1, 3), st.integers(1, 16)
    ),
    st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(1, 16)),  # MLA
)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
# Half an ulp of the target dtype, relative: the cast back after dequantization.
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def chunk_of(shape, dtype, seed, scale=1.0) -> KVChunk:
    kv = (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale).to(dtype)
    return KVChunk.from_kv(kv, shape[-2])


@settings(max_examples=60, deadline=None)
@given(shapes, dtypes, st.integers(0, 10_000), st.sampled_from([1e-3, 1.0, 300.0]))
def test_zstd_round_trip_is_byte_exact(shape, dtype, seed, scale) -> None:
    chunk = chunk_of(shape, dtype, seed, scale)
    packed = compress(chunk, "zstd")
    assert packed.meta.compression == "zstd"
    assert packed.meta.shape == chunk.meta.shape and packed.meta.dtype == chunk.meta.dtype
    back = decompress(packed)
    assert back.meta == chunk.meta
    assert torch.equal(back.payload, chunk.payload)


@settings(max_examples=80, deadline=None)
@given(shapes, dtypes, st.integers(0, 10_000), st.sampled_from([1e-3, 1.0, 300.0]))
def test_int8_error_is_within_half_a_step_per_row(shape, dtype, seed, scale) -> None:
    chunk = chunk_of(shape, dtype, seed, scale)
    packed = compress(chunk, "int8")
    assert packed.meta.compression == "int8"
    back = decompress(packed)
    assert back.meta == chunk.meta
    x = chunk.kv().to(torch.float64)
    y = back.kv().to(torch.float64)
    step = x.abs().amax(dim=-1, keepdim=True) / 127.0
    # half an ulp at |x'|; below the smallest normal the spacing is fixed (subnormals)
    fi = torch.finfo(dtype)
    half_ulp = torch.clamp(y.abs() * HALF_ULP[dtype], min=fi.tiny * fi.eps / 2)
    bound = step / 2 * (1 + 1e-6) + half_ulp
    assert bool(((x - y).abs() <= bound).all())


def test_int8_saves_bytes_and_reports_them() -> None:
    chunk = chunk_of((4, 2, 256, 8, 64), torch.bfloat16, 0)
    packed = compress(chunk, "int8")
    # int8 values plus one float32 scale per 64-value row: 2 bytes -> 1 + 4/64 bytes.
    assert saved_bytes(packed) == chunk.nbytes - packed.nbytes
    assert packed.nbytes == chunk.nbytes // 2 + (chunk.nbytes // 2 // 64) * 4
    assert saved_bytes(chunk) == 0


def test_zstd_saves_bytes_on_compressible_kv() -> None:
    kv = torch.zeros((2, 2, 64, 4, 32), dtype=torch.bfloat16)
    kv[..., :4] = 1.5
    packed = compress(KVChunk.from_kv(kv, 64), "zstd")
    assert saved_bytes(packed) > kv.numel()  # far better than 2x


def test_recompressing_goes_through_raw_and_none_decompresses() -> None:
    chunk = chunk_of((1, 2, 8, 2, 16), torch.float16, 5)
    zst = compress(chunk, "zstd")
    assert compress(zst, "zstd") is zst
    q = compress(zst, "int8")
    assert q.meta.compression == "int8"
    assert torch.equal(decompress(compress(q, "none")).payload, decompress(q).payload)
    assert decompress(chunk) is chunk


def test_zero_rows_and_constant_rows_are_exact() -> None:
    kv = torch.zeros((1, 2, 4, 2, 8), dtype=torch.float32)
    kv[0, 1, 2, 1, :] = 3.25
    back = decompress(compress(KVChunk.from_kv(kv, 4), "int8"))
    assert torch.equal(back.kv(), kv)


def test_unknown_method_lists_valid_ones() -> None:
    with pytest.raises(BadRequest, match=r"valid methods: \['int8', 'none', 'zstd'\]"):
        get_codec("lz4")
    assert set(CODECS) == {"none", "zstd", "int8"}


def test_the_controller_names_the_methods_the_engine_has() -> None:
    """The controller's API offers protocol.COMPRESSION_METHODS (it cannot import torch)."""
    assert sorted(COMPRESSION_METHODS) == sorted(CODECS)


def test_non_finite_kv_is_refused_by_int8() -> None:
    kv = torch.ones((1, 2, 2, 1, 4))
    kv[0, 0, 0, 0, 0] = float("inf")
    with pytest.raises(BadRequest, match="non-finite"):
        compress(KVChunk.from_kv(kv, 2), "int8")


def test_damaged_compressed_payloads_are_corrupt() -> None:
    chunk = chunk_of((1, 2, 8, 2, 16), torch.float16, 5)
    zst = compress(chunk, "zstd")
    with pytest.raises(CorruptChunk):
        decompress(zst.with_payload(zst.payload[:-3].clone()))
    q = compress(chunk, "int8")
    with pytest.raises(CorruptChunk):
        decompress(q.with_payload(q.payload[:-1].clone()))
