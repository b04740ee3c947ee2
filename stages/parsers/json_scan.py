"""Find where a JSON value ends while its text is still arriving.

The streaming tool-call parser must know, chunk by chunk, whether the
``arguments`` object of a call is complete, without parsing it (it may be
half written). ``JsonValueScanner`` tracks just enough: bracket depth,
whether it is inside a string, and whether the previous character was a
backslash. It does not validate; ``json.loads`` does that once the extent is
known. ``header_members`` walks the wrapper object ``{"name": ..., "arguments":
...}`` member by member on a buffer that may end anywhere.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

WHITESPACE = " \t\n\r"
_SCALAR_CHARS = frozenset("0123456789+-.eEtruefalsn")


class JsonValueScanner:
    """Incremental end-of-value finder. ``depth`` > 0 starts inside that many open containers."""

    def __init__(self, depth: int = 0) -> None:
        self.depth = depth
        self.in_string = False
        self.escaped = False
        self.started = depth > 0
        self.scalar = False

    def feed(self, text: str, start: int = 0) -> int | None:
        """Index just past the value's end in ``text``, or None if it goes on past ``text``.

        A top-level scalar (number, true, ...) ends at the first character
        that cannot continue it; that character is not part of the value.
        """
        for i in range(start, len(text)):
            char = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
                continue
            if self.scalar:
                if char not in _SCALAR_CHARS:
                    return i
                continue
            if not self.started and char in WHITESPACE:
                continue
            self.started = True
            if char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth <= 0:
                    return i + 1
            elif self.depth == 0:
                self.scalar = True
        return None


class MoreText(Exception):
    """The buffer ends before the answer is known."""


class NotAToolCall(Exception):
    """The text cannot be a tool-call wrapper object."""


def skip_whitespace(text: str, i: int) -> int:
    while i < len(text) and text[i] in WHITESPACE:
        i += 1
    if i >= len(text):
        raise MoreText
    return i


def value_at(text: str, i: int) -> tuple[Any, int]:
    """(decoded value, end index) of the complete JSON value starting at ``text[i]``."""
    end = JsonValueScanner().feed(text, i)
    if end is None:
        raise MoreText
    try:
        return json.loads(text[i:end]), end
    except json.JSONDecodeError:
        raise NotAToolCall from None


@dataclass(frozen=True)
class Header:
    """What the wrapper object told so far.

    ``args_start`` set: the name is known and the arguments object starts
    there (stream it). ``end`` set: the whole wrapper was read (``arguments``
    holds the arguments JSON text).
    """

    name: str
    args_start: int | None = None
    arguments: str | None = None
    end: int | None = None


def read_header(text: str, name_keys: tuple[str, ...], args_keys: tuple[str, ...]) -> Header:
    """Walk ``{"name": ..., "arguments": ...}`` at the start of ``text`` (after whitespace).

    Raises MoreText when the buffer ends first, NotAToolCall when it cannot
    be a wrapper (not an object, no string name, invalid JSON).
    """
    i = skip_whitespace(text, 0)
    if text[i] != "{":
        raise NotAToolCall
    i += 1
    name: str | None = None
    arguments: str | None = None
    first = True
    while True:
        i = skip_whitespace(text, i)
        if text[i] == "}":
            if name is None:
                raise NotAToolCall
            return Header(name=name, arguments=arguments if arguments is not None else "{}", end=i + 1)
        if not first:
            if text[i] != ",":
                raise NotAToolCall
            i = skip_whitespace(text, i + 1)
        first = False
        key, i = value_at(text, i) if text[i] == '"' else (None, i)
        if not isinstance(key, str):
            raise NotAToolCall
        i = skip_whitespace(text, i)
        if text[i] != ":":
            raise NotAToolCall
        i = skip_whitespace(text, i + 1)
        if key in args_keys and name is not None and arguments is None and text[i] in "{[":
            return Header(name=name, args_start=i)
        value, end = value_at(text, i)
        if key in name_keys:
            if not isinstance(value, str) or not value:
                raise NotAToolCall
            name = value
        elif key in args_keys:
            arguments = value if isinstance(value, str) else text[i:end]
        i = end
