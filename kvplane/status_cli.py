"""``kvplane status``: one screen of the cluster from the controller's ``GET /status``.

:func:`render` is pure (a :class:`ClusterStatus` in, text out); the command only fetches
(stdlib ``urllib``: the controller's install has no HTTP client), prints and, with
``--watch``, repeats.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import TYPE_CHECKING

from kvplane.controller.overview import is_late
from kvplane.errors import BadRequest, Unavailable
from kvplane.text_table import format_table

if TYPE_CHECKING:
    from kvplane.controller.status_api import ClusterStatus

__all__ = ["add_parser", "check_url", "fetch_status", "render"]

DEFAULT_CONTROLLER = "http://127.0.0.1:9000"


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "status",
        help="show the cluster's instances, workers, tiers and chunk counts",
        description="One screen of the cluster from the controller's GET /status.",
    )
    p.add_argument(
        "--controller",
        default=DEFAULT_CONTROLLER,
        metavar="URL",
        help=f"the controller's HTTP address (default {DEFAULT_CONTROLLER})",
    )
    p.add_argument("--json", action="store_true", help="print the controller's JSON answer")
    p.add_argument(
        "--watch",
        nargs="?",
        type=float,
        const=2.0,
        default=None,
        metavar="SECONDS",
        help="refresh every SECONDS (default 2) until Ctrl-C",
    )
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per request (default 5)")
    p.add_argument(
        "--api-token",
        default=None,
        help="the controller's bearer token, needed when it runs with --protect-reads "
        "(default: $KVPLANE_CONTROLLER_TOKEN)",
    )
    p.set_defaults(func=run)


def fetch_status(controller: str, timeout: float, token: str | None = None) -> ClusterStatus:
    """GET /status (with ``Authorization: Bearer <token>`` when a token is given);
    Unavailable (one line, naming the address) when it cannot be had."""
    # imported here: every `kvplane` command builds this module's parser at start-up
    from pydantic import ValidationError

    from kvplane.controller.status_api import ClusterStatus

    check_url(controller)
    url = controller.rstrip("/") + "/status"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(
            urllib.request.Request(url, headers=headers), timeout=timeout
        ) as resp:
            body = resp.read()
    except urllib.error.HTTPError as exc:
        hint = (
            " (it guards reads: pass --api-token or set $KVPLANE_CONTROLLER_TOKEN)"
            if exc.code in (401, 403)
            else ""
        )
        raise Unavailable(
            f"the controller at {controller} answered {exc.code} to GET /status{hint}"
        ) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unavailable(f"cannot reach the controller at {controller}: {reason}") from None
    try:
        return ClusterStatus.model_validate_json(body)
    except ValidationError:
        raise Unavailable(f"{url} did not answer a kvplane status (is it a controller?)") from None


def check_url(controller: str) -> None:
    """BadRequest naming ``--controller`` unless it is an http(s) URL with a host and a
    valid port (urllib would raise a bare ValueError later)."""
    problem = f"--controller must be an http:// or https:// URL with a host, not {controller!r}"
    try:
        parts = urllib.parse.urlsplit(controller)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise BadRequest(f"{problem}: {exc}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise BadRequest(problem)


def _age(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.0f}m"


def render(status: ClusterStatus, controller: str) -> str:
    """The screen: a header line, one row per worker with its chunks per tier, totals."""
    t = status.totals
    when = time.strftime("%H:%M:%S", time.localtime(status.time))
    header = (
        f"kvplane cluster at {controller} ({when}): {t.instances} instance(s), "
        f"{t.workers} worker(s), {t.chunks} chunk(s)"
    )
    if status.log is not None:  # a replica: where it stands in the event log
        g = status.log
        role = "lease holder" if g.leader else f"lease holder {g.leader_id or 'none'}"
        header += (
            f"\n    replica {g.replica_id} ({role}): log applied {g.applied_seq} of "
            f"{g.stream_seq}, lag {g.lag}{', STALE' if g.stale else ''}"
        )
    if not status.instances:
        return header + "\n    no workers registered\n"
    tiers = sorted({tier for i in status.instances for w in i.workers for tier in w.chunks})
    headers = ["instance", "worker", "address", "heartbeat", "up", *tiers, "chunks"]
    rows: list[list[object]] = []
    for inst in status.instances:
        for w in inst.workers:
            late = " LATE" if is_late(w.heartbeat_age_s, status.worker_timeout_s) else ""
            rows.append(
                [
                    inst.instance_id,
                    w.worker_id,
                    w.address,
                    _age(w.heartbeat_age_s) + late,
                    _age(max(0.0, status.time - w.registration_time)),
                    *(w.chunks.get(tier, 0) for tier in tiers),
                    sum(w.chunks.values()),
                ]
            )
    rows.append(
        ["total", t.workers, "", "", "", *(t.chunks_by_tier.get(x, 0) for x in tiers), t.chunks]
    )
    return f"{header}\n{format_table(headers, rows)}\n"


def run(args: argparse.Namespace) -> int:
    if args.watch is not None and not args.watch > 0:
        raise BadRequest("--watch must be a positive number of seconds")
    if not 0 < args.timeout < 3600:
        raise BadRequest("--timeout must be a number of seconds in (0, 3600)")
    from kvplane.controller.settings import TOKEN_ENV

    token = args.api_token or os.environ.get(TOKEN_ENV) or None
    if args.watch is None:
        status = fetch_status(args.controller, args.timeout, token)
        print(status.model_dump_json(indent=2) if args.json else render(status, args.controller))
        return 0
    tty = sys.stdout.isatty()
    try:
        while True:
            try:
                status = fetch_status(args.controller, args.timeout, token)
                text = status.model_dump_json() if args.json else render(status, args.controller)
            except Unavailable as exc:
                text = f"kvplane status: {exc} (retrying every {args.watch:g}s)"
            sys.stdout.write(("\033[H\033[2J" if tty else "") + text.rstrip("\n") + "\n")
            if not tty and not args.json:
                sys.stdout.write("\n")
            sys.stdout.flush()
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
