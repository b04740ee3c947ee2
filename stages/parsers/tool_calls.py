"""Tool calls: model text -> OpenAI ``message.tool_calls`` and streamed ``delta.tool_calls``.

Formats (``--tool-call-parser``):

* ``qwen25`` / ``qwen3`` (Hermes style)::

      some text<tool_call>
      {"name": "get_weather", "arguments": {"city": "Paris"}}
      </tool_call>

* ``llama3`` (Llama 3.1 JSON tool calling): the output *is* the call,
  ``{"name": "get_weather", "parameters": {"city": "Paris"}}``, either at the
  start of the output or after ``<|python_tag|>``; several calls are
  separated by ``;``.

One streaming state machine serves both (and the forced ``tool_choice``
array format): ``feed(text_delta)`` returns a ``ParserDelta`` with the normal
content to show and the tool-call deltas (the first delta of a call carries
its id and name, later ones carry ``arguments`` chunks, which are the
model's own JSON text). Text that could be the beginning of a marker is held
back until it is decided. A marker followed by something that is not a
wrapper object is plain content. The whole-output parse is the same machine
fed in one piece, so whole and streamed results are identical by
construction; the tests check it on random chunkings.

Modes: ``text`` (content, watching for a marker) -> ``header`` (buffer the
wrapper up to the start of the arguments) -> ``args`` (stream the arguments
until their closing bracket) -> ``wrapper`` (skip to the wrapper's ``}``) ->
``after`` (end marker, separator, next call, or back to text).
"""
from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from pipeline.messages import FunctionCall, ToolCall
from stages.parsers.json_scan import WHITESPACE, JsonValueScanner, MoreText, NotAToolCall, read_header


@dataclass(frozen=True)
class ToolFormat:
    """How one model family writes tool calls."""

    markers: tuple[str, ...] = ()  # text that opens a call (or a run of calls)
    end_marker: str | None = None  # text that closes one call
    bare_start: str | None = None  # "{" or "[": opens calls when it starts the output
    separators: str = ""  # between calls in a run
    run_end: str | None = None  # closes a run of calls ("]" for a JSON array)
    name_keys: tuple[str, ...] = ("name",)
    args_keys: tuple[str, ...] = ("arguments", "parameters")


QWEN = ToolFormat(markers=("<tool_call>",), end_marker="</tool_call>")
LLAMA3 = ToolFormat(markers=("<|python_tag|>",), bare_start="{", separators=";")
FORCED_ARRAY = ToolFormat(bare_start="[", separators=",", run_end="]")
TOOL_FORMATS: dict[str, ToolFormat] = {"qwen25": QWEN, "qwen3": QWEN, "llama3": LLAMA3}


class ToolParserError(ValueError):
    """Unknown --tool-call-parser or a bad tools/tool_choice request (message says which, ``param`` where)."""

    def __init__(self, message: str, param: str = "tool_choice") -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class ToolCallDelta:
    """One streamed piece of tool call ``index``: id and name first, then argument chunks."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict[str, Any]:
        """The ``delta.tool_calls[i]`` object of a chat.completion.chunk."""
        function: dict[str, Any] = {"arguments": self.arguments}
        out: dict[str, Any] = {"index": self.index}
        if self.id is not None:
            out.update(id=self.id, type="function")
        if self.name is not None:
            function["name"] = self.name
        out["function"] = function
        return out


@dataclass
class ParserDelta:
    """What one ``feed`` produced: normal content and tool-call pieces."""

    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)


@dataclass(frozen=True)
class ParsedOutput:
    """A whole output split into content and tool calls."""

    content: str
    tool_calls: list[ToolCall]

    @property
    def message_content(self) -> str | None:
        """OpenAI ``message.content``: None when only whitespace surrounds tool calls."""
        if self.tool_calls and not self.content.strip():
            return None
        return self.content.strip() if self.tool_calls else self.content


def new_call_id(index: int) -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class StreamingToolCallParser:
    """Feed text deltas, get content and tool-call deltas (see module docstring)."""

    def __init__(self, tool_format: ToolFormat, make_id: Callable[[int], str] = new_call_id) -> None:
        self.format = tool_format
        self.make_id = make_id
        self.buffer = ""
        self.mode = "text"
        self.at_start = True  # nothing but whitespace seen yet (bare_start may still open calls)
        self.opened_with = ""  # the marker text that opened the current header
        self.num_calls = 0
        self.scanner: JsonValueScanner | None = None
        self._out = ParserDelta()

    def feed(self, text: str) -> ParserDelta:
        self.buffer += text
        self._out = ParserDelta()
        while self._step():
            pass
        return self._out

    def finish(self) -> ParserDelta:
        """End of output: release held-back text (an unfinished header is content)."""
        self._out = ParserDelta()
        if self.mode == "text" or self.mode == "header":
            self._content(self.opened_with + self.buffer if self.mode == "header" else self.buffer)
        self.buffer, self.opened_with, self.mode = "", "", "done"
        return self._out

    # ------------------------------------------------------------ one transition

    def _step(self) -> bool:
        """Make one transition; False when more text is needed."""
        return {"text": self._text, "header": self._header, "args": self._args,
                "wrapper": self._wrapper, "after": self._after, "done": lambda: False}[self.mode]()

    def _content(self, text: str) -> None:
        if text:
            self._out.content += text

    def _text(self) -> bool:
        if self.at_start and self.format.bare_start:
            stripped = self.buffer.lstrip(WHITESPACE)
            if not stripped:
                return False
            self.at_start = False
            if stripped[0] == self.format.bare_start:
                self._content(self.buffer[: len(self.buffer) - len(stripped)])
                self.buffer = stripped
                return self._open_run(self.format.bare_start)
        self.at_start = self.at_start and not self.buffer.strip(WHITESPACE)
        position, marker = self._find_marker()
        if marker:
            self._content(self.buffer[:position])
            self.buffer = self.buffer[position + len(marker):]
            self.opened_with, self.mode = marker, "header"
            return True
        keep = self._partial_marker_len()
        self._content(self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _open_run(self, opener: str) -> bool:
        if opener == "[":
            self.buffer = self.buffer[1:]
            self.opened_with, self.mode = "[", "after"
        else:
            self.opened_with, self.mode = "", "header"
        return True

    def _find_marker(self) -> tuple[int, str]:
        found = [(self.buffer.find(m), m) for m in self.format.markers if m in self.buffer]
        return min(found) if found else (-1, "")

    def _partial_marker_len(self) -> int:
        """Length of the longest buffer suffix that is a proper prefix of a marker."""
        best = 0
        for marker in self.format.markers:
            for length in range(min(len(marker) - 1, len(self.buffer)), best, -1):
                if self.buffer.endswith(marker[:length]):
                    best = length
                    break
        return best

    def _header(self) -> bool:
        try:
            header = read_header(self.buffer, self.format.name_keys, self.format.args_keys)
        except MoreText:
            return False
        except NotAToolCall:
            self._content(self.opened_with)
            self.opened_with, self.mode = "", "text"
            return True
        delta = ToolCallDelta(index=self.num_calls, id=self.make_id(self.num_calls), name=header.name)
        self.num_calls += 1
        self.opened_with = ""
        if header.args_start is not None:
            self._out.tool_calls.append(delta)
            self.buffer = self.buffer[header.args_start:]
            self.scanner, self.mode = JsonValueScanner(), "args"
        else:
            self._out.tool_calls.append(ToolCallDelta(index=delta.index, id=delta.id, name=delta.name,
                                                      arguments=header.arguments or "{}"))
            self.buffer = self.buffer[header.end:]
            self.mode = "after"
        return True

    def _args(self) -> bool:
        end = self.scanner.feed(self.buffer)
        chunk = self.buffer if end is None else self.buffer[:end]
        if chunk:
            self._out.tool_calls.append(ToolCallDelta(index=self.num_calls - 1, arguments=chunk))
        self.buffer = "" if end is None else self.buffer[end:]
        if end is None:
            return False
        self.scanner, self.mode = JsonValueScanner(depth=1), "wrapper"
        return True

    def _wrapper(self) -> bool:
        end = self.scanner.feed(self.buffer)
        self.buffer = "" if end is None else self.buffer[end:]
        if end is None:
            return False
        self.mode = "after"
        return True

    def _after(self) -> bool:
        """Between calls: an end marker, a separator, the next call, or plain text again."""
        if self.format.end_marker:
            return self._after_end_marker()
        rest = self.buffer.lstrip(WHITESPACE + self.format.separators)
        if not rest:
            self.buffer = ""
            return False
        self.buffer = rest
        if rest[0] == "{":
            self.mode = "header"
        elif self.format.run_end and rest[0] == self.format.run_end:
            self.buffer, self.mode = rest[1:], "text"
        else:
            self.mode = "text"
        return True

    def _after_end_marker(self) -> bool:
        end_marker = self.format.end_marker
        position = self.buffer.find(end_marker)
        next_call, marker = self._find_marker()
        if marker and (position < 0 or next_call < position):  # a new call without closing the last
            self.buffer = self.buffer[next_call + len(marker):]
            self.opened_with, self.mode = marker, "header"
            return True
        if position < 0:
            keep = max(self._partial_marker_len(), _suffix_prefix_len(self.buffer, end_marker))
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        self.buffer = self.buffer[position + len(end_marker):]
        self.mode = "text"
        return True


def _suffix_prefix_len(text: str, marker: str) -> int:
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


# --------------------------------------------------------------------------
# Whole outputs, parser selection
# --------------------------------------------------------------------------


def make_tool_parser(parser_name: str, make_id: Callable[[int], str] = new_call_id) -> StreamingToolCallParser:
    """The streaming parser for ``--tool-call-parser`` (qwen25 | qwen3 | llama3)."""
    if parser_name not in TOOL_FORMATS:
        raise ToolParserError(f"unknown tool call parser {parser_name!r}; expected one of {sorted(TOOL_FORMATS)}")
    return StreamingToolCallParser(TOOL_FORMATS[parser_name], make_id)


def collect(deltas: list[ParserDelta]) -> ParsedOutput:
    """Join streamed deltas into one ParsedOutput."""
    content = "".join(delta.content for delta in deltas)
    calls: dict[int, dict[str, str]] = {}
    for delta in deltas:
        for piece in delta.tool_calls:
            call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
            call["id"] = piece.id or call["id"]
            call["name"] = piece.name or call["name"]
            call["arguments"] += piece.arguments
    tool_calls = [ToolCall(id=c["id"], function=FunctionCall(name=c["name"], arguments=c["arguments"]))
                  for _, c in sorted(calls.items())]
    return ParsedOutput(content=content, tool_calls=tool_calls)


def parse_with(parser: StreamingToolCallParser, text: str) -> ParsedOutput:
    return collect([parser.feed(text), parser.finish()])


def parse_tool_calls(text: str, parser_name: str, make_id: Callable[[int], str] = new_call_id) -> ParsedOutput:
    """Split a whole model output into content and tool calls."""
    return parse_with(make_tool_parser(parser_name, make_id), text)


# --------------------------------------------------------------------------
# tool_choice: "required" or a named function -> constrained output
# --------------------------------------------------------------------------


def _function_table(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]]:
    table = {}
    for position, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str):
            raise ToolParserError(f"tools[{position}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        table[function["name"]] = parameters
    return table


def forced_function_name(tool_choice: Any) -> str | None:
    """The function named by ``tool_choice`` ({"type": "function", "function": {"name"}}), if any."""
    if isinstance(tool_choice, dict):
        function = tool_choice.get("function")
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ToolParserError("tool_choice must be 'none', 'auto', 'required' or "
                                  "{'type': 'function', 'function': {'name': ...}}")
        return function["name"]
    return None


def tool_choice_to_json_schema(tools: list[dict[str, Any]] | None, tool_choice: Any,
                               parallel: bool = True) -> str | None:
    """JSON schema that forces the tool calls ``tool_choice`` asks for, or None.

    * a named function: the output is that function's arguments object
      (its ``parameters`` schema);
    * ``"required"``: the output is a JSON array of one or more (exactly one
      when ``parallel`` is False: ``parallel_tool_calls: false``)
      ``{"name": <a tool>, "parameters": <its schema>}`` objects. Each tool's
      ``$defs``/``definitions`` move to the array schema's root, where its
      ``#/$defs/...`` references point (see ``_nest_parameters``).
    ``"auto"``/``"none"``/None constrain nothing. The constrained output is
    turned into tool calls by ``forced_tool_parser``.
    """
    if tool_choice in (None, "auto", "none"):
        return None
    table = _function_table(tools)
    name = forced_function_name(tool_choice)
    if name is not None:
        if name not in table:
            raise ToolParserError(f"tool_choice names function {name!r}, which is not in tools")
        return json.dumps(table[name])
    if tool_choice != "required":
        raise ToolParserError(f"tool_choice must be 'none', 'auto', 'required' or a function, got {tool_choice!r}")
    if not table:
        raise ToolParserError("tool_choice 'required' needs at least one tool")
    definitions: dict[str, dict[str, Any]] = {}
    calls = [{"type": "object", "properties": {
        "name": {"type": "string", "enum": [fn]},
        "parameters": _nest_parameters(params, f"#/items/anyOf/{i}/properties/parameters", definitions, fn)},
        "required": ["name", "parameters"]} for i, (fn, params) in enumerate(table.items())]
    schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
    if not parallel:
        schema["maxItems"] = 1
    schema.update({key: defs for key, defs in definitions.items() if defs})
    return json.dumps(schema)


DEFINITION_KEYS = ("$defs", "definitions")


def _nest_parameters(params: dict[str, Any], path: str, definitions: dict[str, dict[str, Any]],
                     function: str) -> dict[str, Any]:
    """One tool's parameters as a subschema at ``path`` of the combined schema.

    Its root ``$defs``/``definitions`` are merged into ``definitions`` (one
    map per key; a name two tools define differently is a ToolParserError,
    the same definition twice is kept once), so ``#/$defs/X`` references keep
    pointing at them from the combined root. Other local references
    (``#``, ``#/properties/...``) are rewritten to start at ``path``.
    """
    nested = {key: value for key, value in params.items() if key not in DEFINITION_KEYS}
    for key in DEFINITION_KEYS:
        merged = definitions.setdefault(key, {})
        for name, definition in (params.get(key) or {}).items():
            if name in merged and merged[name] != definition:
                raise ToolParserError(f"tools define {key}/{name} differently (function {function!r}); rename one "
                                      f"of them", "tools")
            merged[name] = definition
    rewrite = lambda ref: ref if ref.startswith(tuple(f"#/{k}/" for k in DEFINITION_KEYS)) else path + ref[1:]
    return _map_refs(nested, rewrite)


def _map_refs(value: Any, rewrite: Callable[[str], str]) -> Any:
    """A copy of ``value`` with every local ``$ref`` ("#..." string) passed through ``rewrite``."""
    if isinstance(value, dict):
        return {key: rewrite(item) if key == "$ref" and isinstance(item, str) and item.startswith("#")
                else _map_refs(item, rewrite) for key, item in value.items()}
    if isinstance(value, list):
        return [_map_refs(item, rewrite) for item in value]
    return value


class NamedToolCallParser:
    """Streams an output that *is* the arguments of one named function (tool_choice by name)."""

    def __init__(self, name: str, make_id: Callable[[int], str] = new_call_id) -> None:
        self.name = name
        self.make_id = make_id
        self.started = False

    def feed(self, text: str) -> ParserDelta:
        """The call's id and name come with its first text (not before: the model may still be thinking)."""
        delta = ParserDelta()
        if not text:
            return delta
        if not self.started:
            self.started = True
            delta.tool_calls.append(ToolCallDelta(index=0, id=self.make_id(0), name=self.name))
        delta.tool_calls.append(ToolCallDelta(index=0, arguments=text))
        return delta

    def finish(self) -> ParserDelta:
        """Nothing to release: an output with no text made no call."""
        return ParserDelta()


def forced_tool_parser(tool_choice: Any, make_id: Callable[[int], str] = new_call_id
                       ) -> StreamingToolCallParser | NamedToolCallParser:
    """Parser for output constrained by ``tool_choice_to_json_schema``."""
    name = forced_function_name(tool_choice)
    if name is not None:
        return NamedToolCallParser(name, make_id)
    return StreamingToolCallParser(FORCED_ARRAY, make_id)
