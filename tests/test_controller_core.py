"""The controller's pure core fed messages on a fake clock: exact replies and transitions.

What tests/test_controller_service.py checks over real sockets and processes, here without
either: the ControllerCore's message handling (register -> report -> gap -> RESYNC ->
re-register -> reap -> peer lookup), the executor and cluster over a fake transport (how
worker error codes become HTTP statuses), and the event table's capacity.
"""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from kvplane.controller.cluster import Cluster, CommandFailed
from kvplane.controller.core import ControllerCore
from kvplane.controller.executor import EventStatus, EventTable, Executor
from kvplane.controller.http import create_app
from kvplane.controller.index import Match
from kvplane.controller.registry import WorkerRecord
from kvplane.controller.settings import ControllerConfig
from kvplane.errors import BadRequest, Conflict, NotFound, Unavailable, Unsupported
from kvplane.keys import chunk_hashes, key_scheme_fingerprint
from kvplane.protocol import (
    ChunkReport,
    ClearCommand,
    Command,
    CommandReply,
    DeregisterReply,
    DeregisterRequest,
    ErrorCode,
    HeartbeatReply,
    HeartbeatRequest,
    HeartbeatStatus,
    PeerLookupReply,
    PeerLookupRequest,
    RegisterReply,
    RegisterRequest,
    Segment,
    UnknownMessage,
    pack_hashes,
)

CHUNK = 4
TIMEOUT = 30.0
TOKENS = list(range(10))  # chunks [0,4) [4,8) [8,10)
HASHES = chunk_hashes(TOKENS, CHUNK)
CPU = "LocalCPUBackend"


def hello(instance: str, epoch: int, *, worker: int = 0, port: int = 7000) -> RegisterRequest:
    return RegisterRequest(
        instance_id=instance,
        worker_id=worker,
        ip="10.0.0.1",
        port=port,
        peer_init_url=f"{instance}.peer:{port + 1}",
        key_scheme=key_scheme_fingerprint(CHUNK),
        chunk_size=CHUNK,
        epoch=epoch,
    )


def report(
    instance: str, epoch: int, seq: int, hashes: list[int], *, admit: bool = True
) -> ChunkReport:
    return ChunkReport(
        instance_id=instance,
        worker_id=0,
        epoch=epoch,
        seq=seq,
        segments=[Segment(admit, CPU, pack_hashes(hashes))],
    )


def beat(instance: str, epoch: int) -> HeartbeatRequest:
    return HeartbeatRequest(instance_id=instance, worker_id=0, epoch=epoch)


def feed(core: ControllerCore, msg: object, now: float) -> object:
    """What the service does with every frame: stage outside the lock, then handle."""
    return core.handle(core.stage(msg), now)


def lookup(core: ControllerCore) -> dict[str, Match]:
    return core.lookup({CHUNK: HASHES}, len(TOKENS))


def test_register_report_gap_resync_reap_and_peer_lookup() -> None:
    core = ControllerCore(TIMEOUT)
    c = core.counters
    assert feed(core, hello("A", 7), 0.0) == RegisterReply(ok=True)
    assert feed(core, hello("B", 9), 0.0) == RegisterReply(ok=True)
    assert (c.registrations, len(core.registry)) == (2, 2)

    # reports: A holds all three chunks, B the first two
    assert feed(core, report("A", 7, 1, HASHES), 1.0) is None
    assert feed(core, report("B", 9, 1, HASHES[:2]), 1.0) is None
    assert lookup(core) == {"A": Match(CPU, 3, 10), "B": Match(CPU, 2, 8)}
    assert (c.reports_applied, c.admits_applied, c.evicts_applied) == (2, 5, 0)

    # A's report 2 is lost: report 3 still applies, and A is told to resync
    assert feed(core, beat("A", 7), 2.0) == HeartbeatReply(status=HeartbeatStatus.OK)
    assert feed(core, report("A", 7, 3, HASHES[2:], admit=False), 3.0) is None
    assert c.sequence_gaps == 1
    assert lookup(core)["A"] == Match(CPU, 2, 8)
    assert feed(core, beat("A", 7), 4.0) == HeartbeatReply(status=HeartbeatStatus.RESYNC)
    assert feed(core, beat("A", 7), 4.5) == HeartbeatReply(status=HeartbeatStatus.RESYNC)
    assert c.resyncs_requested == 2
    # a duplicate and an older incarnation's report are dropped, not applied
    assert feed(core, report("A", 7, 3, HASHES), 5.0) is None
    assert feed(core, report("A", 6, 4, HASHES), 5.0) is None
    assert (c.reports_stale, c.reports_unknown_worker) == (1, 1)
    assert lookup(core)["A"] == Match(CPU, 2, 8)

    # A re-registers (a fresh epoch): its old chunks leave at once, the resync refills them
    assert feed(core, hello("A", 8), 6.0) == RegisterReply(ok=True)
    dropped = core.take_dropped()
    assert [(d.key, d.num_chunks) for d in dropped] == [(("A", 0), 2)]
    assert core.take_dropped() == []
    assert lookup(core) == {"B": Match(CPU, 2, 8)}
    assert feed(core, beat("A", 7), 6.5) == HeartbeatReply(status=HeartbeatStatus.UNKNOWN_WORKER)
    assert feed(core, beat("A", 8), 6.5) == HeartbeatReply(status=HeartbeatStatus.OK)
    assert feed(core, report("A", 8, 1, HASHES), 7.0) is None
    assert lookup(core) == {"A": Match(CPU, 3, 10), "B": Match(CPU, 2, 8)}

    # peer lookup: the other instance holding the longest run from the first chunk
    ask = PeerLookupRequest(
        instance_id="A", worker_id=0, hashes=pack_hashes(HASHES), chunk_size=CHUNK
    )
    assert feed(core, ask, 8.0) == PeerLookupReply(
        instance_id="B", peer_init_url="B.peer:7001", location=CPU, num_chunks=2
    )

    # reap: B's last heartbeat was its registration at 0; A beat at 20
    assert feed(core, beat("A", 8), 20.0) == HeartbeatReply(status=HeartbeatStatus.OK)
    assert core.reap(TIMEOUT) == []  # not older than the timeout yet
    reaped = core.reap(TIMEOUT + 0.5)
    assert [(r.instance_id, r.worker_id) for r in reaped] == [("B", 0)]
    assert (c.reaped_workers, [d.num_chunks for d in core.take_dropped()]) == (1, [2])
    assert feed(core, ask, 31.0) == PeerLookupReply()  # nobody else holds them now
    assert feed(core, beat("B", 9), 31.0) == HeartbeatReply(status=HeartbeatStatus.UNKNOWN_WORKER)
    assert lookup(core) == {"A": Match(CPU, 3, 10)}

    # deregistration: only with the current epoch
    assert feed(core, DeregisterRequest(instance_id="A", worker_id=0, epoch=7), 32.0) == (
        DeregisterReply(ok=False)
    )
    assert feed(core, DeregisterRequest(instance_id="A", worker_id=0, epoch=8), 32.0) == (
        DeregisterReply(ok=True)
    )
    assert (lookup(core), len(core.registry), c.deregistrations) == ({}, 0, 1)
    assert c.chunks_dropped == 2 + 2 + 3


def test_a_refused_registration_and_an_unknown_message() -> None:
    core = ControllerCore(TIMEOUT)
    bad = RegisterRequest(**{**_fields(hello("A", 1)), "key_scheme": "md5/chunk_size=4"})
    reply = feed(core, bad, 0.0)
    assert isinstance(reply, RegisterReply) and not reply.ok and "key scheme" in reply.reason
    assert (core.counters.registrations_refused, len(core.registry)) == (1, 0)
    assert feed(core, UnknownMessage(type="admit_v9", raw=b""), 0.0) is None
    assert feed(core, report("A", 1, 1, HASHES), 0.0) is None  # from nobody registered
    assert (core.counters.unknown_messages, core.counters.reports_unknown_worker) == (1, 1)


# --- the executor and the cluster over a fake transport ------------------------------------


class FakeTransport:
    """Answers each worker (by rank) with a scripted reply, or raises the scripted error."""

    def __init__(self, answers: dict[int, CommandReply | Exception]) -> None:
        self.answers = answers
        self.sent: list[tuple[int, Command, float]] = []

    def __call__(self, worker: WorkerRecord, command: Command, timeout: float) -> CommandReply:
        self.sent.append((worker.worker_id, command, timeout))
        answer = self.answers[worker.worker_id]
        if isinstance(answer, Exception):
            raise answer
        return answer


def cluster_with(answers: dict[int, CommandReply | Exception]) -> tuple[Cluster, FakeTransport]:
    transport = FakeTransport(answers)
    core = ControllerCore(TIMEOUT)
    for rank in answers:
        assert feed(core, hello("A", 1, worker=rank), 0.0) == RegisterReply(ok=True)
    return Cluster(core, Executor(transport, timeout_s=1.5), clock=lambda: 0.0), transport


def reply(code: ErrorCode, message: str = "", num_tokens: int = 0) -> CommandReply:
    return CommandReply(error_code=code, message=message, num_tokens=num_tokens)


def test_the_executor_turns_silence_and_faults_into_error_codes() -> None:
    cluster, transport = cluster_with(
        {0: reply(ErrorCode.OK, num_tokens=8), 1: Unavailable("no answer"), 2: OSError("boom")}
    )
    workers = cluster.workers("A")
    result = cluster.executor.fan_out(workers, lambda w: ClearCommand(event_id="e"))
    assert {w: r.error_code for w, r in result.replies.items()} == {
        0: ErrorCode.OK,
        1: ErrorCode.TIMEOUT,
        2: ErrorCode.UNREACHABLE,
    }
    assert result.replies[1].message == "no answer" and "boom" in result.replies[2].message
    assert not result.ok and result.num_tokens == 0
    assert sorted((w, t) for w, _, t in transport.sent) == [(0, 1.5), (1, 1.5), (2, 1.5)]
    cluster.executor.close()


def test_all_ok_is_the_minimum_over_ranks() -> None:
    cluster, transport = cluster_with(
        {0: reply(ErrorCode.OK, num_tokens=12), 1: reply(ErrorCode.OK, num_tokens=8)}
    )
    done = cluster.clear("A", CPU)
    assert done.num_tokens == 8
    assert {type(c) for _, c, _ in transport.sent} == {ClearCommand}
    assert cluster.check_finish(done.event_id) is EventStatus.FINISHED
    cluster.executor.close()


ANSWERS: list[tuple[dict[int, CommandReply | Exception], type[Exception], int]] = [
    ({0: reply(ErrorCode.UNSUPPORTED, "no p2p"), 1: reply(ErrorCode.OK)}, Unsupported, 409),
    ({0: reply(ErrorCode.CONFLICT, "frozen"), 1: reply(ErrorCode.OK)}, Conflict, 409),
    ({0: reply(ErrorCode.NOT_FOUND, "no tier"), 1: reply(ErrorCode.OK)}, NotFound, 404),
    ({0: reply(ErrorCode.BAD_REQUEST, "no codec"), 1: reply(ErrorCode.OK)}, BadRequest, 400),
    (
        {0: reply(ErrorCode.UNSUPPORTED, "no codec"), 1: reply(ErrorCode.BAD_REQUEST, "no")},
        CommandFailed,
        503,
    ),
    ({0: reply(ErrorCode.FAILED, "disk"), 1: reply(ErrorCode.OK)}, CommandFailed, 503),
    ({0: Unavailable("silent"), 1: reply(ErrorCode.OK)}, CommandFailed, 503),
]


@pytest.mark.parametrize(("answers", "error", "status"), ANSWERS)
def test_worker_error_codes_map_to_one_error_and_its_http_status(
    answers: dict[int, CommandReply | Exception], error: type[Exception], status: int
) -> None:
    """Every failing rank refusing alike: that refusal's error (UNSUPPORTED or CONFLICT 409,
    NOT_FOUND 404, BAD_REQUEST 400); anything else (mixed codes, a failure, a timeout): 503
    with each rank's code and the event id."""
    cluster, _ = cluster_with(answers)
    with pytest.raises(error) as caught:
        cluster.clear("A", CPU)
    assert getattr(caught.value, "status_code", None) == status
    with TestClient(create_app(cluster, ControllerConfig())) as client:
        resp = client.post("/clear", json={"instance_id": "A", "location": CPU})
    body = resp.json()
    assert resp.status_code == status and set(body) >= {"error", "message"}
    if status == 503:  # the error's details reach the client
        codes = {
            str(w): int(getattr(a, "error_code", ErrorCode.TIMEOUT)) for w, a in answers.items()
        }
        assert body["error_codes"] == codes
        assert cluster.check_finish(body["event_id"]) is EventStatus.FAILED
        assert body["error"] == "Command failed"
    cluster.executor.close()


def test_an_unknown_instance_is_404_before_any_command() -> None:
    cluster, transport = cluster_with({0: reply(ErrorCode.OK)})
    with pytest.raises(NotFound, match="'nope'"):
        cluster.clear("nope", CPU)
    with TestClient(create_app(cluster, ControllerConfig())) as client:
        resp = client.post("/clear", json={"instance_id": "nope"})
        assert (resp.status_code, resp.json()["error"]) == (404, "Not found")
        resp = client.post("/clear", json={"location": CPU})
        assert (resp.status_code, resp.json()["error"]) == (400, "Invalid parameters")
        assert "instance_id" in resp.json()["message"]
    assert transport.sent == []
    cluster.executor.close()


EMPTY_TIERS = [
    ("/clear", {"instance_id": "A", "location": ""}),
    ("/pin", {"instance_id": "A", "location": "", "tokens": [1]}),
    ("/compress", {"instance_id": "A", "method": "zstd", "location": ""}),
    ("/move", {"old_position": ["A", ""], "new_position": ["A", CPU]}),
    ("/move", {"old_position": ["A", CPU], "new_position": ["", CPU]}),
]


@pytest.mark.parametrize(("path", "body"), EMPTY_TIERS)
def test_an_empty_tier_or_instance_name_is_refused_by_the_schema(
    path: str, body: dict[str, object]
) -> None:
    """The document says ``minLength: 1``, and the server refuses what it refuses: a 400
    naming the field, no command sent."""
    cluster, transport = cluster_with({0: reply(ErrorCode.OK)})
    with TestClient(create_app(cluster, ControllerConfig())) as client:
        resp = client.post(path, json=body)
        assert (resp.status_code, resp.json()["error"]) == (400, "Invalid parameters")
        assert "at least 1 character" in resp.json()["message"], resp.text
        schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert transport.sent == []
    assert '"minLength": 1' in json.dumps(schemas[path.title().strip("/") + "Request"])
    cluster.executor.close()


# --- the event table -----------------------------------------------------------------------


def test_the_event_table_forgets_the_oldest_beyond_its_capacity() -> None:
    table = EventTable(capacity=3)
    ids = [table.start("clear") for _ in range(5)]
    assert len(set(ids)) == 5 and all(i.startswith("clear-") for i in ids)
    assert [table.get(i) is None for i in ids] == [True, True, False, False, False]
    table.finish(ids[2], error="worker 0: FAILED")
    table.finish(ids[3])
    statuses = [table.get(i).status for i in ids[2:]]  # type: ignore[union-attr]
    assert statuses == [EventStatus.FAILED, EventStatus.FINISHED, EventStatus.RUNNING]
    table.finish(ids[0])  # forgotten: nothing to finish, nothing revived
    assert table.get(ids[0]) is None
    done = table.start("lookup", finished=True)
    assert table.get(done).status is EventStatus.FINISHED  # type: ignore[union-attr]
    assert table.get(ids[2]) is not None  # lookups are bounded apart from operations
    table.start("clear")
    assert table.get(ids[2]) is None  # the oldest operation left to make room


def test_check_finish_of_a_forgotten_event_is_not_found() -> None:
    cluster, _ = cluster_with({0: reply(ErrorCode.OK)})
    cluster.events = EventTable(capacity=2)
    first = cluster.clear("A", CPU).event_id
    for _ in range(2):
        cluster.clear("A", CPU)
    assert cluster.check_finish(first) is EventStatus.NOT_FOUND
    cluster.executor.close()


def _fields(msg: RegisterRequest) -> dict[str, object]:
    return {f: getattr(msg, f) for f in msg.__struct_fields__}
