"""The peer directory alone, over a fake link: what it asks the controller and when."""

from __future__ import annotations

from typing import Any

from kvplane.keys import CacheKey
from kvplane.protocol import PeerLookupReply, PeerLookupRequest, pack_hashes
from kvplane.worker.peers import PeerDirectory


class FakeLink:
    def __init__(self, reply: Any, answers: bool = True) -> None:
        self.reply, self.answers = reply, answers
        self.sent: list[tuple[Any, float]] = []

    def request(self, msg: Any, timeout_s: float) -> Any:
        self.sent.append((msg, timeout_s))
        return self.reply


KEYS = [CacheKey("m", 1, 0, "bfloat16", h) for h in (11, 22, 33)]


def directory(link: FakeLink, registered: bool = True) -> PeerDirectory:
    return PeerDirectory(
        link,  # type: ignore[arg-type]
        instance_id="a",
        worker_id=0,
        chunk_size=16,
        timeout_s=0.5,
        registered=lambda: registered,
    )


def test_asks_for_the_keys_and_returns_the_peer_url() -> None:
    link = FakeLink(PeerLookupReply(instance_id="b", peer_init_url="h:1", num_chunks=2))
    assert directory(link).locate(KEYS) == "h:1"
    request = PeerLookupRequest(
        instance_id="a", worker_id=0, hashes=pack_hashes([11, 22, 33]), chunk_size=16
    )
    assert link.sent == [(request, 0.5)]


def test_no_peer_no_answer_or_nothing_to_ask_is_none() -> None:
    assert directory(FakeLink(PeerLookupReply())).locate(KEYS) is None  # nobody holds them
    assert directory(FakeLink(None)).locate(KEYS) is None  # timed out
    for link, registered, keys in (
        (FakeLink(None, answers=False), True, KEYS),  # pull-only controller
        (FakeLink(None), False, KEYS),  # not registered: the controller does not know us
        (FakeLink(None), True, []),
    ):
        assert directory(link, registered).locate(keys) is None
        assert link.sent == []
