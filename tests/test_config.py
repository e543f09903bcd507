import pytest

from kvplane.config import EngineConfig, key_specs, load_config
from kvplane.docs import DOC_PATH, render_configuration_md
from kvplane.errors import ConfigError

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
    assert cfg.lmcache_worker_ports == [8001]
    assert cfg.p2p_init_ports == [8200]
    assert cfg.internal_api_server_include_index_list == [0, 1]
    assert cfg.controller_reply_url == "localhost:9002"


def test_overview_yaml_alias_p2p_init_port(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("p2p_init_port: [11, 12, 13]\nlmcache_worker_ports: [1, 2, 3]\n")
    cfg = load_config(path, env={})
    assert cfg.p2p_init_ports == [11, 12, 13]


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


def test_runtime_update_partial_failure_and_listeners():
    cfg = EngineConfig()
    seen = []
    cfg.on_change(lambda name, value: seen.append((name, value)))
    result = cfg.update(
        {"min_retrieve_tokens": 512, "chunk_size": 4, "nope": 1, "save_decode_cache": "x"}
    )
    assert result.updated == {"min_retrieve_tokens": 512}
    assert result.errors["chunk_size"] == "Config is not mutable at runtime"
    assert result.errors["nope"] == "Unknown config"
    assert "save_decode_cache" in result.errors["save_decode_cache"]
    assert cfg.min_retrieve_tokens == 512
    assert seen == [("min_retrieve_tokens", 512)]


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
