"""The controller's settings: CLI flags, optionally from a YAML ``--config`` file.

Defaults reap a dead worker within a minute and agree with the worker's heartbeat default
(``lmcache_worker_heartbeat_time`` = 5 s): six missed heartbeats = 30 s.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kvplane.errors import ConfigError

__all__ = ["ControllerSettings", "check_port", "parse_monitor_ports"]

MONITOR_PORT_NAMES = ("pull", "reply", "heartbeat")
_PORT_FIELDS = ("port", "pull_port", "reply_port", "heartbeat_port")


def check_port(value: object, what: str) -> int:
    """``value`` as a TCP port (an int in 1..65535; a bool is not one). Raises ConfigError
    naming ``what``: a port out of range would otherwise be bound modulo 65536 or fail late
    with an address that names no flag."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
        raise ConfigError(f"{what} must be a port number in 1..65535, got {value!r}")
    return value


@dataclass(frozen=True)
class ControllerSettings:
    host: str = "0.0.0.0"
    port: int = 9000
    pull_port: int = 9001
    reply_port: int | None = 9002
    heartbeat_port: int | None = None  # optional second reply socket for heartbeats only
    health_check_interval: float = 1.0  # seconds between reaper sweeps
    worker_timeout: float = 30.0  # seconds without a heartbeat before a worker is reaped
    command_timeout: float = 5.0  # deadline of each controller->worker command
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        for name in _PORT_FIELDS:
            value = getattr(self, name)
            if value is not None or name in ("port", "pull_port"):
                check_port(value, name)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def with_overrides(self, **changes: Any) -> ControllerSettings:
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    @classmethod
    def from_file(cls, path: str | Path) -> ControllerSettings:
        """Settings from YAML; keys are the field names (``monitor_ports`` also accepted)."""
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read controller config {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"controller config {path} must be a mapping")
        names = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        if "monitor_ports" in raw:
            try:
                values.update(parse_monitor_ports(raw.pop("monitor_ports")))
            except ConfigError as exc:
                raise ConfigError(f"monitor_ports in {path}: {exc}") from None
        for key, value in raw.items():
            if key not in names:
                raise ConfigError(
                    f"unknown controller config key {key!r}; known: "
                    + ", ".join(sorted([*names, "monitor_ports"]))
                )
            values[key] = value
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"controller config {path}: {exc}") from None


def parse_monitor_ports(value: str | dict[str, Any]) -> dict[str, int | None]:
    """``{"pull": 9001, "reply": 9002, "heartbeat": 9003}`` (JSON text or a mapping) as
    settings fields. Raises ConfigError; its message leaves naming the flag or key to the
    caller."""
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
    out: dict[str, int | None] = {}
    for name in MONITOR_PORT_NAMES:
        port = value.get(name)
        out[f"{name}_port"] = None if port is None and name != "pull" else check_port(port, name)
    return out
