"""Chat output parsing: plain text, or reasoning and tool calls split out by a parser.

With neither ``--reasoning-parser`` nor ``--tool-call-parser`` set, the model's
text is the assistant message's ``content``. With them, the parsers of
``stages/parsers`` split the text into ``reasoning_content`` (e.g. a
``<think>`` block), ``tool_calls`` and the remaining ``content``, for whole
responses (``whole``) and for streams (``incremental``: ``feed`` returns each
chunk's ``delta`` fields, ``finish`` flushes what was held back).
"""
from __future__ import annotations

from typing import Any


class PlainIncremental:
    """Streamed text is content, as is."""

    made_tool_calls = False

    def feed(self, text: str) -> dict[str, Any]:
        return {"content": text} if text else {}

    def finish(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def merge(first: dict[str, Any], second: dict[str, Any]) -> dict[str, Any]:
        merged = dict(first)
        for key, value in second.items():
            if key in merged and isinstance(value, str):
                merged[key] = merged[key] + value
            elif key in merged and isinstance(value, list):
                merged[key] = merged[key] + value
            else:
                merged[key] = value
        return merged


class PlainParsing:
    """No parser configured: the whole text is the content."""

    def whole(self, text: str) -> dict[str, Any]:
        return {"role": "assistant", "content": text}

    def incremental(self) -> PlainIncremental:
        return PlainIncremental()


def make_parsing(tool_call_parser: str, reasoning_parser: str, tools: list | None, separate_reasoning: bool,
                 tool_choice: object = None, parallel_tool_calls: bool = True) -> object:
    """The parsing for one chat request (plain unless a parser is configured and applies).

    ``tool_choice`` "required" or a named function forces tool calls whatever
    ``--tool-call-parser`` says (the output was constrained to their JSON);
    ``parallel_tool_calls`` False keeps only the first call.
    """
    forced = tool_choice if tools and tool_choice not in (None, "auto", "none") else None
    reasoning = reasoning_parser if separate_reasoning else ""
    tool_parser = tool_call_parser if tools and tool_choice != "none" else ""
    if not (reasoning or tool_parser or forced is not None):
        return PlainParsing()
    from stages.ingest.parser_bridge import ParserParsing

    return ParserParsing(tool_parser, reasoning, forced, parallel_tool_calls)
