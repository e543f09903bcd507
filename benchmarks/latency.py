"""What a router adds to each request: an open-loop client (asyncio, keep-alive, its own
HTTP/1.1 framing from :mod:`benchmarks.fake_openai`) sends completions at a fixed rate to a
URL and times each one from the first byte sent to the last byte of the answer. Run once
straight at the instant fake backend and once through each router in front of it; the
router's added latency is the difference of the two distributions' percentiles.

Requests alternate between streamed and not; each carries a prompt of the
workload's shape (a long shared prefix and a short question), as text, so a router that hashes or
looks the prompt up pays for it here.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from benchmarks.fake_openai import read_body, read_head

__all__ = ["LatencyRun", "measure_latency"]

#: A request not answered within this many seconds counts as failed (a saturated router).
TIMEOUT_S = 30.0


@dataclass(frozen=True)
class LatencyRun:
    """Seconds per request (sorted), how many failed, and how late the client itself sent
    (the largest lag behind the schedule: a busy client inflates every number)."""

    seconds: tuple[float, ...]
    failures: int
    max_send_lag: float


Prompt = str | Sequence[int]


def _body(prompt: Prompt, stream: bool, model: str) -> bytes:
    text = prompt if isinstance(prompt, str) else list(prompt)
    request = {"model": model, "prompt": text, "max_tokens": 4, "stream": stream}
    return json.dumps(request).encode()


async def _one(
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]],
    host: str,
    port: int,
    payload: bytes,
) -> float:
    while pool:  # the server closes a connection idle too long (uvicorn: after 5 s)
        reader, writer = pool.pop()
        if not reader.at_eof() and not writer.is_closing():
            break
        writer.close()
    else:
        reader, writer = await asyncio.open_connection(host, port)
    start = time.perf_counter()
    writer.write(payload)
    await writer.drain()
    head = await read_head(reader)
    if head is None:
        writer.close()
        raise ConnectionError("closed before answering")
    await read_body(reader, head)
    took = time.perf_counter() - start
    if head.status != 200:
        writer.close()
        raise ConnectionError(f"status {head.status}")
    if head.headers.get("connection", "").lower() == "close":
        writer.close()
    else:
        pool.append((reader, writer))
    return took


async def _run(
    url: str, prompts: Sequence[Prompt], rate: float, model: str, connections: int
) -> LatencyRun:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    pool: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    for _ in range(connections):
        pool.append(await asyncio.open_connection(host, port))
    payloads = []
    for i, prompt in enumerate(prompts):
        body = _body(prompt, i % 2 == 1, model)
        head = (
            f"POST /v1/completions HTTP/1.1\r\nhost: {host}:{port}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
        )
        payloads.append(head.encode() + body)
    loop = asyncio.get_running_loop()
    origin = loop.time()
    lag = 0.0
    tasks = []
    for i, payload in enumerate(payloads):
        due = origin + i / rate
        await asyncio.sleep(max(0.0, due - loop.time()))
        lag = max(lag, loop.time() - due)
        one = asyncio.wait_for(_one(pool, host, port, payload), TIMEOUT_S)
        tasks.append(asyncio.ensure_future(one))
    done = await asyncio.gather(*tasks, return_exceptions=True)
    for _, writer in pool:
        writer.close()
    seconds = sorted(t for t in done if isinstance(t, float))
    return LatencyRun(tuple(seconds), len(done) - len(seconds), lag)


def measure_latency(
    url: str,
    prompts: Sequence[Prompt],
    rate: float,
    *,
    model: str = "fake",
    connections: int = 16,
) -> LatencyRun:
    """Send one completion per prompt of ``prompts`` (text or token ids) to ``url`` at ``rate`` per second
    (evenly spaced, open loop), with ``connections`` keep-alive connections opened first
    (more are opened while all are busy)."""
    run = _run(url, prompts, rate, model, connections)
    try:
        import uvloop
    except ImportError:
        return asyncio.run(run)
    return uvloop.run(run)
