"""The constrain stage: grammar state per request -> allowed-token bitmask per batch.

Inbox (``ConstrainInbox``):

* ``GrammarCompile(rid, kind, spec)`` from schedule: compile on the thread
  pool (cached); when done, reply ``GrammarReady(rid, error)`` on ``schedule``
  (``error`` is the compiler's reason, which ends the request as HTTP 400).
  ``replay_ids`` (a decode engine taking a request over from its prefill
  engine) advance the new grammar before GrammarReady is sent.
  The schedule stage keeps that request waiting; other requests run on.
* ``ForwardBatch`` from schedule: emit exactly one ``TokenMask`` with the same
  ``batch_id`` on ``sample``: one packed row per row that is ``constrained``
  and ``need_sample`` (``bitmask`` None when there is none).
* ``SampledTokens`` from sample: advance each constrained request by its token.
* ``GrammarRelease(rid)`` from schedule: drop the request's state; a compile
  that no other request waits for is cancelled (its sandbox worker killed).

Ordering invariant: the mask of a request for step N+1 depends on its token of
step N. If the scheduler runs one batch ahead, a ForwardBatch can arrive
before the SampledTokens of the previous batch; such a batch waits in
``pending_batches`` until every constrained row it holds has been advanced
(``awaiting`` maps rid -> batch whose token is still owed). Batches leave in
arrival order, so TokenMasks leave in ForwardBatch order.

Outboxes (``ConstrainOutboxes``): ``schedule`` (GrammarReady), ``sample``
(TokenMask). Constructed with the tokenizer (token bytes for the automata)
and the forward stage's ``ModelInfo`` (logits width, EOS ids).

State owned: compiled grammars (through ``GrammarCompiler``: a cache bounded
by ``args.grammar_cache_size_mb``, emptied by ``clear_cache``), one
``GrammarState`` per live constrained rid, and the think phase of each request
whose grammar waits for the end of its think block (``think_gate.py``: such a
row gets no mask while it thinks, but its sampled token is still awaited, since
it decides the next mask). The stage never samples, never touches logits and
never blocks on a compile.
"""
from __future__ import annotations

import dataclasses
import logging
from collections import deque
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (ConstrainInbox, FlushCache, ForwardBatch, GrammarCompile, GrammarReady,
                               GrammarRelease, ModelInfo, SampledTokens, TokenMask)
from pipeline.stage import Outbox, Outboxes, Stage
from stages.constrain.bitmask import bitmask_words
from stages.constrain.grammar import GrammarCompiler, GrammarError, GrammarState
from stages.constrain.sandbox import CompileSandbox
from stages.constrain.think_gate import ThinkPhase, next_phase, starting_phase, think_tokens
from stages.constrain.vocab import TokenVocab, vocab_for_tokenizer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ConstrainOutboxes(Outboxes):
    schedule: Outbox[GrammarReady]
    sample: Outbox[TokenMask]


class ConstrainStage(Stage):
    """Per-request grammar automata; one TokenMask per ForwardBatch (see module docstring)."""

    Inbox = ConstrainInbox
    Outboxes = ConstrainOutboxes
    outboxes: ConstrainOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: ConstrainOutboxes | dict[str, Channel | None], *, tokenizer: Any,
                 model_info: ModelInfo, max_workers: int = 2) -> None:
        """``max_workers=0`` compiles inline in ``handle`` (deterministic replays; stalls the loop)."""
        super().__init__("constrain", inbox, outboxes)
        self.vocab: TokenVocab = vocab_for_tokenizer(tokenizer, list(model_info.eos_token_ids) or None)
        self.vocab_size = model_info.vocab_size or self.vocab.tokenizer_size
        self.num_words = bitmask_words(self.vocab_size)
        # Threads wait on a sandboxed compile process; inline compiles (replays, tests) stay in-process.
        # One sandbox process per compile thread: a slow grammar holds up only its own worker.
        sandbox = CompileSandbox(self.vocab.eos_token_id, self.vocab.token_bytes,
                                 num_workers=max_workers) if max_workers > 0 else None
        self.compiler = GrammarCompiler(self.vocab, max_workers=max_workers, sandbox=sandbox,
                                        cache_bytes=args.grammar_cache_size_mb << 20)
        self.states: dict[str, GrammarState] = {}
        self.reasoning_parser = args.reasoning_parser
        self.think = think_tokens(tokenizer, self.vocab)
        self.phases: dict[str, ThinkPhase] = {}  # rid -> THINKING / MAY_THINK (absent: GRAMMAR)
        self.compiling: dict[str, Future] = {}
        self.replays: dict[str, list[int]] = {}  # rid -> tokens to advance its grammar by once compiled
        self.awaiting: dict[str, int] = {}  # rid -> batch_id whose sampled token is owed
        self.pending_batches: deque[ForwardBatch] = deque()

    # ------------------------------------------------------------------ inbox

    def handle(self, message: ConstrainInbox) -> None:
        match message:
            case GrammarCompile():
                self._start_compile(message)
            case ForwardBatch():
                self.pending_batches.append(message)
            case SampledTokens():
                self._advance(message)
            case GrammarRelease():
                self._release(message.rid)
            case FlushCache():  # /flush_cache: compiled grammars go too (running requests keep theirs)
                self.clear_cache()
            case _:
                raise TypeError(f"constrain stage got an unexpected {type(message).__name__}")

    def tick(self) -> None:
        self._finish_compiles()
        self._emit_ready_masks()

    def has_work(self) -> bool:
        """Actionable now: inbox messages, a finished compile to report, or a batch whose mask can be built.

        A compile still running is not work for the loop (it would spin); its
        thread wakes the loop when done (``Stage.wake``). ``busy`` counts it.
        """
        return super().has_work() or any(f.done() for f in self.compiling.values()) or self._head_batch_ready()

    @property
    def busy(self) -> bool:
        return super().busy or bool(self.compiling) or bool(self.pending_batches)

    def close(self) -> None:
        self.compiler.close()

    def clear_cache(self) -> None:
        """Forget compiled grammars and cached mask rows (live requests keep theirs)."""
        self.compiler.clear()

    # ------------------------------------------------------------------ grammars

    def _start_compile(self, message: GrammarCompile) -> None:
        self._release(message.rid)
        phase = starting_phase(self.think, self.reasoning_parser, message.after_reasoning, message.prompt_tail_ids)
        if phase is not ThinkPhase.GRAMMAR:
            self.phases[message.rid] = phase
        future = self.compiler.submit(message.kind, message.spec)
        self.compiling[message.rid] = future
        if message.replay_ids:
            self.replays[message.rid] = list(message.replay_ids)
        if future.done():
            self._finish_compiles()  # a cache hit replies in the same step
        else:
            future.add_done_callback(lambda _: self.wake())

    def _finish_compiles(self) -> None:
        for rid, future in list(self.compiling.items()):
            if not future.done():
                continue
            del self.compiling[rid]
            error = future.exception()
            if error is None:
                self.states[rid] = GrammarState(future.result(), self.vocab)
                error = self._replay(rid, self.replays.pop(rid, []))
            if error is None:
                self.outboxes.schedule.put(GrammarReady(rid=rid))
            else:
                reason = str(error) if isinstance(error, GrammarError) else f"grammar compile failed: {error!r}"
                self.outboxes.schedule.put(GrammarReady(rid=rid, error=reason))

    def _release(self, rid: str) -> None:
        self.states.pop(rid, None)
        self.phases.pop(rid, None)
        self.awaiting.pop(rid, None)
        self.replays.pop(rid, None)
        future = self.compiling.pop(rid, None)
        if future is not None:  # cancelled (worker killed) only when no other request waits on it
            self.compiler.release(future)

    # ------------------------------------------------------------------ masks

    def _constrained_rows(self, batch: ForwardBatch) -> list[int]:
        sampling = batch.sampling
        return [row for row in range(len(batch.rids)) if sampling.constrained[row] and sampling.need_sample[row]]

    def _head_batch_ready(self) -> bool:
        if not self.pending_batches:
            return False
        batch = self.pending_batches[0]
        for row in self._constrained_rows(batch):
            rid = batch.rids[row]
            if rid in self.awaiting or rid in self.compiling:
                return False
        return True

    def _emit_ready_masks(self) -> None:
        while self._head_batch_ready():
            self.outboxes.sample.put(self._build_mask(self.pending_batches.popleft()))

    def _build_mask(self, batch: ForwardBatch) -> TokenMask:
        row_indices = []
        for row in self._constrained_rows(batch):
            rid = batch.rids[row]
            if rid not in self.states:
                logger.warning("batch %d row %d (%s) is constrained but has no grammar; left unconstrained",
                               batch.batch_id, row, rid)
            elif self.phases.get(rid) is ThinkPhase.THINKING:
                self.awaiting[rid] = batch.batch_id  # no mask, but its token may end the think block
            else:
                row_indices.append(row)
        if not row_indices:
            return TokenMask(batch_id=batch.batch_id, row_indices=[], bitmask=None)
        bitmask = torch.empty(len(row_indices), self.num_words, dtype=torch.int32)
        rows_view = bitmask.numpy()  # numpy row views cost less than torch ones (32 rows per step)
        for i, row in enumerate(row_indices):
            rid = batch.rids[row]
            self.states[rid].write_mask(rows_view[i], self.vocab_size)
            if self.phases.get(rid) is ThinkPhase.MAY_THINK:  # the grammar's tokens, or <think>
                self._allow(rows_view[i], self.think.start_id)
            self.awaiting[rid] = batch.batch_id
        return TokenMask(batch_id=batch.batch_id, row_indices=row_indices, bitmask=bitmask)

    def _allow(self, row: np.ndarray, token_id: int) -> None:
        """Set ``token_id``'s bit in a packed int32 mask row (ids past the logits width stay off)."""
        if token_id < self.vocab_size:
            row.view(np.uint32)[token_id // 32] |= np.uint32(1 << (token_id % 32))

    def _advance(self, sampled: SampledTokens) -> None:
        for rid, token_id in zip(sampled.rids, sampled.token_ids):
            if self.awaiting.get(rid) != sampled.batch_id:
                continue
            del self.awaiting[rid]
            if token_id >= 0:
                self._advance_one(rid, token_id)

    def _advance_one(self, rid: str, token_id: int) -> None:
        """One generated token: through the think block's phases, or into the grammar."""
        state = self.states.get(rid)
        if state is None:
            return
        phase = self.phases.pop(rid, ThinkPhase.GRAMMAR)
        if phase is ThinkPhase.GRAMMAR:
            state.advance(token_id)
            return
        after = next_phase(self.think, phase, token_id)
        if after is not ThinkPhase.GRAMMAR:
            self.phases[rid] = after
        elif phase is ThinkPhase.MAY_THINK:  # answered without thinking: the token is the grammar's first
            state.advance(token_id)

    def _replay(self, rid: str, token_ids: list[int]) -> Exception | None:
        """Advance a just-compiled grammar by tokens generated elsewhere; the error if one is not allowed."""
        for token_id in token_ids:
            self._advance_one(rid, token_id)
            if self.states[rid].broken:
                self.states.pop(rid)
                self.phases.pop(rid, None)
                return GrammarError(f"token {token_id}, generated before this engine took the request over, "
                                    f"is not allowed by the grammar")
        return None

