"""The router's memory of the prompts it sent (:mod:`kvplane.router.recent`): exact held
prefixes per backend, expiry, capacity; and through a real router, controller and two fake
backends, a prompt routed a moment ago counting as a hit where it went."""

from __future__ import annotations

import random
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kvplane.children import free_ports, start_child
from kvplane.router.recent import RecentPrompts, prefix_keys
from tests.router_support import Fleet
from tests.support import REPO_ROOT
from tests.test_router_tokenizer import WORDS, write_tokenizer

SYSTEM = list(range(100, 108))  # two blocks of four


def test_held_is_the_longest_prefix_sent_to_each_backend() -> None:
    recent = RecentPrompts(block=4, ttl_s=10.0)
    recent.add("a", prefix_keys([*SYSTEM, 1, 2, 3, 4], 4), now=0.0)
    recent.add("b", prefix_keys([*SYSTEM[:4], 9, 9, 9, 9], 4), now=1.0)
    asked = prefix_keys([*SYSTEM, 1, 2, 3, 4, 5, 6, 7, 8, 9], 4)
    assert recent.held(asked, now=2.0) == {"a": 12, "b": 4}
    # the same tokens behind another first block share no key
    assert recent.held(prefix_keys([0, *SYSTEM[1:]], 4), now=2.0) == {}
    # a partial last block is no key
    assert prefix_keys([1, 2, 3, 4, 5, 6], 4) == prefix_keys([1, 2, 3, 4], 4)


def test_entries_expire_after_ttl_and_a_resend_refreshes_them() -> None:
    recent = RecentPrompts(block=4, ttl_s=5.0)
    keys = prefix_keys(SYSTEM, 4)
    recent.add("a", keys, now=0.0)
    recent.add("b", keys[:1], now=3.0)
    assert recent.held(keys, now=5.0) == {"a": 8, "b": 4}
    assert recent.held(keys, now=5.5) == {"b": 4}
    recent.add("a", keys, now=6.0)
    assert recent.held(keys, now=8.5) == {"a": 8}


def test_capacity_drops_the_least_recently_sent_keys() -> None:
    recent = RecentPrompts(block=4, ttl_s=60.0, capacity=2)
    old = prefix_keys(SYSTEM, 4)
    recent.add("a", old, now=0.0)
    recent.add("a", prefix_keys([7, 7, 7, 7], 4), now=1.0)
    # the oldest key (the first block of SYSTEM) is gone, so none of SYSTEM counts
    assert recent.held(old, now=2.0) == {}
    with pytest.raises(ValueError, match="out of range"):
        RecentPrompts(block=0, ttl_s=1.0)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    """A real controller (no instance registered: the index answers no hit), two instant
    fake backends tokenizing as WORDS do, and a router given their tokenizer."""
    tok = write_tokenizer(tmp_path / "tokenizer.json")
    f = Fleet(tmp_path)
    children = []
    try:
        f.start_controller()
        backends = []
        for i, port in enumerate(free_ports(2)):
            args = [sys.executable, "-m", "benchmarks.fake_openai", "backend", "--port", str(port)]
            args += ["--tokenizer", str(tok)]
            child = start_child(f"fake-{i}", args, tmp_path / f"fake-{i}.log", cwd=REPO_ROOT)
            children.append(child)
            child.wait_healthy(f"http://127.0.0.1:{port}/health", timeout=30)
            backends += ["--backend", f"inst-{i}=http://127.0.0.1:{port}"]
        f.start_router(*backends, "--tokenizer", str(tok), "--log-level", "WARNING")
        yield f
    finally:
        f.stop()
        for child in children:
            child.stop()


def words(seed: int, n: int = 200) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n))


def route(fleet: Fleet, prompt: str) -> tuple[str, str, int]:
    """Send ``prompt``; the backend it went to, why, and the tokens the router counted as
    held there."""
    body = {"model": "fake", "prompt": prompt, "max_tokens": 1}
    reply = httpx.post(f"{fleet.router}/v1/completions", json=body, timeout=30)
    assert reply.status_code == 200, reply.text
    h = reply.headers
    return h["x-kvplane-instance"], h["x-kvplane-route-reason"], int(h["x-kvplane-matched-tokens"])


def test_a_prompt_the_router_just_sent_counts_as_held_where_it_went(fleet: Fleet) -> None:
    from tokenizers import Tokenizer

    first, reason, matched = route(fleet, words(1))
    assert (reason, matched) == ("load", 0)  # nothing anywhere yet
    # the index knows nothing (no instance registered), the router's memory does: the
    # 201 tokens (BOS included) hold three whole blocks of 64
    tok = Tokenizer.from_file(str(fleet.tmp / "tokenizer.json"))
    assert fleet.lookup(tok.encode(words(1)).ids) == {}
    again, reason, matched = route(fleet, words(1))
    assert (again, reason, matched) == (first, "prefix", 192)
    _, reason, matched = route(fleet, words(2))
    assert (reason, matched) == ("load", 0)
