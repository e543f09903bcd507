"""What a worker does with each controller command: one handler per command type.

Handlers run the command against the cache engine and return a :class:`CommandReply`;
the kvplane errors of :data:`~kvplane.protocol.REFUSALS` become their error codes
(BadRequest -> BAD_REQUEST, NotFound -> NOT_FOUND, ...), anything else FAILED, with the error
text, so the controller can say what went wrong.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from kvplane.engine.p2p.move import MoveRequest
from kvplane.errors import Unsupported
from kvplane.protocol import (
    REFUSALS,
    CheckFinishCommand,
    ClearCommand,
    Command,
    CommandReply,
    CompressCommand,
    DecompressCommand,
    ErrorCode,
    HealthCommand,
    MoveCommand,
    PinCommand,
    ResyncCommand,
    UnpinCommand,
)

if TYPE_CHECKING:
    from kvplane.engine.cache_engine import CacheEngine

__all__ = ["CommandHandlers"]

log = logging.getLogger(__name__)


class CommandHandlers:
    """Runs commands on one engine; remembers recent event outcomes for check_finish."""

    def __init__(
        self,
        engine: CacheEngine,
        on_resync: Callable[[], None] | None = None,
        remember: int = 10_000,
    ) -> None:
        """``on_resync``: what a ResyncCommand triggers (the worker's re-registration)."""
        self._engine = engine
        self._on_resync = on_resync
        self._remember = remember
        self._events: OrderedDict[str, str] = OrderedDict()
        self._handlers: dict[type, Callable[[Any], CommandReply]] = {
            ClearCommand: self._clear,
            PinCommand: self._pin,
            UnpinCommand: self._unpin,
            CompressCommand: self._compress,
            DecompressCommand: self._decompress,
            MoveCommand: self._move,
            HealthCommand: self._health,
            CheckFinishCommand: self._check_finish,
            ResyncCommand: self._resync,
        }

    def handle(self, command: Command | Any) -> CommandReply:
        handler = self._handlers.get(type(command))
        if handler is None:
            return CommandReply(
                error_code=ErrorCode.BAD_REQUEST,
                message=f"unknown command {getattr(command, 'type', type(command).__name__)!r}",
            )
        try:
            reply = handler(command)
        except Exception as exc:
            code = next((c for c, t in REFUSALS.items() if isinstance(exc, t)), ErrorCode.FAILED)
            if code is ErrorCode.FAILED:
                log.exception("command %s failed", type(command).__name__)
            reply = CommandReply(error_code=code, message=f"{type(exc).__name__}: {exc}")
        event_id = getattr(command, "event_id", None)
        if event_id and not isinstance(command, CheckFinishCommand):
            self._events[event_id] = "finished" if reply.error_code == ErrorCode.OK else "failed"
            while len(self._events) > self._remember:
                self._events.popitem(last=False)
        return reply

    # --- handlers ----------------------------------------------------------------------------

    def _clear(self, cmd: ClearCommand) -> CommandReply:
        return CommandReply(num_tokens=self._engine.clear(cmd.locations).num_tokens)

    def _pin(self, cmd: PinCommand) -> CommandReply:
        return CommandReply(num_tokens=self._engine.pin(cmd.tokens, cmd.location))

    def _unpin(self, cmd: UnpinCommand) -> CommandReply:
        return CommandReply(num_tokens=self._engine.unpin(cmd.tokens, cmd.location))

    def _compress(self, cmd: CompressCommand) -> CommandReply:
        done = self._engine.compress(method=cmd.method, location=cmd.location, tokens=cmd.tokens)
        return CommandReply(num_tokens=done)

    def _decompress(self, cmd: DecompressCommand) -> CommandReply:
        done = self._engine.decompress(location=cmd.location, tokens=cmd.tokens, method=cmd.method)
        return CommandReply(num_tokens=done)

    def _move(self, cmd: MoveCommand) -> CommandReply:
        if not cmd.dst_peer_url:
            raise Unsupported(
                f"destination instance {cmd.dst_instance_id!r} has no peer URL (enable_p2p)"
            )
        request = MoveRequest(
            source_location=cmd.src_location,
            peer_url=cmd.dst_peer_url,
            target_location=cmd.dst_location or None,
            tokens=cmd.tokens,
            copy=cmd.copy,
        )
        return CommandReply(num_tokens=self._engine.move(request))

    def _health(self, cmd: HealthCommand) -> CommandReply:
        return CommandReply()

    def _resync(self, cmd: ResyncCommand) -> CommandReply:
        if self._on_resync is None:
            raise Unsupported("this worker cannot resync on command")
        self._on_resync()
        return CommandReply()

    def _check_finish(self, cmd: CheckFinishCommand) -> CommandReply:
        return CommandReply(status=self._events.get(cmd.event_id, "not_found"))
