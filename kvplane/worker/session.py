"""The worker's session with the controller, as a state machine: no sockets, threads or clock.

The shell (:mod:`kvplane.worker.service`) asks :meth:`WorkerSession.poll` what to send at
time ``now``, sends it, and hands the reply (None: none came, or none is sent in the seeds'
pull-only mode) to :meth:`WorkerSession.on_reply`. What changed comes back as a
:class:`Change`, which the shell acts on (open the report stream with a full snapshot, close
it). Times are seconds on any monotonic clock; randomness (epochs, jitter) comes from the
``rng`` given, so a test with a seeded one sees exact transitions::

    UNREGISTERED --poll--> RegisterRequest (fresh epoch) --on_reply-->
        accepted (or pull-only)        -> REGISTERED; first heartbeat one interval later
        refused / no answer            -> UNREGISTERED; retry after min(1 s, heartbeat)
    REGISTERED --poll, every heartbeat--> HeartbeatRequest --on_reply-->
        OK / no answer                 -> REGISTERED
        UNKNOWN_WORKER / RESYNC        -> UNREGISTERED; register again after a random jitter
    REGISTERED --resync_requested (a ResyncCommand in pull-only mode, or the shell lost
        storage events)--> the same as RESYNC
    any --close--> CLOSED (a DeregisterRequest to send if it was registered)

Reports are numbered per registration (:meth:`WorkerSession.next_report`): a report the shell
could not send keeps its number, so the controller sees the gap and answers the next
heartbeat with RESYNC instead of silently drifting.
"""

from __future__ import annotations

import random
from enum import Enum
from typing import NamedTuple

import msgspec

from kvplane.protocol import (
    ChunkReport,
    DeregisterRequest,
    HeartbeatReply,
    HeartbeatRequest,
    HeartbeatStatus,
    RegisterReply,
    RegisterRequest,
    Segment,
)

__all__ = ["Change", "Outgoing", "Phase", "WorkerSession"]

_RETRY_S = 1.0  # at most this long between registration attempts
_DEREGISTER_S = 2.0  # at most this long to wait for a deregistration's reply


class Phase(str, Enum):
    UNREGISTERED = "unregistered"
    REGISTERED = "registered"
    CLOSED = "closed"


class Change(str, Enum):
    """What a reply (or a resync command) did to the session."""

    NONE = "none"  # no transition: a heartbeat answered OK, or not answered
    REGISTERED = "registered"  # accepted: (re)open the report stream with a full snapshot
    REFUSED = "refused"  # the controller refused the registration (its reason is logged)
    NO_ANSWER = "no_answer"  # the registration went unanswered
    DROPPED = "dropped"  # the controller lost us or saw a gap: close the report stream


class Outgoing(NamedTuple):
    """A request to send and how long to wait for its reply."""

    message: RegisterRequest | HeartbeatRequest | DeregisterRequest
    timeout_s: float


class WorkerSession:
    """One worker's registration state. Not thread-safe: one thread drives it."""

    def __init__(
        self,
        hello: RegisterRequest,
        *,
        heartbeat_s: float,
        timeout_s: float,
        replies: bool = True,
        rng: random.Random | None = None,
        now: float = 0.0,
    ) -> None:
        """``hello``: the registration to send (its ``epoch`` is replaced by a fresh one at
        every attempt); ``timeout_s``: the longest wait for any reply; ``replies``: False in
        pull-only mode, where nothing is answered and every registration counts as
        accepted. The first registration is due at ``now``."""
        self.hello = hello
        self.heartbeat_s = heartbeat_s
        self.timeout_s = timeout_s
        self.replies = replies
        self.phase = Phase.UNREGISTERED
        self.epoch = 0  # of the current (or last) registration
        self.seq = 0  # number of the last report of this registration
        self.next_register: float = now
        self.next_heartbeat: float = float("inf")
        self._rng = rng or random.Random()
        self._awaiting: RegisterRequest | HeartbeatRequest | None = None

    @property
    def registered(self) -> bool:
        return self.phase is Phase.REGISTERED

    # --- requests ------------------------------------------------------------------------------

    def poll(self, now: float) -> Outgoing | None:
        """The request due at ``now``, if any; its reply must go to :meth:`on_reply` before
        the next poll. A heartbeat never waits past the next one: after a controller
        restart the lost request must not delay the heartbeat that learns of it."""
        if self._awaiting is not None:
            raise RuntimeError(f"{type(self._awaiting).__name__} still awaits on_reply")
        if self.phase is Phase.UNREGISTERED and now >= self.next_register:
            hello = msgspec.structs.replace(self.hello, epoch=self._rng.getrandbits(62))
            self._awaiting = hello
            return Outgoing(hello, self.timeout_s)
        if self.phase is Phase.REGISTERED and now >= self.next_heartbeat:
            self.next_heartbeat = now + self.heartbeat_s
            beat = HeartbeatRequest(
                instance_id=self.hello.instance_id,
                worker_id=self.hello.worker_id,
                epoch=self.epoch,
                ip=self.hello.ip,
                port=self.hello.port or None,
                curve_key=self.hello.curve_key,
            )
            self._awaiting = beat
            return Outgoing(beat, min(self.timeout_s, self.heartbeat_s))
        return None

    def on_reply(self, reply: object | None, now: float) -> Change:
        """Apply the reply to the last polled request (None: no reply)."""
        sent, self._awaiting = self._awaiting, None
        if sent is None:
            raise RuntimeError("on_reply without a polled request")
        if self.phase is Phase.CLOSED:
            return Change.NONE
        if isinstance(sent, RegisterRequest):
            return self._registration_answered(sent, reply, now)
        if isinstance(reply, HeartbeatReply) and reply.status in (
            HeartbeatStatus.UNKNOWN_WORKER,
            HeartbeatStatus.RESYNC,
        ):
            return self._drop(now)
        return Change.NONE

    def resync_requested(self, now: float) -> Change:
        """A ResyncCommand arrived (how a pull-only controller answers a heartbeat it does
        not like), or the shell lost storage events: re-register and resync, as after a
        RESYNC reply."""
        return self._drop(now) if self.phase is Phase.REGISTERED else Change.NONE

    def close(self) -> Outgoing | None:
        """End the session; the DeregisterRequest to send (no reply is applied) if it was
        registered, so its chunks leave lookups at once."""
        was_registered = self.phase is Phase.REGISTERED
        self.phase = Phase.CLOSED
        self._awaiting = None
        if not was_registered:
            return None
        bye = DeregisterRequest(
            instance_id=self.hello.instance_id, worker_id=self.hello.worker_id, epoch=self.epoch
        )
        return Outgoing(bye, min(self.timeout_s, _DEREGISTER_S))

    # --- reports -------------------------------------------------------------------------------

    def next_report(self, segments: list[Segment]) -> ChunkReport:
        """The next numbered report of this registration. Call it for every report, sent
        or not: a dropped one leaves the gap that makes the controller ask for a resync."""
        if self.phase is not Phase.REGISTERED:
            raise RuntimeError(f"no report while {self.phase.value}")
        self.seq += 1
        return ChunkReport(
            instance_id=self.hello.instance_id,
            worker_id=self.hello.worker_id,
            epoch=self.epoch,
            seq=self.seq,
            segments=segments,
        )

    # --- transitions ---------------------------------------------------------------------------

    def _registration_answered(self, sent: RegisterRequest, reply: object, now: float) -> Change:
        if self.replies and not (isinstance(reply, RegisterReply) and reply.ok):
            self.next_register = now + min(_RETRY_S, self.heartbeat_s)
            return Change.REFUSED if isinstance(reply, RegisterReply) else Change.NO_ANSWER
        self.phase = Phase.REGISTERED
        self.epoch, self.seq = sent.epoch, 0
        self.next_heartbeat = now + self.heartbeat_s
        return Change.REGISTERED

    def _drop(self, now: float) -> Change:
        self.phase = Phase.UNREGISTERED
        self.next_heartbeat = float("inf")
        # Spread the re-registrations of a whole cluster after a controller restart.
        self.next_register = now + self._rng.uniform(0, min(_RETRY_S, self.heartbeat_s / 2))
        return Change.DROPPED
