"""Messages between vLLM's scheduler process and its worker ranks (ZMQ over IPC, msgpack).

Workers -> scheduler (PUSH -> PULL): what each rank's tiers hold (:class:`Snapshot` once,
then :class:`TierDelta` as chunks come and go) and :class:`PrefetchDone`. Scheduler ->
workers (PUB -> SUB): :class:`Prefetch`, "bring these chunks in from peers". One worker
sends everything over one socket from one thread, so a rank's admits reach the scheduler
before the ``PrefetchDone`` that follows them.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import msgspec

__all__ = [
    "Prefetch",
    "PrefetchDone",
    "Snapshot",
    "TierDelta",
    "ToScheduler",
    "decode_to_scheduler",
    "decode_to_worker",
    "encode",
    "endpoints",
]


class Snapshot(msgspec.Struct, tag=True, frozen=True):
    """Everything ``rank`` holds, per tier; replaces what the scheduler knew of it."""

    rank: int
    tiers: dict[str, list[int]]


class TierDelta(msgspec.Struct, tag=True, frozen=True):
    rank: int
    location: str
    admitted: bool
    hashes: list[int]


class PrefetchDone(msgspec.Struct, tag=True, frozen=True):
    rank: int
    req_id: str
    held_tokens: int


class Prefetch(msgspec.Struct, tag=True, frozen=True):
    req_id: str
    token_ids: list[int]


ToScheduler = Snapshot | TierDelta | PrefetchDone

_encoder = msgspec.msgpack.Encoder()
_to_scheduler = msgspec.msgpack.Decoder(list[ToScheduler])
_to_worker = msgspec.msgpack.Decoder(Prefetch)


def encode(message: object) -> bytes:
    return _encoder.encode(message)


def decode_to_scheduler(data: bytes) -> list[ToScheduler]:
    return _to_scheduler.decode(data)


def decode_to_worker(data: bytes) -> Prefetch:
    return _to_worker.decode(data)


def endpoints(engine_id: str, dp_rank: int) -> tuple[str, str]:
    """``(events, prefetch)`` IPC endpoints of one vLLM engine (one data-parallel rank);
    the folder is ``$VLLM_RPC_BASE_PATH`` when set, as vLLM's own sockets."""
    base = Path(os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir())
    stem = base / f"kvplane-{engine_id}-dp{dp_rank}"
    return f"ipc://{stem}-events", f"ipc://{stem}-prefetch"
