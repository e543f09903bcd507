"""The slot-mapping syntax of ``GET /cache/kvcache/check``. Pure: no torch, no I/O.

``"1,2,3,[9,12],17"`` lists slots 1, 2, 3, 9, 10, 11, 12 and 17: items are separated by
commas, an item is a slot index or an inclusive range ``[a,b]`` with ``a <= b``; spaces
around items are allowed (spaces only: :data:`SLOT_MAPPING_PATTERN` is the whole syntax, the
one the OpenAPI document gives). :func:`to_ranges` turns a slot list back into the inclusive runs
the response reports as ``slot_mapping_ranges``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from kvplane.errors import BadRequest

__all__ = ["SLOT_MAPPING_PATTERN", "format_ranges", "parse_slot_mapping", "to_ranges"]

_N, _S = "[0-9]+", "[ ]*"  # ASCII digits and spaces: what ECMA and Python regexes agree on
_ITEM = re.compile(rf"{_S}(?:\[{_S}({_N}){_S},{_S}({_N}){_S}\]|({_N})){_S}")
_ANY_ITEM = rf"{_S}(?:\[{_S}{_N}{_S},{_S}{_N}{_S}\]|{_N}){_S}"
SLOT_MAPPING_PATTERN = f"^{_ANY_ITEM}(?:,{_ANY_ITEM})*$"
"""The slot-mapping syntax as one regex (ECMA and Python alike, ASCII only)."""


def parse_slot_mapping(text: str, *, limit: int | None = None) -> list[int]:
    """The slots ``text`` names, in order (duplicates kept).

    ``limit`` bounds every slot (``slot < limit``); it is checked before a range is expanded,
    so a huge range is refused instead of allocated. Raises BadRequest naming the offending
    position or slot.
    """
    bounds: list[tuple[int, int]] = []
    pos = 0
    while True:
        match = _ITEM.match(text, pos)
        if match is None:
            raise _syntax_error(text, pos, "expected a slot index or a range [a,b]")
        first, last, single = match.groups()
        lo, hi = (int(single), int(single)) if single is not None else (int(first), int(last))
        if lo > hi:
            raise BadRequest(f"slot_mapping: range [{lo},{hi}] is empty (start > end)")
        if limit is not None and hi >= limit:
            raise BadRequest(f"slot_mapping: slot {hi} is out of range (slots are 0..{limit - 1})")
        bounds.append((lo, hi))
        pos = match.end()
        if pos == len(text):
            break
        if text[pos] != ",":
            raise _syntax_error(text, pos, "expected ','")
        pos += 1
    return [slot for lo, hi in bounds for slot in range(lo, hi + 1)]


def to_ranges(slots: Sequence[int]) -> list[tuple[int, int]]:
    """Maximal runs of consecutive ascending slots, as inclusive ``(first, last)`` pairs."""
    ranges: list[tuple[int, int]] = []
    for slot in slots:
        if ranges and slot == ranges[-1][1] + 1:
            ranges[-1] = (ranges[-1][0], slot)
        else:
            ranges.append((slot, slot))
    return ranges


def format_ranges(ranges: Sequence[tuple[int, int]]) -> str:
    """The syntax for ``ranges``: a single slot as ``n``, a longer run as ``[a,b]``."""
    return ",".join(str(lo) if lo == hi else f"[{lo},{hi}]" for lo, hi in ranges)


def _syntax_error(text: str, pos: int, what: str) -> BadRequest:
    return BadRequest(f"slot_mapping: {what} at position {pos} of {text!r}")
