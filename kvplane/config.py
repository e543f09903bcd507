"""The engine configuration: its key table, its loader, and the one way it changes at runtime.

Every key is defined once, as a field of :class:`EngineConfig`, through
:func:`~kvplane.settings_table.key`: type, default, whether it may change at runtime, one
line of help. YAML loading, env overrides, validation, ``GET/POST /conf``, ``--help`` text
and ``docs/configuration.md`` all read that table.

An :class:`EngineConfig` is immutable and valid from the moment it exists. A running
process holds its config in a :class:`ConfigStore` (owned by the composition root,
:mod:`kvplane.process`): ``POST /conf`` calls :meth:`ConfigStore.update`, which validates the
change, swaps in a new config and tells the subscribers; whatever reads a mutable key at
runtime reads ``store.current``.

Key names are the seeds' names, so a YAML written for the original system loads unchanged.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kvplane.errors import ConfigError
from kvplane.settings_table import (
    BOOL,
    FLOAT,
    INT,
    INT_LIST,
    LOG_LEVELS,
    OPT_STR,
    STR,
    KeySpec,
    by_name,
    check_known,
    key,
    key_table,
    read_yaml,
    validate_fields,
)
from kvplane.settings_table import help_lines as _help_lines

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_PREFIXES",
    "ConfigListener",
    "ConfigStore",
    "EngineConfig",
    "KeySpec",
    "UpdateResult",
    "help_lines",
    "key_specs",
    "load_config",
    "rank_port",
    "serving_url_of",
]

CONFIG_FILE_ENV = ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE")
ENV_PREFIXES = ("KVPLANE_", "LMCACHE_")


@dataclass(frozen=True, repr=False)
class EngineConfig:
    """One engine process's configuration; its fields are the key table.

    Immutable and always valid: building one validates every key (as :func:`load_config`
    does; ``EngineConfig(chunk_size=0)`` raises ConfigError), and a running process changes
    its config only through :meth:`ConfigStore.update`, which swaps in a new one.

    The model keys (``model_name``, ``world_size``, ``worker_id``, ``kv_*``, ``use_mla``)
    are what the user says about the engine's model. The engine reads its facts from an
    :class:`~kvplane.engine.facts.EngineFacts` record instead, built by the host that knows
    them (from these keys for ``kvplane engine``; from the model for ``kvplane serve``;
    from vLLM's config and tensors under vLLM), and never written back here."""

    # --- chunking and the CPU tier
    chunk_size: int = key(
        256, "Tokens per KV chunk (the last partial chunk is kept too).", kind=INT, minimum=1
    )
    local_cpu: bool = key(True, "Keep chunks in the pinned CPU memory tier.", kind=BOOL)
    max_local_cpu_size: float = key(
        5.0,
        "CPU tier size in GB; the host slab is allocated at start, so at runtime the tier "
        "can shrink and grow back up to it.",
        kind=FLOAT,
        minimum=0.0,
        mutable=True,
    )
    local_cpu_prefault: bool = key(
        False,
        "Make the CPU tier's whole slab resident at start, in a background thread at the "
        "lowest priority, instead of page by page as chunks first land (on a VM a first "
        "write is a slow fault: stores into a filling tier ran 15-30x slower). Costs "
        "max_local_cpu_size of resident memory from the start.",
        kind=BOOL,
    )
    min_retrieve_tokens: int = key(
        0,
        "Skip a retrieve whose cached prefix is shorter than this.",
        kind=INT,
        minimum=0,
        mutable=True,
    )
    save_decode_cache: bool = key(
        False, "Also store KV produced during decoding.", kind=BOOL, mutable=True
    )
    enable_async_loading: bool = key(
        False,
        "Under vLLM: load hits on vLLM's asynchronous path (the request waits while the "
        "running requests keep stepping) instead of before the step's forward pass.",
        kind=BOOL,
    )
    promote_before_load: bool = key(
        True,
        "Under vLLM's synchronous load path: while other requests run, a hit that only a "
        "lower tier (disk, FS, remote) holds is first read into the CPU tier off the step "
        "(the request waits a few steps), so that its load inside the step copies from "
        "memory instead of stalling the batch on the tier.",
        kind=BOOL,
    )
    save_unfull_chunk: bool = key(
        True, "Store the last partial chunk of a prompt.", kind=BOOL, mutable=True
    )
    # --- lower tiers
    local_disk: str | None = key(
        None, "Disk tier directory (file://path or a plain path).", kind=OPT_STR
    )
    max_local_disk_size: float = key(0.0, "Disk tier size in GB.", kind=FLOAT, minimum=0.0)
    remote_url: str | None = key(
        None,
        "Remote tier: redis://[:password@]host:port, rediss://..., "
        "or fs://path for a shared directory.",
        kind=OPT_STR,
        secret=True,
    )
    remote_timeout_s: float = key(
        1.0, "Deadline of every remote-tier call, seconds.", kind=FLOAT, minimum=0.01
    )
    remote_tls_ca_file: str | None = key(
        None,
        "PEM file of the CA certificate(s) that verify the server of a rediss:// remote_url "
        "(e.g. a private CA); null: the system's trusted CAs.",
        kind=OPT_STR,
    )
    tier_queue_size: int = key(
        256,
        "Pending asynchronous writes per lower tier before writes are dropped.",
        kind=INT,
        minimum=1,
    )
    # --- controller and worker
    enable_controller: bool = key(
        False, "Run the worker that reports to the controller.", kind=BOOL
    )
    lmcache_instance_id: str = key(
        "lmcache_default_instance", "This instance's id in the controller.", kind=STR
    )
    controller_pull_url: str | None = key(
        None, "host:port of the controller's pull socket.", kind=OPT_STR
    )
    controller_reply_url: str | None = key(
        None, "host:port of the controller's reply socket.", kind=OPT_STR
    )
    controller_nats_url: str | None = key(
        None,
        "NATS server(s) of the replicated controller's event log, e.g. nats://127.0.0.1:4222 "
        "(comma-separated for a cluster): the worker publishes there instead of to "
        "controller_pull_url (docs/ha.md).",
        kind=OPT_STR,
    )
    controller_nats_buffer: int = key(
        4096,
        "Messages the worker queues for the event log while NATS is away; past it they are "
        "dropped (counted) and the worker resyncs once NATS is back.",
        kind=INT,
        minimum=16,
    )
    lmcache_worker_ports: tuple[int, ...] | None = key(
        None, "Command port per rank (null: auto-assign).", kind=INT_LIST
    )
    lmcache_worker_heartbeat_time: float = key(
        5.0, "Seconds between worker heartbeats.", kind=FLOAT, minimum=0.05
    )
    controller_timeout_s: float = key(
        5.0, "Deadline of each worker->controller request, seconds.", kind=FLOAT, minimum=0.05
    )
    serving_url: str | None = key(
        None,
        "The OpenAI URL this instance serves on (http://host:port), sent at registration so "
        "that a router (kvplane router) finds the instance; null: kvplane serve and vLLM "
        "fill it in from their --host and --port.",
        kind=OPT_STR,
    )
    controller_curve_secret_key_file: str | None = key(
        None,
        "This worker's CURVE secret key file (kvplane keygen); with "
        "controller_curve_public_key_file, the worker reaches the controller over CURVE and "
        "its command port takes only the controller's key. null: plain sockets.",
        kind=OPT_STR,
    )
    controller_curve_public_key_file: str | None = key(
        None, "The controller's CURVE public key file (.key).", kind=OPT_STR
    )
    # --- peer to peer
    enable_p2p: bool = key(False, "Fetch missing chunks from peer instances.", kind=BOOL)
    p2p_host: str = key("localhost", "Host peers reach this instance's chunk server at.", kind=STR)
    p2p_init_ports: tuple[int, ...] | None = key(
        None,
        "Chunk-server port per rank (null: auto-assign).",
        kind=INT_LIST,
        aliases=("p2p_init_port",),
    )
    p2p_timeout_s: float = key(
        5.0, "Deadline of one peer transfer, seconds.", kind=FLOAT, minimum=0.05
    )
    p2p_max_transfer_bytes: int = key(
        1 << 30, "Largest peer transfer accepted, bytes.", kind=INT, minimum=1
    )
    # --- internal API server
    internal_api_server_enabled: bool = key(False, "Start the internal API server.", kind=BOOL)
    internal_api_server_host: str = key(
        "127.0.0.1", "Address the internal API server binds.", kind=STR
    )
    internal_api_server_port_start: int = key(
        6999,
        "Port of index 0 (scheduler); worker i listens on port_start + i + 1.",
        kind=INT,
        minimum=1,
        maximum=65535,
    )
    internal_api_server_include_index_list: tuple[int, ...] | None = key(
        None,
        "Indices that start a server (0 = scheduler, i+1 = worker i); null = all.",
        kind=INT_LIST,
    )
    internal_api_server_socket_path_prefix: str | None = key(
        None, "Serve on the Unix socket {prefix}_{port} instead of TCP.", kind=OPT_STR
    )
    internal_api_server_allow_run_script: bool = key(
        False, "Allow POST /run_script (runs arbitrary Python).", kind=BOOL
    )
    internal_api_server_token: str | None = key(
        None, "Bearer token required on mutating endpoints when set.", kind=OPT_STR, secret=True
    )
    # --- chunk statistics
    chunk_statistics_auto_exit_timeout_hours: float = key(
        0.0,
        "Stop collecting chunk statistics after this many hours (0 = never).",
        kind=FLOAT,
        minimum=0.0,
        mutable=True,
    )
    chunk_statistics_auto_exit_target_unique_chunks: int = key(
        0,
        "Stop collecting once this many unique chunks are seen (0 = never).",
        kind=INT,
        minimum=0,
        mutable=True,
    )
    # --- the engine's model and KV shape, for hosts with no better source of these facts
    # (EngineFacts.from_config): all of them for kvplane engine; world_size, worker_id,
    # kv_block_size and kv_num_blocks for kvplane serve, whose model decides the rest
    model_name: str = key(
        "kvplane/synthetic",
        "Model name of kvplane engine (kvplane serve and vLLM use their served model's); "
        "part of every storage key.",
        kind=STR,
    )
    world_size: int = key(
        1, "Tensor-parallel ranks of this instance (vLLM: its own).", kind=INT, minimum=1
    )
    worker_id: int = key(0, "This process's rank (vLLM: its own).", kind=INT, minimum=0)
    kv_num_layers: int = key(
        4,
        "Attention layers of the paged KV cache (kvplane serve, vLLM: the model's).",
        kind=INT,
        minimum=1,
    )
    kv_num_heads: int = key(
        4, "KV heads per layer (kvplane serve, vLLM: the model's).", kind=INT, minimum=1
    )
    kv_head_size: int = key(
        64, "Head dimension (kvplane serve, vLLM: the model's).", kind=INT, minimum=1
    )
    kv_block_size: int = key(16, "Tokens per paged-KV block (vLLM: its own).", kind=INT, minimum=1)
    kv_num_blocks: int = key(
        256,
        "Blocks per layer of the paged KV cache (kvplane serve: at least max_model_len "
        "tokens; vLLM: its own).",
        kind=INT,
        minimum=1,
    )
    kv_dtype: str = key(
        "bfloat16",
        "KV dtype (kvplane serve, vLLM: the model's).",
        kind=STR,
        choices=("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"),
    )
    use_mla: bool = key(
        False,
        "MLA layout [num_blocks, block_size, head_size] per layer (vLLM: the model's).",
        kind=BOOL,
    )
    # --- logging
    log_level: str = key(
        "INFO",
        "Level of the kvplane loggers.",
        kind=STR,
        choices=LOG_LEVELS,
        mutable=True,
    )

    def __post_init__(self) -> None:
        validate_fields(self)

    def __repr__(self) -> str:  # configs reach logs: secrets masked, as in GET /conf
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"EngineConfig({fields})"

    def to_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        """All keys; secrets masked (a URL keeps its scheme and host) unless asked."""
        out: dict[str, Any] = {}
        for spec in key_specs():
            value = getattr(self, spec.name)
            out[spec.name] = value if reveal_secrets or not spec.secret else _mask(value)
        return out


def key_specs() -> list[KeySpec]:
    """The engine's table, in declaration order."""
    return list(key_table(EngineConfig))


def help_lines(specs: Iterable[KeySpec] | None = None) -> list[str]:
    """One ``name (kind, default): help`` line per key (default: the engine's), for --help."""
    return _help_lines(key_specs() if specs is None else specs)


class UpdateResult(NamedTuple):
    """What :meth:`ConfigStore.update` did: each key applied or refused alone."""

    updated: dict[str, Any]  # accepted keys and their new values
    errors: dict[str, str]  # refused keys and why
    config: EngineConfig  # the config the update left current


#: Called after a runtime update with the new config and the names of the keys it changed.
ConfigListener = Callable[[EngineConfig, frozenset[str]], None]


class ConfigStore:
    """A running process's config, and the one validated way to change it.

    :attr:`current` is always a whole, validated, frozen :class:`EngineConfig`: a reader
    that takes it once sees one consistent config for as long as it keeps it (the next read
    may return a newer one). :meth:`update` (``POST /conf``) validates each change, swaps in
    one new config holding every accepted change, then calls the subscribers.

    Thread-safe: updates, and the subscriber calls that follow each, run one at a time in
    update order; reading :attr:`current` takes no lock.
    """

    def __init__(self, config: EngineConfig) -> None:
        self._current = config
        self._listeners: list[ConfigListener] = []
        self._lock = threading.Lock()

    @property
    def current(self) -> EngineConfig:
        return self._current

    def subscribe(self, listener: ConfigListener) -> None:
        """Call ``listener(config, changed_names)`` after every update that changed a key
        (on the updating thread, under the update lock: a listener must not call
        :meth:`update`). A listener that raises stops the later ones and reaches the caller
        of :meth:`update`; the new config is current all the same."""
        with self._lock:
            self._listeners.append(listener)

    def update(self, changes: Mapping[str, Any]) -> UpdateResult:
        """Apply runtime changes: each key is accepted or refused alone ("Unknown config",
        "Config is not mutable at runtime", or the validation message); the accepted ones
        become current together, in one new config."""
        specs = {s.name: s for s in key_specs()}
        updated: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, raw in changes.items():
            spec = specs.get(name)
            if spec is None:
                errors[name] = "Unknown config"
            elif not spec.mutable:
                errors[name] = "Config is not mutable at runtime"
            else:
                try:
                    updated[name] = spec.validate(raw)
                except ConfigError as exc:
                    errors[name] = str(exc)
        with self._lock:
            if updated:
                self._current = dataclasses.replace(self._current, **updated)
                for listener in list(self._listeners):
                    listener(self._current, frozenset(updated))
            return UpdateResult(updated, errors, self._current)


def _mask(value: Any) -> Any:
    """A URL keeps its scheme, host and path; credentials and the query string (redis
    accepts ``?password=``) are hidden. Anything else is hidden whole."""
    if value is None:
        return None
    text = str(value)
    if "://" not in text:
        return "***"
    scheme, rest = text.split("://", 1)
    rest, has_query, _ = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    if "@" in netloc:  # a raw '@' may sit inside the password: the host follows the last one
        netloc = "***@" + netloc.rpartition("@")[2]
    return f"{scheme}://{netloc}{slash}{path}" + ("?***" if has_query else "")


def load_config(
    path: str | Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> EngineConfig:
    """Build a validated config: defaults < YAML file < environment < explicit overrides.

    The file is ``path``, else ``$KVPLANE_CONFIG_FILE`` (alias ``$LMCACHE_CONFIG_FILE``).
    Env overrides are ``KVPLANE_<KEY>`` or ``LMCACHE_<KEY>`` (upper case).
    Raises ConfigError naming the first unknown key, bad type or out-of-range value.
    """
    env = os.environ if env is None else env
    specs = key_specs()
    raw: dict[str, Any] = {}
    if path is None:
        path = next((env[v] for v in CONFIG_FILE_ENV if env.get(v)), None)
    if path is not None:
        raw.update(read_yaml(path, "config file"))
    for spec in specs:
        for name in (spec.name, *spec.aliases):
            for prefix in ENV_PREFIXES:
                var = prefix + name.upper()
                if var in env:
                    raw[name] = env[var]
    raw.update(overrides or {})
    check_known(raw, specs, what="config", hint="see docs/configuration.md for the valid keys")
    names = by_name(specs)
    values: dict[str, Any] = {}
    for name, value in raw.items():
        spec = names[name]
        values[spec.name] = spec.validate(value)
    return EngineConfig(**values)


def rank_port(name: str, ports: Sequence[int] | None, worker_id: int) -> int | None:
    """Rank ``worker_id``'s entry of the per-rank port list key ``name``
    (``lmcache_worker_ports``, ``p2p_init_ports``); None when the list is null or empty
    (any free port). Raises ConfigError when the list has no entry for that rank."""
    if not ports:
        return None
    if worker_id >= len(ports):
        raise ConfigError(f"{name}: {list(ports)} has no port for worker_id {worker_id}")
    return ports[worker_id]


_WILDCARDS = frozenset({"", "0.0.0.0", "::", "[::]"})


def serving_url_of(host: str | None, port: int, reach_host: str) -> str:
    """The ``serving_url`` of a server bound to ``host:port``: a wildcard (or no) host is
    replaced by ``reach_host`` (the config's ``p2p_host``, the name peers reach this
    machine by), and an IPv6 address gets brackets."""
    name = reach_host if host is None or host in _WILDCARDS else host
    if ":" in name and not name.startswith("["):
        name = f"[{name}]"
    return f"http://{name}:{port}"
