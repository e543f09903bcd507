"""The fewest prompt tokens a fleet must compute for a run, for ``benchmarks/route.py``'s
"within 5% of an oracle" ratio; pure (no I/O).

The oracle knows every instance's cache and fetches any block from wherever it is (as
kvplane's P2P can), so the fleet is one cache: a request computes what no instance holds
when it is sent. Its blocks are held from the moment its prefill ended (its first token)
on, in one LRU of ``capacity_blocks`` blocks (all instances' KV memory and tiers), keyed
by the whole prefix up to each block's end (as vLLM and kvplane key theirs: a block is
reusable only behind the same tokens). Like vLLM, a request computes at least its last
token: a hit is whole blocks and stops short of the last token.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

__all__ = ["block_keys", "oracle_computed"]


def block_keys(prompt: Sequence[int], block: int) -> list[int]:
    """One key per whole block of ``prompt``, each standing for every token up to that
    block's end (a chained hash: equal keys mean equal prefixes, barring collisions)."""
    keys, previous = [], 0
    for end in range(block, len(prompt) + 1, block):
        previous = hash((previous, tuple(prompt[end - block : end])))
        keys.append(previous)
    return keys


def oracle_computed(
    prompts: Sequence[Sequence[int]],
    sent: Sequence[float],
    ready: Sequence[float],
    *,
    block: int,
    capacity_blocks: int | None = None,
) -> list[int]:
    """Prompt tokens each request computes under the oracle, in the order given.
    ``sent[i]`` and ``ready[i]`` are when request ``i`` was sent and when its prefill
    ended (its blocks usable from then on); ``capacity_blocks`` None is unbounded.
    Raises ValueError on lengths that differ, a request ready before it was sent, or an
    empty prompt."""
    if not len(prompts) == len(sent) == len(ready):
        raise ValueError("prompts, sent and ready must be as long as each other")
    if block < 1 or (capacity_blocks is not None and capacity_blocks < 0):
        raise ValueError(f"block {block} and capacity {capacity_blocks} must be positive")
    if any(r < s for s, r in zip(sent, ready, strict=True)):
        raise ValueError("a request cannot be ready before it is sent")
    if any(not p for p in prompts):
        raise ValueError("every prompt needs at least one token")
    # Events in time order; at equal times a prefill that ended comes before a send, but
    # never before its own request's send (a prefill taking no time still computes once).
    events = sorted(
        [(t, 0, i) for i, t in enumerate(ready)] + [(t, 1, i) for i, t in enumerate(sent)]
    )
    held: OrderedDict[int, None] = OrderedDict()
    keys = [block_keys(p, block) for p in prompts]
    computed = [0] * len(prompts)
    was_sent: set[int] = set()
    early: set[int] = set()  # ready at the time of its own send, before the send came up

    def store(i: int) -> None:
        for key in keys[i]:
            held[key] = None
            held.move_to_end(key)
        while capacity_blocks is not None and len(held) > capacity_blocks:
            held.popitem(last=False)

    for _, kind, i in events:
        if kind == 0:
            if i in was_sent:
                store(i)
            else:
                early.add(i)
            continue
        usable = (len(prompts[i]) - 1) // block
        hit = 0
        for key in keys[i][:usable]:
            if key not in held:
                break
            held.move_to_end(key)
            hit += 1
        computed[i] = len(prompts[i]) - hit * block
        was_sent.add(i)
        if i in early:
            store(i)
    return computed
