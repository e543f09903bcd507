import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvplane.api.slot_syntax import format_ranges, parse_slot_mapping, to_ranges
from kvplane.errors import BadRequest

slot_lists = st.lists(st.integers(min_value=0, max_value=5000), min_size=1, max_size=60)


def test_seed_example():
    assert parse_slot_mapping("1,2,3,[9,12],17,19") == [1, 2, 3, 9, 10, 11, 12, 17, 19]
    assert to_ranges(parse_slot_mapping("0,1,2,3")) == [(0, 3)]


def test_spaces_and_single_element_range():
    assert parse_slot_mapping(" 4 , [ 7 , 7 ] ,8") == [4, 7, 8]


@pytest.mark.parametrize(
    "text",
    ["", ",", "1,", ",1", "1,,2", "a", "-1", "[1,2", "[1]", "[3,2]", "1 2", "[1,2,3]", "1.5"],
)
def test_malformed_is_bad_request(text):
    with pytest.raises(BadRequest):
        parse_slot_mapping(text)


def test_limit_is_checked_before_expanding():
    with pytest.raises(BadRequest, match="out of range"):
        parse_slot_mapping("[0,99999999999999]", limit=16)
    assert parse_slot_mapping("[0,15]", limit=16) == list(range(16))


@given(slot_lists)
def test_ranges_round_trip(slots):
    ranges = to_ranges(slots)
    assert parse_slot_mapping(format_ranges(ranges)) == slots


@given(slot_lists)
def test_ranges_are_maximal_runs(slots):
    ranges = to_ranges(slots)
    assert all(lo <= hi for lo, hi in ranges)
    assert sum(hi - lo + 1 for lo, hi in ranges) == len(slots)
    for (_, prev_hi), (next_lo, _) in itertools.pairwise(ranges):
        assert next_lo != prev_hi + 1


@given(st.lists(st.tuples(st.integers(0, 300), st.integers(0, 20)), min_size=1, max_size=20))
def test_parse_expands_each_range(items):
    text = ",".join(f"[{a},{a + n}]" if n else str(a) for a, n in items)
    assert parse_slot_mapping(text) == [s for a, n in items for s in range(a, a + n + 1)]
