"""``kvplane controller``: the composition root of the controller process."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import sys
from typing import Any

from kvplane.controller.settings import (
    TOKEN_ENV,
    ControllerConfig,
    controller_keys,
    parse_monitor_ports,
)
from kvplane.errors import ConfigError, KvplaneError
from kvplane.settings_table import add_flags, flag_values

__all__ = ["add_parser", "bind_worker_ports", "exposure_warnings", "run", "settings_from_args"]

log = logging.getLogger("kvplane.controller")


def _pull_port(text: str) -> int:
    """argparse type of the deprecated ``--monitor-port``: the pull port, by its row."""
    pull = next(s for s in controller_keys() if s.name == "pull_port")
    try:
        return int(pull.validate(text))
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _monitor_ports(text: str) -> dict[str, int | None]:
    """argparse type: the ``--monitor-ports`` JSON, checked by the ports' rows."""
    try:
        return parse_monitor_ports(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """``kvplane controller``: one option per table key with flags (help and default from
    :class:`ControllerConfig`), plus the worker ports and ``--config``."""
    defaults = ControllerConfig()
    p: argparse.ArgumentParser = subparsers.add_parser(
        "controller",
        help="run the controller (KV-aware lookups and cluster operations)",
        description="Run the kvplane controller: HTTP API on --host:--port, worker sockets "
        "on --monitor-ports.",
    )
    add_flags(p, controller_keys())
    p.add_argument(
        "--monitor-ports",
        type=_monitor_ports,
        help='worker ports as JSON, e.g. \'{"pull": 9001, "reply": 9002}\' '
        '(an optional "heartbeat" port is a second reply socket); default pull '
        f"{defaults.pull_port}, reply {defaults.reply_port}",
    )
    p.add_argument(
        "--monitor-port",
        type=_pull_port,
        help="deprecated: the pull port alone, no reply port (use --monitor-ports)",
    )
    p.add_argument("--config", help="YAML file with these settings (flags override it)")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace) -> ControllerConfig:
    """The file's settings (``--config``), then ``$KVPLANE_CONTROLLER_TOKEN``, then the
    flags given on top. Raises ConfigError."""
    base = ControllerConfig.from_file(args.config) if args.config else ControllerConfig()
    env_token = os.environ.get(TOKEN_ENV)
    if env_token:
        base = dataclasses.replace(base, api_token=env_token)
    ports: dict[str, Any] = {}
    if args.monitor_ports:
        ports = args.monitor_ports
    elif args.monitor_port is not None:
        log.warning(
            '--monitor-port is deprecated; use --monitor-ports \'{"pull": %d, "reply": ...}\''
            " (running with a pull port and no reply port)",
            args.monitor_port,
        )
        ports = {"pull_port": args.monitor_port, "reply_port": None, "heartbeat_port": None}
    # Replaced, not merged: "--monitor-port N" means pull N and no reply port at all.
    return dataclasses.replace(base, **flag_values(args, controller_keys()), **ports)


def exposure_warnings(settings: ControllerConfig) -> list[str]:
    """What is open to anyone who can reach a controller bound beyond loopback."""
    from kvplane.web.auth import is_loopback

    if is_loopback(settings.host):
        return []
    out = []
    if not settings.api_token:
        out.append(
            f"controller binds {settings.host} without an API token: anyone who can reach "
            f"port {settings.port} can clear, pin, compress or move caches (set --api-token "
            f"or ${TOKEN_ENV})"
        )
    if not settings.curve:
        out.append(
            f"controller binds {settings.host} without CURVE on its worker ports: anyone who "
            "can reach them can register a worker and report chunks that steer lookups "
            "(set --curve-secret-key-file and --curve-allowed-keys-dir)"
        )
    return out


def run(args: argparse.Namespace) -> int:
    from kvplane.controller.http import create_app
    from kvplane.controller.service import ControllerService
    from kvplane.http_serve import run_http

    logging.basicConfig(
        level=args.log_level or "INFO",
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel(args.log_level or "INFO")
    try:
        settings = settings_from_args(args)
    except KvplaneError as exc:
        log.error("%s", exc)
        return 2
    logging.getLogger().setLevel(settings.log_level)
    for warning in exposure_warnings(settings):
        log.warning("%s", warning)
    # Short GIL hand-offs: HTTP lookups get the interpreter quickly during an ingest burst.
    sys.setswitchinterval(0.0005)
    services: list[Any] = []
    try:
        if settings.nats_url:
            from kvplane.controller.replica import start_replica

            cluster = start_replica(settings, services, bridge=bind_worker_ports(args))
        else:
            service = ControllerService(settings)
            service.start()
            services.append(service)
            cluster = service.cluster
    except KvplaneError as exc:
        log.error("%s", exc)
        for started in reversed(services):
            started.stop()
        return 2 if isinstance(exc, ConfigError) else 1
    log.info("controller HTTP API at %s:%d", settings.host, settings.port)
    app = create_app(cluster, settings)
    # Start-up objects (FastAPI, pydantic schemas) never die: keep them out of every
    # collection, and collect young objects less often; the index itself is untracked.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    try:
        run_http(app, settings.host, settings.port, log_level=settings.log_level.lower())
    finally:
        for started in reversed(services):  # the worker ports before the log they feed
            started.stop()
    return 0


def bind_worker_ports(args: argparse.Namespace) -> bool:
    """Whether the command line (or its ``--config`` file) names worker ports: a replica
    binds none otherwise."""
    if args.monitor_ports or args.monitor_port is not None:
        return True
    if args.config:
        from kvplane.settings_table import read_yaml

        return "monitor_ports" in read_yaml(args.config, "controller config")
    return False
