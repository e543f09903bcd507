"""``kvplane router [--host H] [--port P] --controller URL [--controller URL ...]
[--backend [INSTANCE_ID=]URL ...]``: one OpenAI endpoint in front of vLLM (with kvplane's
connector) and ``kvplane serve`` instances; each request goes to the instance where it costs
least. Several ``--controller`` URLs are replicas of one index (docs/ha.md)."""

from __future__ import annotations

import argparse
import logging

from kvplane.errors import ConfigError
from kvplane.router.settings import RouterConfig, router_keys
from kvplane.settings_table import add_flags, flag_values, help_lines

__all__ = ["add_parser", "config_from_args", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "router",
        help="OpenAI front door routing each request to the instance holding its KV",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (YAML via --config):\n  " + "\n  ".join(help_lines(router_keys())),
    )
    add_flags(p, router_keys())
    p.add_argument(
        "--controller",
        action="append",
        default=[],
        metavar="URL",
        help="a controller's HTTP URL (http://host:9000); repeat (or comma-separate) for "
        "replicas of one index (kvplane controller --nats): the router fails over between "
        "them (config key controller)",
    )
    p.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="[INSTANCE_ID=]URL",
        help="a backend's OpenAI URL, with its kvplane instance id (a bare URL is matched to "
        "the instance whose serving_url it is); repeat for more. Instances the controller "
        "lists with a serving_url are added too (config key discover)",
    )
    p.add_argument("--config", default=None, help="router YAML (the keys below)")
    p.set_defaults(func=run)


def config_from_args(args: argparse.Namespace) -> RouterConfig:
    """File, then flags; ``--backend`` adds to the file's ``backends``, ``--controller``
    replaces its ``controller``. Raises ConfigError."""
    base = RouterConfig.from_file(args.config) if args.config else RouterConfig()
    values = {**base.to_dict(), **flag_values(args, router_keys())}
    values["backends"] = (*base.backends, *args.backend)
    if args.controller:
        values["controller"] = ",".join(args.controller)
    config = RouterConfig(**values)
    if not config.controller and not config.backends:
        raise ConfigError("kvplane router needs --controller URL (and/or --backend URL)")
    return config


def run(args: argparse.Namespace) -> int:
    from kvplane.http_serve import run_http
    from kvplane.router.app import create_app

    config = config_from_args(args)
    logging.getLogger("kvplane").setLevel(config.log_level)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per check otherwise
    logging.getLogger("kvplane.router").info(
        "kvplane router on http://%s:%d, controller %s, backends %s",
        config.host,
        config.port,
        ", ".join(config.controller) or None,
        list(config.backends) or "from the controller",
    )
    run_http(create_app(config), config.host, config.port)
    return 0
