"""Which prompt positions a request still owes logprobs for, and collecting them.

A request asks for prompt logprobs with ``return_logprob`` and
``logprob_start_len >= 0`` (SGLang's names): the logprob of every prompt
token from position ``logprob_start_len`` on. The logprob of prompt token
``p`` comes from the logits at position ``p - 1``, so:

* token 0 has none (its entry is None);
* a chunk of positions ``[start, end)`` yields the tokens ``start + 1 ..
  end`` that are still owed (``Req.logprob_owed`` and after); the rows are
  always a suffix of the chunk (ending at its last row, or just before it
  when the chunk is the prompt's last and its last row samples);
* the radix-cache match is cut at ``logprob_owed - 1`` (``Req.matchable_ids``), so
  a cache hit never skips a position whose logits are needed.

Chunks arrive in order; ``PromptLogprobsBuffer`` joins them, and the first
output token carries them all (``TokenOutput.prompt_logprobs``).
"""
from __future__ import annotations

import dataclasses

import msgspec

from pipeline.messages import PromptLogprobs, SampledTokens, SamplingParams, TokenOutput


def check_logprob_options(params: SamplingParams, prompt_len: int, vocab_size: int) -> tuple[str, str] | None:
    """(message, param) when the logprob options do not fit this prompt or vocabulary."""
    if params.wants_prompt_logprobs and params.logprob_start_len >= prompt_len:
        return (f"logprob_start_len ({params.logprob_start_len}) must be less than the prompt length "
                f"({prompt_len})", "logprob_start_len")
    if any(t >= vocab_size for t in params.token_ids_logprob):
        return f"token_ids_logprob must be in [0, {vocab_size})", "token_ids_logprob"
    return None


def first_owed(params: SamplingParams, prompt_len: int) -> int | None:
    """The first prompt position whose logprob is wanted (None: none)."""
    if not params.wants_prompt_logprobs or params.logprob_start_len >= prompt_len:
        return None
    return params.logprob_start_len


def chunk_targets(input_ids: list[int], owed: int, start: int, end: int) -> list[int]:
    """Prompt tokens whose logprobs the chunk ``[start, end)`` computes (the next token of each row)."""
    first = max(owed, start + 1)
    last = min(end + 1, len(input_ids))
    return input_ids[first:last] if first < last else []


@dataclasses.dataclass
class PromptLogprobsBuffer:
    """Prompt logprobs of one request, joined chunk by chunk."""

    start: int
    with_ids: bool  # the request asked for token_ids_logprob
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float | None] = dataclasses.field(default_factory=list)
    ranks: list[int | None] = dataclasses.field(default_factory=list)
    top_token_ids: list[list[int]] = dataclasses.field(default_factory=list)
    top_logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    ids_logprobs: list[list[float]] = dataclasses.field(default_factory=list)

    @classmethod
    def for_request(cls, params: SamplingParams, input_ids: list[int], owed: int) -> "PromptLogprobsBuffer":
        buffer = cls(start=owed, with_ids=bool(params.token_ids_logprob))
        if owed == 0 and input_ids:  # token 0: nothing before it to predict it
            buffer.token_ids.append(input_ids[0])
            buffer.logprobs.append(None)
            buffer.ranks.append(None)
            buffer.top_token_ids.append([])
            buffer.top_logprobs.append([])
            if buffer.with_ids:
                buffer.ids_logprobs.append([])
        return buffer

    def add(self, chunk: PromptLogprobs) -> None:
        self.token_ids += chunk.token_ids
        self.logprobs += chunk.logprobs
        self.ranks += chunk.ranks
        self.top_token_ids += chunk.top_token_ids
        self.top_logprobs += chunk.top_logprobs
        self.ids_logprobs += chunk.ids_logprobs

    def message(self) -> PromptLogprobs:
        return PromptLogprobs(start=self.start, token_ids=self.token_ids, logprobs=self.logprobs, ranks=self.ranks,
                              top_token_ids=self.top_token_ids, top_logprobs=self.top_logprobs,
                              ids_logprobs=self.ids_logprobs)


def start_request(req) -> None:
    """Set a new request's owed position and its buffer (``req`` is a ``req_table.Req``)."""
    req.logprob_owed = first_owed(req.sampling, len(req.input_ids))
    if req.logprob_owed is not None:
        req.prompt_logprobs = PromptLogprobsBuffer.for_request(req.sampling, req.input_ids, req.logprob_owed)
        owed = max(req.logprob_owed, 1)  # token 0 is in the buffer already (None)
        req.logprob_owed = owed if owed < len(req.input_ids) else None


def take_chunk(req, first: int, chunk: PromptLogprobs) -> None:
    """A chunk's prompt logprobs came back: keep them, move the owed position past them."""
    if req.logprob_owed is None or req.prompt_logprobs is None:
        return
    req.prompt_logprobs.add(chunk)
    owed = max(req.logprob_owed, first + len(chunk.token_ids))
    req.logprob_owed = owed if owed < len(req.input_ids) else None


def with_extras(output: TokenOutput, req, msg: SampledTokens, i: int) -> TokenOutput:
    """The request's first output carries its prompt logprobs; every output its token_ids_logprob values."""
    changes: dict = {}
    if req.prompt_logprobs is not None and req.logprob_owed is None:
        changes["prompt_logprobs"] = req.prompt_logprobs.message()
        req.prompt_logprobs = None
    if msg.ids_logprobs and output.new_token_ids and req.sampling.return_logprob:
        changes["ids_logprobs"] = [list(msg.ids_logprobs[i])]
    return msgspec.structs.replace(output, **changes) if changes else output
