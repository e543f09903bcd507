"""``kvplane router`` (a real process, no controller) relaying to two scripted backends on
loopback: a 503 before any byte goes to the other backend, the headers passed and dropped
both ways, a stream broken mid-way ends in a 502 error event, a stream relayed event by
event, and the in-flight count back at 0 after each."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvplane.children import free_ports, kvplane_args, start_child
from tests.support import REPO_ROOT, read_request, wait_until

MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()


def _whole(status: int, body: bytes, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    return head % (status, len(body)) + extra + b"\r\n" + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class Backend:
    """A scripted OpenAI backend: ``POST /v1/completions`` does what its prompt says
    (``refuse``: 503 from the first backend; ``headers``: the request's head back as JSON;
    ``stream``: three events, the next sent only once ``go`` is set; ``break``: one event,
    then the connection closes)."""

    def __init__(self, name: str, refuses: bool) -> None:
        self.name, self.refuses = name, refuses
        self.completions = 0
        self.go = threading.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head, body = await read_request(reader)
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = [line.split(":", 1) for line in lines[1:] if line]
                if not await self._answer(path, headers, body, writer):
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _answer(
        self, path: str, headers: list[list[str]], body: bytes, writer: asyncio.StreamWriter
    ) -> bool:
        if path != "/v1/completions":
            writer.write(_whole(200, MODELS if path == "/v1/models" else b"{}"))
            await writer.drain()
            return True
        self.completions += 1
        prompt = json.loads(body)["prompt"]
        if prompt == "refuse" and self.refuses:
            writer.write(_whole(503, b'{"error": "busy"}'))
        elif prompt == "headers":
            seen = json.dumps([[k.strip().lower(), v.strip()] for k, v in headers]).encode()
            writer.write(_whole(200, seen, b"x-request-id: r-7\r\nx-other: dropped\r\n"))
        elif prompt in ("stream", "break"):
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n")
            writer.write(b"transfer-encoding: chunked\r\n\r\n" + _chunk(b"data: 1\n\n"))
            await writer.drain()
            if prompt == "break":
                return False
            while not self.go.is_set():
                await asyncio.sleep(0.01)
            writer.write(_chunk(b"data: 2\n\n") + _chunk(b"data: [DONE]\n\n") + _chunk(b""))
        else:
            writer.write(_whole(200, json.dumps({"backend": self.name}).encode()))
        await writer.drain()
        return True


class Fleet:
    """Two backends in a thread's event loop: ``first`` (the lower URL, so the first
    choice of a ranking by load alone) refuses, ``second`` does not."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        started = []
        for _ in range(2):
            backend = Backend("", refuses=False)
            server = asyncio.run_coroutine_threadsafe(
                asyncio.start_server(backend.serve, "127.0.0.1", 0), self.loop
            ).result(10)
            started.append((f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}", backend))
        started.sort(key=lambda pair: pair[0])
        self.urls: dict[str, str] = {}
        self.backends: dict[str, Backend] = {}
        for (url, backend), name in zip(started, ("first", "second"), strict=True):
            backend.name, backend.refuses = name, name == "first"
            self.urls[name], self.backends[name] = url, backend

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


@pytest.fixture(scope="module")
def router(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Fleet]]:
    fleet = Fleet()
    port = free_ports(1)[0]
    args = ["router", "--host", "127.0.0.1", "--port", str(port)]
    for name, url in fleet.urls.items():
        args += ["--backend", f"{name}={url}"]
    log = Path(tmp_path_factory.mktemp("router-relay")) / "router.log"
    child = start_child("router", kvplane_args(args), log, cwd=REPO_ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        child.wait_healthy(f"{url}/health", timeout=60)
        yield url, fleet
    finally:
        child.stop()
        fleet.stop()


def _in_flight(url: str) -> int:
    backends = httpx.get(f"{url}/health", timeout=10).json()["backends"]
    return sum(int(b["in_flight"]) for b in backends)


def _post(url: str, prompt: str, **kw: Any) -> httpx.Response:
    body = {"model": "m", "prompt": prompt}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30, **kw)


def test_a_503_before_any_byte_goes_to_the_next_backend(router: tuple[str, Fleet]) -> None:
    url, fleet = router
    before = fleet.backends["first"].completions
    reply = _post(url, "refuse")
    assert reply.status_code == 200, reply.text
    assert reply.json() == {"backend": "second"}
    assert reply.headers["x-kvplane-instance"] == "second"
    assert reply.headers["x-kvplane-route-reason"] == "retry"
    assert fleet.backends["first"].completions == before + 1
    assert _in_flight(url) == 0


def test_headers_passed_and_dropped_both_ways(router: tuple[str, Fleet]) -> None:
    url, _ = router
    sent = {
        "x-request-id": "r-7",
        "authorization": "Bearer k",
        "accept-encoding": "gzip",
        "te": "trailers",
        "keep-alive": "timeout=5",
    }
    content = json.dumps({"model": "m", "prompt": "headers"}).encode()
    sent["content-type"] = "application/json"
    reply = httpx.post(f"{url}/v1/completions", content=content, headers=sent, timeout=30)
    assert reply.status_code == 200, reply.text
    seen = dict(tuple(pair) for pair in reply.json())
    assert seen["x-request-id"] == "r-7" and seen["authorization"] == "Bearer k"
    assert seen["content-type"] == "application/json"
    assert seen["host"] == router[1].urls["first"].removeprefix("http://")
    assert int(seen["content-length"]) == len(content)
    for dropped in ("accept-encoding", "te", "keep-alive"):
        assert dropped not in seen
    assert reply.headers["x-request-id"] == "r-7"
    assert "x-other" not in reply.headers
    assert reply.headers["x-kvplane-backend"] == router[1].urls["first"]
    assert reply.headers["x-kvplane-matched-tokens"] == "0"


def test_a_stream_is_relayed_event_by_event(router: tuple[str, Fleet]) -> None:
    url, fleet = router
    body = {"model": "m", "prompt": "stream", "stream": True}
    for backend in fleet.backends.values():
        backend.go.clear()
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
        assert reply.headers["content-type"] == "text/event-stream"
        lines = reply.iter_lines()
        assert next(lines) == "data: 1"  # before the backend has sent the rest
        assert _in_flight(url) == 1
        for backend in fleet.backends.values():
            backend.go.set()
        rest = [line for line in lines if line]
    assert rest == ["data: 2", "data: [DONE]"]
    wait_until(lambda: _in_flight(url) == 0, timeout=10, what="in flight back to 0")


def test_a_stream_broken_mid_way_ends_in_a_502_error_event(router: tuple[str, Fleet]) -> None:
    url, _ = router
    body = {"model": "m", "prompt": "break", "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=30) as reply:
        assert reply.status_code == 200
        events = [line.removeprefix("data: ") for line in reply.iter_lines() if line]
    assert events[0] == "1"
    error = json.loads(events[1])["error"]
    assert error["code"] == 502 and "failed mid-stream" in error["message"]
    wait_until(lambda: _in_flight(url) == 0, timeout=10, what="in flight back to 0")
    assert _post(url, "plain").status_code == 200  # the broken connection was not kept
