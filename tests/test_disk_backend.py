from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.engine import chunk_files, serde
from kvplane.engine.backends.disk import LocalDiskBackend
from tests.tier_cases import make_chunk, make_key, same_kv

FRAME = len(serde.encode(make_key(0), make_chunk(0)))


def test_one_file_per_chunk_named_by_key_with_a_readable_header(tmp_path: Path) -> None:
    disk = LocalDiskBackend(tmp_path, 10 * FRAME)
    disk.put(make_key(1), make_chunk(1))
    (path,) = tmp_path.iterdir()
    assert path.name == make_key(1).to_str() + ".kvc"
    header = serde.decode_header(path.read_bytes()[:4096])
    assert header.key == make_key(1)
    assert header.meta == make_chunk(1).meta
    assert header.frame_len == path.stat().st_size


def test_truncated_and_corrupt_files_are_removed_counted_and_missed(tmp_path: Path) -> None:
    disk = LocalDiskBackend(tmp_path, 10 * FRAME)
    for i in range(3):
        disk.put(make_key(i), make_chunk(i))
    p0 = chunk_files.chunk_path(tmp_path, make_key(0))
    p1 = chunk_files.chunk_path(tmp_path, make_key(1))
    os.truncate(p0, FRAME - 100)
    data = bytearray(p1.read_bytes())
    data[-5] ^= 1
    p1.write_bytes(data)
    assert disk.get(make_key(0)) is None
    assert disk.get(make_key(1)) is None
    assert same_kv(disk.get(make_key(2)), make_chunk(2))
    assert not p0.exists() and not p1.exists()
    stats = disk.stats()
    assert stats.corrupt == 2 and stats.chunks == 1 and stats.used_bytes == FRAME
    assert set(disk.keys()) == {make_key(2)}


def test_restart_rebuilds_index_in_lru_order(tmp_path: Path) -> None:
    disk = LocalDiskBackend(tmp_path, 10 * FRAME)
    for i in range(3):
        disk.put(make_key(i), make_chunk(i))
        os.utime(chunk_files.chunk_path(tmp_path, make_key(i)), ns=(0, (i + 1) * 10**9))
    disk.get(make_key(0))  # touched: now the newest
    disk.close()
    # Room for two: the least recently used (key 1) goes at start-up.
    again = LocalDiskBackend(tmp_path, 2 * FRAME)
    assert set(again.keys()) == {make_key(0), make_key(2)}
    assert same_kv(again.get(make_key(0)), make_chunk(0))
    assert again.stats().used_bytes == 2 * FRAME


def test_leftover_temp_files_and_foreign_files(tmp_path: Path) -> None:
    (tmp_path / ".tmp-123-abc").write_bytes(b"half a chunk")
    (tmp_path / "notes.txt").write_text("not ours")
    (tmp_path / "bogus.kvc").write_bytes(b"x")
    disk = LocalDiskBackend(tmp_path, 10 * FRAME)
    assert not (tmp_path / ".tmp-123-abc").exists()
    assert (tmp_path / "notes.txt").exists()
    assert disk.keys() == []


def test_chunk_larger_than_the_tier_is_refused(tmp_path: Path) -> None:
    disk = LocalDiskBackend(tmp_path, FRAME - 1)
    assert not disk.put(make_key(1), make_chunk(1))
    assert disk.keys() == [] and list(tmp_path.iterdir()) == []


def test_full_of_pinned_chunks_refuses_new_ones(tmp_path: Path) -> None:
    disk = LocalDiskBackend(tmp_path, 2 * FRAME)
    for i in range(2):
        disk.put(make_key(i), make_chunk(i))
        disk.pin(make_key(i))
    assert not disk.put(make_key(5), make_chunk(5))
    assert set(disk.keys()) == {make_key(0), make_key(1)}
    assert not chunk_files.chunk_path(tmp_path, make_key(5)).exists()


def test_file_deleted_behind_our_back_is_a_miss(tmp_path: Path) -> None:
    disk = LocalDiskBackend(tmp_path, 10 * FRAME)
    disk.put(make_key(1), make_chunk(1))
    chunk_files.chunk_path(tmp_path, make_key(1)).unlink()
    assert disk.get(make_key(1)) is None
    assert disk.keys() == [] and disk.stats().used_bytes == 0


def test_directory_url_forms() -> None:
    d = chunk_files.directory_from_url
    assert d("file:///var/cache/kv", "file") == Path("/var/cache/kv")
    assert d("/var/cache/kv", "file") == Path("/var/cache/kv")
    assert d("file://rel/dir", "file") == Path("rel/dir")
    assert d("fs://localhost:0/mnt/nfs", "fs") == Path("/mnt/nfs")
    assert d("fs:///mnt/nfs", "fs") == Path("/mnt/nfs")


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.lists(
        st.tuples(st.sampled_from(["put", "get", "remove", "pin", "unpin"]), st.integers(0, 7)),
        max_size=40,
    ),
)
def test_index_accounting_and_directory_agree(capacity_chunks: int, ops) -> None:
    """Under any sequence: bytes used never exceed the limit, the index equals the files on
    disk, every key held reads back exactly, and reopening finds the same set."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        disk = LocalDiskBackend(root, capacity_chunks * FRAME)
        for op, i in ops:
            key = make_key(i)
            if op == "put":
                disk.put(key, make_chunk(i))
            elif op == "get":
                got = disk.get(key)
                assert got is None or same_kv(got, make_chunk(i))
            else:
                getattr(disk, op)(key)
            stats = disk.stats()
            assert stats.used_bytes <= stats.capacity_bytes
            files = {f.key for f in chunk_files.scan(root)}
            assert files == set(disk.keys())
            assert stats.used_bytes == len(files) * FRAME
        again = LocalDiskBackend(root, capacity_chunks * FRAME)
        assert set(again.keys()) == set(disk.keys())
        for key in again.keys():
            assert same_kv(again.get(key), make_chunk(key.chunk_hash - 0x1000))


def test_failed_writes_are_refused_counted_and_logged_once_per_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "disk"
    disk = LocalDiskBackend(root, 10 * FRAME)
    root.rmdir()  # every write fails now (as on a full or vanished disk)
    caplog.set_level(logging.DEBUG, logger="kvplane.engine.backends.disk")
    assert not disk.put(make_key(1), make_chunk(1))
    assert not disk.put(make_key(2), make_chunk(2))
    assert disk.stats().write_errors == 2 and disk.keys() == []
    root.mkdir()
    assert disk.put(make_key(3), make_chunk(3))
    assert same_kv(disk.get(make_key(3)), make_chunk(3))
    levels = [(r.levelno, r.getMessage().split(":")[1].strip()) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "writing " + make_key(1).to_str() + " failed"),
        (logging.DEBUG, "writing " + make_key(2).to_str() + " failed"),
        (logging.INFO, "writes succeed again"),
    ]
