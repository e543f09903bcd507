"""``kvplane controller``: the composition root of the controller process."""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import sys
from typing import Any

from kvplane.controller.settings import ControllerSettings, check_port, parse_monitor_ports
from kvplane.errors import ConfigError, KvplaneError

__all__ = ["add_parser", "run"]

log = logging.getLogger("kvplane.controller")


def _port(text: str) -> int:
    """argparse type: a port number; a bad one is a usage error naming the flag (exit 2)."""
    try:
        return check_port(int(text), "a port")
    except (ValueError, ConfigError):
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number (1..65535)") from None


def _monitor_ports(text: str) -> dict[str, int | None]:
    """argparse type: the ``--monitor-ports`` JSON, checked as settings fields."""
    try:
        return parse_monitor_ports(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{exc} (in {text!r})") from None


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "controller",
        help="run the controller (KV-aware lookups and cluster operations)",
        description="Run the kvplane controller: HTTP API on --host:--port, worker sockets "
        "on --monitor-ports.",
    )
    p.add_argument("--host", help="address to bind (HTTP and worker ports; default 0.0.0.0)")
    p.add_argument("--port", type=_port, help="HTTP port (default 9000)")
    p.add_argument(
        "--monitor-ports",
        type=_monitor_ports,
        help='worker ports as JSON, e.g. \'{"pull": 9001, "reply": 9002}\' '
        '(an optional "heartbeat" port is a second reply socket); default pull 9001, reply 9002',
    )
    p.add_argument(
        "--monitor-port",
        type=_port,
        help="deprecated: the pull port alone, no reply port (use --monitor-ports)",
    )
    p.add_argument(
        "--health-check-interval", type=float, help="seconds between reaper sweeps (default 1)"
    )
    p.add_argument(
        "--lmcache-worker-timeout",
        "--worker-timeout",
        dest="worker_timeout",
        type=float,
        help="seconds without a heartbeat before a worker is reaped (default 30; workers "
        "heartbeat every 5 s by default)",
    )
    p.add_argument(
        "--command-timeout", type=float, help="deadline of each command to a worker (default 5)"
    )
    p.add_argument("--log-level", help="log level (default INFO)")
    p.add_argument("--config", help="YAML file with these settings (flags override it)")
    p.set_defaults(func=run)
    return p


def settings_from_args(args: argparse.Namespace) -> ControllerSettings:
    base = ControllerSettings.from_file(args.config) if args.config else ControllerSettings()
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
    settings = base.with_overrides(
        host=args.host,
        port=args.port,
        health_check_interval=args.health_check_interval,
        worker_timeout=args.worker_timeout,
        command_timeout=args.command_timeout,
        log_level=args.log_level,
    )
    # Replaced, not merged: "--monitor-port N" means pull N and no reply port at all.
    return dataclasses.replace(settings, **ports) if ports else settings


def run(args: argparse.Namespace) -> int:
    from kvplane.controller.http import create_app
    from kvplane.controller.service import ControllerService
    from kvplane.http_serve import run_http

    logging.basicConfig(
        level=(args.log_level or "INFO").upper(),
        format="[%(asctime)s] %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger().setLevel((args.log_level or "INFO").upper())
    try:
        settings = settings_from_args(args)
    except KvplaneError as exc:
        log.error("%s", exc)
        return 2
    logging.getLogger().setLevel(settings.log_level.upper())
    # Short GIL hand-offs: HTTP lookups get the interpreter quickly during an ingest burst.
    sys.setswitchinterval(0.0005)
    service = ControllerService(settings)
    try:
        service.start()
    except KvplaneError as exc:
        log.error("%s", exc)
        return 1
    log.info("controller HTTP API at %s:%d", settings.host, settings.port)
    app = create_app(service.cluster, settings)
    # Start-up objects (FastAPI, pydantic schemas) never die: keep them out of every
    # collection, and collect young objects less often; the index itself is untracked.
    gc.freeze()
    gc.set_threshold(20_000, 50, 50)
    try:
        run_http(app, settings.host, settings.port, log_level=settings.log_level.lower())
    finally:
        service.stop()
    return 0
