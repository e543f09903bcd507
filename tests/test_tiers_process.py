"""Real engine processes (``kvplane engine``) with disk, fs and p2p tiers configured."""

from __future__ import annotations

import signal
from pathlib import Path

from kvplane.engine import chunk_files
from kvplane.engine.p2p import P2PClient
from tests.support import free_port, kvplane_process, wait_until
from tests.tier_cases import make_chunk, make_key, same_kv


def test_engine_process_serves_peers_and_its_disk_survives_a_restart(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(
        "chunk_size: 16\nmax_local_cpu_size: 0.01\nkv_num_layers: 2\n"
        f"local_disk: file://{tmp_path / 'disk'}\nmax_local_disk_size: 0.01\n"
        f"remote_url: fs://{tmp_path / 'shared'}\n"
        f"enable_p2p: true\np2p_host: 127.0.0.1\np2p_init_ports: [{port}]\n"
    )
    url = f"127.0.0.1:{port}"
    client = P2PClient(timeout_s=5)
    items = [(make_key(i), make_chunk(i)) for i in range(3)]

    log = tmp_path / "engine.log"
    with kvplane_process(["engine", "--config", str(cfg)], log_path=log) as proc:
        wait_until(lambda: b"ready" in log.read_bytes(), timeout=60, what="engine ready")
        assert client.push(url, items, location="LocalDiskBackend") == [True] * 3
        assert client.push(url, items[:1], location="FSConnector") == [True]
        got = client.fetch(url, [k for k, _ in items] + [make_key(99)])
        assert all(same_kv(g, c) for g, (_, c) in zip(got, items, strict=False))
        assert got[3] is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert {f.key for f in chunk_files.scan(tmp_path / "disk")} == {k for k, _ in items}
    assert [f.key for f in chunk_files.scan(tmp_path / "shared")] == [make_key(0)]

    log2 = tmp_path / "engine2.log"
    with kvplane_process(["engine", "--config", str(cfg)], log_path=log2):
        wait_until(lambda: b"ready" in log2.read_bytes(), timeout=60, what="engine ready")
        got = client.fetch(url, [k for k, _ in items])
        assert all(same_kv(g, c) for g, (_, c) in zip(got, items, strict=True))
