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

__all__ = ["ControllerSettings", "parse_monitor_ports"]

MONITOR_PORT_NAMES = ("pull", "reply", "heartbeat")


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
            values.update(parse_monitor_ports(raw.pop("monitor_ports")))
        for key, value in raw.items():
            if key not in names:
                raise ConfigError(
                    f"unknown controller config key {key!r}; known: "
                    + ", ".join(sorted([*names, "monitor_ports"]))
                )
            values[key] = value
        return cls(**values)


def parse_monitor_ports(value: str | dict[str, Any]) -> dict[str, int | None]:
    """``{"pull": 9001, "reply": 9002, "heartbeat": 9003}`` (JSON text or a mapping)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--monitor-ports is not JSON: {exc}") from None
    if not isinstance(value, dict) or "pull" not in value:
        raise ConfigError('--monitor-ports needs a JSON object with "pull" (and "reply")')
    unknown = set(value) - set(MONITOR_PORT_NAMES)
    if unknown:
        raise ConfigError(
            f"unknown --monitor-ports key(s) {sorted(unknown)}; known: {list(MONITOR_PORT_NAMES)}"
        )
    out: dict[str, int | None] = {}
    for name in MONITOR_PORT_NAMES:
        port = value.get(name)
        if port is not None and (not isinstance(port, int) or not 0 < port < 65536):
            raise ConfigError(f"--monitor-ports {name!r} must be a port number, got {port!r}")
        out[f"{name}_port"] = port
    return out
