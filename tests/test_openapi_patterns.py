"""The patterns the OpenAPI documents give for string parameters accept exactly the strings
the servers accept (pure: no server; hypothesis over both sides of each pattern)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvplane.api.common.conf_api import select
from kvplane.api.engine.cache_api import TOKENS_INPUT_PATTERN, TOKENS_MOCK_PATTERN, parse_tokens
from kvplane.api.openapi import names_pattern
from kvplane.api.slot_syntax import SLOT_MAPPING_PATTERN, parse_slot_mapping
from kvplane.errors import BadRequest
from kvplane.web.diagnostics import LEVEL_PATTERN, LEVELS
from kvplane.web.openapi import case_insensitive_pattern


def texts(pattern: str, alphabet: str) -> st.SearchStrategy[str]:
    """Strings the pattern matches, and strings near them that it may not."""
    return st.from_regex(pattern, fullmatch=True) | st.text(alphabet=alphabet, max_size=24)


def accepts(parse, text: str) -> bool:
    try:
        parse(text)
    except BadRequest:
        return False
    return True


@settings(max_examples=80, deadline=None)
@given(texts(SLOT_MAPPING_PATTERN, " 0123456789[],\t\n٣x-"))
def test_slot_mapping_pattern_is_the_parsers_syntax(text: str) -> None:
    matches = re.fullmatch(SLOT_MAPPING_PATTERN, text) is not None
    try:
        parse_slot_mapping(text, limit=10_000)
    except BadRequest as exc:
        # what a pattern cannot say: a range's order, the cache's size
        assert not matches or "empty" in str(exc) or "out of range" in str(exc), text
    else:
        assert matches, text


@settings(max_examples=80, deadline=None)
@given(texts(TOKENS_MOCK_PATTERN, " 0123456789,+-_٣"))
def test_tokens_mock_pattern_is_the_parsers_syntax(text: str) -> None:
    matches = re.fullmatch(TOKENS_MOCK_PATTERN, text) is not None
    try:
        parse_tokens(text, None, limit=10_000)
    except BadRequest as exc:
        assert not matches or "start < end" in str(exc) or "do not fit" in str(exc), text
    else:
        assert matches, text


@settings(max_examples=80, deadline=None)
@given(texts(TOKENS_INPUT_PATTERN, " 0123456789,+-_٣"))
def test_tokens_input_pattern_is_the_parsers_syntax(text: str) -> None:
    matches = re.fullmatch(TOKENS_INPUT_PATTERN, text) is not None
    try:
        parse_tokens(None, text, limit=10_000)
    except BadRequest as exc:
        assert not matches or "[0, 2147483647]" in str(exc) or "do not fit" in str(exc), text
    else:
        assert matches, text


NAMES = {"chunk_size": 1, "chunk_size_x": 2, "local_cpu": 3}


@settings(max_examples=80, deadline=None)
@given(texts(names_pattern(NAMES), " ,\tchunk_sizexlocal_cpu"))
def test_names_pattern_is_what_select_accepts(text: str) -> None:
    matches = re.fullmatch(names_pattern(NAMES), text) is not None
    assert accepts(lambda t: select(NAMES, t, "config"), text) == matches, text


@settings(max_examples=80, deadline=None)
@given(texts(LEVEL_PATTERN, " \tinfoINFOdebugDEBUG\u0131x"))
def test_level_pattern_is_every_level_in_any_case_and_nothing_else(text: str) -> None:
    matches = re.fullmatch(LEVEL_PATTERN, text) is not None
    assert matches == (text.upper() in LEVELS and text.isascii()), text


@pytest.mark.parametrize("word", ["true", "Info", "a.b"])
def test_case_insensitive_pattern_escapes_and_folds(word: str) -> None:
    pattern = case_insensitive_pattern([word])
    assert re.fullmatch(pattern, word.upper()) and re.fullmatch(pattern, word.lower())
    assert not re.fullmatch(pattern, word + " ")
    assert re.fullmatch(case_insensitive_pattern(["a.b"]), "axb") is None
