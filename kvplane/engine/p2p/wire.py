"""The peer-to-peer wire: one request and one reply per TCP connection.

A control message is a u32 length (little endian) and a msgpack-encoded tagged struct. Chunk
frames (:mod:`kvplane.engine.serde`) follow a message back to back, their sizes listed in it:

    fetch:  -> FetchRequest(keys)          <- FetchReply(sizes) frame*   (size 0 = miss)
    push:   -> PushRequest(sizes, location) frame*   <- PushReply(accepted)
    either: <- ErrorReply(message) instead of the reply

Every read and write runs against one absolute deadline, so a silent or dead peer costs at
most the transfer timeout, never a hang.
"""

from __future__ import annotations

import socket
import struct
import time
from collections.abc import Callable

import msgspec
import numpy as np

from kvplane.errors import Unavailable

__all__ = [
    "MAX_CONTROL_BYTES",
    "Deadline",
    "ErrorReply",
    "FetchReply",
    "FetchRequest",
    "Message",
    "PushReply",
    "PushRequest",
    "recv_exact",
    "recv_message",
    "send_message",
]

MAX_CONTROL_BYTES = 16 * 1024 * 1024
_LEN = struct.Struct("<I")


class FetchRequest(msgspec.Struct, tag="fetch"):
    keys: list[str]


class FetchReply(msgspec.Struct, tag="fetch_reply"):
    sizes: list[int]


class PushRequest(msgspec.Struct, tag="push"):
    sizes: list[int]
    #: the receiver's tier to store into (None: its usual store path)
    location: str | None = None


class PushReply(msgspec.Struct, tag="push_reply"):
    accepted: list[bool]


class ErrorReply(msgspec.Struct, tag="error"):
    message: str


Message = FetchRequest | FetchReply | PushRequest | PushReply | ErrorReply
_encoder = msgspec.msgpack.Encoder()
_decoder = msgspec.msgpack.Decoder(Message)


class Deadline:
    """An absolute monotonic deadline; ``remaining()`` raises Unavailable once it passed."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds

    def remaining(self) -> float:
        left = self.at - time.monotonic()
        if left <= 0:
            raise Unavailable("peer transfer deadline passed")
        return left


def send_message(sock: socket.socket, msg: Message, deadline: Deadline) -> None:
    body = _encoder.encode(msg)
    send_all(sock, _LEN.pack(len(body)) + body, deadline)


def send_all(sock: socket.socket, data: bytes | memoryview, deadline: Deadline) -> None:
    view = memoryview(data).cast("B")
    sent = 0
    while sent < view.nbytes:
        sock.settimeout(deadline.remaining())
        try:
            sent += sock.send(view[sent : sent + (4 << 20)])
        except TimeoutError:
            raise Unavailable("peer transfer deadline passed while sending") from None
        except OSError as exc:
            raise Unavailable(f"peer connection failed while sending: {exc}") from None


def recv_exact(sock: socket.socket, n: int, deadline: Deadline) -> memoryview:
    """Exactly ``n`` bytes, in a writable buffer of their own (not zeroed first: a chunk
    frame is megabytes, and every byte is overwritten)."""
    view = new_buffer(n)
    recv_into(sock, view, deadline)
    return view


def new_buffer(n: int) -> memoryview:
    """A writable ``n``-byte buffer, not zeroed (every byte is about to be overwritten)."""
    return np.empty(n, dtype=np.uint8).data


def recv_into(
    sock: socket.socket,
    view: memoryview,
    deadline: Deadline,
    on_piece: Callable[[memoryview], None] | None = None,
) -> None:
    """Fill all of the writable byte buffer ``view`` from ``sock``; ``on_piece`` sees each
    received piece as it lands."""
    n = view.nbytes
    got = 0
    while got < n:
        sock.settimeout(deadline.remaining())
        try:
            k = sock.recv_into(view[got:], n - got)
        except TimeoutError:
            raise Unavailable("peer transfer deadline passed while receiving") from None
        except OSError as exc:
            raise Unavailable(f"peer connection failed while receiving: {exc}") from None
        if k == 0:
            raise Unavailable(f"peer closed the connection after {got} of {n} bytes")
        if on_piece is not None:
            on_piece(view[got : got + k])
        got += k


def recv_message(sock: socket.socket, deadline: Deadline) -> Message:
    (length,) = _LEN.unpack(recv_exact(sock, _LEN.size, deadline))
    if length > MAX_CONTROL_BYTES:
        raise Unavailable(f"peer sent a {length}-byte control message")
    try:
        return _decoder.decode(recv_exact(sock, length, deadline))
    except msgspec.DecodeError as exc:
        raise Unavailable(f"peer sent an unreadable message: {exc}") from None
