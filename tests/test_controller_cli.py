"""``kvplane controller`` flags and config file: the seeds' flags, defaults, errors."""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx
import pytest

from kvplane.controller.main import add_parser, settings_from_args
from kvplane.controller.settings import ControllerSettings
from kvplane.errors import ConfigError
from tests.support import free_ports, kvplane_process, wait_until


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    return parser.parse_args(["controller", *argv])


def test_defaults_reap_within_a_minute_and_agree_with_worker_heartbeats() -> None:
    from kvplane.config import EngineConfig

    s = settings_from_args(parse())
    assert (s.host, s.port, s.pull_port, s.reply_port) == ("0.0.0.0", 9000, 9001, 9002)
    heartbeat = EngineConfig().lmcache_worker_heartbeat_time
    assert s.worker_timeout <= 60 and s.worker_timeout >= 3 * heartbeat


def test_monitor_ports_flags() -> None:
    s = settings_from_args(
        parse("--monitor-ports", '{"pull": 8300, "reply": 8400, "heartbeat": 8500}')
    )
    assert (s.pull_port, s.reply_port, s.heartbeat_port) == (8300, 8400, 8500)
    s = settings_from_args(parse("--monitor-port", "8301"))
    assert (s.pull_port, s.reply_port) == (8301, None)
    s = settings_from_args(parse("--lmcache-worker-timeout", "12", "--health-check-interval", "2"))
    assert (s.worker_timeout, s.health_check_interval) == (12, 2)
    assert settings_from_args(parse("--worker-timeout", "7")).worker_timeout == 7
    for bad in ('{"reply": 1}', "not json", '{"pull": 1, "push": 2}', '{"pull": "x"}'):
        with pytest.raises(ConfigError):
            settings_from_args(parse("--monitor-ports", bad))


def test_config_file_and_flags_override_it(tmp_path: Path) -> None:
    cfg = tmp_path / "controller.yaml"
    cfg.write_text("port: 9100\nworker_timeout: 20\nmonitor_ports: {pull: 9101, reply: 9102}\n")
    s = settings_from_args(parse("--config", str(cfg), "--port", "9200"))
    assert (s.port, s.worker_timeout, s.pull_port, s.reply_port) == (9200, 20, 9101, 9102)
    cfg.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        ControllerSettings.from_file(cfg)


def test_deprecated_monitor_port_warns_and_pull_only_workers_still_register(
    tmp_path: Path,
) -> None:
    """The seeds' quick start: ``--monitor-port N`` and a YAML with only controller_pull_url."""
    from kvplane.config import EngineConfig
    from kvplane.engine.runtime import EngineRuntime

    http, pull = free_ports(2)
    log = tmp_path / "controller.log"
    args = ["controller", "--host", "127.0.0.1", "--port", str(http), "--monitor-port", str(pull)]
    with kvplane_process(args, log_path=log):
        url = f"http://127.0.0.1:{http}"
        wait_until(lambda: httpx.get(url + "/healthz").status_code == 200, timeout=30)
        assert "--monitor-port is deprecated" in log.read_text()
        cfg = EngineConfig(
            chunk_size=16, kv_num_layers=2, kv_num_heads=2, kv_head_size=16, kv_num_blocks=64,
            max_local_cpu_size=0.01, enable_controller=True, lmcache_instance_id="pull-only",
            controller_pull_url=f"127.0.0.1:{pull}", lmcache_worker_heartbeat_time=0.2,
        )  # fmt: skip
        rt = EngineRuntime(cfg)
        rt.start()
        try:
            body = {"instance_id": "pull-only"}
            wait_until(
                lambda: httpx.post(url + "/query_worker_info", json=body).status_code == 200,
                timeout=10, what="registration over the pull socket",
            )  # fmt: skip
            tokens = list(range(40))
            import torch

            rt.cache_engine.store(tokens, rt.kv_caches, torch.arange(40))
            lookup = lambda: httpx.post(url + "/lookup", json={"tokens": tokens}).json()  # noqa: E731
            wait_until(lambda: lookup()["layout_info"], timeout=10)
            assert lookup()["layout_info"] == {"pull-only": ["LocalCPUBackend", 40]}
        finally:
            rt.stop()
        assert httpx.post(url + "/lookup", json={"tokens": tokens}).json()["layout_info"] == {}
