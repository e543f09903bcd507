"""The /lookup body parser: the fast path answers exactly what the request model
(``LookupRequest``, the schema the OpenAPI document gives) answers, token ids and error
messages alike; integral floats are ids too (JSON Schema's ``integer``)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from kvplane.controller.fast_lookup import LookupRequest, TokenParser
from kvplane.errors import BadRequest
from kvplane.keys import MAX_TOKEN_ID as MAX_TOKEN

parse_tokens = TokenParser().parse


def reference(body: bytes) -> np.ndarray | str:
    """The model's verdict: the token array, or each problem as ``body.field: what``."""
    try:
        tokens = LookupRequest.model_validate_json(body).tokens
    except ValidationError as exc:
        return "; ".join(
            ".".join(map(str, ("body", *e["loc"]))) + f": {e['msg']}" for e in exc.errors()
        )
    return np.asarray(tokens, dtype="<i4")


def parsed(body: bytes) -> np.ndarray | str:
    try:
        arr = parse_tokens(body)
    except BadRequest as exc:
        assert exc.title == "Invalid parameters"
        return str(exc)
    assert arr.dtype == np.dtype("<i4") and arr.ndim == 1
    return arr


def assert_same(body: bytes) -> None:
    want, got = reference(body), parsed(body)
    if isinstance(want, str):
        assert got == want
    else:
        assert isinstance(got, np.ndarray) and got.tolist() == want.tolist()


EDGES = [0, 1, MAX_TOKEN, MAX_TOKEN + 1, 2**32 - 1, 2**32, -1, -(2**31), 2**63, 2**64, -(2**63)]
ids = st.one_of(st.integers(0, MAX_TOKEN), st.sampled_from(EDGES), st.integers())


@given(st.lists(ids, max_size=40), st.sampled_from([(", ", ": "), (",", ":")]))
def test_any_int_list_parses_like_the_checked_decoder(tokens: list[int], seps: Any) -> None:
    assert_same(json.dumps({"tokens": tokens}, separators=seps).encode())


@given(st.lists(st.integers(0, MAX_TOKEN), min_size=1, max_size=40))
def test_valid_ids_round_trip_on_the_fast_path(tokens: list[int]) -> None:
    """The bodies clients send never reach the model (which is what made them slow)."""
    body = json.dumps({"tokens": tokens}).encode()
    fast = TokenParser()._parse_plain(body)
    assert fast is not None and fast.tolist() == tokens
    assert parse_tokens(body).tolist() == tokens


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=12,
)


@given(json_values)
def test_any_json_value_as_tokens(value: Any) -> None:
    assert_same(json.dumps({"tokens": value}).encode())


@given(json_values)
def test_any_json_document(value: Any) -> None:
    assert_same(json.dumps(value).encode())


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"[1, 2]",
        b'{"tokens": [1, 2], "extra": 3}',
        b'{"tokens": [1.5, 2]}',
        b'{"tokens": [true]}',
        b'{"tokens": [01]}',
        b'{"tokens": [1,]}',
        b'{"tokens": []}',
        b'{"tokens": null}',
        b'{"tokens": "abc"}',
        b'{"tokens": [-1]}',
        b'{"tokens": [2147483648]}',
        b'{"tokens": [4294967296]}',
        b'{"tokens": [18446744073709551616]}',
        b'{"toks": [1]}',
        b' \n{"tokens" : [ 1 , 2 ] }\n',
        b'{"tokens": [[1]]}',
        b'{"tokens": [[1, 2]]}',
        b'{"tokens": [1, [2]]}',
        b'{"tokens": [1], "tokens": [2]}',
        b'{"tokens": [1], "x": [2]}',
        b'{"a[": 1, "tokens": [3]}',
        b'{"tok\\u0065ns": [5]}',
        b'{"tokens": [-0]}',
        b'{"tokens": [1, "2"]}',
        b'{"tokens": [9223372036854775808]}',
        b'{"tokens": [-9223372036854775809]}',
        b'{"tokens": [1]}x',
        b'{"tokens": [1]}\x00',
    ],
)
def test_edge_bodies(body: bytes) -> None:
    assert_same(body)


def test_threads_parse_at_once() -> None:
    """Each thread has its own simdjson parser; one thread's document never leaks into
    another's."""
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, 128_000, int(n)).tolist() for n in rng.integers(1, 3000, 8)]
    bodies = [json.dumps({"tokens": p}).encode() for p in prompts]
    shared = TokenParser()

    def work(k: int) -> bool:
        return all(
            shared.parse(bodies[(k + i) % len(bodies)]).tolist() == prompts[(k + i) % 8]
            for i in range(200)
        )

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(4)))


def test_a_prompt_of_8k_tokens() -> None:
    tokens = np.random.default_rng(3).integers(0, 128_000, 8192).tolist()
    assert parse_tokens(json.dumps({"tokens": tokens}).encode()).tolist() == tokens


def test_integral_floats_are_token_ids_and_other_floats_are_refused() -> None:
    assert parse_tokens(b'{"tokens": [1.0, 2, 3e2]}').tolist() == [1, 2, 300]
    for body in (b'{"tokens": [1.5]}', b'{"tokens": [-1.0]}', b'{"tokens": [2147483648.0]}'):
        with pytest.raises(BadRequest, match=r"body\.tokens\.0: "):
            parse_tokens(body)
