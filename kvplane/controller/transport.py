"""Commands to workers' command ports over ZMQ REQ, shared by the ZMQ controller and the
replicas: one socket per command, so a timed-out exchange never poisons the next; a CURVE
client towards a worker that registered a CURVE key when the controller has keys."""

from __future__ import annotations

import zmq

from kvplane.controller.registry import WorkerRecord
from kvplane.curve import KeyPair, make_client
from kvplane.errors import Unavailable
from kvplane.protocol import (
    Command,
    CommandReply,
    ErrorCode,
    HeartbeatRequest,
    decode,
    encode,
)

__all__ = ["CommandSender", "resync_target"]


class CommandSender:
    """The executor's transport (:data:`kvplane.controller.executor.Transport`)."""

    def __init__(self, ctx: zmq.Context[zmq.Socket[bytes]], keys: KeyPair | None = None) -> None:
        self._ctx = ctx
        self.keys = keys

    def __call__(self, worker: WorkerRecord, command: Command, timeout: float) -> CommandReply:
        sock: zmq.Socket[bytes] = self._ctx.socket(zmq.REQ)
        try:
            sock.setsockopt(zmq.LINGER, 0)
            if ":" in worker.ip:
                sock.setsockopt(zmq.IPV6, 1)
            if self.keys is not None and worker.curve_key:
                make_client(sock, self.keys, worker.curve_key.encode())
            sock.connect(worker.address)
            sock.send(encode(command))
            if not sock.poll(int(timeout * 1000), zmq.POLLIN):
                raise Unavailable(
                    f"worker {worker.instance_id}/{worker.worker_id} at {worker.address} "
                    f"did not answer within {timeout:g}s"
                )
            reply = decode(sock.recv())
        finally:
            sock.close(linger=0)
        if not isinstance(reply, CommandReply):
            return CommandReply(
                error_code=ErrorCode.FAILED, message=f"unexpected reply {type(reply).__name__}"
            )
        return reply


def resync_target(heartbeat: HeartbeatRequest, now: float) -> WorkerRecord | None:
    """Where to send a ResyncCommand for a heartbeat that could not be answered (it came
    over PULL, or through the event log): its command port, if it says; else None."""
    if not heartbeat.ip or not heartbeat.port:
        return None
    return WorkerRecord(
        instance_id=heartbeat.instance_id,
        worker_id=heartbeat.worker_id,
        ip=heartbeat.ip,
        port=heartbeat.port,
        peer_init_url=None,
        chunk_size=0,
        key_scheme="",
        epoch=heartbeat.epoch,
        registration_time=now,
        last_heartbeat_time=now,
        curve_key=heartbeat.curve_key,
    )
