"""JSON schema -> regex, with the numeric bounds outlines-core leaves out.

outlines-core 0.2.14 turns a JSON schema into a regex but ignores
``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum`` on integers
and numbers (``{"type": "integer", "minimum": 3}`` allows ``-7``), so output
would fail the very schema it was constrained by. We close that gap:

1. walk the schema and replace each bounded integer/number subschema by a
   string schema whose ``pattern`` is a unique placeholder (``@@N@@``);
2. let outlines build the regex (a pattern renders as ``("@@N@@")``);
3. put a digit-range regex in place of each rendered placeholder.

Digit ranges follow the classic construction: split ``[lo, hi]`` into runs
of equal digit count, then recurse on the first digit (``[120, 345]`` ->
``1(2[0-9]|[3-9][0-9])|2[0-9][0-9]|3([0-3][0-9]|4[0-5])``). Numbers allow a
fraction only where every fraction stays in range, so a bound that is not an
integer is rounded inward (sound: every output validates; ``0.5 <= x <= 0.9``
is rejected as unsupported), while an exclusive integer bound keeps its open
unit interval (``exclusiveMinimum: 0`` allows ``0.25``). Bounded numbers are
written without exponents.

Strings with ``minLength``/``maxLength`` get placeholders too (``@@sN@@``).
outlines renders them as a bounded repeat, ``"(char){0,200}"``, whose
automaton has a state per count and takes minutes to compile on a large
vocabulary. ``schema_regexes`` therefore returns three regexes: the exact one
(bounded repeats, what outlines would build), one with every bounded body
unbounded (``"(char)*"``, compiles fast) and one whose bounded bodies open
with a marker (``"\x01N\x02(char)*"``) naming the string; ``bounded.py``
counts the characters of each bounded string outside the automaton.
"""
from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass
from typing import Any

from outlines_core.json_schema import build_regex_from_schema

FRACTION = r"(\.[0-9]+)?"
ZERO_FRACTION = r"(\.0+)?"
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMA_SINGLE = ("items", "additionalProperties", "not", "contains")
# One character of a JSON string as outlines renders it: any char but '"', '\\' and
# controls, or a two-byte escape (no \\uXXXX). ``bounded.py`` relies on this shape.
STRING_CHAR = r'([^"\\\x00-\x1F\x7F-\x9F]|\\["\\/bfnrt])'
_STRING_KEYS = ("pattern", "format", "enum", "const")


class SchemaError(ValueError):
    """The schema cannot be compiled (reason in the message)."""


# --------------------------------------------------------------------------
# Digit ranges
# --------------------------------------------------------------------------


def _same_length_range(lo: str, hi: str) -> str:
    """Regex for the integers between two digit strings of equal length (lo <= hi)."""
    if len(lo) == 1:
        return lo if lo == hi else f"[{lo}-{hi}]"
    if lo[0] == hi[0]:
        return lo[0] + _group(_same_length_range(lo[1:], hi[1:]))
    rest = len(lo) - 1
    parts = [lo[0] + _group(_same_length_range(lo[1:], "9" * rest))]
    first, last = int(lo[0]) + 1, int(hi[0]) - 1
    if first <= last:
        digit = str(first) if first == last else f"[{first}-{last}]"
        parts.append(f"{digit}[0-9]{{{rest}}}")
    parts.append(hi[0] + _group(_same_length_range("0" * rest, hi[1:])))
    return "|".join(parts)


def _group(regex: str) -> str:
    return f"({regex})" if "|" in regex else regex


def nonneg_range_regex(lo: int, hi: int | None) -> str:
    """Regex for the integers in [lo, hi] (hi None: unbounded), 0 <= lo, no leading zeros."""
    if lo < 0 or (hi is not None and hi < lo):
        raise ValueError(f"bad range [{lo}, {hi}]")
    parts = []
    digits = len(str(lo))
    top = hi if hi is not None else 10**digits - 1
    for num_digits in range(digits, len(str(top)) + 1):
        run_lo = max(lo, 10 ** (num_digits - 1) if num_digits > 1 else 0)
        run_hi = min(top, 10**num_digits - 1)
        parts.append(_same_length_range(str(run_lo), str(run_hi)))
    if hi is None:
        parts.append(f"[1-9][0-9]{{{digits},}}")
    return "(" + "|".join(parts) + ")"


def integer_range_regex(lo: int | None, hi: int | None) -> str:
    """Regex for the integers in [lo, hi]; None is unbounded on that side."""
    parts = []
    if hi is None or hi >= 0:
        parts.append(nonneg_range_regex(max(lo, 0) if lo is not None else 0, hi))
    if lo is None or lo < 0:
        parts.append("-" + nonneg_range_regex(max(1, -hi) if hi is not None else 1,
                                              -lo if lo is not None else None))
    return "(" + "|".join(parts) + ")"


def number_range_regex(lo: int | None, hi: int | None, lo_gap: bool = False, hi_gap: bool = False) -> str:
    """Regex for decimal numbers in [lo, hi] (integer bounds; None unbounded), no exponent.

    ``lo_gap``: the true bound is ``> lo - 1``, so (lo-1, lo) is allowed too;
    ``hi_gap``: the true bound is ``< hi + 1``, so (hi, hi+1) is allowed too.
    Gap values are written with a nonzero fraction (never the excluded bound).
    """
    parts = _closed_number_parts(lo, hi) if lo is None or hi is None or lo <= hi else []
    if hi_gap and hi is not None and (lo is None or lo <= hi or (lo == hi + 1 and lo_gap)):
        parts.append(_open_unit_interval(hi))
    if lo_gap and lo is not None and (hi is None or hi >= lo or (hi == lo - 1 and hi_gap)):
        parts.append(_open_unit_interval(lo - 1))
    if not parts:
        raise SchemaError(f"no number in [{lo}, {hi}] can be written")
    return "(" + "|".join(dict.fromkeys(parts)) + ")"


def _open_unit_interval(k: int) -> str:
    """Numbers strictly between k and k+1."""
    nonzero_fraction = r"\.[0-9]*[1-9][0-9]*"
    return (str(k) if k >= 0 else f"-{-k - 1}") + nonzero_fraction


def _closed_number_parts(lo: int | None, hi: int | None) -> list[str]:
    parts = []
    if hi is None or hi >= 0:
        low = max(lo, 0) if lo is not None else 0
        if hi is None or hi - 1 >= low:  # k.ddd lies in [k, k+1) inside [lo, hi]
            parts.append(nonneg_range_regex(low, hi - 1 if hi is not None else None) + FRACTION)
        if hi is not None and hi >= low:
            parts.append(str(hi) + ZERO_FRACTION)
    if lo is None or lo < 0:
        if (lo is None or lo <= -1) and (hi is None or hi >= 0):
            parts.append(r"-0\.[0-9]+")  # (-1, 0]
        first = max(1, -hi) if hi is not None else 1
        last = -lo - 1 if lo is not None else None
        if last is None or last >= first:  # -k.ddd lies in (-(k+1), -k]
            parts.append("-" + nonneg_range_regex(first, last) + FRACTION)
        if lo is not None and -lo >= first:
            parts.append(f"-{-lo}" + ZERO_FRACTION)
    return parts


# --------------------------------------------------------------------------
# Schema rewrite
# --------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _tightest(candidates: list[tuple[int, bool]], pick: Any) -> tuple[int | None, bool]:
    """The tightest (bound, gap) pair; a gap survives only if every pair at that bound has one."""
    if not candidates:
        return None, False
    bound = pick(value for value, _ in candidates)
    return bound, all(gap for value, gap in candidates if value == bound)


def _integer_bounds(schema: dict[str, Any]) -> tuple[int | None, int | None, bool, bool]:
    """(lo, hi, lo_gap, hi_gap): inclusive integer bounds rounded inward (drafts 4 and 6+).

    A gap flag says the true bound is an exclusive integer one step outside
    (``exclusiveMinimum: 0`` -> lo 1 with a gap: (0, 1) holds numbers too).
    """
    minimum, maximum = schema.get("minimum"), schema.get("maximum")
    ex_min, ex_max = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    lows: list[tuple[int, bool]] = []
    highs: list[tuple[int, bool]] = []
    if _is_number(minimum):
        exclusive = ex_min is True and minimum == math.floor(minimum)
        lows.append((math.floor(minimum) + 1, True) if exclusive else (math.ceil(minimum), False))
    if _is_number(maximum):
        exclusive = ex_max is True and maximum == math.ceil(maximum)
        highs.append((math.ceil(maximum) - 1, True) if exclusive else (math.floor(maximum), False))
    if _is_number(ex_min):
        lows.append((math.floor(ex_min) + 1, ex_min == math.floor(ex_min)))
    if _is_number(ex_max):
        highs.append((math.ceil(ex_max) - 1, ex_max == math.ceil(ex_max)))
    lo, lo_gap = _tightest(lows, max)
    hi, hi_gap = _tightest(highs, min)
    return lo, hi, lo_gap, hi_gap


def _has_bounds(schema: dict[str, Any]) -> bool:
    return any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"))


def _numeric_regex(schema: dict[str, Any]) -> str:
    lo, hi, lo_gap, hi_gap = _integer_bounds(schema)
    if schema["type"] == "number":
        return number_range_regex(lo, hi, lo_gap, hi_gap)
    if lo is not None and hi is not None and lo > hi:
        raise SchemaError(f"integer bounds of {schema} leave no value")
    return integer_range_regex(lo, hi)


def _length_bounds(node: dict[str, Any]) -> tuple[int, int | None] | None:
    """(minLength, maxLength or None) of a plain bounded string schema, else None (left to outlines)."""
    if node.get("type") != "string" or any(key in node for key in _STRING_KEYS):
        return None
    low, high = node.get("minLength", 0), node.get("maxLength")
    if "minLength" not in node and high is None:
        return None
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in (low, high) if v is not None):
        return None
    if high is not None and low > high:
        raise SchemaError(f"minLength {low} > maxLength {high}: no string fits")
    return low, high


def _rewrite(node: Any, placeholders: list[str], strings: list[tuple[int, int | None]] | None = None) -> Any:
    """Copy of ``node`` with bounded numeric schemas (and, given ``strings``, bounded strings)
    swapped for placeholder string schemas."""
    if not isinstance(node, dict):
        return node
    bounds = _length_bounds(node) if strings is not None else None
    if bounds is not None:
        strings.append(bounds)
        return {"type": "string", "pattern": f"@@s{len(strings) - 1}@@"}
    has_lengths = strings is not None and ("minLength" in node or "maxLength" in node)
    if isinstance(node.get("type"), list) and (_has_bounds(node) or has_lengths) and "enum" not in node \
            and "const" not in node:
        return _rewrite({"anyOf": [{**node, "type": kind} for kind in node["type"]]}, placeholders, strings)
    if node.get("type") in ("integer", "number") and _has_bounds(node) and "enum" not in node \
            and "const" not in node:
        placeholders.append(_numeric_regex(node))
        return {"type": "string", "pattern": f"@@{len(placeholders) - 1}@@"}
    out = dict(node)
    for key in _SUBSCHEMA_LISTS:
        if isinstance(node.get(key), list):
            out[key] = [_rewrite(child, placeholders, strings) for child in node[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(node.get(key), dict):
            out[key] = {name: _rewrite(child, placeholders, strings) for name, child in node[key].items()}
    for key in _SUBSCHEMA_SINGLE:
        if key in node:
            child = node[key]
            out[key] = [_rewrite(c, placeholders, strings) for c in child] if isinstance(child, list) \
                else _rewrite(child, placeholders, strings)
    return out


@dataclass(frozen=True)
class SchemaRegexes:
    """The regexes of one schema (see the module docstring); ``bounds[N]`` is string N's
    (minLength, maxLength or None). Without bounded strings all three regexes are equal."""

    exact: str
    unbounded: str
    marked: str
    bounds: tuple[tuple[int, int | None], ...]


def string_marker(number: int) -> str:
    """The regex of bounded string ``number``'s marker (the bytes ``\\x01``, its digits, ``\\x02``)."""
    return rf"\x01{number}\x02"


def schema_regexes(schema: Any, whitespace_pattern: str | None = None) -> SchemaRegexes:
    """Exact, unbounded and marked regexes of ``schema`` (a parsed schema)."""
    placeholders: list[str] = []
    strings: list[tuple[int, int | None]] | None = [] if _renders_strings_as_expected() else None
    rewritten = _rewrite(copy.deepcopy(schema), placeholders, strings)
    try:
        regex = build_regex_from_schema(json.dumps(rewritten), whitespace_pattern)
    except (ValueError, TypeError, RuntimeError) as error:
        raise SchemaError(f"unsupported or invalid json_schema: {error}") from None
    for number, numeric in enumerate(placeholders):
        rendered = f'("@@{number}@@")'
        if rendered not in regex:
            raise SchemaError(f"internal: bounded number placeholder {number} not found in the regex")
        regex = regex.replace(rendered, f"({numeric})")
    exact = unbounded = marked = regex
    for number, (low, high) in enumerate(strings or []):
        rendered = f'("@@s{number}@@")'
        if rendered not in regex:
            raise SchemaError(f"internal: bounded string placeholder {number} not found in the regex")
        repeat = f"{{{low},{high if high is not None else ''}}}"
        exact = exact.replace(rendered, f'("{STRING_CHAR}{repeat}")')
        unbounded = unbounded.replace(rendered, f'("{STRING_CHAR}*")')
        marked = marked.replace(rendered, f'("{string_marker(number)}{STRING_CHAR}*")')
    return SchemaRegexes(exact=exact, unbounded=unbounded, marked=marked, bounds=tuple(strings or ()))


def _renders_strings_as_expected() -> bool:
    """True if outlines writes a bounded string as ``"STRING_CHAR{m,n}"`` (what the counting assumes)."""
    rendered = build_regex_from_schema(json.dumps({"type": "string", "minLength": 1, "maxLength": 2}))
    return rendered == f'"{STRING_CHAR}{{1,2}}"'


def schema_to_regex(schema: Any, whitespace_pattern: str | None = None) -> str:
    """Regex matching exactly the JSON texts valid under ``schema`` (a parsed schema)."""
    return schema_regexes(schema, whitespace_pattern).exact
