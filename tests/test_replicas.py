"""Controller replicas on NATS JetStream (docs/ha.md), real processes: a nats-server, two
``kvplane controller --nats`` replicas and engines publishing to the event log. Both
replicas answer /lookup, /query_worker_info, /query_chunks and /status alike once they have
applied the same log sequence; neither binds a ZMQ port."""

from __future__ import annotations

import contextlib
from pathlib import Path

import psutil
import pytest

from kvplane.keys import chunk_hashes
from tests.engine_support import EngineProc
from tests.nats_support import NatsServer, engine_config, start_replica, wait_agree
from tests.support import wait_until

pytestmark = pytest.mark.slow

CHUNK = 16
CPU = "LocalCPUBackend"


def test_two_replicas_answer_alike(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = NatsServer(tmp_path, "nats").start()
        stack.callback(server.stop)
        replicas = [start_replica(tmp_path, f"r{i}", server.url) for i in range(2)]
        for r in replicas:
            stack.callback(r.stop)
        engines = [
            stack.enter_context(EngineProc(tmp_path, name, **engine_config(server.url)))
            for name in ("inst-a", "inst-b")
        ]
        for e in engines:
            e.launch()
        for e in engines:
            e.wait_ready()
        for i, e in enumerate(engines):
            assert e.store(1000 * i, 1000 * i + 64) == 64
        tokens = list(range(64))
        hashes = chunk_hashes(tokens, CHUNK)

        def held() -> bool:
            got = replicas[0].post("/lookup", {"tokens": tokens}).json()
            return got.get("layout_info") == {"inst-a": [CPU, 64]}

        wait_until(held, timeout=30, what="the lookup to see inst-a's prefix")
        calls = [("/lookup", {"tokens": tokens})]
        for name in ("inst-a", "inst-b"):
            calls += [
                ("/query_worker_info", {"instance_id": name}),
                ("/query_chunks", {"instance_id": name}),
            ]
        wait_agree(replicas, calls)
        chunks = replicas[1].post("/query_chunks", {"instance_id": "inst-a"}).json()
        assert set(hashes) <= set(chunks["chunk_hashes"]["0"][CPU])
        assert set(chunks["chunk_hashes"]["0"][CPU]) == set(engines[0].chunks()[CPU])
        statuses = [r.status() for r in replicas]
        for st in statuses:
            assert st["log"]["applied_seq"] > 0 and st["log"]["lag"] == 0
            assert not st["log"]["stale"]
        assert sum(st["log"]["leader"] for st in statuses) == 1
        # neither binds a worker port: its HTTP port is all it listens on
        for r in replicas:
            listening = {
                c.laddr.port
                for c in psutil.Process(r.child.pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            }
            assert listening == {int(r.url.rsplit(":", 1)[1])}
