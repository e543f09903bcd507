"""The controller's settings: a key table like the engine's (:mod:`kvplane.settings_table`),
set from a YAML ``--config`` file, then from the command line.

Each key is defined once below: type, default, range, help, and the flags that set it;
``kvplane controller --help``, the file loader and ``docs/configuration.md`` read the table.
The worker ports have no flag of their own: ``--monitor-ports`` (and the ``monitor_ports``
file key) sets all three at once, :func:`parse_monitor_ports`.

Defaults reap a dead worker within a minute and agree with the worker's heartbeat default
(``lmcache_worker_heartbeat_time`` = 5 s): six missed heartbeats = 30 s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kvplane.errors import ConfigError
from kvplane.settings_table import (
    BOOL,
    FLOAT,
    INT,
    LOG_LEVEL,
    LOG_LEVELS,
    OPT_INT,
    OPT_STR,
    STR,
    KeySpec,
    check_known,
    key,
    key_table,
    read_yaml,
    validate_fields,
)

__all__ = [
    "MONITOR_PORT_NAMES",
    "TOKEN_ENV",
    "ControllerConfig",
    "controller_keys",
    "parse_monitor_ports",
]

#: The ``--monitor-ports`` JSON's names; each sets the key ``<name>_port``.
MONITOR_PORT_NAMES = ("pull", "reply", "heartbeat")
#: The environment variable that sets ``api_token`` (between the file and the flags).
TOKEN_ENV = "KVPLANE_CONTROLLER_TOKEN"


@dataclass(frozen=True, repr=False)
class ControllerConfig:
    """The controller process's settings; its fields are the key table. Frozen and valid
    however it is built (``__post_init__`` validates every key)."""

    host: str = key(
        "0.0.0.0", "Address to bind (HTTP and worker ports).", kind=STR, flags=("--host",)
    )
    port: int = key(9000, "HTTP port.", kind=INT, minimum=1, maximum=65535, flags=("--port",))
    pull_port: int = key(
        9001,
        'Worker PULL port: chunk reports (--monitor-ports "pull").',
        kind=INT,
        minimum=1,
        maximum=65535,
    )
    reply_port: int | None = key(
        9002,
        'Worker REPLY port: register, heartbeat, peer lookups (--monitor-ports "reply"); '
        "null: the seeds' pull-only mode.",
        kind=OPT_INT,
        minimum=1,
        maximum=65535,
    )
    heartbeat_port: int | None = key(
        None,
        'Optional second reply socket for heartbeats only (--monitor-ports "heartbeat").',
        kind=OPT_INT,
        minimum=1,
        maximum=65535,
    )
    health_check_interval: float = key(
        1.0,
        "Seconds between reaper sweeps.",
        kind=FLOAT,
        minimum=0.01,
        flags=("--health-check-interval",),
    )
    worker_timeout: float = key(
        30.0,
        "Seconds without a heartbeat before a worker is reaped (workers heartbeat every 5 s "
        "by default).",
        kind=FLOAT,
        minimum=0.01,
        flags=("--lmcache-worker-timeout", "--worker-timeout"),
    )
    command_timeout: float = key(
        5.0,
        "Deadline of each command to a worker, seconds.",
        kind=FLOAT,
        minimum=0.01,
        flags=("--command-timeout",),
    )
    log_level: str = key(
        "INFO", "Log level.", kind=LOG_LEVEL, choices=LOG_LEVELS, flags=("--log-level",)
    )
    api_token: str | None = key(
        None,
        "Bearer token every mutating HTTP call must carry (Authorization: Bearer <token>); "
        f"also read from ${TOKEN_ENV}. null: the HTTP API is open.",
        kind=OPT_STR,
        secret=True,
        flags=("--api-token",),
    )
    protect_reads: bool = key(
        False,
        "With api_token, reads need the token too (/lookup, /query_*, /health, /check_finish, "
        "/metrics, /conf, ...); /healthz and the OpenAPI document stay open.",
        kind=BOOL,
        flags=("--protect-reads",),
    )
    curve_secret_key_file: str | None = key(
        None,
        "The controller's CURVE secret key file (kvplane keygen); with "
        "curve_allowed_keys_dir, the worker ports take only workers with an allowed key. "
        "null: the worker ports are open.",
        kind=OPT_STR,
        flags=("--curve-secret-key-file",),
    )
    curve_allowed_keys_dir: str | None = key(
        None,
        "Directory of the allowed workers' CURVE public key files (*.key).",
        kind=OPT_STR,
        flags=("--curve-allowed-keys-dir",),
    )

    nats_url: str | None = key(
        None,
        "NATS server(s) of the event log, e.g. nats://127.0.0.1:4222 (comma-separated for a "
        "cluster): run as one replica of a replicated controller (docs/ha.md); the worker "
        "ports are bound only with --monitor-ports. null: the single ZMQ controller.",
        kind=OPT_STR,
        flags=("--nats",),
    )
    nats_replicas: int = key(
        1,
        "Copies JetStream keeps of the log, the work queue and the buckets (3 on a 3-node "
        "cluster); read when they are first created.",
        kind=INT,
        minimum=1,
        maximum=5,
        flags=("--nats-replicas",),
    )
    replica_id: str | None = key(
        None,
        "This replica's name in the lease and in /status; null: host name and process id.",
        kind=OPT_STR,
        flags=("--replica-id",),
    )
    lease_ttl: float = key(
        5.0,
        "Seconds the lease holder's lease lasts without renewal (it renews every third); "
        "another replica takes over at most this long after the holder dies.",
        kind=FLOAT,
        minimum=0.5,
        flags=("--lease-ttl",),
    )
    snapshot_interval: float = key(
        30.0,
        "Seconds between the lease holder's index snapshots (then the log is trimmed behind "
        "the older of the two it keeps).",
        kind=FLOAT,
        minimum=0.1,
        flags=("--snapshot-interval",),
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        if (self.curve_secret_key_file is None) != (self.curve_allowed_keys_dir is None):
            raise ConfigError(
                "curve_secret_key_file and curve_allowed_keys_dir go together: set both "
                "(CURVE on the worker ports) or neither"
            )

    @property
    def curve(self) -> bool:
        """Whether the worker ports require CURVE."""
        return self.curve_secret_key_file is not None

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items())
        return f"ControllerConfig({fields})"

    def to_dict(self) -> dict[str, Any]:
        """Every key and its value, a secret's shown as ``***`` (what ``GET /conf``
        answers)."""
        out = {s.name: getattr(self, s.name) for s in controller_keys()}
        for s in controller_keys():
            if s.secret and out[s.name] is not None:
                out[s.name] = "***"
        return out

    @classmethod
    def from_file(cls, path: str | Path) -> ControllerConfig:
        """Settings from YAML; keys are the table's names (``monitor_ports`` too: a mapping
        as in ``--monitor-ports``). Raises ConfigError naming the file and the key."""
        raw = read_yaml(path, "controller config")
        values: dict[str, Any] = {}
        if "monitor_ports" in raw:
            try:
                values.update(parse_monitor_ports(raw.pop("monitor_ports")))
            except ConfigError as exc:
                raise ConfigError(f"monitor_ports in {path}: {exc}") from None
        known = ", ".join(sorted([*(s.name for s in controller_keys()), "monitor_ports"]))
        check_known(raw, controller_keys(), what="controller config", hint=f"known: {known}")
        try:
            return cls(**{**values, **raw})
        except ConfigError as exc:
            raise ConfigError(f"controller config {path}: {exc}") from None


def controller_keys() -> tuple[KeySpec, ...]:
    """The controller's table, in declaration order."""
    return key_table(ControllerConfig)


def parse_monitor_ports(value: str | dict[str, Any]) -> dict[str, int | None]:
    """``{"pull": 9001, "reply": 9002, "heartbeat": 9003}`` (JSON text or a mapping) as the
    keys ``pull_port``, ``reply_port``, ``heartbeat_port`` (a name left out: None; ``pull``
    is required), each checked by its row of the table. Raises ConfigError; naming the flag
    or file key is left to the caller."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not JSON: {exc}") from None
    if not isinstance(value, dict) or "pull" not in value:
        raise ConfigError(f'needs a JSON object with "pull" (and "reply"), got {value!r}')
    unknown = set(value) - set(MONITOR_PORT_NAMES)
    if unknown:
        raise ConfigError(f"unknown key(s) {sorted(unknown)}; known: {list(MONITOR_PORT_NAMES)}")
    rows = {s.name: s for s in controller_keys()}
    return {
        f"{name}_port": rows[f"{name}_port"].validate(value.get(name))
        for name in MONITOR_PORT_NAMES
    }
