"""`kvplane engine` with the internal API enabled in its YAML: both roles answer over HTTP
(TCP) and over Unix sockets, and SIGTERM removes the sockets."""

import os

import httpx

from tests.api_client import short_tmpdir
from tests.support import (
    consecutive_free_ports,
    kvplane_process,
    wait_for_unix_socket,
    wait_until,
)

BASE = """
chunk_size: 16
kv_block_size: 4
kv_num_blocks: 64
kv_num_layers: 2
kv_num_heads: 2
kv_head_size: 16
max_local_cpu_size: 0.01
internal_api_server_enabled: True
internal_api_server_include_index_list: [0, 1]
"""


def test_engine_process_serves_both_roles_over_tcp(tmp_path):
    port = consecutive_free_ports(2)
    cfg = tmp_path / "engine.yaml"
    cfg.write_text(BASE + f"internal_api_server_port_start: {port}\n")
    with (
        kvplane_process(["engine", "--config", str(cfg)], log_path=tmp_path / "log"),
        httpx.Client(timeout=5) as client,
    ):
        meta = wait_until(
            lambda: client.get(f"http://127.0.0.1:{port + 1}/meta").json(),
            timeout=60,
            what="engine API",
        )
        assert meta["role"] == "worker_0"
        assert client.get(f"http://127.0.0.1:{port}/meta").json()["role"] == "scheduler"
        r = client.post(f"http://127.0.0.1:{port + 1}/cache/store", params={"tokens_mock": "0,32"})
        assert r.json()["num_stored_tokens"] == 32


def test_engine_process_over_unix_sockets(tmp_path):
    with short_tmpdir() as tmp:
        prefix = f"{tmp}/sockdir/socket"
        cfg = tmp_path / "engine.yaml"
        cfg.write_text(
            BASE
            + f'internal_api_server_port_start: 6999\ninternal_api_server_socket_path_prefix: "{prefix}"\n'
        )
        with kvplane_process(["engine", "--config", str(cfg)], log_path=tmp_path / "log") as proc:
            for port, role in ((6999, "scheduler"), (7000, "worker_0")):
                wait_for_unix_socket(f"{prefix}_{port}", what=f"{role} socket API")
                transport = httpx.HTTPTransport(uds=f"{prefix}_{port}")
                with httpx.Client(transport=transport, base_url="http://e", timeout=5) as client:
                    assert client.get("/meta").json()["role"] == role
            proc.terminate()
            proc.wait(20)
        assert not os.path.exists(f"{prefix}_6999")
        assert not os.path.exists(f"{prefix}_7000")
