"""Requests the schedule stage holds, and the rows of ``req_to_token`` they use.

``Req`` is the scheduler's private working object: it never leaves the stage
(forward sees only plain ints in a ``ForwardBatch``). Its KV bookkeeping:

* ``slots[i]`` is the KV slot of token ``i`` of ``fill_ids`` for
  ``i < len(slots)`` (= ``kv_len``, tokens whose K/V is computed or being
  computed by the batch in flight);
* ``slots[:cached_len]`` belong to the radix tree (locked through
  ``last_node``); ``slots[cached_len:]`` belong to the request.

``fill_ids = input_ids + output_ids``. A request is *prefilling* while
``kv_len < prefill_target`` (chunks of its prompt, or prompt + generated
tokens after a retraction) and *decoding* afterwards: each decode step feeds
``fill_ids[-1]`` at position ``kv_len``.

``RowTable`` hands out rows ``1 .. num_rows-1`` of the forward stage's
``req_to_token``; row 0 is the dummy row padded CUDA-graph rows use.
"""
from __future__ import annotations

import dataclasses
import enum
from typing import Any

from pipeline.messages import FinishReason, SamplingParams


class Phase(enum.Enum):
    GRAMMAR = "grammar"  # waiting for the constrain stage to compile its grammar
    WAITING = "waiting"  # in the waiting queue (new or retracted)
    RUNNING = "running"  # holds a row and KV slots
    DONE = "done"


@dataclasses.dataclass(eq=False)
class Req:
    """One sequence being generated (``n > 1`` requests are several Reqs)."""

    rid: str
    parent_rid: str
    index: int
    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # sampling.max_new_tokens clipped to the context length
    seed: int
    arrival_order: int
    stop_ids: frozenset[int] = frozenset()  # eos (unless ignore_eos) + stop_token_ids
    output_ids: list[int] = dataclasses.field(default_factory=list)
    phase: Phase = Phase.WAITING
    row: int = 0
    slots: list[int] = dataclasses.field(default_factory=list)
    cached_len: int = 0
    last_node: Any = None
    prefill_target: int = 0
    cached_tokens: int = 0  # prompt tokens served from the radix cache (first admission)
    admitted_once: bool = False
    num_retractions: int = 0
    finish_reason: FinishReason | None = None
    constrained: bool = False
    # Tokens sampled by batches in flight whose values have not reached the host (0 or 1,
    # see overlap scheduling in stage.py); a batch planned meanwhile feeds ``-row`` for it.
    pending_tokens: int = 0
    # Prompt logprobs (stages/schedule/prompt_logprobs.py): the first prompt position still
    # owed (None: none), and what came back so far.
    logprob_owed: int | None = None
    prompt_logprobs: Any = None
    # Images / videos (``stages/schedule/multimodal.py``'s ``RequestMedia``); None: text only.
    media: Any = None

    @property
    def fill_ids(self) -> list[int]:
        return self.input_ids + self.output_ids

    @property
    def key_ids(self) -> list[int]:
        """The radix cache's keys for ``fill_ids``: an image's pad positions hold its ``pad_value``."""
        return self.fill_ids if self.media is None else self.media.prompt_keys + self.output_ids

    @property
    def matchable_ids(self) -> list[int]:
        """The tokens a radix-cache match may cover: all but the last, and none whose logits are owed."""
        if self.logprob_owed is None:
            return self.key_ids[:-1]
        return self.key_ids[:max(self.logprob_owed - 1, 0)]

    @property
    def seq_len(self) -> int:
        return len(self.input_ids) + len(self.output_ids)

    @property
    def kv_len(self) -> int:
        return len(self.slots)

    @property
    def is_prefilling(self) -> bool:
        return self.kv_len < self.prefill_target

    @property
    def output_len(self) -> int:
        """Tokens generated, counting those sampled by batches in flight (not on the host yet)."""
        return len(self.output_ids) + self.pending_tokens

    @property
    def remaining_new_tokens(self) -> int:
        return max(0, self.max_new_tokens - self.output_len)


class RowTable:
    """Free list of ``req_to_token`` rows (row 0 reserved)."""

    def __init__(self, num_rows: int) -> None:
        if num_rows < 2:
            raise ValueError(f"num_rows must be >= 2 (row 0 is reserved), got {num_rows}")
        self.num_rows = num_rows
        self._free = list(range(num_rows - 1, 0, -1))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def alloc(self) -> int | None:
        return self._free.pop() if self._free else None

    def free(self, row: int) -> None:
        assert 0 < row < self.num_rows and row not in self._free, f"double free of row {row}"
        self._free.append(row)
