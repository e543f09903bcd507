import signal
import socket
import threading
import time

import pytest
import torch

from tests.support import free_ports, kvplane_process, wait_until


def test_engine_runs_until_sigterm_and_exits_cleanly(tmp_path):
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("chunk_size: 16\nmax_local_cpu_size: 0.01\nkv_num_layers: 2\n")
    log = tmp_path / "engine.log"
    with kvplane_process(["engine", "--config", str(cfg)], log_path=log) as proc:
        wait_until(lambda: b"ready" in log.read_bytes(), timeout=60, what="engine ready")
        time.sleep(0.2)
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert b"shutting down" in log.read_bytes()


def test_engine_rejects_bad_config_with_a_clear_message(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("chunk_size: banana\n")
    log = tmp_path / "bad.log"
    with kvplane_process(["engine", "--config", str(cfg)], log_path=log) as proc:
        assert proc.wait(60) == 2
    text = log.read_text()
    assert "chunk_size" in text and "banana" in text
    assert "Traceback" not in text


def test_engine_stops_on_sigint_too(tmp_path):
    cfg = tmp_path / "engine.yaml"
    cfg.write_text("chunk_size: 16\nmax_local_cpu_size: 0.01\nkv_num_layers: 2\n")
    log = tmp_path / "engine.log"
    with kvplane_process(["engine", "--config", str(cfg)], log_path=log) as proc:
        wait_until(lambda: b"ready" in log.read_bytes(), timeout=60, what="engine ready")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0
    assert b"shutting down" in log.read_bytes()
    assert b"Traceback" not in log.read_bytes()


def test_cpu_tier_larger_than_the_host_is_a_config_error_not_a_crash(tmp_path):
    cfg = tmp_path / "huge.yaml"
    cfg.write_text("max_local_cpu_size: 100000000\n")  # 100 PB
    log = tmp_path / "huge.log"
    with kvplane_process(["engine", "--config", str(cfg)], log_path=log) as proc:
        assert proc.wait(60) == 2
    text = log.read_text()
    assert "max_local_cpu_size" in text and "cannot allocate" in text
    assert "Traceback" not in text


@pytest.mark.parametrize(
    "device",
    [
        "foo",
        "meta",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present"),
        ),
        "cuda:99",
    ],
)
def test_engine_rejects_an_unusable_device_with_a_clear_message(tmp_path, device):
    log = tmp_path / "device.log"
    with kvplane_process(["engine", "--device", device], log_path=log) as proc:
        assert proc.wait(60) == 2
    text = log.read_text()
    assert f"--device {device!r}" in text
    assert "Traceback" not in text


def test_failed_start_stops_the_services_already_started():
    from kvplane.config import load_config
    from kvplane.errors import Conflict
    from kvplane.process import EngineProcess

    api, p2p, command, pull, reply = free_ports(5)
    config = load_config(
        env={},
        overrides=dict(
            chunk_size=16,
            max_local_cpu_size=0.01,
            enable_p2p=True,
            p2p_host="127.0.0.1",
            p2p_init_ports=[p2p],
            enable_controller=True,
            controller_pull_url=f"127.0.0.1:{pull}",
            controller_reply_url=f"127.0.0.1:{reply}",
            lmcache_worker_ports=[command],
            controller_timeout_s=0.5,
            internal_api_server_enabled=True,
            internal_api_server_port_start=api,
            internal_api_server_include_index_list=[0],
        ),
    )
    runtime = EngineProcess(config)
    with socket.socket() as taken:  # the internal API cannot bind: the last service fails
        taken.bind(("127.0.0.1", api))
        taken.listen()
        with pytest.raises(Conflict):
            runtime.start()
    for port in (p2p, command):  # the p2p server and the worker released their ports
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    alive = [t.name for t in threading.enumerate() if t.name.startswith("kvplane-")]
    assert alive == []
