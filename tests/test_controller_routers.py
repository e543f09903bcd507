"""The controller's table of routers (pure, on explicit times) and its routes over the ASGI
app on a fake clock: ``POST /routers/heartbeat``, ``GET /routers``, the dashboard's
``routers``, bad bodies, the token. The real router reporting to a real controller:
tests/test_router_dashboard.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.controller.cluster import Cluster
from kvplane.controller.core import ControllerCore
from kvplane.controller.executor import Executor
from kvplane.controller.http import create_app
from kvplane.controller.routers import MISSED_HEARTBEATS, RouterReport, RouterTable
from kvplane.controller.settings import ControllerConfig
from kvplane.errors import Conflict
from kvplane.protocol import CommandReply


def report(router_id: str, interval_s: float = 2.0, uptime_s: float = 0.0) -> RouterReport:
    return RouterReport(router_id, f"http://{router_id}", interval_s, uptime_s, (), {})


# --- the table -------------------------------------------------------------------------------


def test_a_router_is_kept_for_three_intervals_of_silence_then_forgotten() -> None:
    table = RouterTable()
    table.heartbeat(report("r1", interval_s=2.0), now=100.0)
    table.heartbeat(report("r2", interval_s=0.5), now=100.0)
    assert [e.report.router_id for e in table.routers(101.5)] == ["r1", "r2"]
    assert [e.report.router_id for e in table.routers(101.6)] == ["r1"]  # r2: 3 x 0.5 passed
    assert [e.report.router_id for e in table.routers(106.0)] == ["r1"]  # exactly 3 x 2.0
    assert table.forget_expired(106.1) == ["r1"]
    assert table.routers(106.1) == [] and len(table) == 0


def test_a_heartbeat_replaces_the_report_and_counts() -> None:
    table = RouterTable()
    table.heartbeat(report("r1", uptime_s=1.0), now=10.0)
    entry = table.heartbeat(report("r1", uptime_s=3.0), now=12.0)
    assert (entry.first_seen, entry.last_seen, entry.heartbeats) == (10.0, 12.0, 2)
    assert entry.report.uptime_s == 3.0 and len(table) == 1
    # forgotten, then back: a new entry
    again = table.heartbeat(report("r1"), now=100.0)
    assert (again.first_seen, again.heartbeats) == (100.0, 1)


def test_a_full_table_refuses_new_routers_but_not_known_ones() -> None:
    table = RouterTable(capacity=2)
    table.heartbeat(report("a"), now=0.0)
    table.heartbeat(report("b"), now=0.0)
    with pytest.raises(Conflict, match="2 routers"):
        table.heartbeat(report("c"), now=1.0)
    assert table.heartbeat(report("a"), now=1.0).heartbeats == 2
    # once "b" is forgotten there is room again
    table.heartbeat(report("a"), now=6.5)
    assert table.heartbeat(report("c"), now=6.5).heartbeats == 1
    assert [e.report.router_id for e in table.routers(6.5)] == ["a", "c"]


beats = st.lists(
    st.tuples(
        st.sampled_from(["r1", "r2", "r3"]),
        st.floats(0.0, 5.0),  # seconds since the previous event
        st.sampled_from([0.1, 0.5, 2.0]),  # the interval the router says
    ),
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(beats, st.floats(0.0, 10.0))
def test_listed_exactly_the_routers_heard_within_three_of_their_intervals(events, tail) -> None:
    table = RouterTable()
    now = 0.0
    last: dict[str, tuple[float, float]] = {}  # id -> (time, interval), the model
    for router_id, gap, interval in events:
        now += gap
        # what the model says is forgotten by now is forgotten before this heartbeat
        last = {i: (t, iv) for i, (t, iv) in last.items() if now - t <= MISSED_HEARTBEATS * iv}
        table.heartbeat(report(router_id, interval), now)
        last[router_id] = (now, interval)
    now += tail
    expected = sorted(i for i, (t, iv) in last.items() if now - t <= MISSED_HEARTBEATS * iv)
    listed = table.routers(now)
    assert [e.report.router_id for e in listed] == expected
    for e in listed:
        assert e.last_seen == last[e.report.router_id][0]


# --- the routes ------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


HEARTBEAT = {
    "router_id": "edge-1",
    "url": "http://10.0.0.5:8080",
    "interval_s": 2.0,
    "uptime_s": 42.5,
    "backends": [
        {"url": "http://10.0.0.7:8000", "instance_id": "inst-a", "admitted": True, "in_flight": 2},
        {"url": "http://10.0.0.8:8000", "instance_id": None, "admitted": False, "in_flight": 0},
    ],
    "requests": {"prefix": 5, "load": 2, "fallback": 0},
}


@pytest.fixture
def app_and_clock(request: pytest.FixtureRequest) -> Iterator[tuple[TestClient, FakeClock]]:
    clock = FakeClock(5_000.0)
    cluster = Cluster(
        ControllerCore(worker_timeout_s=10.0),
        Executor(lambda w, c, t: CommandReply(), 1.0),
        clock=clock,
    )
    config = getattr(request, "param", ControllerConfig())
    try:
        with TestClient(create_app(cluster, config)) as client:
            yield client, clock
    finally:
        cluster.executor.close()


def test_a_heartbeat_shows_in_get_routers_and_the_dashboard_until_it_goes_silent(
    app_and_clock,
) -> None:
    client, clock = app_and_clock
    assert client.get("/routers").json() == {"routers": []}
    resp = client.post("/routers/heartbeat", json=HEARTBEAT)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"router_id": "edge-1", "forget_after_s": 6.0, "routers": 1}
    clock.now += 1.5
    (view,) = client.get("/routers").json()["routers"]
    assert view["backends"] == HEARTBEAT["backends"]
    assert (view["requests_total"], view["heartbeat_age_s"], view["heartbeats"]) == (7, 1.5, 1)
    assert (view["url"], view["uptime_s"], view["first_seen"]) == (
        "http://10.0.0.5:8080",
        42.5,
        5_000.0,
    )
    data = client.get("/dashboard/data").json()
    assert [r["router_id"] for r in data["routers"]] == ["edge-1"]
    assert data["routers"][0] == view
    clock.now += 4.6  # 6.1 s after the heartbeat: three intervals missed
    assert client.get("/routers").json() == {"routers": []}
    assert client.get("/dashboard/data").json()["routers"] == []


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"router_id": ""}, "router_id"),
        ({"interval_s": 0.001}, "interval_s"),
        ({"interval_s": 1e9}, "interval_s"),
        ({"uptime_s": -1}, "uptime_s"),
        ({"uptime_s": "1.5"}, "uptime_s"),
        ({"interval_s": True}, "interval_s"),
        ({"backends": [{"url": "http://x", "admitted": True, "in_flight": False}]}, "in_flight"),
        ({"requests": {"prefix": "3"}}, "requests"),
        ({"backends": [{"url": "http://x", "admitted": "yes", "in_flight": 0}]}, "admitted"),
        ({"backends": [{"url": "http://x", "admitted": True, "in_flight": -1}]}, "in_flight"),
        ({"requests": {"prefix": -3}}, "requests"),
        ({"url": None}, "url"),
    ],
)
def test_a_bad_heartbeat_is_a_400_naming_the_field(app_and_clock, change, field) -> None:
    client, _ = app_and_clock
    resp = client.post("/routers/heartbeat", json={**HEARTBEAT, **change})
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert body["error"] == "Invalid parameters" and field in body["message"]
    assert client.get("/routers").json() == {"routers": []}


def test_a_heartbeat_that_is_not_json_is_a_400(app_and_clock) -> None:
    client, _ = app_and_clock
    resp = client.post(
        "/routers/heartbeat", content=b"{nope", headers={"content-type": "application/json"}
    )
    assert resp.status_code == 400 and resp.json()["error"] == "Invalid parameters"


@pytest.mark.parametrize("app_and_clock", [ControllerConfig(api_token="t0k")], indirect=True)
def test_with_a_token_the_heartbeat_needs_it_and_get_routers_stays_a_read(app_and_clock) -> None:
    client, _ = app_and_clock
    missing = client.post("/routers/heartbeat", json=HEARTBEAT)
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    assert set(missing.json()) == {"error", "message"}
    wrong = client.post(
        "/routers/heartbeat", json=HEARTBEAT, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status_code == 403 and "message" in wrong.json()
    assert client.get("/routers").json() == {"routers": []}
    ok = client.post("/routers/heartbeat", json=HEARTBEAT, headers={"Authorization": "Bearer t0k"})
    assert ok.status_code == 200
    assert [r["router_id"] for r in client.get("/routers").json()["routers"]] == ["edge-1"]
    schema = client.get("/openapi.json").json()
    assert "security" in schema["paths"]["/routers/heartbeat"]["post"]
    assert "security" not in schema["paths"]["/routers"]["get"]
