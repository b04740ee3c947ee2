"""Reasoning: split ``<think>…</think>`` off a model's output into ``reasoning_content``.

``--reasoning-parser``:

* ``qwen3``: the output is reasoning only if it opens with ``<think>`` (after
  whitespace); otherwise it is all content (thinking disabled).
* ``deepseek-r1``: the output starts in reasoning; the opening ``<think>`` may
  be there or may have been part of the prompt. Everything up to
  ``</think>`` is reasoning (all of it, if the tag never comes).

``reasoning_content`` is stripped of surrounding whitespace; the content after
``</think>`` loses its leading whitespace (the template's blank line). When
streaming, whitespace at the end of the reasoning so far and any text that may
be the start of a tag are held back until the next delta decides them, so the
streamed pieces join to exactly what the whole-output parse returns.
"""
from __future__ import annotations

from dataclasses import dataclass

from stages.parsers.json_scan import WHITESPACE

THINK_START = "<think>"
THINK_END = "</think>"
REASONING_PARSERS = ("qwen3", "deepseek-r1")


class ReasoningParserError(ValueError):
    """Unknown --reasoning-parser."""


@dataclass
class ReasoningDelta:
    """Pieces of one feed: reasoning text and content text (either may be empty)."""

    reasoning: str = ""
    content: str = ""


@dataclass(frozen=True)
class ReasoningResult:
    """A whole output: ``reasoning_content`` (None if there was none) and ``content``."""

    reasoning_content: str | None
    content: str


class StreamingReasoningParser:
    """Feed text deltas; get reasoning and content deltas (modes: start, reasoning, content)."""

    def __init__(self, parser_name: str) -> None:
        if parser_name not in REASONING_PARSERS:
            raise ReasoningParserError(f"unknown reasoning parser {parser_name!r}; expected one of "
                                       f"{list(REASONING_PARSERS)}")
        self.starts_in_reasoning = parser_name == "deepseek-r1"
        self.mode = "start"
        self.buffer = ""
        self.pending_space = ""  # whitespace inside the reasoning, emitted once non-space follows
        self.reasoning_started = False  # a non-space reasoning char was emitted
        self.content_started = False  # a non-space content char after </think> was emitted
        self.saw_reasoning = False

    def feed(self, text: str) -> ReasoningDelta:
        self.buffer += text
        out = ReasoningDelta()
        while self._step(out):
            pass
        return out

    def finish(self) -> ReasoningDelta:
        out = ReasoningDelta()
        if self.mode == "start":
            self._decide_start(out, final=True)
        if self.mode == "reasoning":
            self._emit_reasoning(out, self.buffer)
        elif self.mode == "content":
            self._emit_content(out, self.buffer)
        self.buffer, self.mode = "", "done"
        return out

    @property
    def in_reasoning(self) -> bool:
        return self.mode == "reasoning" or (self.mode == "start" and self.starts_in_reasoning)

    # ------------------------------------------------------------ transitions

    def _step(self, out: ReasoningDelta) -> bool:
        if self.mode == "start":
            return self._decide_start(out, final=False)
        if self.mode == "reasoning":
            return self._reasoning(out)
        if self.mode == "content":
            self._emit_content(out, self.buffer)
            self.buffer = ""
        return False

    def _decide_start(self, out: ReasoningDelta, final: bool) -> bool:
        head = self.buffer.lstrip(WHITESPACE)
        if not final and (not head or (len(head) < len(THINK_START) and THINK_START.startswith(head))):
            return False  # may still become "<think>"
        if head.startswith(THINK_START):
            self.buffer = head[len(THINK_START):]
            self.mode = "reasoning"
        else:
            self.mode = "reasoning" if self.starts_in_reasoning else "content"
            self.content_started = self.mode == "content"  # no think block: content is verbatim
        self.saw_reasoning = self.mode == "reasoning"
        return True

    def _reasoning(self, out: ReasoningDelta) -> bool:
        position = self.buffer.find(THINK_END)
        if position >= 0:
            self._emit_reasoning(out, self.buffer[:position])
            self.buffer = self.buffer[position + len(THINK_END):]
            self.pending_space, self.mode = "", "content"
            return True
        keep = _partial_suffix_len(self.buffer, THINK_END)
        self._emit_reasoning(out, self.buffer[: len(self.buffer) - keep])
        self.buffer = self.buffer[len(self.buffer) - keep:]
        return False

    def _emit_reasoning(self, out: ReasoningDelta, text: str) -> None:
        """Append reasoning, dropping leading whitespace and holding trailing whitespace."""
        if not self.reasoning_started:
            text = text.lstrip(WHITESPACE)
        if not text:
            return
        body = text.rstrip(WHITESPACE)
        if body:
            out.reasoning += self.pending_space + body
            self.pending_space = ""
            self.reasoning_started = True
        self.pending_space += text[len(body):]

    def _emit_content(self, out: ReasoningDelta, text: str) -> None:
        if not self.content_started:
            text = text.lstrip(WHITESPACE)
            self.content_started = bool(text)
        out.content += text


def _partial_suffix_len(text: str, marker: str) -> int:
    for length in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:length]):
            return length
    return 0


def parse_reasoning(text: str, parser_name: str) -> ReasoningResult:
    """Split a whole output into reasoning_content and content."""
    parser = StreamingReasoningParser(parser_name)
    first, last = parser.feed(text), parser.finish()
    reasoning = first.reasoning + last.reasoning
    has_reasoning = parser.saw_reasoning and bool(reasoning)
    return ReasoningResult(reasoning_content=reasoning if has_reasoning else None,
                           content=first.content + last.content)
