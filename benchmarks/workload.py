"""The requests of ``benchmarks/fleet.py``, made from a seed; pure (no sockets, no threads).

Two workloads of token-id prompts:

* :func:`multi_round`, in the shape of production-stack's multi-round QA and LMCache's
  long-document QA: ``users`` users share one system prompt, each has a long private
  context, and each of ``rounds`` rounds sends the whole history (the previous prompt, its
  answer) plus a new question. The answer in the history is the workload's own seeded
  answer of ``answer_tokens`` tokens, not what the model generated, so every configuration
  gets the same requests whatever it answered. Requests come round by round, users in
  order: the access pattern that makes an LRU cache smaller than the working set miss.
* :func:`no_reuse`: every prompt unique from its first two tokens on.
* :func:`shared_prefix`, in the shape of llm-d's shared-prefix benchmark: ``groups`` groups
  of users, each group sharing one long system prompt, each request the prompt plus its own
  question, in a seeded random order; with ``hot_share`` one group sends that share of all
  requests (a hot spot).

``vocab`` is either a number (ids ``FIRST_ID`` up to it) or the ids themselves: a list of
ids that each decode to one word, so that the text of a prompt tokenizes back to exactly its
ids (``benchmarks/route.py`` sends text, which every router can read). Prompts never hold
ids below :data:`FIRST_ID` (the test model's pad, BOS and EOS).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "FIRST_ID",
    "Request",
    "Shape",
    "common_prefix",
    "multi_round",
    "no_reuse",
    "poisson_arrivals",
    "shared_prefix",
    "working_set_tokens",
]

FIRST_ID = 3
#: A vocabulary: ids ``FIRST_ID`` up to the number, or exactly the listed ids.
Vocab = int | Sequence[int]


@dataclass(frozen=True)
class Request:
    """One completion request: ``prompt`` token ids, greedy, ``max_tokens`` new tokens.
    ``after`` is the index of the request that must have finished before this one is sent
    (the same user's previous round), or None."""

    index: int
    user: int
    round: int
    prompt: tuple[int, ...]
    answer: tuple[int, ...]
    max_tokens: int
    after: int | None


@dataclass(frozen=True)
class Shape:
    """The sizes of a multi-round workload."""

    users: int
    rounds: int
    system_tokens: int
    context_tokens: int
    question_tokens: int
    answer_tokens: int

    def prompt_tokens(self, round_: int) -> int:
        """Length of a prompt of round ``round_`` (0-based)."""
        head = self.system_tokens + self.context_tokens
        return head + (round_ + 1) * self.question_tokens + round_ * self.answer_tokens

    def longest(self) -> int:
        """Tokens of the longest request, its answer included."""
        return self.prompt_tokens(self.rounds - 1) + self.answer_tokens


def _ids(rng: random.Random, n: int, vocab: Vocab) -> tuple[int, ...]:
    if isinstance(vocab, int):
        return tuple(rng.randrange(FIRST_ID, vocab) for _ in range(n))
    return tuple(rng.choice(vocab) for _ in range(n))


def _tag(i: int, vocab: Vocab) -> tuple[int, int]:
    """Two ids that differ for every ``i`` below the vocabulary's size squared, the first
    already for every ``i`` below its size."""
    ids = range(FIRST_ID, vocab) if isinstance(vocab, int) else vocab
    span = len(ids)
    if i >= span * span:
        raise ValueError(f"at most {span * span} distinct tags with a vocab of {span} ids")
    return ids[i % span], ids[i // span]


def multi_round(seed: int, shape: Shape, *, vocab: Vocab, max_model_len: int) -> list[Request]:
    """The requests of ``shape``, round by round. Raises ValueError when a request with its
    answer would not fit ``max_model_len`` or ``shape`` has an empty part."""
    if min(shape.users, shape.rounds, shape.question_tokens, shape.answer_tokens) < 1:
        raise ValueError(f"every count of {shape} must be at least 1")
    if shape.context_tokens < 2 or shape.system_tokens < 0:
        raise ValueError(f"a private context needs at least 2 tokens: {shape}")
    if shape.longest() > max_model_len:
        raise ValueError(
            f"the last round needs {shape.longest()} tokens, more than {max_model_len}"
        )
    rng = random.Random(seed)
    system = _ids(rng, shape.system_tokens, vocab)
    # Each context starts with its user's tag: two users share the system prompt and no more
    # (one token more past ``vocab - FIRST_ID`` users).
    history = [
        system + _tag(u, vocab) + _ids(rng, shape.context_tokens - 2, vocab)
        for u in range(shape.users)
    ]
    requests: list[Request] = []
    for r in range(shape.rounds):
        for u in range(shape.users):
            prompt = history[u] + _ids(rng, shape.question_tokens, vocab)
            answer = _ids(rng, shape.answer_tokens, vocab)
            after = None if r == 0 else len(requests) - shape.users
            requests.append(Request(len(requests), u, r, prompt, answer, len(answer), after))
            history[u] = prompt + answer
    return requests


def no_reuse(
    seed: int, count: int, prompt_tokens: int, answer_tokens: int, *, vocab: Vocab
) -> list[Request]:
    """``count`` prompts of ``prompt_tokens`` ids; any two share at most their first id."""
    if prompt_tokens < 2 or answer_tokens < 1:
        raise ValueError("a prompt needs at least 2 tokens and an answer at least 1")
    rng = random.Random(seed)
    return [
        Request(
            i,
            i,
            0,
            _tag(i, vocab) + _ids(rng, prompt_tokens - 2, vocab),
            _ids(rng, answer_tokens, vocab),
            answer_tokens,
            None,
        )
        for i in range(count)
    ]


def shared_prefix(
    seed: int,
    groups: int,
    requests: int,
    system_tokens: int,
    question_tokens: int,
    answer_tokens: int,
    *,
    vocab: Vocab,
    hot_share: float | None = None,
) -> list[Request]:
    """``requests`` requests over ``groups`` groups (``user`` is the group, ``round`` the
    question's number within it), shuffled by ``seed``: the group's system prompt then a
    question of its own. Without ``hot_share`` the groups take turns evenly; with it, group 0
    sends ``round(hot_share * requests)`` of them and the others share the rest evenly."""
    if min(groups, requests, question_tokens, answer_tokens) < 1 or system_tokens < 2:
        raise ValueError("groups, requests and lengths must be at least 1, a system prompt 2")
    if hot_share is not None and not 0 < hot_share < 1:
        raise ValueError(f"hot_share must lie between 0 and 1, not {hot_share}")
    if hot_share is not None and groups < 2:
        raise ValueError("a hot spot needs at least 2 groups")
    rng = random.Random(seed)
    systems = [_tag(g, vocab) + _ids(rng, system_tokens - 2, vocab) for g in range(groups)]
    if hot_share is None:
        owners = [i % groups for i in range(requests)]
    else:
        hot = round(hot_share * requests)
        owners = [0] * hot + [1 + i % (groups - 1) for i in range(requests - hot)]
    rng.shuffle(owners)
    asked = [0] * groups
    out: list[Request] = []
    for i, g in enumerate(owners):
        prompt = systems[g] + _ids(rng, question_tokens, vocab)
        answer = _ids(rng, answer_tokens, vocab)
        out.append(Request(i, g, asked[g], prompt, answer, answer_tokens, None))
        asked[g] += 1
    return out


def poisson_arrivals(seed: int, count: int, rate: float) -> list[float]:
    """Send times in seconds from the start for ``count`` requests at ``rate`` per second."""
    if rate <= 0:
        raise ValueError(f"rate must be positive, not {rate}")
    rng = random.Random(seed)
    times, t = [], 0.0
    for _ in range(count):
        times.append(t)
        t += rng.expovariate(rate)
    return times


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def working_set_tokens(prompts: Sequence[Sequence[int]]) -> int:
    """Distinct prefixes over ``prompts``: the tokens a cache must hold to serve every
    prompt from it (the size of their trie)."""
    ordered = sorted(tuple(p) for p in prompts)
    total = 0
    for i, p in enumerate(ordered):
        total += len(p) - (common_prefix(p, ordered[i - 1]) if i else 0)
    return total
