from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from kvplane.engine import chunk_files
from kvplane.engine.backends.disk import LocalDiskBackend
from kvplane.engine.backends.fs import (
    FSConnectorBackend,
    load_fs_chunks,
    load_fs_chunks_from_config,
)
from kvplane.errors import BadRequest
from tests.support import REPO_ROOT, kvplane_env, stop_process, wait_until
from tests.tier_cases import make_chunk, make_key, same_kv

CHILD = textwrap.dedent(
    """
    import sys, time
    from kvplane.engine.backends.fs import FSConnectorBackend
    from tests.tier_cases import make_chunk, make_key, same_kv
    fs = FSConnectorBackend(sys.argv[1])
    fs.put(make_key(1), make_chunk(1))
    deadline = time.monotonic() + 20
    while not fs.contains(make_key(2)):
        if time.monotonic() > deadline:
            sys.exit("parent's chunk never appeared")
        time.sleep(0.02)
    print("OK" if same_kv(fs.get(make_key(2)), make_chunk(2)) else "WRONG", flush=True)
    """
)


def test_two_processes_see_each_others_chunks(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(shared)],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(shared.is_dir, timeout=20, what="the child to create the directory")
        fs = FSConnectorBackend(shared)
        wait_until(lambda: fs.contains(make_key(1)), timeout=20, what="the child's chunk")
        assert same_kv(fs.get(make_key(1)), make_chunk(1))
        fs.put(make_key(2), make_chunk(2))
        out, _ = child.communicate(timeout=30)
        assert child.returncode == 0, out
        assert out.decode().strip().endswith("OK")
        assert set(fs.keys()) == {make_key(1), make_key(2)}
    finally:
        stop_process(child)  # type: ignore[arg-type]


def _fill(root: Path, n: int) -> FSConnectorBackend:
    fs = FSConnectorBackend(root)
    for i in range(n):
        fs.put(make_key(i), make_chunk(i))
    return fs


def test_load_fs_chunks_into_a_tier(tmp_path: Path) -> None:
    _fill(tmp_path / "shared", 5)
    sink = LocalDiskBackend(tmp_path / "sink", 1 << 30)
    result = load_fs_chunks(tmp_path / "shared", sink, max_chunks=3)
    assert (result.loaded_chunks, result.total_files, result.failed_keys) == (3, 5, [])
    assert len(sink.keys()) == 3
    result = load_fs_chunks(tmp_path / "shared", sink)
    assert result.loaded_chunks == 5
    for i in range(5):
        assert same_kv(sink.get(make_key(i)), make_chunk(i))


def test_failed_keys_are_reported_up_to_the_bound(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    _fill(root, 6)
    for i in range(4):
        chunk_files.chunk_path(root, make_key(i)).write_bytes(b"garbage")
    sink = LocalDiskBackend(tmp_path / "sink", 1 << 30)
    result = load_fs_chunks(root, sink, max_failed_keys=3)
    assert result.loaded_chunks == 2 and result.total_files == 6
    assert len(result.failed_keys) == 3
    assert set(result.failed_keys) <= {make_key(i).to_str() for i in range(4)}


def test_nothing_outside_the_directory_is_read(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _fill(outside, 1)
    root = tmp_path / "shared"
    _fill(root, 1)
    (root / (make_key(9).to_str() + ".kvc")).symlink_to(
        chunk_files.chunk_path(outside, make_key(0))
    )
    sub = root / "sub"
    sub.mkdir()
    _fill(sub, 3)
    sink = LocalDiskBackend(tmp_path / "sink", 1 << 30)
    result = load_fs_chunks(root, sink)
    assert (result.loaded_chunks, result.total_files) == (1, 1)
    assert sink.keys() == [make_key(0)]


def test_load_from_config_file(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    _fill(root, 2)
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(f"chunk_size: 16\nremote_url: fs://{root}\n")
    sink = LocalDiskBackend(tmp_path / "sink", 1 << 30)
    result = load_fs_chunks_from_config(cfg, sink, max_chunks=10)
    assert result.loaded_chunks == 2
    with pytest.raises(BadRequest, match="Configuration file not found"):
        load_fs_chunks_from_config(tmp_path / "missing.yaml", sink)
    cfg.write_text("remote_url: redis://127.0.0.1:1\n")
    with pytest.raises(BadRequest, match="fs://"):
        load_fs_chunks_from_config(cfg, sink)
    cfg.write_text(f"remote_url: fs://{tmp_path / 'nope'}\n")
    with pytest.raises(BadRequest, match="does not exist"):
        load_fs_chunks_from_config(cfg, sink)
    cfg.write_text("no_such_key: 1\n")
    with pytest.raises(BadRequest, match="no_such_key"):
        load_fs_chunks_from_config(cfg, sink)


def test_failed_writes_are_refused_and_counted(tmp_path: Path) -> None:
    root = tmp_path / "shared"
    fs = FSConnectorBackend(root)
    events: list[object] = []
    fs.set_event_sink(events.append)
    root.rmdir()  # every write fails now (as on a full or vanished filesystem)
    assert not fs.put(make_key(1), make_chunk(1))
    assert not fs.put(make_key(2), make_chunk(2))
    assert fs.counters() == {"corrupt": 0.0, "write_errors": 2.0}
    assert events == [] and not fs.contains(make_key(1))
    root.mkdir()
    assert fs.put(make_key(3), make_chunk(3))
    assert same_kv(fs.get(make_key(3)), make_chunk(3))
    assert fs.counters()["write_errors"] == 2.0
