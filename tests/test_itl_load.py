"""The pure parts of benchmarks/itl_load.py: the block order, which gaps overlap a load,
when a block is invalid, and the report's numbers and verdicts."""

from __future__ import annotations

import json

import pytest

from benchmarks.itl_load import (
    ALIGNED,
    KINDS,
    Block,
    block_order,
    kind_summary,
    overlapping_gaps,
    prompt_ids,
    ratios,
    report,
)
from benchmarks.workload import FIRST_ID

GREW = dict.fromkeys(
    [
        "hit_device",
        "hit_host",
        "hit_disk",
        "hit_external",
        "computed",
        "retrieved_tokens",
        "retrieves",
        "retrieve_s",
        "chunks_from_cpu",
        "chunks_from_disk",
    ],
    0.0,
)


def test_block_order_mirrors_so_each_kind_sits_alike_in_time() -> None:
    assert block_order(1) == ["hit", "load", "alone"]
    order = block_order(2)
    assert order == ["hit", "load", "alone", "alone", "load", "hit"]
    mean_slot = {k: sum(i for i, o in enumerate(order) if o == k) / 2 for k in KINDS}
    assert len(set(mean_slot.values())) == 1
    assert sorted(block_order(3)) == sorted(KINDS * 3)


def test_prompts_are_deterministic_distinct_and_avoid_special_ids() -> None:
    a, b = prompt_ids(0, "stored-0", 1800), prompt_ids(0, "stored-1", 1800)
    assert a == prompt_ids(0, "stored-0", 1800) and a != b
    assert a[:128] != b[:128]
    assert min(a + b) >= FIRST_ID and len(a) == 1800


def test_overlapping_gaps_are_those_whose_interval_meets_a_span() -> None:
    times = [0.0, 1.0, 2.0, 4.0, 5.0]
    assert overlapping_gaps(times, [(1.5, 1.6)]) == [1.0]
    assert overlapping_gaps(times, [(0.5, 2.5)]) == [1.0, 1.0, 2.0]
    assert overlapping_gaps(times, [(5.5, 6.0)]) == []


def load_block(retrieved: float, device: float, spans: list[tuple[float, float]]) -> Block:
    grew = dict(GREW, retrieved_tokens=retrieved, hit_device=device, retrieves=len(spans))
    grew["retrieve_s"] = 0.03 * len(spans)
    return Block("load", streams=[[0.0, 0.02, 0.1, 0.12]], spans=spans, grew=grew)


def test_a_load_block_is_invalid_unless_kvplane_served_every_load() -> None:
    spans = [(0.03, 0.09)]
    assert load_block(ALIGNED, 0, spans).problems() == []
    assert load_block(ALIGNED - 1, 0, spans).problems() == [
        f"kvplane retrieved {ALIGNED - 1} tokens"
    ]
    assert load_block(ALIGNED, 128, spans).problems() == ["vLLM had 128 device-hit tokens"]
    late = load_block(ALIGNED * 2, 0, [*spans, (0.1, 0.5)]).problems()
    assert late == ["a request outlived a decoding stream"]


def test_a_hit_block_is_invalid_if_kvplane_loaded_or_vllm_missed() -> None:
    grew = dict(GREW, hit_device=ALIGNED)
    block = Block("hit", streams=[[0.0, 1.0]], spans=[(0.2, 0.3)], grew=grew)
    assert block.problems() == []
    block.grew = dict(grew, retrieved_tokens=256)
    assert block.problems() == ["kvplane retrieved 256 tokens"]


def test_summary_ratios_and_report() -> None:
    streams = [[0.0, 0.02, 0.04, 0.06]]
    alone = Block("alone", streams=streams, grew=dict(GREW))
    hit = Block(
        "hit",
        streams=[[0.0, 0.02, 0.06, 0.08]],
        spans=[(0.03, 0.05)],
        grew=dict(GREW, hit_device=ALIGNED),
    )
    load = load_block(ALIGNED, 0, [(0.03, 0.09)])
    rows = {b.kind: kind_summary([b]) for b in (alone, hit, load)}
    assert rows["load"]["load_ms_per_load"] == pytest.approx(30.0)
    assert rows["load"]["overlapping_gaps"] == 1 and rows["hit"][
        "overlapping_max_s"
    ] == pytest.approx(0.04)
    assert rows["hit"]["ttft_p50_s"] == pytest.approx(0.02)
    ratio = ratios(rows)
    assert ratio["p99_load_over_hit"] == rows["load"]["itl_p99_s"] / rows["hit"]["itl_p99_s"]
    result = {
        "about": "test",
        "measured_at": "now",
        "server_up_s": 1.0,
        "order": ["alone", "hit", "load"],
        "kinds": rows,
        "ratios": ratio,
    }
    lines = report(["# header"], {"kvplane-sync": result})
    assert lines[0] == "# header"
    verdict = "met" if ratio["p99_load_over_hit"] <= 1.2 else "MISSED"
    assert lines[-1].startswith("kvplane-sync") and verdict in lines[-1]
    assert lines[-1].endswith("yes")
    assert any("kvplane load 30.0 ms per load" in line for line in lines)
    json.dumps(result)
