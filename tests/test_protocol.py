"""Wire protocol: round trips, unknown and malformed frames, compact hashes."""

from __future__ import annotations

import subprocess
import sys

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvplane.errors import BadRequest
from kvplane.protocol import (
    ChunkReport,
    ClearCommand,
    CommandReply,
    ErrorCode,
    HeartbeatReply,
    HeartbeatStatus,
    RegisterRequest,
    Segment,
    UnknownMessage,
    decode,
    encode,
    pack_hashes,
    unpack_hashes,
)
from tests.support import REPO_ROOT, kvplane_env


@given(st.lists(st.integers(0, 2**64 - 1), max_size=50))
def test_hashes_round_trip_as_8_bytes_each(hashes: list[int]) -> None:
    packed = pack_hashes(hashes)
    assert len(packed) == 8 * len(hashes)
    assert unpack_hashes(packed) == hashes


def test_messages_round_trip() -> None:
    msgs = [
        ChunkReport(
            instance_id="a",
            worker_id=1,
            epoch=7,
            seq=3,
            segments=[
                Segment(True, "LocalCPUBackend", pack_hashes([1, 2])),
                Segment(False, "x", b""),
            ],
        ),
        ClearCommand(event_id="e", locations=["LocalCPUBackend"]),
        CommandReply(error_code=ErrorCode.UNSUPPORTED, message="no"),
        HeartbeatReply(status=HeartbeatStatus.RESYNC),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg


def test_unknown_type_decodes_to_unknown_message() -> None:
    frame = msgspec.msgpack.encode({"type": "from_the_future", "x": 1})
    msg = decode(frame)
    assert isinstance(msg, UnknownMessage) and msg.type == "from_the_future"


@pytest.mark.parametrize(
    "frame",
    [b"\xc1garbage", msgspec.msgpack.encode([1, 2]), msgspec.msgpack.encode({"type": "chunks"})],
)
def test_malformed_frames_raise_bad_request(frame: bytes) -> None:
    with pytest.raises(BadRequest):
        decode(frame)


def test_controller_side_imports_no_torch() -> None:
    code = (
        "import sys, kvplane.protocol, kvplane.controller.core, kvplane.controller.index, "
        "kvplane.controller.registry, kvplane.controller.executor\n"
        "import importlib, pkgutil, kvplane.controller as c\n"
        "for m in pkgutil.iter_modules(c.__path__): importlib.import_module('kvplane.controller.' + m.name)\n"
        "assert 'torch' not in sys.modules, sorted(k for k in sys.modules if 'torch' in k)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO_ROOT,
        env=kvplane_env(),
        capture_output=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode()


def test_register_serving_url_is_optional_both_ways() -> None:
    hello = RegisterRequest(
        instance_id="a", worker_id=0, ip="127.0.0.1", port=1, key_scheme="k", chunk_size=4,
        epoch=1, serving_url="http://127.0.0.1:8000",
    )  # fmt: skip
    assert decode(encode(hello)) == hello
    # an older worker's frame has no such field: None
    old = msgspec.msgpack.decode(encode(hello))
    del old["serving_url"]
    older = decode(msgspec.msgpack.encode(old))
    assert isinstance(older, RegisterRequest) and older.serving_url is None
    # a newer worker's extra field is ignored, not refused
    newer = decode(msgspec.msgpack.encode({**old, "from_the_future": 1}))
    assert isinstance(newer, RegisterRequest) and newer.instance_id == "a"
