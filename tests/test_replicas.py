"""Controller replicas on NATS JetStream (docs/ha.md), real processes: a nats-server, two
``kvplane controller --nats`` replicas, an engine publishing to the event log and one on
the ZMQ worker ports of the replica started with ``--monitor-ports`` (which bridges them
into the log). Both replicas answer /lookup, /query_worker_info, /query_chunks and /status
alike once they have applied the same log sequence; the one without ``--monitor-ports``
listens on its HTTP port alone."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import psutil
import pytest

from kvplane.keys import chunk_hashes
from tests.engine_support import EngineProc
from tests.nats_support import NatsServer, engine_config, start_replica, wait_agree
from tests.support import free_ports, wait_until

pytestmark = pytest.mark.slow

CHUNK = 16
CPU = "LocalCPUBackend"


def test_two_replicas_answer_alike(tmp_path: Path) -> None:
    with contextlib.ExitStack() as stack:
        server = NatsServer(tmp_path, "nats").start()
        stack.callback(server.stop)
        pull, reply = free_ports(2)
        bridge = ["--monitor-ports", json.dumps({"pull": pull, "reply": reply})]
        replicas = [
            start_replica(tmp_path, "r0", server.url),
            start_replica(tmp_path, "r1", server.url, extra=bridge),
        ]
        for r in replicas:
            stack.callback(r.stop)
        on_zmq = engine_config(
            server.url,
            controller_nats_url=None,
            controller_pull_url=f"127.0.0.1:{pull}",
            controller_reply_url=f"127.0.0.1:{reply}",
        )
        engines = [
            stack.enter_context(EngineProc(tmp_path, "inst-a", **engine_config(server.url))),
            stack.enter_context(EngineProc(tmp_path, "inst-b", **on_zmq)),
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
        chunks_b = replicas[0].post("/query_chunks", {"instance_id": "inst-b"}).json()
        assert set(chunks_b["chunk_hashes"]["0"][CPU]) == set(engines[1].chunks()[CPU])
        # r0 binds no worker port: its HTTP port is all it listens on; r1 its bridge's too
        for r, ports in zip(replicas, [set(), {pull, reply}], strict=True):
            listening = {
                c.laddr.port
                for c in psutil.Process(r.child.pid).net_connections("tcp")
                if c.status == psutil.CONN_LISTEN
            }
            assert listening == {int(r.url.rsplit(":", 1)[1]), *ports}
