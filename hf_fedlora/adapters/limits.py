"""Bounds on what a client's config can make the server match or compute: the regexes of
``rank_pattern``/``alpha_pattern`` (matched against module paths) and every number in a config or
provenance. File kinds, sizes and JSON depth are bounded in :mod:`hf_fedlora.files`."""

from __future__ import annotations

import math
import re
from typing import Any

from ..constants import (
    MAX_PATTERN_ENTRIES,
    MAX_PATTERN_LENGTH,
    MAX_PATTERN_UNBOUNDED_REPEATS,
)
from ..errors import AdapterFormatError

try:  # Python >= 3.11
    from re import _parser as _sre_parse
except ImportError:  # pragma: no cover
    import sre_parse as _sre_parse  # type: ignore[no-redef]


def positive_number(value: object, *, integer: bool) -> bool:
    """True for a finite number > 0 that is not a bool (an ``int`` when ``integer``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if integer and not isinstance(value, int):
        return False
    try:
        return math.isfinite(value) and value > 0
    except OverflowError:  # an int too large for a float
        return integer


def check_pattern(pattern: object, where: str, field: str) -> None:
    """Refuse a ``rank_pattern``/``alpha_pattern`` key that is not a regex we can match in bounded time.

    Refused: non-strings, keys over ``MAX_PATTERN_LENGTH`` characters, invalid regexes, back
    references, a repeat inside a repeat or an alternative under a repeat (``(a+)+``, ``(a|a)*``:
    exponential backtracking), and more than ``MAX_PATTERN_UNBOUNDED_REPEATS`` unbounded repeats.
    """
    head = f"{where}, field `{field}`"
    if not isinstance(pattern, str) or not pattern:
        raise AdapterFormatError(f"{head}: key {pattern!r} must be a non-empty module name or regex.")
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise AdapterFormatError(
            f"{head}: key of {len(pattern)} characters is over the limit of {MAX_PATTERN_LENGTH}."
        )
    try:
        parsed = _sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise AdapterFormatError(f"{head}: key {pattern!r} is not a valid regex ({exc}).") from exc
    unbounded = _walk(parsed, inside_repeat=False, where=f"{head}: key {pattern!r}")
    if unbounded > MAX_PATTERN_UNBOUNDED_REPEATS:
        raise AdapterFormatError(
            f"{head}: key {pattern!r} has {unbounded} unbounded repeats (limit "
            f"{MAX_PATTERN_UNBOUNDED_REPEATS}); matching it can take exponential time."
        )


def _walk(items: Any, *, inside_repeat: bool, where: str) -> int:
    """Count unbounded repeats under ``items``; raise on nested repeats and back references."""
    count = 0
    for op, arg in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, body = arg
            many = high == _sre_parse.MAXREPEAT or high > 1
            if inside_repeat and many:
                raise AdapterFormatError(
                    f"{where} nests a repeat inside a repeat; matching it can take exponential time."
                )
            count += high == _sre_parse.MAXREPEAT
            count += _walk(body, inside_repeat=inside_repeat or many, where=where)
        elif name in ("GROUPREF", "GROUPREF_EXISTS"):
            raise AdapterFormatError(f"{where} uses a back reference; refusing it.")
        elif name == "BRANCH":
            if inside_repeat:
                raise AdapterFormatError(
                    f"{where} repeats an alternation; matching it can take exponential time."
                )
            for branch in arg[1]:
                count += _walk(branch, inside_repeat=inside_repeat, where=where)
        elif name in ("SUBPATTERN", "ATOMIC_GROUP"):
            body = arg[-1]
            count += _walk(body, inside_repeat=inside_repeat, where=where)
        elif name in ("ASSERT", "ASSERT_NOT"):
            count += _walk(arg[1], inside_repeat=inside_repeat, where=where)
    return count


def check_patterns(data: dict[str, Any], where: str) -> None:
    """``rank_pattern`` maps regexes to positive integer ranks, ``alpha_pattern`` to finite positive alphas."""
    for field, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        mapping = data.get(field) or {}
        if len(mapping) > MAX_PATTERN_ENTRIES:
            raise AdapterFormatError(
                f"{where}, field `{field}`: {len(mapping)} entries, over the limit of {MAX_PATTERN_ENTRIES}."
            )
        for key, value in mapping.items():
            check_pattern(key, where, field)
            if not positive_number(value, integer=integer):
                kind = "a positive integer" if integer else "a finite positive number"
                raise AdapterFormatError(
                    f"{where}, field `{field}`: the value for {key!r} must be {kind}, got {value!r:.60}."
                )


def check_provenance(provenance: dict[str, Any], where: str) -> None:
    """A provenance's ``num_examples``, when given, is a positive integer (it becomes a weight)."""
    value = provenance.get("num_examples")
    if value is not None and not positive_number(value, integer=True):
        raise AdapterFormatError(
            f"{where}: field `num_examples` must be a positive integer (the client's training examples), "
            f"got {value!r:.60}."
        )


__all__ = [
    "check_pattern",
    "check_patterns",
    "check_provenance",
    "positive_number",
]
