"""The router's heartbeat to its controller: every ``discovery_interval_s``, ``POST
/routers/heartbeat`` with who it is (``router_id``, its URL), its backends and the requests
it routed by reason, so that the controller's ``GET /routers`` and dashboard show it. The
controller forgets a router that misses three heartbeats."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from kvplane.router.metrics import RouterMetrics
from kvplane.router.pool import Pool
from kvplane.router.settings import RouterConfig
from kvplane.router.upstream import ControllerClient

__all__ = ["Reporter", "heartbeat_body", "identity"]

log = logging.getLogger("kvplane.router")

_WILDCARDS = ("0.0.0.0", "::", "[::]", "")


def identity(config: RouterConfig) -> tuple[str, str]:
    """(router_id, the router's URL): a wildcard ``host`` is replaced by this machine's
    name; ``router_id`` defaults to that host:port."""
    host = socket.gethostname() if config.host in _WILDCARDS else config.host
    netloc = f"[{host}]:{config.port}" if ":" in host else f"{host}:{config.port}"
    return config.router_id or netloc, f"http://{netloc}"


def heartbeat_body(
    router_id: str,
    url: str,
    interval_s: float,
    uptime_s: float,
    pool: Pool,
    requests: dict[str, int],
) -> dict[str, Any]:
    """The body of one heartbeat (the controller's ``RouterHeartbeat``)."""
    return {
        "router_id": router_id,
        "url": url,
        "interval_s": interval_s,
        "uptime_s": round(uptime_s, 3),
        "backends": [
            {
                "url": b.url,
                "instance_id": b.instance_id,
                "admitted": b.admitted,
                "in_flight": b.in_flight,
            }
            for b in sorted(pool.backends.values(), key=lambda b: b.url)
        ],
        "requests": requests,
    }


class Reporter:
    """Sends the heartbeats; logs a refused or failed one when the outcome changes (not
    every interval)."""

    def __init__(
        self,
        controller: ControllerClient,
        pool: Pool,
        metrics: RouterMetrics,
        config: RouterConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._controller = controller
        self._pool = pool
        self._metrics = metrics
        self._clock = clock
        self._started = clock()
        self.router_id, self.url = identity(config)
        self._interval = config.discovery_interval_s
        self._timeout = max(config.connect_timeout_s, 1.0)
        self._last_problem: str | None = None

    async def beat(self) -> str | None:
        """One heartbeat; None when the controller took it, else why not."""
        body = heartbeat_body(
            self.router_id,
            self.url,
            self._interval,
            self._clock() - self._started,
            self._pool,
            self._metrics.requests_by_reason(),
        )
        problem = await self._controller.heartbeat(body, self._timeout)
        if problem != self._last_problem:
            if problem is None:
                log.info("controller took heartbeat of router %s", self.router_id)
            else:
                log.warning("controller refused or missed the router's heartbeat: %s", problem)
            self._last_problem = problem
        return problem

    async def run(self) -> None:
        """Beat forever (cancel to stop)."""
        while True:
            await self.beat()
            await asyncio.sleep(self._interval)
