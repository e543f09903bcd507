"""``kvplane router`` in front of two ``kvplane serve`` instances and a controller, all real
processes: prefix routing, a burst spreading by P2P, streaming, disconnects, kill -9 of a
backend, bad input."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.router_support import CHUNK, Fleet, events, metric
from tests.support import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    f = Fleet(Path(tmp_path_factory.mktemp("router-serve")))
    try:
        f.start_controller()
        f.start_serve("inst-a")
        f.start_serve("inst-b")
        for name in ("inst-a", "inst-b"):
            f.wait_registered(name)
        f.start_router()
        wait_until(
            lambda: (
                all(b["admitted"] and b["instance_id"] for b in f.router_health()["backends"])
                and len(f.router_health()["backends"]) == 2
            ),
            timeout=60,
            what="both instances admitted by the router",
        )
        yield f
    finally:
        f.stop()


def prefix(seed: str, words: int = 60) -> str:
    """A system prompt no other test shares (~6 tokens a word with the byte tokenizer)."""
    rng = random.Random(seed)
    return " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kappa"]) for _ in range(words))


def tokens_of(fleet: Fleet, text: str) -> list[int]:
    resp = httpx.post(f"{fleet.serve['inst-a']}/tokenize", json={"prompt": text}, timeout=10)
    return list(resp.json()["tokens"])


def seed_on(fleet: Fleet, name: str, text: str) -> None:
    """Prefill ``text`` on instance ``name`` directly, then wait until the index shows it."""
    body = {"prompt": text, "max_tokens": 1}
    assert (
        httpx.post(f"{fleet.serve[name]}/v1/completions", json=body, timeout=60).status_code == 200
    )
    toks = tokens_of(fleet, text)
    wait_until(
        lambda: fleet.lookup(toks).get(name, [None, 0])[1] >= len(toks) // CHUNK * CHUNK,
        timeout=30,
        what=f"the index crediting {name} with the prompt",
    )
    fleet.wait_idle()


def post(fleet: Fleet, body: dict[str, Any], **kw: Any) -> httpx.Response:
    return httpx.post(f"{fleet.router}/v1/completions", json=body, timeout=120, **kw)


def test_instances_are_found_by_their_serving_url(fleet: Fleet) -> None:
    for name, url in fleet.serve.items():
        body = {"instance_id": name}
        infos = httpx.post(f"{fleet.controller}/query_worker_info", json=body, timeout=10).json()
        assert infos["worker_infos"][0]["serving_url"] == url
        assert fleet.backend(name)["instance_id"] == name
    models = httpx.get(f"{fleet.router}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["kvplane/tiny-llama-random"]


def test_a_prefix_only_b_holds_goes_to_b_and_hits_there(fleet: Fleet) -> None:
    system = prefix("only-b")
    seed_on(fleet, "inst-b", system)
    before = metric(fleet.router, "kvplane_router_requests_total")
    reply = post(fleet, {"prompt": system + " Question one?", "max_tokens": 2})
    assert reply.status_code == 200, reply.text
    assert reply.headers["x-kvplane-instance"] == "inst-b"
    assert reply.headers["x-kvplane-route-reason"] == "prefix"
    matched = int(reply.headers["x-kvplane-matched-tokens"])
    assert matched >= CHUNK
    # the hit the router counted on is the one B served: those tokens were loaded, not computed
    assert reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= matched - 1
    assert float(reply.headers["x-kvplane-ttft-s"]) > 0
    assert metric(fleet.router, "kvplane_router_requests_total") == before + 1
    assert metric(fleet.router, "kvplane_router_matched_tokens_total") >= matched


def test_a_burst_on_a_hot_prefix_spreads_to_a_which_fetches_it_by_p2p(fleet: Fleet) -> None:
    system = prefix("hot")
    seed_on(fleet, "inst-b", system)
    assert "inst-a" not in fleet.lookup(tokens_of(fleet, system))
    long = {"prompt": system + " Long one?", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{fleet.router}/v1/completions", json=long, timeout=120) as first:
        assert first.headers["x-kvplane-instance"] == "inst-b"
        got = events(first.iter_lines())  # kept: a dropped iterator closes the stream
        next(got)  # B is busy with it now
        wait_until(lambda: fleet.backend("inst-b")["in_flight"] == 1, what="B's request in flight")
        second = post(fleet, {"prompt": system + " Short one?", "max_tokens": 2})
    assert second.status_code == 200, second.text
    assert second.headers["x-kvplane-instance"] == "inst-a"
    assert second.headers["x-kvplane-route-reason"] == "load"
    # A never saw this prefix: what it did not compute came from B by P2P
    assert second.json()["usage"]["prompt_tokens_details"]["cached_tokens"] >= CHUNK


def test_streaming_through_the_router_arrives_event_by_event(fleet: Fleet) -> None:
    body = {"prompt": "Tell a story", "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    whole = post(fleet, body).json()["choices"][0]["text"]
    with httpx.stream(
        "POST", f"{fleet.router}/v1/completions", json={**body, "stream": True}, timeout=120
    ) as reply:
        assert reply.headers["content-type"].startswith("text/event-stream")
        backend = reply.headers["x-kvplane-backend"]
        got = events(reply.iter_lines())
        first = json.loads(next(got))
        # the client has its first token while the backend still generates the rest
        assert metric(backend, "kvplane_serve_num_requests_running") == 1
        rest = list(got)
    assert rest[-1] == "[DONE]"
    chunks = [first, *(json.loads(e) for e in rest[:-1])]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole


def test_a_client_disconnect_cancels_the_upstream_request(fleet: Fleet) -> None:
    body = {"prompt": "Never mind", "max_tokens": 500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{fleet.router}/v1/completions", json=body, timeout=120) as reply:
        backend = reply.headers["x-kvplane-backend"]
        aborts = metric(backend, "kvplane_serve_request_aborts_total")
        next(events(reply.iter_lines()))
    wait_until(
        lambda: metric(backend, "kvplane_serve_request_aborts_total") == aborts + 1,
        timeout=30,
        what="the backend aborting the request the client left",
    )
    wait_until(
        lambda: metric(fleet.router, "kvplane_router_backend_in_flight") == 0,
        what="the router's in-flight count back to 0",
    )


@pytest.mark.parametrize(
    ("content", "status", "words"),
    [
        (b'{"prompt": "x", ', 400, "not valid JSON"),
        (b'["prompt"]', 400, "JSON object"),
        (json.dumps({"model": "no/such-model", "prompt": "x"}).encode(), 404, "no/such-model"),
    ],
)
def test_bad_input_gets_openai_error_bodies(
    fleet: Fleet, content: bytes, status: int, words: str
) -> None:
    reply = httpx.post(
        f"{fleet.router}/v1/completions",
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert reply.status_code == status
    error = reply.json()["error"]
    assert words in error["message"] and error["code"] == status
    assert error["type"] == ("BadRequestError" if status == 400 else "NotFoundError")
    assert error["param"] == ("model" if status == 404 else None)


def test_kill_9_a_backend_mid_stream_then_restart_it(fleet: Fleet) -> None:
    system = prefix("killed")
    seed_on(fleet, "inst-b", system)
    long = {"prompt": system + " Go on.", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{fleet.router}/v1/completions", json=long, timeout=120) as reply:
        assert reply.headers["x-kvplane-instance"] == "inst-b"
        got = events(reply.iter_lines())
        next(got)
        fleet.kill("inst-b")
        rest = list(got)  # ends: nothing hangs
    errors = [json.loads(e)["error"] for e in rest if e.startswith('{"error"')]
    assert errors and "failed mid-stream" in errors[0]["message"] and errors[0]["code"] == 502
    # B still looks cheapest for its prefix until ejected: the connection fails, A answers
    again = post(fleet, {"prompt": system + " Again?", "max_tokens": 2})
    assert again.status_code == 200, again.text
    assert again.headers["x-kvplane-instance"] == "inst-a"
    assert again.headers["x-kvplane-route-reason"] in ("retry", "load", "prefix")
    wait_until(lambda: not fleet.backend("inst-b")["admitted"], timeout=30, what="B ejected")
    for _ in range(3):
        assert (
            post(fleet, {"prompt": system, "max_tokens": 1}).headers["x-kvplane-instance"]
            == "inst-a"
        )
    fleet.restart_serve("inst-b")
    wait_until(lambda: fleet.backend("inst-b")["admitted"], timeout=60, what="B readmitted")
