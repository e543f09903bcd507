"""What the lease holder decides once for every replica (docs/ha.md), real processes: a
nats-server, two ``kvplane controller --nats`` replicas, protocol-level workers on the log
(tests/nats_support.LogWorker). A silent worker is reaped by one ReapEvent in the log that
both replicas apply; a cluster operation sent to either replica runs once, also when the
lease holder dies in the middle of it; a replica restarted joins from a snapshot without
any worker resync; garbage on the log is counted and skipped by both."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from kvplane.eventlog import CONTROL_SUBJECT, STREAM
from kvplane.protocol import ClearCommand, CommandReply, ResyncCommand
from tests.nats_support import LogWorker, NatsServer, Replica, start_replica, wait_agree
from tests.support import wait_until

pytestmark = pytest.mark.slow

FAST = ["--lease-ttl", "1", "--health-check-interval", "0.2", "--command-timeout", "10"]


@contextlib.contextmanager
def topology(
    tmp: Path, extra: list[str] | None = None
) -> Iterator[tuple[NatsServer, list[Replica], contextlib.ExitStack]]:
    with contextlib.ExitStack() as stack:
        server = NatsServer(tmp, "nats").start()
        stack.callback(server.stop)
        replicas = []
        for i in range(2):
            replicas.append(start_replica(tmp, f"r{i}", server.url, extra=[*FAST, *(extra or [])]))
            stack.callback(replicas[-1].stop)
        yield server, replicas, stack


def leader_of(replicas: list[Replica]) -> tuple[Replica, Replica]:
    """(lease holder, the other), once one holds the lease."""

    def find() -> tuple[Replica, Replica] | None:
        holders = [r for r in replicas if r.status()["log"]["leader"]]
        if len(holders) != 1:
            return None
        return holders[0], next(r for r in replicas if r is not holders[0])

    found = wait_until(find, timeout=20, what="one lease holder")
    return found


def control_messages(url: str) -> list[bytes]:
    """Every message on the lease holder's subject of the log."""

    async def read() -> list[bytes]:
        nc = await nats.connect(url)
        js = nc.jetstream()
        sub = await js.subscribe(CONTROL_SUBJECT, stream=STREAM, ordered_consumer=True)
        got = []
        with contextlib.suppress(TimeoutError, nats.errors.TimeoutError):
            while True:
                got.append((await sub.next_msg(timeout=1.0)).data)
        await nc.close()
        return got

    return asyncio.run(read())


def calls(instance: str) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("/query_worker_info", {"instance_id": instance}),
        ("/query_chunks", {"instance_id": instance}),
        ("/lookup", {"tokens": list(range(16))}),
    ]


def test_a_silent_worker_is_reaped_once_at_the_same_point_everywhere(tmp_path: Path) -> None:
    with topology(tmp_path, ["--worker-timeout", "2"]) as (server, replicas, stack):
        worker = LogWorker(server.url, "inst-a")
        stack.callback(worker.close)
        worker.register()
        worker.report([11, 12, 13])
        beating = worker.keep_alive(0.2)
        wait_agree(replicas, calls("inst-a"))
        time.sleep(3)  # heartbeats keep it past the timeout
        assert all(
            r.post("/query_worker_info", {"instance_id": "inst-a"}).status_code == 200
            for r in replicas
        )
        beating.set()
        wait_until(
            lambda: all(
                r.post("/query_worker_info", {"instance_id": "inst-a"}).status_code == 404
                for r in replicas
            ),
            timeout=20,
            what="both replicas to drop the silent worker",
        )
        assert [r.metric("reaped_workers") for r in replicas] == [1, 1]
        assert len(control_messages(server.url)) == 1  # one decision, in the log
        assert len({r.applied() for r in replicas}) == 1


def test_an_operation_runs_once_and_check_finish_agrees(tmp_path: Path) -> None:
    with topology(tmp_path) as (server, replicas, stack):
        worker = LogWorker(server.url, "inst-a")
        stack.callback(worker.close)
        worker.serve_commands(lambda cmd: CommandReply(num_tokens=5))
        worker.register()
        worker.keep_alive(0.2)
        wait_agree(replicas, calls("inst-a"))
        _, other = leader_of(replicas)
        resp = other.post("/clear", {"instance_id": "inst-a", "location": "LocalCPUBackend"})
        assert resp.status_code == 200, resp.text
        event_id = resp.json()["event_id"]
        assert resp.json()["num_tokens"] == 5
        clears = [c for c in worker.commands if type(c) is ClearCommand]
        assert [c.event_id for c in clears] == [event_id]
        assert clears[0].locations == ["LocalCPUBackend"]
        for r in replicas:
            assert r.post("/check_finish", {"event_id": event_id}).json() == {"status": "finished"}
        missing = other.post("/clear", {"instance_id": "nobody"})
        assert missing.status_code == 404 and "nobody" in missing.text
        assert other.post("/health", {"instance_id": "inst-a"}).json()["error_codes"] == {"0": 0}


def test_the_lease_holder_killed_mid_clear_never_runs_it_twice(tmp_path: Path) -> None:
    with topology(tmp_path) as (server, replicas, stack):
        worker = LogWorker(server.url, "inst-a")
        stack.callback(worker.close)
        release = threading.Event()

        def answer(cmd: Any) -> CommandReply:
            if type(cmd) is ClearCommand:
                release.wait(20)  # the clear is under way until the test lets it end
            return CommandReply(num_tokens=3)

        worker.serve_commands(answer)
        worker.register()
        worker.keep_alive(0.2)
        wait_agree(replicas, calls("inst-a"))
        holder, other = leader_of(replicas)
        outcome: list[Any] = []
        client = threading.Thread(
            target=lambda: outcome.append(other.post("/clear", {"instance_id": "inst-a"})),
            daemon=True,
        )
        client.start()
        wait_until(
            lambda: any(type(c) is ClearCommand for c in worker.commands),
            timeout=15,
            what="the clear to reach the worker",
        )
        holder.kill()  # mid-operation
        wait_until(
            lambda: other.status()["log"]["leader"],
            timeout=20,
            what="the other replica to take the lease",
        )
        release.set()
        client.join(60)
        resp = outcome[0]
        # its runner died: the new holder marks it failed (it may have run in part), and
        # the replica that accepted it says so, naming the event
        event_id = next(c for c in worker.commands if type(c) is ClearCommand).event_id
        assert resp.status_code == 503, resp.text
        assert resp.json()["event_id"] == event_id and "not run again" in resp.text
        time.sleep(2)  # a second run would come now, by the new holder: none does
        assert [type(c) for c in worker.commands].count(ClearCommand) == 1
        status = other.post("/check_finish", {"event_id": event_id}).json()["status"]
        assert status == "failed"
        back = start_replica(tmp_path, "r0-again", server.url, extra=FAST)
        stack.callback(back.stop)
        assert back.post("/check_finish", {"event_id": event_id}).json()["status"] == status


def test_a_restarted_replica_joins_from_a_snapshot_without_a_resync(tmp_path: Path) -> None:
    with topology(tmp_path, ["--snapshot-interval", "0.5"]) as (server, replicas, stack):
        worker = LogWorker(server.url, "inst-a")
        stack.callback(worker.close)
        worker.serve_commands(lambda cmd: CommandReply())
        worker.register()
        worker.keep_alive(0.2)
        for n in range(20):
            worker.report(list(range(1000 * n, 1000 * n + 500)))
            worker.report(list(range(1000 * n, 1000 * n + 100)), admit=False)
        wait_agree(replicas, calls("inst-a"))
        holder, other = leader_of(replicas)
        other.kill()
        for n in range(20, 30):
            worker.report(list(range(1000 * n, 1000 * n + 500)))
        wait_until(
            lambda: holder.status()["log"]["snapshot_seq"] > 40,
            timeout=20,
            what="a snapshot past the reports",
        )
        back = start_replica(tmp_path, "r1-again", server.url, extra=FAST)
        stack.callback(back.stop)
        wait_agree([holder, back], calls("inst-a"))
        assert "joined from the snapshot at log sequence" in back.child.log_path.read_text()
        chunks = back.post("/query_chunks", {"instance_id": "inst-a"}).json()["chunk_hashes"]["0"]
        assert len(chunks["LocalCPUBackend"]) == 30 * 500 - 20 * 100
        assert not any(type(c) is ResyncCommand for c in worker.commands)

        async def first_seq() -> int:
            nc = await nats.connect(server.url)
            info = await nc.jetstream().stream_info(STREAM)
            await nc.close()
            return int(info.state.first_seq)

        assert asyncio.run(first_seq()) > 1  # trimmed behind the snapshots


def test_garbage_and_foreign_messages_are_counted_and_skipped(tmp_path: Path) -> None:
    with topology(tmp_path) as (server, replicas, stack):
        worker = LogWorker(server.url, "inst-a")
        stack.callback(worker.close)
        worker.register()
        worker.keep_alive(0.2)
        worker.publish(b"\xc1 not msgpack")
        worker.publish(ClearCommand(event_id="x"))  # a command has no place in the log
        worker.publish(b"\x81\xa4type\xa6future")  # a tag this build does not know
        worker.report([1, 2, 3])
        wait_agree(replicas, calls("inst-a"))
        for r in replicas:
            assert (
                r.metric("malformed_frames"),
                r.metric("foreign_messages"),
                r.metric("unknown_messages"),
            ) == (1, 1, 1)
        chunks = replicas[0].post("/query_chunks", {"instance_id": "inst-a"}).json()
        assert chunks["chunk_hashes"]["0"]["LocalCPUBackend"] == [1, 2, 3]
