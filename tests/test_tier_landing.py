"""A disk or FS hit promoted into the CPU tier by reading the file straight into a CPU-tier
page: the chunk the engine copies from is that page (no buffer of the file's own, no copy
into the CPU tier), byte-exact, and every damaged file is still caught by its checksum."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from kvplane.engine import chunk_files, serde
from kvplane.engine.backends.base import StorageBackend
from kvplane.engine.backends.cpu import LocalCPUBackend
from kvplane.engine.backends.disk import LocalDiskBackend
from kvplane.engine.backends.fs import FSConnectorBackend
from kvplane.engine.memory_pool import HostMemoryPool
from kvplane.engine.storage_manager import StorageManager
from tests.tier_cases import make_chunk, make_key, same_kv

FRAME = len(serde.encode(make_key(0), make_chunk(0)))
PAGE = make_chunk(0).nbytes

LOWER: dict[str, Callable[[Path], StorageBackend]] = {
    "disk": lambda root: LocalDiskBackend(root, 64 * FRAME),
    "fs": lambda root: FSConnectorBackend(root),
}


@pytest.fixture(params=sorted(LOWER))
def lower(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StorageBackend]:
    backend = LOWER[request.param](tmp_path)
    for i in range(4):
        assert backend.put(make_key(i), make_chunk(i))
    yield backend
    backend.close()


def in_slab(chunk_ptr: int, pool: HostMemoryPool) -> bool:
    first = pool._pages[0].data.data_ptr()
    return first <= chunk_ptr < first + pool.page_nbytes * pool.num_pages


def storage_over(lower: StorageBackend, pages: int) -> tuple[StorageManager, LocalCPUBackend]:
    cpu = LocalCPUBackend(HostMemoryPool(PAGE, pages, pin=False))
    return StorageManager([cpu, lower]), cpu


def test_a_lower_tier_hit_lands_in_a_cpu_page_without_a_copy(
    lower: StorageBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    storage, cpu = storage_over(lower, 8)

    def no_copy(*_: object) -> bool:
        raise AssertionError("the hit was copied into the CPU tier, not read into it")

    monkeypatch.setattr(cpu, "put", no_copy)
    with storage.read(make_key(1)) as chunk:
        assert same_kv(chunk, make_chunk(1))
        assert chunk is not None and in_slab(chunk.payload.data_ptr(), cpu.pool)
    assert cpu.contains(make_key(1))  # promoted: the next read is a CPU-tier hit
    with cpu.read(make_key(1)) as again:
        assert same_kv(again, make_chunk(1))
    hits = storage.metrics.tier_hits.labels(lower.name)._value.get()
    assert hits == 1


def test_with_no_free_page_the_hit_is_read_into_its_own_buffer(lower: StorageBackend) -> None:
    storage, cpu = storage_over(lower, 1)
    assert cpu.put(make_key(9), make_chunk(9)) and cpu.pin(make_key(9))  # the one page, pinned
    with storage.read(make_key(2)) as chunk:
        assert same_kv(chunk, make_chunk(2))
        assert chunk is not None and not in_slab(chunk.payload.data_ptr(), cpu.pool)
    assert not cpu.contains(make_key(2)) and cpu.contains(make_key(9))


def damage(path: Path, how: str) -> None:
    if how == "truncated payload":
        os.truncate(path, FRAME - 100)
    elif how == "truncated header":
        os.truncate(path, serde.PREFIX_SIZE + 3)
    elif how == "flipped payload bit":
        data = bytearray(path.read_bytes())
        data[-5] ^= 1
        path.write_bytes(data)
    elif how == "trailing bytes":
        with open(path, "ab") as f:
            f.write(b"\0")
    else:
        raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["truncated payload", "truncated header", "flipped payload bit", "trailing bytes"]
)
def test_a_damaged_file_read_into_a_page_is_a_miss_and_frees_the_page(
    lower: StorageBackend, how: str
) -> None:
    storage, cpu = storage_over(lower, 8)
    root: Path = lower.root  # type: ignore[attr-defined]
    damage(chunk_files.chunk_path(root, make_key(3)), how)
    with storage.read(make_key(3)) as chunk:
        assert chunk is None
    assert not cpu.contains(make_key(3))
    assert cpu.pool.free_pages == 8  # the page it was read into went back
    assert not lower.contains(make_key(3))  # dropped as unreadable
    with storage.read(make_key(0)) as other:  # the tier goes on serving the rest
        assert same_kv(other, make_chunk(0))


def test_read_chunk_file_without_a_buffer_from_the_landing_reads_its_own(
    tmp_path: Path,
) -> None:
    disk = LocalDiskBackend(tmp_path, 4 * FRAME)
    disk.put(make_key(5), make_chunk(5))
    asked: list[int] = []

    def declines(_key: object, nbytes: int) -> None:
        asked.append(nbytes)
        return None

    path = chunk_files.chunk_path(tmp_path, make_key(5))
    chunk = chunk_files.read_chunk_file(path, make_key(5), declines)
    assert same_kv(chunk, make_chunk(5)) and asked == [PAGE]
    buffer = torch.zeros(PAGE + 64, dtype=torch.uint8)
    landed = chunk_files.read_chunk_file(path, make_key(5), lambda _k, _n: buffer.numpy().data)
    assert same_kv(landed, make_chunk(5))
    assert landed.payload.data_ptr() == buffer.data_ptr()


def test_promote_reads_the_leading_lower_tier_run_into_the_cpu_tier(
    lower: StorageBackend,
) -> None:
    """What a scheduler's probe asks for before a synchronous load: every chunk of the
    leading locally held run that only the lower tier holds is read into the CPU tier (one
    CPU-tier chunk in the run is passed over, not counted); the run ends at the first chunk
    no tier holds; a frozen manager promotes nothing."""
    storage, cpu = storage_over(lower, 8)
    assert cpu.put(make_key(1), make_chunk(1))
    keys = [make_key(i) for i in (0, 1, 2, 7, 3)]  # chunk 7 is held nowhere
    assert storage.promote(keys) == 2
    assert [storage.locate(k) for k in keys] == [cpu.name, cpu.name, cpu.name, None, lower.name]
    with cpu.read(make_key(2)) as promoted:
        assert same_kv(promoted, make_chunk(2))
    assert storage.promote(keys) == 0  # all in memory now

    frozen, frozen_cpu = storage_over(lower, 8)
    frozen.frozen = True
    assert frozen.promote([make_key(3)]) == 0 and not frozen_cpu.contains(make_key(3))
