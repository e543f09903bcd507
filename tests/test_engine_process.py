import signal
import time

import pytest
import torch

from tests.support import kvplane_process, wait_until


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
