"""The constrain stage: grammar state per request -> allowed-token bitmask per batch.

Inbox (``ConstrainInbox``):

* ``GrammarCompile(rid, kind, spec)`` from schedule: compile on the thread
  pool (cached); when done, reply ``GrammarReady(rid, error)`` on "schedule"
  (``error`` is the compiler's reason, which ends the request as HTTP 400).
  The schedule stage keeps that request waiting; other requests run on.
* ``ForwardBatch`` from schedule: emit exactly one ``TokenMask`` with the same
  ``batch_id`` on "sample": one packed row per row that is ``constrained``
  and ``need_sample`` (``bitmask`` None when there is none).
* ``SampledTokens`` from sample: advance each constrained request by its token.
* ``GrammarRelease(rid)`` from schedule: drop the request's state.

Ordering invariant: the mask of a request for step N+1 depends on its token of
step N. If the scheduler runs one batch ahead, a ForwardBatch can arrive
before the SampledTokens of the previous batch; such a batch waits in
``pending_batches`` until every constrained row it holds has been advanced
(``awaiting`` maps rid -> batch whose token is still owed). Batches leave in
arrival order, so TokenMasks leave in ForwardBatch order.

State owned: compiled grammars (through ``GrammarCompiler``), one
``GrammarState`` per live constrained rid. The stage never samples, never
touches logits and never blocks on a compile.
"""
from __future__ import annotations

import json
import logging
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Iterable

import torch

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (ForwardBatch, GrammarCompile, GrammarReady, GrammarRelease, SampledTokens,
                               TokenMask)
from pipeline.stage import Stage
from stages.constrain.bitmask import bitmask_words
from stages.constrain.grammar import GrammarCompiler, GrammarError, GrammarState
from stages.constrain.sandbox import CompileSandbox
from stages.constrain.vocab import TokenVocab, vocab_for_tokenizer

logger = logging.getLogger(__name__)


class ConstrainStage(Stage):
    """Per-request grammar automata; one TokenMask per ForwardBatch (see module docstring)."""

    def __init__(self, args: ServerArgs, tokenizer: Any, inbox: Channel | None,
                 outboxes: dict[str, Channel], *, vocab_size: int | None = None,
                 eos_token_ids: Iterable[int] | None = None, max_workers: int = 2) -> None:
        """``max_workers=0`` compiles inline in ``handle`` (deterministic replays; stalls the loop)."""
        super().__init__("constrain", inbox, outboxes)
        eos_ids = list(eos_token_ids) if eos_token_ids is not None else _generation_eos_ids(args)
        self.vocab: TokenVocab = vocab_for_tokenizer(tokenizer, eos_ids or None)
        self.vocab_size = vocab_size or _model_vocab_size(args) or self.vocab.tokenizer_size
        self.num_words = bitmask_words(self.vocab_size)
        # Threads wait on a sandboxed compile process; inline compiles (replays, tests) stay in-process.
        sandbox = CompileSandbox(self.vocab.eos_token_id, self.vocab.token_bytes) if max_workers > 0 else None
        self.compiler = GrammarCompiler(self.vocab, max_workers=max_workers, sandbox=sandbox)
        self.states: dict[str, GrammarState] = {}
        self.compiling: dict[str, Future] = {}
        self.awaiting: dict[str, int] = {}  # rid -> batch_id whose sampled token is owed
        self.pending_batches: deque[ForwardBatch] = deque()

    # ------------------------------------------------------------------ inbox

    def handle(self, message: Any) -> None:
        match message:
            case GrammarCompile():
                self._start_compile(message)
            case ForwardBatch():
                self.pending_batches.append(message)
            case SampledTokens():
                self._advance(message)
            case GrammarRelease():
                self._release(message.rid)
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

    # ------------------------------------------------------------------ grammars

    def _start_compile(self, message: GrammarCompile) -> None:
        self._release(message.rid)
        future = self.compiler.submit(message.kind, message.spec)
        self.compiling[message.rid] = future
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
                self.emit("schedule", GrammarReady(rid=rid))
            else:
                reason = str(error) if isinstance(error, GrammarError) else f"grammar compile failed: {error!r}"
                self.emit("schedule", GrammarReady(rid=rid, error=reason))

    def _release(self, rid: str) -> None:
        self.states.pop(rid, None)
        self.awaiting.pop(rid, None)
        self.compiling.pop(rid, None)  # never cancel: the cached compile may serve other requests

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
            self.emit("sample", self._build_mask(self.pending_batches.popleft()))

    def _build_mask(self, batch: ForwardBatch) -> TokenMask:
        row_indices = []
        for row in self._constrained_rows(batch):
            if batch.rids[row] in self.states:
                row_indices.append(row)
            else:
                logger.warning("batch %d row %d (%s) is constrained but has no grammar; left unconstrained",
                               batch.batch_id, row, batch.rids[row])
        if not row_indices:
            return TokenMask(batch_id=batch.batch_id, row_indices=[], bitmask=None)
        bitmask = torch.empty(len(row_indices), self.num_words, dtype=torch.int32)
        rows_view = bitmask.numpy()  # numpy row views cost less than torch ones (32 rows per step)
        for i, row in enumerate(row_indices):
            rid = batch.rids[row]
            self.states[rid].write_mask(rows_view[i], self.vocab_size)
            self.awaiting[rid] = batch.batch_id
        return TokenMask(batch_id=batch.batch_id, row_indices=row_indices, bitmask=bitmask)

    def _advance(self, sampled: SampledTokens) -> None:
        for rid, token_id in zip(sampled.rids, sampled.token_ids):
            if self.awaiting.get(rid) != sampled.batch_id:
                continue
            del self.awaiting[rid]
            state = self.states.get(rid)
            if state is not None and token_id >= 0:
                state.advance(token_id)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _model_vocab_size(args: ServerArgs) -> int | None:
    """The model's vocab_size (logits width) from config.json, if there is one."""
    config = _read_json(Path(args.model_path or args.model_dir) / "config.json")
    size = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    return int(size) if size else None


def _generation_eos_ids(args: ServerArgs) -> list[int]:
    """Every EOS id the model may end with (generation_config.json, else config.json)."""
    model_dir = Path(args.model_path or args.model_dir)
    for name in ("generation_config.json", "config.json"):
        eos = _read_json(model_dir / name).get("eos_token_id")
        if eos is not None:
            return [int(i) for i in (eos if isinstance(eos, list) else [eos])]
    return []
