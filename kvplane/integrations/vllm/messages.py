"""Messages between vLLM's scheduler process and its worker ranks (ZMQ over IPC, msgpack).

One socket pair per rank: the scheduler binds a ROUTER, each rank connects a DEALER.
Workers -> scheduler: :class:`Hello` first (the scheduler learns which connection is which
rank, and sends a rank nothing before it), then what its tiers hold (:class:`Snapshot`
once, then :class:`TierDelta` as chunks come and go) and :class:`PrefetchDone`. Scheduler
-> a rank: :class:`Prefetch`, "bring these chunks in from peers". One worker sends
everything over one socket from one thread, so a rank's admits reach the scheduler before
the ``PrefetchDone`` that follows them.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import msgspec

from kvplane.errors import ConfigError

__all__ = [
    "IPC_PATH_MAX",
    "Hello",
    "Prefetch",
    "PrefetchDone",
    "Snapshot",
    "TierDelta",
    "ToScheduler",
    "decode_to_scheduler",
    "decode_to_worker",
    "encode",
    "endpoint",
]


class Hello(msgspec.Struct, tag=True, frozen=True):
    """A rank's first message on a new connection."""

    rank: int


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


ToScheduler = Hello | Snapshot | TierDelta | PrefetchDone

_encoder = msgspec.msgpack.Encoder()
_to_scheduler = msgspec.msgpack.Decoder(list[ToScheduler])
_to_worker = msgspec.msgpack.Decoder(Prefetch)


def encode(message: object) -> bytes:
    return _encoder.encode(message)


def decode_to_scheduler(data: bytes) -> list[ToScheduler]:
    return _to_scheduler.decode(data)


def decode_to_worker(data: bytes) -> Prefetch:
    return _to_worker.decode(data)


#: Bytes a unix socket path may hold on Linux (``sun_path`` is 108 with its NUL).
IPC_PATH_MAX = 107


def endpoint(engine_id: str, dp_rank: int) -> str:
    """The IPC endpoint of one vLLM engine (one data-parallel rank), in
    ``$VLLM_RPC_BASE_PATH`` when set, as vLLM's own sockets: ``kvp-`` and 12 hex digits of
    a hash of the engine id, 17 characters past the folder, where vLLM's own take 37."""
    base = Path(os.environ.get("VLLM_RPC_BASE_PATH") or tempfile.gettempdir())
    digest = hashlib.blake2b(f"{engine_id}/dp{dp_rank}".encode(), digest_size=6).hexdigest()
    path = str(base / f"kvp-{digest}")
    if len(os.fsencode(path)) > IPC_PATH_MAX:
        raise ConfigError(
            f"kvplane's IPC socket path {path!r} is {len(os.fsencode(path))} bytes, over the "
            f"{IPC_PATH_MAX}-byte limit of a unix socket path: set VLLM_RPC_BASE_PATH (or "
            "TMPDIR) to a shorter folder"
        )
    return f"ipc://{path}"
