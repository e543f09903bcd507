"""The router's controller client over real loopback sockets: a controller that refuses
the connection is passed over within the same lookup, one that hangs costs the lookup
that waits out its deadline and then is passed over, and the client stays with the one
that answers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator, Iterator

import httpx

from kvplane.router.metrics import RouterMetrics
from kvplane.router.pool import Pool
from kvplane.router.upstream import ControllerClient, Hits
from tests.support import free_port, read_request

LAYOUT = {"layout_info": {"inst-b": ["LocalCPUBackend", 64]}}


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A controller's /lookup, as few bytes as HTTP/1.1 allows; counts each request."""
    try:
        while True:
            await read_request(reader)
            body = json.dumps(LAYOUT).encode()
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


@contextlib.asynccontextmanager
async def answering() -> AsyncIterator[str]:
    server = await asyncio.start_server(_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def hanging() -> Iterator[str]:
    """A socket that listens (connections complete in the backlog) and never reads."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield f"http://127.0.0.1:{s.getsockname()[1]}"


def _client(urls: list[str], http: httpx.AsyncClient) -> tuple[ControllerClient, RouterMetrics]:
    metrics = RouterMetrics(lambda: Pool(3))
    return ControllerClient(urls, http, metrics), metrics


def _failovers(metrics: RouterMetrics, url: str) -> float:
    value = metrics.registry.get_sample_value(
        "kvplane_router_controller_failovers_total", {"controller": url}
    )
    return value or 0.0


def test_a_refused_controller_is_passed_over_within_the_same_lookup() -> None:
    refused = f"http://127.0.0.1:{free_port()}"

    async def scenario() -> None:
        async with answering() as good, httpx.AsyncClient() as http:
            client, metrics = _client([refused, good], http)
            assert client.current == refused
            hits = await client.lookup([1, 2, 3], timeout=2.0)
            assert hits == Hits({"inst-b": ("LocalCPUBackend", 64)})
            assert client.current == good
            assert _failovers(metrics, refused) == 1
            assert await client.lookup([1, 2, 3], timeout=2.0) == hits
            assert _failovers(metrics, refused) == 1  # not asked again
            client.close()

    asyncio.run(scenario())


def test_a_hung_controller_costs_one_lookup_then_the_next_answers() -> None:
    async def scenario(hung: str) -> None:
        async with answering() as good, httpx.AsyncClient() as http:
            client, metrics = _client([hung, good], http)
            assert await client.lookup([1, 2, 3], timeout=0.3) is None  # the deadline spent
            assert client.current == good
            assert await client.lookup([1, 2, 3], timeout=0.3) is not None
            assert _failovers(metrics, hung) == 1
            client.close()

    with hanging() as hung:
        asyncio.run(scenario(hung))


def test_with_every_controller_gone_lookup_and_status_are_none() -> None:
    urls = [f"http://127.0.0.1:{free_port()}" for _ in range(2)]

    async def scenario() -> None:
        async with httpx.AsyncClient() as http:
            client, metrics = _client(urls, http)
            assert await client.lookup([1], timeout=1.0) is None
            assert await client.serving_urls(timeout=1.0) is None
            assert _failovers(metrics, urls[0]) == 2 and _failovers(metrics, urls[1]) == 2
            client.close()

    asyncio.run(scenario())
