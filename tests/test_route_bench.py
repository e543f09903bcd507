"""The pieces of ``benchmarks/route.py`` that need no vLLM: its workloads (deterministic,
shaped as documented), the text that tokenizes back to a prompt's ids, the oracle (against
a brute-force count), the targets' arithmetic, and the instant fake backend with the
round-robin proxy and the latency client, on real loopback sockets."""

from __future__ import annotations

import collections
import itertools
import random
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.client import counters, run_workload
from benchmarks.latency import measure_latency
from benchmarks.oracle import oracle_computed
from benchmarks.route_report import targets
from benchmarks.route_weights import weights_of
from benchmarks.workload import FIRST_ID, common_prefix, shared_prefix
from kvplane.children import free_ports, start_child

ROOT = Path(__file__).resolve().parent.parent
seeds = st.integers(0, 2**32)


@settings(max_examples=50, deadline=None)
@given(
    seed=seeds,
    groups=st.integers(2, 6),
    requests=st.integers(1, 40),
    system=st.integers(2, 50),
    question=st.integers(1, 20),
    hot=st.none() | st.floats(0.05, 0.95),
)
def test_shared_prefix_is_the_seeds_and_groups_share_exactly_their_prompt(
    seed: int, groups: int, requests: int, system: int, question: int, hot: float | None
) -> None:
    made = shared_prefix(seed, groups, requests, system, question, 4, vocab=500, hot_share=hot)
    assert made == shared_prefix(
        seed, groups, requests, system, question, 4, vocab=500, hot_share=hot
    )
    assert [r.index for r in made] == list(range(requests))
    per_group = collections.Counter(r.user for r in made)
    if hot is None:
        assert max(per_group.values()) - min(per_group.values()) <= 1 or len(per_group) < groups
    else:
        assert per_group[0] == round(hot * requests)
    for g in per_group:
        asked = [r.round for r in made if r.user == g]
        assert asked == list(range(len(asked)))
    for a, b in itertools.combinations(made, 2):
        assert len(a.prompt) == system + question and a.after is None
        assert all(FIRST_ID <= t < 500 for t in a.prompt)
        shared = common_prefix(a.prompt, b.prompt)
        assert shared >= system if a.user == b.user else shared == 0


def test_a_listed_vocabulary_is_used_exactly() -> None:
    ids = [7, 11, 13]
    made = shared_prefix(1, 3, 9, 5, 3, 2, vocab=ids)
    assert {t for r in made for t in r.prompt + r.answer} <= set(ids)
    with pytest.raises(ValueError, match="distinct tags"):
        shared_prefix(1, 10, 10, 5, 3, 2, vocab=ids)
    with pytest.raises(ValueError, match="hot_share"):
        shared_prefix(1, 3, 9, 5, 3, 2, vocab=ids, hot_share=1.0)


def test_word_text_tokenizes_back_to_its_ids() -> None:
    from benchmarks.route import word_alphabet
    from kvplane.integrations.vllm.testmodel import train_tokenizer

    tokenizer = train_tokenizer().backend_tokenizer
    alphabet = word_alphabet(tokenizer)
    assert len(alphabet) > 100
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.choice(alphabet) for _ in range(rng.randrange(1, 400))]
        assert tokenizer.encode(tokenizer.decode(ids)).ids == [1, *ids]


def brute_force(prompts: list[list[int]]) -> int:
    """Tokens computed when each prompt is sent after the last one finished, with every
    earlier prompt cached token by token: all but the longest prefix any earlier prompt
    shares (at least one token)."""
    total = 0
    for i, p in enumerate(prompts):
        shared = max((common_prefix(p, q) for q in prompts[:i]), default=0)
        total += max(1, len(p) - shared)
    return total


prompt_lists = st.lists(
    st.lists(st.integers(0, 2), min_size=1, max_size=12), min_size=1, max_size=8
)


@settings(max_examples=200, deadline=None)
@given(prompts=prompt_lists)
def test_oracle_one_after_the_other_matches_brute_force(prompts: list[list[int]]) -> None:
    times = [float(i) for i in range(len(prompts))]
    computed = oracle_computed(prompts, times, [t + 0.5 for t in times], block=1)
    assert sum(computed) == brute_force(prompts)
    assert all(1 <= c <= len(p) for c, p in zip(computed, prompts, strict=True))


@settings(max_examples=150, deadline=None)
@given(prompts=prompt_lists, block=st.integers(1, 4), capacity=st.integers(0, 20), data=st.data())
def test_oracle_computes_no_less_with_less_room_or_later_prefills(
    prompts: list[list[int]], block: int, capacity: int, data: st.DataObject
) -> None:
    n = len(prompts)
    sent = sorted(data.draw(st.lists(st.floats(0, 10), min_size=n, max_size=n)))
    took = data.draw(st.lists(st.floats(0, 3), min_size=n, max_size=n))
    ready = [s + t for s, t in zip(sent, took, strict=True)]
    unbounded = sum(oracle_computed(prompts, sent, ready, block=block))
    bounded = sum(oracle_computed(prompts, sent, ready, block=block, capacity_blocks=capacity))
    later = sum(oracle_computed(prompts, sent, [r + 5 for r in ready], block=block))
    assert unbounded <= bounded <= sum(len(p) for p in prompts)
    assert unbounded <= later
    assert sum(oracle_computed(prompts, sent, ready, block=block, capacity_blocks=0)) == sum(
        len(p) for p in prompts
    )


def test_oracle_counts_whole_blocks_and_refuses_bad_input() -> None:
    system = list(range(8))
    prompts = [[*system, 20, 21, 22], [*system, 30, 31, 32], system]
    # the second reuses two blocks of four; the third, all cached, still computes a block
    assert oracle_computed(prompts, [0, 1, 2], [0.5, 1.5, 2.5], block=4) == [11, 3, 4]
    # sent while the first is still in its prefill: nothing to reuse yet
    assert oracle_computed(prompts[:2], [0, 1], [2, 3], block=4) == [11, 11]
    # prefills that take no time (benchmarks/route.py's bound): each request still computes
    # what no earlier request held, its own blocks included
    assert oracle_computed(prompts, [0, 1, 2], [0, 1, 2], block=4) == [11, 3, 4]
    assert oracle_computed(prompts[:2], [0, 0], [0, 0], block=4) == [11, 3]
    with pytest.raises(ValueError, match="before it is sent"):
        oracle_computed(prompts[:1], [1.0], [0.5], block=4)
    with pytest.raises(ValueError, match="as long"):
        oracle_computed(prompts, [0], [1], block=4)


def run_row(p50: float, p99: float, computed: int = 100, oracle: int = 100) -> dict[str, float]:
    return {"ttft_p50_s": p50, "ttft_p99_s": p99, "computed": computed, "oracle_computed": oracle}


def test_targets_are_ratios_within_the_run() -> None:
    rows = {
        "round-robin": run_row(1.0, 2.0),
        "sglang": run_row(0.6, 1.0),
        "vllm-router": run_row(0.5, 1.5),
        "kvplane": run_row(0.3, 0.9, computed=104),
    }
    hot = {**rows, "kvplane": run_row(0.3, 1.1)}
    latency = {"kvplane": {"added_p50_ms": 1.0, "added_p99_ms": 12.0}}
    got = {
        t.name: t
        for t in targets({"runs": {"shared-prefix": rows, "hot-spot": hot}, "latency": latency})
    }
    assert got["shared-prefix: p50 vs round robin"].value == pytest.approx(0.3)
    assert got["shared-prefix: p50 vs best other router"].value == pytest.approx(0.6)
    assert got["shared-prefix: p50 vs best other router"].met
    assert got["shared-prefix: computed vs oracle"].met
    assert got["hot-spot: p99 vs best other router"].value == pytest.approx(1.1)
    assert not got["hot-spot: p99 vs best other router"].met
    assert got["added latency p50 (ms)"].met and not got["added latency p99 (ms)"].met
    without = targets({"runs": {"shared-prefix": {"round-robin": run_row(1, 2)}}})
    assert all(t.value is None and t.met is None and "n/a" in t.line() for t in without)


def test_weights_are_shares_of_computing() -> None:
    medians = {"compute": 1.1, "vllm_hit": 0.1, "cpu": 0.2, "p2p": 0.35, "disk": 0.05}
    assert weights_of(medians) == pytest.approx({"cpu": 0.1, "p2p": 0.25, "disk": 0.0})
    with pytest.raises(ValueError, match="not slower"):
        weights_of({**medians, "compute": 0.1})


@pytest.fixture(scope="module")
def fake_pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[list[str], str]]:
    """Two fake backends and the round-robin proxy in front of them (child processes)."""
    folder = tmp_path_factory.mktemp("fake")
    ports = free_ports(3)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    module = [sys.executable, "-m", "benchmarks.fake_openai"]
    children = []
    try:
        for i, port in enumerate(ports[:2]):
            args = [*module, "backend", "--port", str(port), "--model", "m"]
            children.append(start_child(f"fake-{i}", args, folder / f"{i}.log", cwd=ROOT))
        proxy = [*module, "proxy", "--port", str(ports[2]), "--backend", *urls[:2]]
        children.append(start_child("proxy", proxy, folder / "proxy.log", cwd=ROOT))
        for child, url in zip(children, urls, strict=True):
            child.wait_healthy(f"{url}/health", timeout=30)
        yield urls[:2], urls[2]
    finally:
        for child in children:
            child.stop(5.0)


COMPLETIONS = {"completions": ("fake:completions_total", "")}


def served(urls: list[str]) -> list[float]:
    return [counters(u, COMPLETIONS)["completions"] for u in urls]


def test_round_robin_proxy_alternates_and_relays_streams(fake_pair: tuple[list[str], str]) -> None:
    backends, proxy = fake_pair
    before = served(backends)
    body = {"model": "m", "prompt": "a b c", "max_tokens": 3}
    plain = httpx.post(f"{proxy}/v1/completions", json=body, timeout=10)
    assert plain.status_code == 200 and plain.json()["choices"][0]["text"] == "xxx"
    with httpx.stream(
        "POST", f"{proxy}/v1/completions", json={**body, "stream": True}, timeout=10
    ) as resp:
        events = [line for line in resp.iter_lines() if line.startswith("data:")]
    assert len(events) == 4 and events[-1] == "data: [DONE]"
    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    reply = httpx.post(f"{proxy}/v1/chat/completions", json=chat, timeout=10).json()
    assert reply["choices"][0]["message"]["content"] == "xx"
    grew = [b - a for a, b in zip(before, served(backends), strict=True)]
    assert sorted(grew) == [1, 2]
    bad = httpx.post(f"{backends[0]}/v1/completions", content=b"{", timeout=10)
    assert bad.status_code == 400 and "error" in bad.json()


def test_workload_client_and_latency_client_through_the_proxy(
    fake_pair: tuple[list[str], str],
) -> None:
    backends, proxy = fake_pair
    requests = shared_prefix(3, 2, 8, 20, 5, 3, vocab=300)
    texts = {r.index: " ".join(map(str, r.prompt)) for r in requests}
    before = served(backends)
    outcomes, wall = run_workload(proxy, "m", requests, 3, texts=texts)
    assert [len(o.tokens) for o in outcomes] == [3] * 8 and wall > 0
    assert all(o.ttft > 0 and o.sent <= o.done for o in outcomes)
    run = measure_latency(proxy, [texts[i % 8] for i in range(60)], 100.0, model="m")
    assert run.failures == 0 and len(run.seconds) == 60
    assert list(run.seconds) == sorted(run.seconds)
    grew = [b - a for a, b in zip(before, served(backends), strict=True)]
    assert grew == [34, 34]
