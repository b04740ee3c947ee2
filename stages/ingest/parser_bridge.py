"""Chat output through the parsers of ``stages/parsers``: reasoning first, then tool calls.

The reasoning parser (``--reasoning-parser``) splits ``<think>...</think>``
into ``reasoning_content``; what remains goes through the tool-call parser
(``--tool-call-parser``, or the forced parser when ``tool_choice`` names a
function or is ``"required"``, whose output the constrain stage shaped).
Whole outputs and streams use the same state machines, so a streamed answer
adds up to the whole one.
"""
from __future__ import annotations

from typing import Any

from stages.parsers.reasoning import StreamingReasoningParser
from stages.parsers.tool_calls import collect, forced_tool_parser, make_tool_parser


class ParserIncremental:
    """Per-choice streaming state: feed text deltas, get OpenAI ``delta`` fields."""

    def __init__(self, tool_call_parser: str, reasoning_parser: str, forced_tool_choice: Any) -> None:
        self.reasoning = StreamingReasoningParser(reasoning_parser) if reasoning_parser else None
        if forced_tool_choice is not None:
            self.tools: Any = forced_tool_parser(forced_tool_choice)
        else:
            self.tools = make_tool_parser(tool_call_parser) if tool_call_parser else None
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
        calls = [call.to_openai() for p in pieces for call in p.tool_calls]
        if text:
            delta["content"] = text
        if calls:
            self.made_tool_calls = True
            delta["tool_calls"] = calls
        return delta

    merge = staticmethod(lambda first, second: _merge(first, second))


def _merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
    merged = dict(first)
    for key, value in second.items():
        merged[key] = merged[key] + value if key in merged else value
    return merged


class ParserParsing:
    """Parsing for one chat request with a reasoning and/or tool-call parser."""

    def __init__(self, tool_call_parser: str, reasoning_parser: str, forced_tool_choice: Any = None) -> None:
        self.tool_call_parser = tool_call_parser
        self.reasoning_parser = reasoning_parser
        self.forced_tool_choice = forced_tool_choice

    def incremental(self) -> ParserIncremental:
        return ParserIncremental(self.tool_call_parser, self.reasoning_parser, self.forced_tool_choice)

    def whole(self, text: str) -> dict[str, Any]:
        state = self.incremental()
        delta = _merge(state.feed(text), state.finish())
        message: dict[str, Any] = {"role": "assistant", "content": delta.get("content", "")}
        if "reasoning_content" in delta:
            message["reasoning_content"] = delta["reasoning_content"]
        if state.tools is not None:
            parsed = collect(state.tool_deltas)
            if parsed.tool_calls:
                message["content"] = parsed.message_content
                message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.function.name, "arguments": c.function.arguments}} for c in parsed.tool_calls]
        return message
