"""Every message between controller and worker: tagged msgspec Structs, encoded as msgpack.

Three wires, named by direction:

* worker -> controller, fire and forget (controller PULL): :class:`ChunkReport` batches.
  Register/Heartbeat/Deregister may come this way too when the controller has no reply
  port (the seeds' ``--monitor-port`` mode); their replies are then simply not sent.
* worker -> controller, request/reply (controller REP): :class:`RegisterRequest`,
  :class:`HeartbeatRequest`, :class:`DeregisterRequest`, :class:`PeerLookupRequest`.
* controller -> worker command port (worker REP): the ``*Command`` structs, each answered
  by a :class:`CommandReply`.
* the replicated controller's own records (NATS mode, :mod:`kvplane.eventlog`): the lease
  holder's :class:`ReapEvent` in the event log, the cluster operations it runs
  (:class:`OperationRequest`) and their state (:class:`OperationRecord`) in a key-value
  bucket.

Every struct carries a ``type`` tag, so one decoder reads any frame and a receiver
dispatches with ``dict[type, handler]``. A frame whose tag this build does not know (a
newer peer) decodes to :class:`UnknownMessage` instead of raising, so a receiver logs,
counts and skips it.

Chunk hashes travel as packed little-endian uint64 bytes (:func:`pack_hashes`): 8 bytes a
chunk, decoded with one numpy call, no per-chunk msgpack objects.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

import msgspec
import numpy as np

from kvplane.errors import BadRequest, Conflict, KvplaneError, NotFound, Unsupported

__all__ = [
    "COMPRESSION_METHODS",
    "PROTOCOL_VERSION",
    "REFUSALS",
    "CheckFinishCommand",
    "ChunkReport",
    "ClearCommand",
    "Command",
    "CommandReply",
    "CompressCommand",
    "DecompressCommand",
    "DeregisterReply",
    "DeregisterRequest",
    "ErrorCode",
    "HealthCommand",
    "HeartbeatReply",
    "HeartbeatRequest",
    "HeartbeatStatus",
    "Message",
    "MoveCommand",
    "OperationRecord",
    "OperationRequest",
    "PeerLookupReply",
    "PeerLookupRequest",
    "PinCommand",
    "ReapEvent",
    "RegisterReply",
    "RegisterRequest",
    "ResyncCommand",
    "Segment",
    "UnknownMessage",
    "UnpinCommand",
    "decode",
    "encode",
    "pack_hashes",
    "unpack_hashes",
]

PROTOCOL_VERSION = 2  # 2: the error codes NOT_FOUND and CONFLICT


class ErrorCode(IntEnum):
    """A worker's answer code; 0 means done/healthy (the seeds' ``error_codes``)."""

    OK = 0
    FAILED = 1
    UNSUPPORTED = 2
    BAD_REQUEST = 3
    TIMEOUT = 4
    UNREACHABLE = 5
    NOT_FOUND = 6
    CONFLICT = 7


#: The kvplane error each refusal code stands for, both ways: a worker answers a command
#: that raised one of these errors with its code, and the controller, when every failing
#: rank answered the same code, gives its client that error (a tier the instance lacks is a
#: 404, a move without P2P a 409), not a 503.
REFUSALS: dict[ErrorCode, type[KvplaneError]] = {
    ErrorCode.BAD_REQUEST: BadRequest,
    ErrorCode.NOT_FOUND: NotFound,
    ErrorCode.CONFLICT: Conflict,
    ErrorCode.UNSUPPORTED: Unsupported,
}


class HeartbeatStatus(IntEnum):
    OK = 0
    UNKNOWN_WORKER = 1  # re-register, then resync the full key set
    RESYNC = 2  # the controller saw a sequence gap: re-register and resync


class _Msg(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True, gc=False):
    pass


# --- worker -> controller ------------------------------------------------------------------


class RegisterRequest(_Msg, tag="register", kw_only=True):
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str | None = None
    protocol_version: int = PROTOCOL_VERSION
    key_scheme: str
    chunk_size: int
    epoch: int  # random per registration; reports of an older epoch are dropped
    # Bytes of one full, uncompressed chunk of this rank's KV: lets the controller show
    # bytes per tier (chunks x this). None from workers that do not say.
    chunk_bytes: int | None = None
    # The command port's CURVE public key (z85 text) when it is a CURVE server; None: plain.
    curve_key: str | None = None
    # The OpenAI URL the instance serves on (config key serving_url), for routers; None:
    # not known. A field with a default: a controller of this protocol version that
    # predates it ignores it, and one that knows it reads None from older workers.
    serving_url: str | None = None


class RegisterReply(_Msg, tag="register_reply", kw_only=True):
    ok: bool
    reason: str = ""


class HeartbeatRequest(_Msg, tag="heartbeat", kw_only=True):
    instance_id: str
    worker_id: int
    epoch: int
    # Where the worker's command port is: lets a controller without a reply socket (the
    # seeds' pull-only mode) tell an unknown worker to resync with a ResyncCommand.
    ip: str | None = None
    port: int | None = None
    curve_key: str | None = None  # as in RegisterRequest


class HeartbeatReply(_Msg, tag="heartbeat_reply", kw_only=True):
    status: HeartbeatStatus = HeartbeatStatus.OK


class DeregisterRequest(_Msg, tag="deregister", kw_only=True):
    instance_id: str
    worker_id: int
    epoch: int


class DeregisterReply(_Msg, tag="deregister_reply", kw_only=True):
    ok: bool


class Segment(msgspec.Struct, array_like=True, gc=False):
    """A run of admits (or evicts) in one location, in the order they happened."""

    admit: bool
    location: str
    hashes: bytes  # packed little-endian uint64


class ChunkReport(_Msg, tag="chunks", kw_only=True):
    """A batch of admits/evicts; ``seq`` counts 1, 2, 3... from each registration."""

    instance_id: str
    worker_id: int
    epoch: int
    seq: int
    segments: list[Segment]


class PeerLookupRequest(_Msg, tag="peer_lookup", kw_only=True):
    """Which other instance holds the longest run of these chunks from the first one, and
    the chunk-server URL of its rank ``worker_id`` (for p2p fetches)."""

    instance_id: str
    worker_id: int
    hashes: bytes
    chunk_size: int


class PeerLookupReply(_Msg, tag="peer_lookup_reply", kw_only=True):
    instance_id: str | None = None
    peer_init_url: str | None = None
    location: str | None = None
    num_chunks: int = 0


# --- controller -> worker commands ---------------------------------------------------------


class ClearCommand(_Msg, tag="clear", kw_only=True):
    event_id: str
    locations: list[str] | None = None


class PinCommand(_Msg, tag="pin", kw_only=True):
    event_id: str
    tokens: list[int]
    location: str | None = None


class UnpinCommand(_Msg, tag="unpin", kw_only=True):
    event_id: str
    tokens: list[int]
    location: str | None = None


COMPRESSION_METHODS = ("none", "zstd", "int8")
"""The values of a compress/decompress command's ``method``: one codec each in
:data:`kvplane.engine.compression.CODECS` (a test holds the two equal). Here, without torch,
so that the controller's API can name them."""


class CompressCommand(_Msg, tag="compress", kw_only=True):
    event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class DecompressCommand(_Msg, tag="decompress", kw_only=True):
    event_id: str
    method: str
    location: str
    tokens: list[int] | None = None


class MoveCommand(_Msg, tag="move", kw_only=True):
    event_id: str
    src_location: str
    dst_instance_id: str
    dst_location: str
    dst_peer_url: str | None = None
    tokens: list[int] | None = None
    copy: bool = False


class HealthCommand(_Msg, tag="health", kw_only=True):
    event_id: str


class ResyncCommand(_Msg, tag="resync", kw_only=True):
    """Register again and resend every key (pull-only mode's answer to "unknown worker")."""

    event_id: str


class CheckFinishCommand(_Msg, tag="check_finish", kw_only=True):
    event_id: str


class CommandReply(_Msg, tag="command_reply", kw_only=True):
    error_code: ErrorCode = ErrorCode.OK
    num_tokens: int = 0
    status: str = ""
    message: str = ""


# --- the replicated controller's records -----------------------------------------------------


class ReapEvent(_Msg, tag="reap", kw_only=True):
    """The lease holder's decision that a worker is dead, applied by every replica at this
    point of the log: the worker goes only if it is still the incarnation (``epoch``) whose
    last heartbeat (``last_heartbeat_time``, a log timestamp) the decision saw, so a
    heartbeat that landed before the decision keeps it."""

    instance_id: str
    worker_id: int
    epoch: int
    last_heartbeat_time: float


class OperationRequest(_Msg, tag="operation", kw_only=True):
    """A cluster operation a replica accepted, for the lease holder to run once. ``kind``
    is one of clear, pin, compress, decompress, move, health; the fields it does not use
    stay at their defaults."""

    event_id: str
    kind: str
    instance_id: str
    location: str | None = None
    tokens: list[int] | None = None
    method: str | None = None
    dst_instance_id: str | None = None
    dst_location: str | None = None
    copy: bool = False


class OperationRecord(_Msg, tag="operation_record", kw_only=True):
    """An operation's state in the operations bucket (queued -> running -> finished or
    failed). ``error_status`` is the HTTP status a failure answers with (0: none);
    ``error_codes`` each worker's code (``health`` and fan-out failures)."""

    request: OperationRequest
    status: str = "queued"
    owner: str = ""  # the replica that runs (or ran) it
    num_tokens: int = 0
    error: str = ""
    error_status: int = 0
    error_codes: dict[int, int] = {}


class UnknownMessage(msgspec.Struct):
    """Stands for a frame of a type this build does not know; never encoded."""

    type: str
    raw: bytes


Command = (
    ClearCommand
    | PinCommand
    | UnpinCommand
    | CompressCommand
    | DecompressCommand
    | MoveCommand
    | HealthCommand
    | CheckFinishCommand
    | ResyncCommand
)

Message = (
    RegisterRequest
    | RegisterReply
    | HeartbeatRequest
    | HeartbeatReply
    | DeregisterRequest
    | DeregisterReply
    | ChunkReport
    | PeerLookupRequest
    | PeerLookupReply
    | Command
    | CommandReply
    | ReapEvent
    | OperationRequest
    | OperationRecord
)

_encoder = msgspec.msgpack.Encoder()
_decoder: msgspec.msgpack.Decoder[Any] = msgspec.msgpack.Decoder(Message)


class _Tag(msgspec.Struct):
    type: str = "?"


_tag_decoder = msgspec.msgpack.Decoder(_Tag)


def encode(msg: msgspec.Struct) -> bytes:
    return _encoder.encode(msg)


def decode(frame: bytes | memoryview) -> Message | UnknownMessage:
    """Decode one frame.

    Returns :class:`UnknownMessage` for a well-formed frame whose tag is not known here.
    Raises :class:`~kvplane.errors.BadRequest` for a frame that is not a kvplane message
    (garbage, or a known tag with wrong fields).
    """
    try:
        msg: Message = _decoder.decode(frame)
        return msg
    except msgspec.ValidationError as exc:
        try:
            tag = _tag_decoder.decode(frame).type
        except msgspec.MsgspecError:
            raise BadRequest(f"malformed frame: {exc}") from None
        if tag not in _KNOWN_TAGS:
            return UnknownMessage(type=tag, raw=bytes(frame))
        raise BadRequest(f"malformed {tag!r} frame: {exc}") from None
    except msgspec.DecodeError as exc:
        raise BadRequest(f"undecodable frame: {exc}") from None


_KNOWN_TAGS = frozenset(
    cls.__struct_config__.tag  # type: ignore[attr-defined]
    for cls in (
        RegisterRequest,
        RegisterReply,
        HeartbeatRequest,
        HeartbeatReply,
        DeregisterRequest,
        DeregisterReply,
        ChunkReport,
        PeerLookupRequest,
        PeerLookupReply,
        ClearCommand,
        PinCommand,
        UnpinCommand,
        CompressCommand,
        DecompressCommand,
        MoveCommand,
        HealthCommand,
        CheckFinishCommand,
        ResyncCommand,
        CommandReply,
        ReapEvent,
        OperationRequest,
        OperationRecord,
    )
)


def pack_hashes(hashes: list[int] | np.ndarray) -> bytes:
    return np.asarray(hashes, dtype="<u8").tobytes()


def unpack_hashes(data: bytes) -> list[int]:
    return np.frombuffer(data, dtype="<u8").tolist()  # type: ignore[no-any-return]
