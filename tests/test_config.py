import dataclasses
import math
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.config import ConfigStore, EngineConfig, key_specs, load_config
from kvplane.docs import (
    DOC_PATH,
    missing_controller_flags,
    missing_router_keys,
    render_configuration_md,
)
from kvplane.errors import ConfigError
from tests.support import REPO_ROOT, kvplane_env, run_threads

SEED_YAML = """
chunk_size: 256
local_cpu: True
max_local_cpu_size: 5

# cache controller configurations
enable_controller: True
lmcache_instance_id: "lmcache_default_instance"
controller_pull_url: "localhost:9001"
controller_reply_url: localhost:9002
lmcache_worker_ports: 8001

# Peer identifiers
p2p_host: "localhost"
p2p_init_ports: 8200

internal_api_server_enabled: True
internal_api_server_port_start: 6999
internal_api_server_include_index_list: [0, 1]
internal_api_server_socket_path_prefix: "/tmp/lmcache_internal_api_server/socket"
"""


def test_seed_yaml_loads_unchanged(tmp_path):
    path = tmp_path / "example.yaml"
    path.write_text(SEED_YAML)
    cfg = load_config(env={"LMCACHE_CONFIG_FILE": str(path)})
    assert cfg.chunk_size == 256
    assert cfg.max_local_cpu_size == 5.0
    assert cfg.enable_controller is True
    assert cfg.lmcache_worker_ports == (8001,)
    assert cfg.p2p_init_ports == (8200,)
    assert cfg.internal_api_server_include_index_list == (0, 1)
    assert cfg.controller_reply_url == "localhost:9002"


def test_overview_yaml_alias_p2p_init_port(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("p2p_init_port: [11, 12, 13]\nlmcache_worker_ports: [1, 2, 3]\n")
    cfg = load_config(path, env={})
    assert cfg.p2p_init_ports == (11, 12, 13)


def test_precedence_file_env_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("chunk_size: 128\nmin_retrieve_tokens: 5\n")
    env = {
        "KVPLANE_CONFIG_FILE": str(path),
        "KVPLANE_CHUNK_SIZE": "64",
        "LMCACHE_LOCAL_CPU": "false",
    }
    cfg = load_config(env=env, overrides={"min_retrieve_tokens": 7})
    assert (cfg.chunk_size, cfg.local_cpu, cfg.min_retrieve_tokens) == (64, False, 7)


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        ({"chunk_sise": 4}, ["chunk_sise", "unknown"]),
        ({"chunk_size": "abc"}, ["chunk_size", "'abc'", "integer"]),
        ({"chunk_size": 0}, ["chunk_size", "minimum"]),
        ({"local_cpu": "maybe"}, ["local_cpu", "boolean"]),
        ({"kv_dtype": "int4"}, ["kv_dtype", "one of"]),
        ({"internal_api_server_port_start": 70000}, ["internal_api_server_port_start", "maximum"]),
    ],
)
def test_bad_values_name_the_key(overrides, words):
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides=overrides)
    for w in words:
        assert w in str(info.value)


def test_bad_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad, env={})


def test_runtime_update_partial_failure_and_subscribers():
    cfg = EngineConfig()
    store = ConfigStore(cfg)
    seen = []
    store.subscribe(lambda config, changed: seen.append((config, changed)))
    result = store.update(
        {"min_retrieve_tokens": 512, "chunk_size": 4, "nope": 1, "save_decode_cache": "x"}
    )
    assert result.updated == {"min_retrieve_tokens": 512}
    assert result.errors["chunk_size"] == "Config is not mutable at runtime"
    assert result.errors["nope"] == "Unknown config"
    assert "save_decode_cache" in result.errors["save_decode_cache"]
    assert store.current.min_retrieve_tokens == 512 and store.current is result.config
    assert cfg.min_retrieve_tokens == 0  # the config loaded is never changed, only replaced
    assert seen == [(store.current, frozenset({"min_retrieve_tokens"}))]
    assert store.update({"nope": 1}).config is store.current and len(seen) == 1


def test_a_config_is_immutable_and_validated_however_it_is_built():
    cfg = EngineConfig(chunk_size="64", p2p_init_ports=[1, 2], max_local_cpu_size=1)
    assert (cfg.chunk_size, cfg.p2p_init_ports, cfg.max_local_cpu_size) == (64, (1, 2), 1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.min_retrieve_tokens = 5  # type: ignore[misc]
    for bad, words in [
        ({"chunk_size": 0}, "chunk_size: 0 is below the minimum"),
        ({"kv_dtype": "int4"}, "kv_dtype"),
        ({"local_cpu": "maybe"}, "local_cpu"),
    ]:
        with pytest.raises(ConfigError, match=words):
            EngineConfig(**bad)
        with pytest.raises(ConfigError, match=words):
            dataclasses.replace(cfg, **bad)
    shown = repr(EngineConfig(remote_url="redis://:hunter2@h:1", internal_api_server_token="t"))
    assert "hunter2" not in shown and "'t'" not in shown and "redis://***@h:1" in shown


def test_concurrent_updates_of_different_keys_are_never_lost():
    store = ConfigStore(EngineConfig())
    last = {
        "min_retrieve_tokens": 99,
        "chunk_statistics_auto_exit_target_unique_chunks": 99,
        "max_local_cpu_size": 99.0,
        "chunk_statistics_auto_exit_timeout_hours": 99.0,
    }

    def bump(name: str) -> None:
        for value in range(100):
            store.update({name: value})

    run_threads(lambda i: bump(list(last)[i]), len(last), timeout=60)
    # each update is applied to the config current at that moment, never to a stale copy
    assert {name: getattr(store.current, name) for name in last} == last


def test_secrets_masked():
    cfg = load_config(
        env={},
        overrides={
            "remote_url": "redis://:hunter2@127.0.0.1:6379",
            "internal_api_server_token": "tok",
        },
    )
    shown = cfg.to_dict()
    assert "hunter2" not in str(shown)
    assert shown["remote_url"] == "redis://***@127.0.0.1:6379"
    assert shown["internal_api_server_token"] == "***"


def test_every_key_has_help_and_valid_default():
    for spec in key_specs():
        assert spec.help
        assert spec.validate(spec.default) == spec.default


def test_configuration_doc_is_current():
    assert DOC_PATH.read_text() == render_configuration_md()
    assert missing_controller_flags() == []  # docs/controller.md names every flag
    assert missing_router_keys() == []  # docs/router.md names every router key and flag


# Verbatim from the seeds (controller_overview.rst, internal_api_server.rst): each YAML block
# an operator may already have must load unchanged.
SEED_OVERVIEW_YAML = """
enable_controller: True
lmcache_instance_id: "lmcache_instance_id"

controller_pull_url: ip:pull_port
# if controller reply port is None, no need to configure reply url
controller_reply_url: ip:reply_port
# the number of ports for LMCache Worker, must equal to the number of ranks
lmcache_worker_ports: [1, 2, 3]

# p2p configuration
p2p_host: localhost
p2p_init_port: [11, 12, 13]
"""

SEED_INTERNAL_API_YAML = """
# Enable/disable the internal API server
internal_api_server_enabled: True
# Base port for the API server
# actual_port = internal_api_server_port_start + index
# Scheduler → 6999 + 0 = 6999
# Worker 0 → 6999 + 1 = 7000
internal_api_server_port_start: 6999
# List of scheduler/worker indices: 0 for scheduler, 1 for worker 0, 2 for worker 1, etc.
internal_api_server_include_index_list: [0, 1]
# Socket path prefix for the API server. If configured, the server will use a Unix socket instead of listening on a port.
internal_api_server_socket_path_prefix: "/tmp/lmcache_internal_api_server/socket"
"""


def test_every_seed_yaml_block_loads_unchanged(tmp_path):
    path = tmp_path / "overview.yaml"
    path.write_text(SEED_OVERVIEW_YAML)
    cfg = load_config(env={"LMCACHE_CONFIG_FILE": str(path)})
    assert cfg.lmcache_instance_id == "lmcache_instance_id"
    assert (cfg.controller_pull_url, cfg.controller_reply_url) == ("ip:pull_port", "ip:reply_port")
    assert cfg.lmcache_worker_ports == (1, 2, 3)
    assert cfg.p2p_init_ports == (11, 12, 13)
    path = tmp_path / "api.yaml"
    path.write_text(SEED_INTERNAL_API_YAML)
    cfg = load_config(env={"KVPLANE_CONFIG_FILE": str(path)})
    assert cfg.internal_api_server_enabled is True
    assert cfg.internal_api_server_port_start == 6999
    assert cfg.internal_api_server_include_index_list == (0, 1)
    assert cfg.internal_api_server_socket_path_prefix == "/tmp/lmcache_internal_api_server/socket"
    # The keys the seeds' POST /conf examples change exist and are mutable.
    specs = {s.name: s for s in key_specs()}
    assert specs["min_retrieve_tokens"].mutable and specs["save_decode_cache"].mutable


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "'nan'", "'inf'"])
def test_non_finite_numbers_are_refused(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(f"max_local_cpu_size: {text}\n")
    with pytest.raises(ConfigError, match=r"max_local_cpu_size.*finite number"):
        load_config(path, env={})
    store = ConfigStore(EngineConfig())
    result = store.update({"max_local_cpu_size": float("nan")})
    assert result.updated == {} and "finite" in result.errors["max_local_cpu_size"]
    assert store.current.max_local_cpu_size == 5.0


@settings(max_examples=200, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
def test_float_keys_hold_only_finite_values_within_their_range(raw):
    for spec in key_specs():
        if spec.kind.name != "float":
            continue
        try:
            value = spec.validate(raw)
        except ConfigError as exc:
            assert str(exc).startswith(spec.name + ":")
            continue
        assert math.isfinite(value)
        assert spec.minimum is None or value >= spec.minimum
        assert spec.maximum is None or value <= spec.maximum


def test_unknown_key_error_names_the_nearest_key_but_not_the_value():
    # The value of a misspelt key may be a secret ("remote_ulr: redis://:pw@...").
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"remote_ulr": "redis://:hunter2@h:1"})
    message = str(info.value)
    assert "'remote_ulr'" in message and "hunter2" not in message
    assert "did you mean 'remote_url'" in message


def test_errors_about_secret_keys_do_not_echo_the_value():
    with pytest.raises(ConfigError) as info:
        load_config(env={}, overrides={"internal_api_server_token": 123456})
    assert "internal_api_server_token" in str(info.value) and "123456" not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:p@ss@127.0.0.1:6379/0", "redis://***@127.0.0.1:6379/0"),
        ("redis://user:pw@h:1", "redis://***@h:1"),
        ("redis://h:1/0?password=pw", "redis://h:1/0?***"),
        ("redis://h:1?password=pw", "redis://h:1?***"),
        ("fs:///shared/dir", "fs:///shared/dir"),
    ],
)
def test_remote_url_credentials_are_masked_in_every_form(url, shown):
    cfg = load_config(env={}, overrides={"remote_url": url})
    assert cfg.to_dict()["remote_url"] == shown
    assert cfg.to_dict(reveal_secrets=True)["remote_url"] == url


def test_engine_help_lists_every_config_key():
    out = subprocess.run(
        [sys.executable, "-m", "kvplane", "engine", "--help"],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    for spec in key_specs():
        line = next((ln for ln in out.splitlines() if ln.strip().startswith(spec.name + " (")), "")
        assert spec.help in line, spec.name
        assert ("mutable" in line) == spec.mutable, spec.name
