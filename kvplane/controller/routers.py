"""The routers that report to this controller (``kvplane router``'s heartbeat,
``POST /routers/heartbeat``): what each said last, kept until it has missed
:data:`MISSED_HEARTBEATS` heartbeats in a row.

Pure: no sockets, threads or clock; each call takes ``now``, the controller's clock. The
HTTP side calls it from the event loop only, so it takes no lock.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from kvplane.errors import Conflict

__all__ = ["MISSED_HEARTBEATS", "RouterBackend", "RouterEntry", "RouterReport", "RouterTable"]

#: Heartbeats in a row a router may miss before it is forgotten.
MISSED_HEARTBEATS = 3


class RouterBackend(NamedTuple):
    """One of a router's backends, as the router sees it."""

    url: str
    instance_id: str | None
    admitted: bool
    in_flight: int


class RouterReport(NamedTuple):
    """One heartbeat: who the router is and what it routes to."""

    router_id: str
    url: str
    interval_s: float  # between its heartbeats
    uptime_s: float
    backends: tuple[RouterBackend, ...]
    requests: Mapping[str, int]  # requests routed since it started, by decision reason


class RouterEntry(NamedTuple):
    report: RouterReport
    first_seen: float  # when this controller first heard of it (since it last forgot it)
    last_seen: float
    heartbeats: int

    @property
    def forget_after_s(self) -> float:
        return MISSED_HEARTBEATS * self.report.interval_s

    def expired(self, now: float) -> bool:
        return now - self.last_seen > self.forget_after_s


class RouterTable:
    """Routers by id. A heartbeat replaces the router's report; a router silent for more
    than :data:`MISSED_HEARTBEATS` of its own intervals is dropped on the next call."""

    def __init__(self, capacity: int = 256) -> None:
        self.capacity = capacity
        self._entries: dict[str, RouterEntry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def heartbeat(self, report: RouterReport, now: float) -> RouterEntry:
        """Record ``report`` at ``now``. Raises Conflict for a new router while
        ``capacity`` routers are live."""
        self.forget_expired(now)
        old = self._entries.get(report.router_id)
        if old is None and len(self._entries) >= self.capacity:
            raise Conflict(
                f"this controller already tracks {self.capacity} routers; "
                f"router {report.router_id!r} is not recorded"
            )
        entry = RouterEntry(
            report,
            first_seen=now if old is None else old.first_seen,
            last_seen=now,
            heartbeats=1 if old is None else old.heartbeats + 1,
        )
        self._entries[report.router_id] = entry
        return entry

    def forget_expired(self, now: float) -> list[str]:
        """Drop the routers that missed their heartbeats; their ids, sorted."""
        gone = sorted(i for i, e in self._entries.items() if e.expired(now))
        for router_id in gone:
            del self._entries[router_id]
        return gone

    def routers(self, now: float) -> list[RouterEntry]:
        """The live routers at ``now``, by id."""
        self.forget_expired(now)
        return [self._entries[i] for i in sorted(self._entries)]
