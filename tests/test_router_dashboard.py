"""``kvplane router`` on the controller's ``GET /routers`` and dashboard, all real processes
on loopback: a controller with ``--api-token`` and ``--protect-reads``, one ``kvplane serve``
instance, and routers with and without the token (``controller_token``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.router_support import Fleet
from tests.support import wait_until

pytestmark = pytest.mark.slow

TOKEN = "r0uter-dash-token"
GOOD = {"Authorization": f"Bearer {TOKEN}"}
INTERVAL_S = 0.3  # discovery_interval_s: also the heartbeat's


def router_config(fleet: Fleet, name: str, **keys: Any) -> str:
    path = fleet.tmp / f"{name}.yaml"
    path.write_text(json.dumps({"discovery_interval_s": INTERVAL_S, **keys}))
    return str(path)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(Path(tmp_path_factory.mktemp("router-dashboard")))
    f.headers = GOOD
    try:
        f.start_controller("--api-token", TOKEN, "--protect-reads")
        f.start_serve("inst-a")
        f.wait_registered("inst-a")
        config = router_config(f, "router", controller_token=TOKEN, router_id="edge-1")
        f.start_router("--config", config)
        # discovery read the protected /status: the instance is found by its serving_url
        wait_until(
            lambda: (
                [(b["instance_id"], b["admitted"]) for b in f.router_health()["backends"]]
                == [("inst-a", True)]
            ),
            timeout=60,
            what="inst-a discovered through the protected /status and admitted",
        )
        yield f
    finally:
        f.stop()


def routers(fleet: Fleet, path: str = "/routers") -> dict[str, dict[str, Any]]:
    resp = httpx.get(fleet.controller + path, headers=GOOD, timeout=10)
    assert resp.status_code == 200, resp.text
    return {r["router_id"]: r for r in resp.json()["routers"]}


def complete(router: str, prompt: str) -> httpx.Response:
    body = {"prompt": prompt, "max_tokens": 1}
    resp = httpx.post(f"{router}/v1/completions", json=body, timeout=120)
    assert resp.status_code == 200, resp.text
    return resp


def test_the_router_reports_its_backends_and_requests_to_get_routers_and_the_dashboard(
    fleet: Fleet,
) -> None:
    wait_until(lambda: "edge-1" in routers(fleet), timeout=15, what="edge-1 in GET /routers")
    r = routers(fleet)["edge-1"]
    assert r["url"] == fleet.router and r["interval_s"] == INTERVAL_S
    assert r["backends"] == [
        {"url": fleet.serve["inst-a"], "instance_id": "inst-a", "admitted": True, "in_flight": 0}
    ]
    lookups_before = routers_lookups(fleet)
    resp = complete(fleet.router, "alpha beta gamma " * 30)
    # the /lookup with the token was answered: routed on the index's answer, not by fallback
    assert resp.headers["x-kvplane-route-reason"] in ("prefix", "load")
    assert routers_lookups(fleet) > lookups_before
    reason = resp.headers["x-kvplane-route-reason"]
    wait_until(
        lambda: routers(fleet)["edge-1"]["requests"].get(reason, 0) >= 1,
        timeout=15,
        what=f"edge-1's heartbeat counting the {reason} request",
    )
    seen = routers(fleet, "/dashboard/data")["edge-1"]
    assert seen["backends"][0]["instance_id"] == "inst-a"
    assert seen["requests_total"] >= 1 and seen["heartbeats"] >= 2


def routers_lookups(fleet: Fleet) -> int:
    resp = httpx.get(fleet.controller + "/dashboard/data", headers=GOOD, timeout=10)
    return int(resp.json()["lookups"]["lookups"])


def test_without_the_token_heartbeats_and_lookups_are_refused(fleet: Fleet) -> None:
    for headers, status in (({}, 401), ({"Authorization": "Bearer wrong"}, 403)):
        for method, path in (("GET", "/routers"), ("POST", "/routers/heartbeat")):
            resp = httpx.request(method, fleet.controller + path, headers=headers, timeout=10)
            assert resp.status_code == status, (method, path, resp.text)
            assert set(resp.json()) == {"error", "message"}
    config = router_config(fleet, "router-nt", router_id="edge-no-token")
    url = fleet.start_router(
        "--config", config, "--backend", fleet.serve["inst-a"], name="router-nt"
    )
    resp = complete(url, "delta kappa " * 30)
    assert resp.headers["x-kvplane-route-reason"] == "fallback"  # its /lookup was refused
    wait_until(
        lambda: (
            f"controller {fleet.controller} failed: /lookup answered 401" in fleet.log("router-nt")
            and f"the router's heartbeat: {fleet.controller}: 401" in fleet.log("router-nt")
        ),
        timeout=15,
        what="the router logging the refused lookup and heartbeat",
    )
    # a token-holding router's heartbeats keep landing meanwhile; this one's never do
    assert "edge-1" in routers(fleet) and "edge-no-token" not in routers(fleet)
    fleet.stop_child("router-nt")


def test_a_stopped_router_is_forgotten_after_missed_heartbeats(fleet: Fleet) -> None:
    wait_until(lambda: "edge-1" in routers(fleet), timeout=15, what="edge-1 listed")
    fleet.stop_child("router")
    # forgotten 3 intervals (0.9 s) after its last heartbeat; the bound is generous
    wait_until(
        lambda: "edge-1" not in routers(fleet), timeout=10, what="edge-1 dropped from /routers"
    )
    assert routers(fleet, "/dashboard/data") == {}
