"""``kvplane controller`` flags and config file: the seeds' flags, defaults, errors."""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from kvplane.controller.main import add_parser, settings_from_args
from kvplane.controller.settings import ControllerConfig, controller_keys
from kvplane.errors import ConfigError
from tests.controller_client import controller_args, wait_controller_up
from tests.support import (
    free_ports,
    kvplane_process,
    run_kvplane,
    stop_process,
    wait_until,
)

#: The replicated controller's keys (docs/ha.md), each with a flag.
NATS_KEYS = ["nats_url", "nats_replicas", "replica_id", "lease_ttl", "snapshot_interval"]


def run_cli(args: list[str]) -> subprocess.CompletedProcess[str]:
    """A controller that starts anyway is stopped by the timeout, failing the test."""
    return run_kvplane(args, timeout=15)


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


def test_flags_help_and_checks_come_from_the_table() -> None:
    parser = argparse.ArgumentParser()
    text = " ".join(add_parser(parser.add_subparsers()).format_help().split())
    flagged = [spec for spec in controller_keys() if spec.flags]
    assert [s.name for s in flagged] == [
        "host",
        "port",
        "health_check_interval",
        "worker_timeout",
        "command_timeout",
        "log_level",
        "api_token",
        "protect_reads",
        "curve_secret_key_file",
        "curve_allowed_keys_dir",
        *NATS_KEYS,
    ]
    for spec in flagged:
        assert " ".join(spec.help.rstrip(".").split()) in text
        assert all(f in text for f in spec.flags)
    assert "(default 30)" in text and "--monitor-ports" in text and "--config" in text
    assert (
        list(ControllerConfig().to_dict())
        == [s.name for s in controller_keys()]
        == [
            "host",
            "port",
            "pull_port",
            "reply_port",
            "heartbeat_port",
            "health_check_interval",
            "worker_timeout",
            "command_timeout",
            "log_level",
            "api_token",
            "protect_reads",
            "curve_secret_key_file",
            "curve_allowed_keys_dir",
            *NATS_KEYS,
        ]
    )  # the shape of GET /conf
    assert settings_from_args(parse("--log-level", "debug")).log_level == "DEBUG"
    for bad in (["--health-check-interval", "0"], ["--log-level", "LOUD"], ["--port", "x"]):
        with pytest.raises(SystemExit):
            parse(*bad)
    with pytest.raises(ConfigError, match="port: 0 is below the minimum 1"):
        ControllerConfig(port=0)  # built directly, validated all the same


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
        with pytest.raises(SystemExit):
            parse("--monitor-ports", bad)


BAD_PORT_ARGS = [
    (["--port", "99999"], "--port", "99999"),
    (["--port", "0"], "--port", "'0'"),
    (["--port", "http"], "--port", "http"),
    (["--monitor-port", "65536"], "--monitor-port", "65536"),
    (["--monitor-ports", '{"pull": 70000, "reply": 9002}'], "--monitor-ports", "70000"),
    (["--monitor-ports", '{"pull": 9001, "reply": -1}'], "--monitor-ports", "-1"),
    (["--monitor-ports", '{"pull": 9001, "heartbeat": "x"}'], "--monitor-ports", "'x'"),
    (["--monitor-ports", '{"pull": true}'], "--monitor-ports", "True"),
    (["--monitor-ports", '{"pull": 9001, "push": 9003}'], "--monitor-ports", "push"),
    (["--monitor-ports", '{"reply": 9002}'], "--monitor-ports", "pull"),
    (["--monitor-ports", "[9001]"], "--monitor-ports", "[9001]"),
    (["--monitor-ports", "9001"], "--monitor-ports", "9001"),
]


@pytest.mark.parametrize(
    ("args", "flag", "value"), BAD_PORT_ARGS, ids=[" ".join(a[0]) for a in BAD_PORT_ARGS]
)
def test_bad_ports_are_a_usage_error_naming_the_flag(
    args: list[str], flag: str, value: str
) -> None:
    """Without the check the controller started and logged a bogus address (--port 99999)
    or failed binding with a message that named no flag."""
    out = run_cli(["controller", "--host", "127.0.0.1", *args])
    assert out.returncode == 2, out.stdout
    assert f"argument {flag}:" in out.stdout and value in out.stdout, out.stdout
    assert "Traceback" not in out.stdout and "controller HTTP API" not in out.stdout


def test_bad_port_in_the_config_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "controller.yaml"
    cfg.write_text("port: 99999\n")
    out = run_cli(["controller", "--config", str(cfg)])
    assert out.returncode == 2 and "port: 99999 is above the maximum 65535" in out.stdout
    cfg.write_text("monitor_ports: {pull: 9001, reply: 0}\n")
    out = run_cli(["controller", "--config", str(cfg)])
    assert out.returncode == 2 and "monitor_ports in" in out.stdout
    assert "reply_port: 0 is below the minimum 1" in out.stdout
    cfg.write_text("health_check_interval: often\n")  # every key is checked, not only ports
    out = run_cli(["controller", "--config", str(cfg)])
    assert out.returncode == 2 and "health_check_interval: invalid value 'often'" in out.stdout
    assert "Traceback" not in out.stdout


def test_config_file_and_flags_override_it(tmp_path: Path) -> None:
    cfg = tmp_path / "controller.yaml"
    cfg.write_text("port: 9100\nworker_timeout: 20\nmonitor_ports: {pull: 9101, reply: 9102}\n")
    s = settings_from_args(parse("--config", str(cfg), "--port", "9200"))
    assert (s.port, s.worker_timeout, s.pull_port, s.reply_port) == (9200, 20, 9101, 9102)
    cfg.write_text("prot: 1\n")
    with pytest.raises(ConfigError, match="prot"):
        ControllerConfig.from_file(cfg)


def test_deprecated_monitor_port_warns_and_pull_only_workers_still_register(
    tmp_path: Path,
) -> None:
    """The seeds' quick start: ``--monitor-port N`` and a YAML with only controller_pull_url.
    Without a reply socket, a restarted controller reaches unknown workers through their
    command port (ResyncCommand), so they register and resync all the same."""
    import torch

    from kvplane.config import EngineConfig
    from kvplane.process import EngineProcess

    http, pull = free_ports(2)
    args = ["controller", "--host", "127.0.0.1", "--port", str(http), "--monitor-port", str(pull)]
    url = f"http://127.0.0.1:{http}"
    tokens = list(range(40))

    def lookup() -> dict:
        return httpx.post(url + "/lookup", json={"tokens": tokens}).json()["layout_info"]

    def up() -> bool:
        return httpx.get(url + "/healthz").status_code == 200

    cfg = EngineConfig(
        chunk_size=16, kv_num_layers=2, kv_num_heads=2, kv_head_size=16, kv_num_blocks=64,
        max_local_cpu_size=0.01, enable_controller=True, lmcache_instance_id="pull-only",
        controller_pull_url=f"127.0.0.1:{pull}", lmcache_worker_heartbeat_time=0.2,
    )  # fmt: skip
    with contextlib.ExitStack() as stack:
        first = stack.enter_context(kvplane_process(args, log_path=tmp_path / "c1.log"))
        wait_until(up, timeout=30)
        assert "--monitor-port is deprecated" in (tmp_path / "c1.log").read_text()
        rt = EngineProcess(cfg)
        rt.start()
        stack.callback(rt.stop)
        body = {"instance_id": "pull-only"}
        wait_until(
            lambda: httpx.post(url + "/query_worker_info", json=body).status_code == 200,
            timeout=10, what="registration over the pull socket",
        )  # fmt: skip
        rt.cache_engine.store(tokens, rt.kv_caches, torch.arange(40))
        wait_until(lookup, timeout=10)
        assert lookup() == {"pull-only": ["LocalCPUBackend", 40]}

        stop_process(first)
        with kvplane_process(args, log_path=tmp_path / "c2.log"):
            wait_until(up, timeout=30)
            wait_until(lambda: lookup() == {"pull-only": ["LocalCPUBackend", 40]},
                       timeout=5, what="resync after a restart in pull-only mode")  # fmt: skip
            rt.stop()
            assert lookup() == {}  # deregistered over the pull socket


def test_sigterm_stops_the_controller_cleanly_with_exit_0(tmp_path: Path) -> None:
    http, pull, reply = free_ports(3)
    log = tmp_path / "controller.log"
    with kvplane_process(controller_args(http, pull, reply), log_path=log) as proc:
        wait_controller_up(f"http://127.0.0.1:{http}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    assert "Traceback" not in log.read_text()


def test_token_from_file_then_environment_then_flag(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvplane.controller.settings import TOKEN_ENV

    cfg = tmp_path / "controller.yaml"
    cfg.write_text("api_token: from-file\nprotect_reads: true\n")
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    s = settings_from_args(parse("--config", str(cfg)))
    assert (s.api_token, s.protect_reads) == ("from-file", True)
    monkeypatch.setenv(TOKEN_ENV, "from-env")
    assert settings_from_args(parse("--config", str(cfg))).api_token == "from-env"
    s = settings_from_args(parse("--config", str(cfg), "--api-token", "from-flag"))
    assert s.api_token == "from-flag"
    assert "from-flag" not in repr(s) and s.to_dict()["api_token"] == "***"
    # --protect-reads alone switches it on; "--protect-reads false" spells it out.
    assert settings_from_args(parse("--protect-reads")).protect_reads is True
    assert settings_from_args(parse("--protect-reads", "false")).protect_reads is False
    assert settings_from_args(parse()).protect_reads is False
    with pytest.raises(SystemExit):
        parse("--protect-reads", "maybe")
