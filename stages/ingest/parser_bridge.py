"""Chat output through the parsers of ``stages/parsers``: reasoning first, then tool calls.

The reasoning parser (``--reasoning-parser``) splits ``<think>...</think>``
into ``reasoning_content``; what remains goes through the tool-call parser
(``--tool-call-parser``, or the forced parser when ``tool_choice`` names a
function or is ``"required"``, whose output the constrain stage shaped after
the think block). Whole outputs and streams use the same state machines, so a
streamed answer adds up to the whole one.

What clients rely on: one ``delta.tool_calls`` entry per call index in a chunk
(the parsers' id/name piece and argument pieces of one feed are joined), and
with ``parallel_tool_calls: false`` only the first call (index 0) is kept.
"""
from __future__ import annotations

from typing import Any

from stages.parsers.reasoning import StreamingReasoningParser
from stages.parsers.tool_calls import ToolCallDelta, collect, forced_tool_parser, make_tool_parser


class ParserIncremental:
    """Per-choice streaming state: feed text deltas, get OpenAI ``delta`` fields."""

    def __init__(self, tool_call_parser: str, reasoning_parser: str, forced_tool_choice: Any,
                 parallel_tool_calls: bool = True) -> None:
        self.reasoning = StreamingReasoningParser(reasoning_parser) if reasoning_parser else None
        if forced_tool_choice is not None:
            self.tools: Any = forced_tool_parser(forced_tool_choice)
        else:
            self.tools = make_tool_parser(tool_call_parser) if tool_call_parser else None
        self.parallel_tool_calls = parallel_tool_calls
        self.made_tool_calls = False
        self.tool_deltas: list[Any] = []

    def feed(self, text: str) -> dict[str, Any]:
        reasoning, content = self._split(text, final=False)
        return self._delta(reasoning, content, final=False)

    def finish(self) -> dict[str, Any]:
        reasoning, content = self._split("", final=True)
        return self._delta(reasoning, content, final=True)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        if self.reasoning is None:
            return "", text
        piece = self.reasoning.finish() if final else self.reasoning.feed(text)
        if final and text:
            raise ValueError("finish takes no text")
        return piece.reasoning, piece.content

    def _delta(self, reasoning: str, content: str, final: bool) -> dict[str, Any]:
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if self.tools is None:
            if content:
                delta["content"] = content
            return delta
        pieces = [self.tools.feed(content)] if content or not final else []
        if final:
            pieces.append(self.tools.finish())
        self.tool_deltas.extend(pieces)
        text = "".join(p.content for p in pieces)
        calls = [call for p in pieces for call in p.tool_calls if self.parallel_tool_calls or call.index == 0]
        if text:
            delta["content"] = text
        if calls:
            self.made_tool_calls = True
            delta["tool_calls"] = [call.to_openai() for call in coalesce(calls)]
        return delta

    merge = staticmethod(lambda first, second: _merge(first, second))


def coalesce(calls: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """Join the pieces of one call index into one entry (id and name from the first, arguments joined)."""
    joined: dict[int, ToolCallDelta] = {}
    for call in calls:
        first = joined.get(call.index)
        joined[call.index] = call if first is None else ToolCallDelta(
            index=call.index, id=first.id or call.id, name=first.name or call.name,
            arguments=first.arguments + call.arguments)
    return list(joined.values())


def _merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    """Two deltas of one chunk as one: strings joined, tool-call entries of one index joined."""
    merged = dict(first)
    for key, value in second.items():
        merged[key] = merged[key] + value if key in merged else value
    if "tool_calls" in first and "tool_calls" in second:
        merged["tool_calls"] = _join_entries(merged["tool_calls"])
    return merged


def _join_entries(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    calls = [ToolCallDelta(index=e["index"], id=e.get("id"), name=e["function"].get("name"),
                           arguments=e["function"].get("arguments", "")) for e in entries]
    return [call.to_openai() for call in coalesce(calls)]


class ParserParsing:
    """Parsing for one chat request with a reasoning and/or tool-call parser."""

    def __init__(self, tool_call_parser: str, reasoning_parser: str, forced_tool_choice: Any = None,
                 parallel_tool_calls: bool = True) -> None:
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.forced_tool_choice = forced_tool_choice
        self.parallel_tool_calls = parallel_tool_calls

    def incremental(self) -> ParserIncremental:
        return ParserIncremental(self.tool_call_parser, self.reasoning_parser, self.forced_tool_choice,
                                 self.parallel_tool_calls)

    def whole(self, text: str) -> dict[str, Any]:
        state = self.incremental()
        delta = _merge(state.feed(text), state.finish())
        message: dict[str, Any] = {"role": "assistant", "content": delta.get("content", ""),
                                   "reasoning_content": delta.get("reasoning_content")}
        if state.tools is not None:
            parsed = collect(state.tool_deltas)
            calls = parsed.tool_calls if self.parallel_tool_calls else parsed.tool_calls[:1]
            if calls:
                message["content"] = parsed.message_content
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": c.function.arguments}} for c in calls]
            elif self.forced_tool_choice is not None:  # forced, but cut before a call began: no calls
                message["content"], message["tool_calls"] = "", []
        return message
