"""The fleet benchmark's workloads (benchmarks/workload.py): deterministic from the seed,
each round extending the last, within the model's length, and no reuse where none is
meant."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.workload import (
    FIRST_ID,
    Shape,
    common_prefix,
    multi_round,
    no_reuse,
    poisson_arrivals,
    working_set_tokens,
)

VOCAB = 2000
MAX_LEN = 2048

shapes = st.builds(
    Shape,
    users=st.integers(1, 5),
    rounds=st.integers(1, 4),
    system_tokens=st.integers(0, 64),
    context_tokens=st.integers(2, 300),
    question_tokens=st.integers(1, 40),
    answer_tokens=st.integers(1, 40),
)
seeds = st.integers(0, 2**32)


@settings(max_examples=60, deadline=None)
@given(seed=seeds, shape=shapes)
def test_multi_round_is_the_seeds_and_each_round_extends_the_last(seed: int, shape: Shape) -> None:
    requests = multi_round(seed, shape, vocab=VOCAB, max_model_len=MAX_LEN)
    assert requests == multi_round(seed, shape, vocab=VOCAB, max_model_len=MAX_LEN)
    assert len(requests) == shape.users * shape.rounds
    assert [r.index for r in requests] == list(range(len(requests)))
    assert [(r.round, r.user) for r in requests] == sorted((r.round, r.user) for r in requests)
    for r in requests:
        assert len(r.prompt) == shape.prompt_tokens(r.round)
        assert len(r.prompt) + r.max_tokens <= MAX_LEN
        assert len(r.answer) == r.max_tokens == shape.answer_tokens
        assert all(FIRST_ID <= t < VOCAB for t in r.prompt + r.answer)
        if r.round == 0:
            assert r.after is None
            continue
        assert r.after is not None
        previous = requests[r.after]
        assert (previous.user, previous.round) == (r.user, r.round - 1)
        history = previous.prompt + previous.answer
        assert r.prompt[: len(history)] == history
        assert len(r.prompt) == len(history) + shape.question_tokens


@settings(max_examples=40, deadline=None)
@given(seed=seeds, shape=shapes)
def test_users_share_exactly_the_system_prompt(seed: int, shape: Shape) -> None:
    first = [r for r in multi_round(seed, shape, vocab=VOCAB, max_model_len=MAX_LEN) if not r.round]
    for a, b in itertools.combinations(first, 2):
        assert common_prefix(a.prompt, b.prompt) == shape.system_tokens


@settings(max_examples=40, deadline=None)
@given(seed=seeds, count=st.integers(1, 30), length=st.integers(2, 200))
def test_no_reuse_prompts_share_at_most_one_token(seed: int, count: int, length: int) -> None:
    requests = no_reuse(seed, count, length, 8, vocab=VOCAB)
    assert requests == no_reuse(seed, count, length, 8, vocab=VOCAB)
    assert all(len(r.prompt) == length and r.after is None for r in requests)
    for a, b in itertools.combinations(requests, 2):
        assert common_prefix(a.prompt, b.prompt) <= 1
    assert working_set_tokens([r.prompt for r in requests]) >= count * (length - 1)


@given(seed=seeds, shape=shapes)
def test_working_set_counts_every_distinct_prefix_once(seed: int, shape: Shape) -> None:
    requests = multi_round(seed, shape, vocab=VOCAB, max_model_len=MAX_LEN)
    last = [r.prompt for r in requests if r.round == shape.rounds - 1]
    expected = shape.system_tokens + sum(len(p) - shape.system_tokens for p in last)
    assert working_set_tokens([r.prompt for r in requests]) == expected


@given(seed=seeds, count=st.integers(1, 50), rate=st.floats(0.1, 100))
def test_poisson_arrivals_start_at_zero_and_never_go_back(
    seed: int, count: int, rate: float
) -> None:
    times = poisson_arrivals(seed, count, rate)
    assert times == poisson_arrivals(seed, count, rate)
    assert times[0] == 0.0 and len(times) == count
    assert all(b >= a for a, b in itertools.pairwise(times))


def test_bad_shapes_are_refused_by_name() -> None:
    too_long = Shape(2, 3, 100, 1800, 32, 32)
    with pytest.raises(ValueError, match="more than 2048"):
        multi_round(0, too_long, vocab=VOCAB, max_model_len=MAX_LEN)
    with pytest.raises(ValueError, match="at least 1"):
        multi_round(0, Shape(0, 1, 1, 10, 1, 1), vocab=VOCAB, max_model_len=MAX_LEN)
    with pytest.raises(ValueError, match="rate"):
        poisson_arrivals(0, 3, 0.0)
