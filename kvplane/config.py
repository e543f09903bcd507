"""The engine configuration table and its loader.

Every key is defined once, as a field of :class:`EngineConfig`, through :func:`key`:
type (the field's annotation and a :class:`Kind` that parses it), default, whether it may
change at runtime, and one line of help. YAML loading, env overrides, validation,
``GET/POST /conf``, ``--help`` text and ``docs/configuration.md`` all read that table.

Key names are the seeds' names, so a YAML written for the original system loads unchanged.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import yaml

from kvplane.errors import ConfigError

__all__ = [
    "CONFIG_FILE_ENV",
    "ENV_PREFIXES",
    "EngineConfig",
    "KeySpec",
    "UpdateResult",
    "help_lines",
    "key_specs",
    "load_config",
    "rank_port",
]

CONFIG_FILE_ENV = ("KVPLANE_CONFIG_FILE", "LMCACHE_CONFIG_FILE")
ENV_PREFIXES = ("KVPLANE_", "LMCACHE_")


class Kind(NamedTuple):
    """How one key's value is parsed: from YAML/JSON values and from env strings."""

    name: str
    parse: Callable[[Any], Any]


def _bool(v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected a boolean (true/false)")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        raise ValueError("expected an integer")
    if isinstance(v, int):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("+-").isdigit():
        return int(v.strip())
    raise ValueError("expected an integer")


def _float(v: Any) -> float:
    if isinstance(v, bool):
        raise ValueError("expected a number")
    number: float | None = None
    if isinstance(v, (int, float)):
        number = float(v)
    elif isinstance(v, str):
        with contextlib.suppress(ValueError):
            number = float(v.strip())
    # NaN passes every range check and inf overflows every size computed from it.
    if number is None or not math.isfinite(number):
        raise ValueError("expected a finite number")
    return number


def _str(v: Any) -> str:
    if isinstance(v, str):
        return v
    raise ValueError("expected a string")


def _optional(inner: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def parse(v: Any) -> Any:
        if v is None or (isinstance(v, str) and v.strip().lower() in ("", "none", "null")):
            return None
        return inner(v)

    return parse


def _int_list(v: Any) -> list[int]:
    """An int, a list of ints, or a comma-separated string (env form)."""
    if isinstance(v, str):
        text = v.strip().strip("[]")
        return [_int(p) for p in text.split(",") if p.strip()]
    if isinstance(v, (list, tuple)):
        return [_int(p) for p in v]
    return [_int(v)]


def _str_list(v: Any) -> list[str]:
    if isinstance(v, str):
        return [p.strip() for p in v.split(",") if p.strip()]
    if isinstance(v, (list, tuple)) and all(isinstance(p, str) for p in v):
        return list(v)
    raise ValueError("expected a list of strings")


BOOL = Kind("bool", _bool)
INT = Kind("int", _int)
FLOAT = Kind("float", _float)
STR = Kind("str", _str)
OPT_STR = Kind("str | null", _optional(_str))
OPT_INT = Kind("int | null", _optional(_int))
INT_LIST = Kind("int | list[int] | null", _optional(_int_list))
STR_LIST = Kind("list[str]", _str_list)


def key(
    default: Any,
    help: str,
    *,
    kind: Kind,
    mutable: bool = False,
    secret: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
    choices: tuple[str, ...] | None = None,
    aliases: tuple[str, ...] = (),
) -> Any:
    """Declare one config key (a dataclass field carrying its spec)."""
    spec = {
        "help": help,
        "kind": kind,
        "mutable": mutable,
        "secret": secret,
        "minimum": minimum,
        "maximum": maximum,
        "choices": choices,
        "aliases": aliases,
    }
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=spec)
    return field(default=default, metadata=spec)


@dataclass
class EngineConfig:
    """One engine process's configuration; fields are the key table."""

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
    lmcache_worker_ports: list[int] | None = key(
        None, "Command port per rank (null: auto-assign).", kind=INT_LIST
    )
    lmcache_worker_heartbeat_time: float = key(
        5.0, "Seconds between worker heartbeats.", kind=FLOAT, minimum=0.05
    )
    controller_timeout_s: float = key(
        5.0, "Deadline of each worker->controller request, seconds.", kind=FLOAT, minimum=0.05
    )
    # --- peer to peer
    enable_p2p: bool = key(False, "Fetch missing chunks from peer instances.", kind=BOOL)
    p2p_host: str = key("localhost", "Host peers reach this instance's chunk server at.", kind=STR)
    p2p_init_ports: list[int] | None = key(
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
    internal_api_server_include_index_list: list[int] | None = key(
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
    # --- the engine's model shape (standalone engine and the reference server)
    model_name: str = key("kvplane/synthetic", "Model name; part of every storage key.", kind=STR)
    world_size: int = key(1, "Tensor-parallel ranks of this instance.", kind=INT, minimum=1)
    worker_id: int = key(0, "This process's rank.", kind=INT, minimum=0)
    kv_num_layers: int = key(4, "Attention layers of the paged KV cache.", kind=INT, minimum=1)
    kv_num_heads: int = key(4, "KV heads per layer.", kind=INT, minimum=1)
    kv_head_size: int = key(64, "Head dimension.", kind=INT, minimum=1)
    kv_block_size: int = key(16, "Tokens per paged-KV block.", kind=INT, minimum=1)
    kv_num_blocks: int = key(256, "Blocks per layer of the paged KV cache.", kind=INT, minimum=1)
    kv_dtype: str = key(
        "bfloat16",
        "KV dtype.",
        kind=STR,
        choices=("float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"),
    )
    use_mla: bool = key(
        False, "MLA layout [num_blocks, block_size, head_size] per layer.", kind=BOOL
    )
    # --- logging
    log_level: str = key(
        "INFO",
        "Level of the kvplane loggers.",
        kind=STR,
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        mutable=True,
    )

    def __post_init__(self) -> None:
        self._listeners: list[Callable[[str, Any], None]] = []

    # ------------------------------------------------------------------ runtime access
    def to_dict(self, *, reveal_secrets: bool = False) -> dict[str, Any]:
        """All keys; secrets masked (a URL keeps its scheme and host) unless asked."""
        out: dict[str, Any] = {}
        for spec in key_specs():
            value = getattr(self, spec.name)
            out[spec.name] = value if reveal_secrets or not spec.secret else _mask(value)
        return out

    def on_change(self, listener: Callable[[str, Any], None]) -> None:
        """Call ``listener(name, new_value)`` after every runtime update of a key."""
        self._listeners.append(listener)

    def update(self, changes: Mapping[str, Any]) -> UpdateResult:
        """Apply runtime changes key by key; each key succeeds or fails alone."""
        specs = {s.name: s for s in key_specs()}
        updated: dict[str, Any] = {}
        errors: dict[str, str] = {}
        for name, raw in changes.items():
            spec = specs.get(name)
            if spec is None:
                errors[name] = "Unknown config"
                continue
            if not spec.mutable:
                errors[name] = "Config is not mutable at runtime"
                continue
            try:
                value = spec.validate(raw)
            except ConfigError as exc:
                errors[name] = str(exc)
                continue
            setattr(self, name, value)
            updated[name] = value
            for listener in self._listeners:
                listener(name, value)
        return UpdateResult(updated, errors)


class UpdateResult(NamedTuple):
    updated: dict[str, Any]
    errors: dict[str, str]


@dataclass(frozen=True)
class KeySpec:
    name: str
    default: Any
    help: str
    kind: Kind
    mutable: bool
    secret: bool
    minimum: float | None
    maximum: float | None
    choices: tuple[str, ...] | None
    aliases: tuple[str, ...]

    def validate(self, raw: Any) -> Any:
        """Parse and range-check ``raw``; ConfigError names the key, the value and the rule."""
        shown = "***" if self.secret else repr(raw)  # errors reach logs and HTTP bodies
        try:
            value = self.kind.parse(raw)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{self.name}: invalid value {shown}: {exc}") from None
        numbers = value if isinstance(value, list) else [value]
        for v in numbers:
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                if self.minimum is not None and v < self.minimum:
                    raise ConfigError(f"{self.name}: {shown} is below the minimum {self.minimum}")
                if self.maximum is not None and v > self.maximum:
                    raise ConfigError(f"{self.name}: {shown} is above the maximum {self.maximum}")
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{self.name}: {shown} is not one of {list(self.choices)}")
        return value


def key_specs() -> list[KeySpec]:
    """The table, in declaration order."""
    specs = []
    for f in dataclasses.fields(EngineConfig):
        if not f.metadata:
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        specs.append(KeySpec(name=f.name, default=default, **f.metadata))
    return specs


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
    by_name: dict[str, KeySpec] = {}
    for spec in specs:
        by_name[spec.name] = spec
        for alias in spec.aliases:
            by_name[alias] = spec

    raw: dict[str, Any] = {}
    if path is None:
        path = next((env[v] for v in CONFIG_FILE_ENV if env.get(v)), None)
    if path is not None:
        raw.update(_read_yaml(Path(path)))
    for spec in specs:
        for name in (spec.name, *spec.aliases):
            for prefix in ENV_PREFIXES:
                var = prefix + name.upper()
                if var in env:
                    raw[name] = env[var]
    raw.update(overrides or {})

    values: dict[str, Any] = {}
    unknown = sorted(k for k in raw if k not in by_name)
    if unknown:
        close = difflib.get_close_matches(unknown[0], list(by_name), n=1)
        raise ConfigError(
            f"unknown config key {unknown[0]!r}"
            + (f" (and {unknown[1:]})" if len(unknown) > 1 else "")
            + (f"; did you mean {close[0]!r}?" if close else "")
            + "; see docs/configuration.md for the valid keys"
        )
    for name, value in raw.items():
        spec = by_name[name]
        values[spec.name] = spec.validate(value)
    return EngineConfig(**values)


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of keys to values")
    return {str(k): v for k, v in data.items()}


def help_lines(specs: Iterable[KeySpec] | None = None) -> list[str]:
    """One ``name (kind, default): help`` line per key, for --help and docs."""
    return [
        f"{s.name} ({s.kind.name}, default {s.default!r}{', mutable' if s.mutable else ''}): {s.help}"
        for s in (specs or key_specs())
    ]


def rank_port(name: str, ports: list[int] | None, worker_id: int) -> int | None:
    """Rank ``worker_id``'s entry of the per-rank port list key ``name``
    (``lmcache_worker_ports``, ``p2p_init_ports``); None when the list is null or empty
    (any free port). Raises ConfigError when the list has no entry for that rank."""
    if not ports:
        return None
    if worker_id >= len(ports):
        raise ConfigError(f"{name}: {ports} has no port for worker_id {worker_id}")
    return ports[worker_id]
