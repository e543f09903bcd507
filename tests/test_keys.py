import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.keys import (
    MAX_TOKEN_ID,
    TOKEN_ID_RANGE,
    CacheKey,
    chunk_hashes,
    chunk_spans,
    key_scheme_fingerprint,
)

tokens_st = st.lists(st.integers(min_value=0, max_value=2**31 - 1), min_size=1, max_size=300)
chunk_st = st.integers(min_value=1, max_value=64)


@given(tokens_st, tokens_st, chunk_st)
def test_shared_prefix_gives_same_leading_keys(a, b, chunk):
    full_shared = (len(a) // chunk) * chunk
    ha = chunk_hashes(a, chunk)
    hb = chunk_hashes(a[:full_shared] + b, chunk)
    n = full_shared // chunk
    assert ha[:n] == hb[:n]


@given(tokens_st, chunk_st, st.data())
def test_change_in_chunk_changes_that_key_and_all_later(tokens, chunk, data):
    i = data.draw(st.integers(min_value=0, max_value=len(tokens) - 1))
    changed = list(tokens)
    changed[i] = (changed[i] + 1) % 2**31
    h0, h1 = chunk_hashes(tokens, chunk), chunk_hashes(changed, chunk)
    first = i // chunk
    assert h0[:first] == h1[:first]
    assert all(x != y for x, y in zip(h0[first:], h1[first:], strict=True))


@given(tokens_st, chunk_st)
def test_last_partial_chunk_counts(tokens, chunk):
    hashes = chunk_hashes(tokens, chunk)
    assert len(hashes) == -(-len(tokens) // chunk)
    assert len(chunk_spans(len(tokens), chunk)) == len(hashes)


@settings(max_examples=20)
@given(tokens_st)
def test_list_numpy_and_torch_agree(tokens):
    expected = chunk_hashes(tokens, 16)
    assert chunk_hashes(np.array(tokens, dtype=np.int64), 16) == expected
    assert chunk_hashes(torch.tensor(tokens, dtype=torch.int64), 16) == expected


def test_deterministic_across_processes_with_different_hash_seeds():
    code = "from kvplane.keys import chunk_hashes; print(chunk_hashes(list(range(1000)), 256))"
    outs = set()
    for seed in ("0", "1", "random"):
        env = {"PYTHONHASHSEED": seed, "PATH": "/usr/bin:/bin"}
        out = subprocess.run(
            [sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            check=True,
            cwd=__import__("pathlib").Path(__file__).resolve().parent.parent,
        ).stdout
        outs.add(out)
    assert len(outs) == 1
    assert str(chunk_hashes(list(range(1000)), 256)) == outs.pop().strip()


def test_known_value_is_stable():
    # Pinned so that a change to the scheme is noticed (and the fingerprint bumped).
    assert chunk_hashes([1, 2, 3], 256) == [5576843613559543360]
    assert chunk_hashes(list(range(600)), 256) == [
        10895189164716788183,
        16231168784244703093,
        6608542830004766598,
    ]
    assert key_scheme_fingerprint(256).endswith("chunk_size=256")


def test_cache_key_round_trip():
    k = CacheKey("meta-llama/Llama@3", 2, 1, "bfloat16", 2**64 - 1)
    assert CacheKey.from_str(k.to_str()) == k
    assert "/" not in k.to_str()
    with pytest.raises(ValueError):
        CacheKey.from_str("nonsense")


def test_rejects_bad_tokens():
    with pytest.raises(ValueError):
        chunk_hashes([[1, 2]], 4)
    with pytest.raises(ValueError):
        chunk_hashes([1.5, 2.0], 4)


@given(
    st.lists(st.integers(min_value=0, max_value=MAX_TOKEN_ID), max_size=20),
    st.integers(min_value=0, max_value=19),
    st.integers(min_value=MAX_TOKEN_ID + 1, max_value=2**63 - 1) | st.integers(-(2**63), -1),
)
def test_token_ids_outside_the_one_range_are_refused_not_wrapped(tokens, at, bad_id):
    bad = list(tokens)
    bad.insert(min(at, len(bad)), bad_id)
    forms = [bad, np.array(bad, dtype=np.int64), torch.tensor(bad, dtype=torch.int64)]
    if bad_id < 0 and bad_id >= -(2**31):  # negative but int32: refused by value, not type
        forms += [np.array(bad, dtype=np.int32), torch.tensor(bad, dtype=torch.int32)]
    if bad_id <= 2**32 - 1 and bad_id > 0:
        forms.append(np.array(bad, dtype=np.uint32))
    for form in forms:
        with pytest.raises(ValueError, match=re.escape(TOKEN_ID_RANGE)):
            chunk_hashes(form, 4)
    # In range, the hashes are those of the int32 values themselves, whatever the dtype.
    expected = chunk_hashes(np.array(tokens, dtype=np.int32), 4)
    assert chunk_hashes(np.array(tokens, dtype=np.int64), 4) == expected
    assert chunk_hashes(np.array(tokens, dtype=np.uint64), 4) == expected
    assert chunk_hashes(tokens, 4) == expected


def test_the_token_id_range_is_non_negative_int32():
    assert TOKEN_ID_RANGE == "[0, 2147483647]" and MAX_TOKEN_ID == 2**31 - 1
    assert chunk_hashes(np.array([0, 65535], dtype=np.uint16), 4) == chunk_hashes([0, 65535], 4)
    with pytest.raises(ValueError, match="non-negative"):
        chunk_hashes(np.array([-1], dtype=np.int8), 4)


@pytest.mark.parametrize("chunk_size", [0, -1, -256])
def test_non_positive_chunk_size_is_refused(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_hashes([1, 2, 3], chunk_size)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_spans(3, chunk_size)
