"""Structured output after the think block: which phase a constrained request is in.

With ``--reasoning-parser`` a chat request with a forced tool call or a JSON
schema may let the model think first (``SamplingParams.grammar_after_reasoning``).
Its grammar then waits: tokens are free until the think-end token is sampled,
and the grammar constrains every token after it (the reasoning parser in the
front end splits ``<think>…</think>`` off, and the tool/JSON parse reads what
follows). Three phases:

* ``THINKING``: unconstrained; ``</think>`` moves to ``GRAMMAR`` (the grammar
  has not seen a token yet).
* ``MAY_THINK`` (``qwen3``: the output thinks only if it opens with
  ``<think>``): the grammar's mask plus ``<think>``; sampling ``<think>`` moves
  to ``THINKING``, any other token is the grammar's first (``GRAMMAR``).
* ``GRAMMAR``: the grammar constrains every token.

The prompt's last tokens say whether the chat template already decided: a
prompt ending in ``</think>`` (thinking turned off, e.g. Qwen3's
``enable_thinking=False``) starts in ``GRAMMAR``, one ending in ``<think>``
starts in ``THINKING``. Gating works on token ids, so it needs the tokenizer
to have ``</think>`` as one token; without it the grammar applies from the
first token, as without a reasoning parser.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from stages.constrain.vocab import TokenVocab

THINK_START, THINK_END = "<think>", "</think>"


class ThinkPhase(enum.Enum):
    THINKING = "thinking"
    MAY_THINK = "may_think"
    GRAMMAR = "grammar"


@dataclass(frozen=True)
class ThinkTokens:
    """Token ids of ``<think>`` and ``</think>`` (None when not a single token) and of whitespace-only tokens."""

    start_id: int | None
    end_id: int | None
    blank_ids: frozenset[int]


def _single_token_id(tokenizer: Any, text: str) -> int | None:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[0] if len(ids) == 1 else None


def think_tokens(tokenizer: Any, vocab: TokenVocab) -> ThinkTokens:
    blank = frozenset(i for data, ids in vocab.token_bytes.items() if data and not data.strip() for i in ids)
    return ThinkTokens(start_id=_single_token_id(tokenizer, THINK_START),
                       end_id=_single_token_id(tokenizer, THINK_END), blank_ids=blank)


def starting_phase(tokens: ThinkTokens, reasoning_parser: str, after_reasoning: bool,
                   prompt_tail_ids: list[int]) -> ThinkPhase:
    """Where a request's grammar starts (see the module docstring)."""
    if not (reasoning_parser and after_reasoning) or tokens.end_id is None:
        return ThinkPhase.GRAMMAR
    last = next((t for t in reversed(prompt_tail_ids) if t not in tokens.blank_ids), None)
    if last == tokens.end_id:
        return ThinkPhase.GRAMMAR
    if last is not None and last == tokens.start_id:
        return ThinkPhase.THINKING
    if reasoning_parser == "qwen3":
        return ThinkPhase.MAY_THINK if tokens.start_id is not None else ThinkPhase.GRAMMAR
    return ThinkPhase.THINKING


def next_phase(tokens: ThinkTokens, phase: ThinkPhase, token_id: int) -> ThinkPhase:
    """The phase after ``token_id`` was sampled in ``phase`` (the token is the grammar's iff it returns
    GRAMMAR from MAY_THINK)."""
    if phase is ThinkPhase.THINKING:
        return ThinkPhase.GRAMMAR if token_id == tokens.end_id else ThinkPhase.THINKING
    if phase is ThinkPhase.MAY_THINK:
        return ThinkPhase.THINKING if token_id == tokens.start_id else ThinkPhase.GRAMMAR
    return ThinkPhase.GRAMMAR
