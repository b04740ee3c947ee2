"""ScheduleStage: who runs next, where their KV lives, and when they stop.

Inbox (``ScheduleInbox``): TokenizedRequest, Abort, FlushCache,
SampledTokens, GrammarReady. Outboxes (``ScheduleOutboxes``): ``forward``
(ForwardBatch), ``constrain`` (GrammarCompile / GrammarRelease, and the
ForwardBatch when a row is constrained), ``detokenize`` (TokenOutputBatch,
ErrorOutput) and ``stats`` (EngineStats, once a second). While busy it
also logs one INFO line at most every ``LOG_INTERVAL_S`` (SGLang's decode
batch line: running and queued requests, KV tokens in use, generation
throughput over the busy time since the last line, radix cache hit rate).

Constructed with the ``ModelInfo`` the forward stage measured (KV slots,
rows, context length, vocabulary, EOS ids).

State owned here and nowhere else: the waiting queue, the running set, the
KV page pool, the radix cache and the ``req_to_token`` row table (through
``KVManager``). The forward stage owns the KV *tensors*; it learns which
slots to use only from ForwardBatch fields.

One step (``tick``), when no batch is in flight: plan prefill chunks
(admitting waiting requests) and, if there are none, the decodes
(retracting if KV is short); emit one ForwardBatch. With
``--enable-mixed-chunk`` the decodes come first and prefill chunks fill the
rest of the token budget in the same batch (SGLang's flag; off by default,
as there). ``--max-running-requests`` 0 takes the figure the forward stage
derived from the KV capacity (``ModelInfo.num_rows - 1``). ``SampledTokens`` closes the step: append tokens, check finish
conditions, cache computed prefixes, emit one TokenOutputBatch. Every
request ends with exactly one final TokenOutput (or an ErrorOutput).

Overlap scheduling (on unless ``--disable-overlap-schedule``; SGLang's
``event_loop_overlap``). Without it the GPU idles while the host turns
step N's tokens into step N+1: the sample stage synchronizes, this stage
checks finishes and plans, the forward stage packs and uploads. With it the
host plans step N+1 while the GPU still runs step N, so that work hides
behind the GPU's::

    host:  plan N | plan N+1 | wait N, finish checks N | plan N+2 | wait N+1 ...
    GPU:          |  run N   |        run N+1          |        run N+2 ...

Step N+1 needs what step N samples. Each request decoding in step N has one
*pending* token (``Req.pending_tokens``); step N+1 feeds it the placeholder
``-row`` (its ``req_to_token`` row, >= 1, never a token id). The sample
stage stores step N's tokens on the device at ``future_tokens[row]`` and the
forward stage resolves the placeholders there before the model runs
(``triton_kernels/future.py``); stream order does the rest, and no
synchronization sits between the two steps. Everything that counts
generated tokens (the seeded sampler's step, min_new_tokens, the KV
reserve) counts pending ones too, so a step planned ahead is the step the
synchronous loop would have planned.

At most one batch runs ahead, and only when planning it cannot change what
the batch in flight decides:

* the batch in flight is all decodes, or nothing waits for admission (a
  chunk's KV enters the radix cache when its batch returns, and a request
  admitted before that would miss it); the chunk caches only the tokens it
  computed (``PlannedRow.kv_end``), not the next chunk planned ahead, and
  no chunk in flight owes prompt logprobs;
* no request is constrained, running or waiting (a grammar mask for step
  N+1 needs the grammar advanced by step N's token, on the host: such
  batches simply run synchronously);
* it needs no retraction (KV short: wait, then plan synchronously, when the
  pending tokens are known);
* a request whose pending token is its last (``max_new_tokens``) is left
  out: it is known to finish.

A request can still finish at step N (a stop token) after step N+1 was
planned with it. When step N's tokens arrive it finishes exactly as it
would have: its output ends there, the slot taken for step N+1 is given
back (``KVManager.trim``; the GPU's write into it happens before any later
step can reuse it, by stream order), and the token step N+1 computes for it
is dropped on arrival, like that of a request aborted in flight. Stop
strings and aborts arrive as messages and act on the host state, whatever
is in flight.

Where the time goes per step (CPU): planning is O(running requests) list
work; flattening the batch is O(new tokens); the radix tree is touched only
on admission, chunk ends, finish and retraction. No tensors are built here.
Downstream, a decode step costs the host one packed upload into a reused
pinned buffer, one CUDA-graph launch and one device->host sync. Measured on
an H200 (Llama-3.1-8B, batch 1, ``perf/profile_decode.py``): 4.56 ms of GPU
kernels in a 4.64-4.84 ms step; the rest is that launch and sync, during
which the GPU idles because the next step is planned only after this one's
tokens arrive (with overlap scheduling off; see above).
"""
from __future__ import annotations

import collections
import dataclasses
import json
import logging
import random
import time
from typing import Any

import msgspec

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (
    Abort, EngineStats, ErrorOutput, FinishReason, FlushCache, ForwardBatch, GrammarCompile,
    GrammarReady, GrammarRelease, ModelInfo, RowWrite, SampledTokens, SamplingParams, ScheduleInbox,
    TokenizedRequest, TokenOutput, TokenOutputBatch,
)
from pipeline.stage import Outbox, Outboxes, Stage
from stages.schedule.batch import (
    PlannedRow, build_forward_batch, plan_decodes, plan_prefills,
)
from stages.schedule.prompt_logprobs import check_logprob_options, start_request, take_chunk, with_extras
from stages.schedule.kv_manager import KVManager
from stages.schedule.multimodal import RequestMedia, attach as attach_media
from stages.schedule.req_table import Phase, Req
from stages.schedule.speculative import Speculator

logger = logging.getLogger(__name__)

STATS_INTERVAL_S = 1.0
PROMPT_TAIL_LEN = 16  # prompt tokens a GrammarCompile carries when the grammar waits for the think block
LOG_INTERVAL_S = 3.0  # SGLang logs every 40 decode steps; we log by time, so a slow CPU is not noisy


@dataclasses.dataclass(frozen=True)
class ScheduleOutboxes(Outboxes):
    forward: Outbox[ForwardBatch]
    constrain: Outbox[GrammarCompile | GrammarRelease | ForwardBatch | FlushCache]
    detokenize: Outbox[TokenOutputBatch | ErrorOutput]
    stats: Outbox[EngineStats]  # -> ingest (relayed by detokenize)


class ScheduleStage(Stage):
    """Continuous batching with chunked prefill, a radix prefix cache and retraction."""

    Inbox = ScheduleInbox
    Outboxes = ScheduleOutboxes
    outboxes: ScheduleOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: ScheduleOutboxes | dict[str, Channel | None], *, model_info: ModelInfo,
                 dp_rank: int = 0) -> None:
        super().__init__("schedule", inbox, outboxes)
        self.args = args
        self.dp_rank = dp_rank  # which data-parallel replica this is (named in its EngineStats)
        self.info = model_info
        self.kv = KVManager(model_info.num_slots, args.page_size, model_info.num_rows,
                            args.disable_radix_cache)
        self.eos_ids = frozenset(model_info.eos_token_ids)
        self.waiting: list[Req] = []
        self.running_reqs: list[Req] = []
        self.grammar_wait: dict[str, Req] = {}
        self.live_rids: set[str] = set()  # every request not finished yet (rids must be unique)
        self.in_flight: collections.deque[tuple[int, list[PlannedRow]]] = collections.deque()  # oldest first
        self.overlap = not args.disable_overlap_schedule
        self.spec = Speculator.of(args)  # speculative decoding (None: off); see speculative.py
        self.pending_row_writes: list[RowWrite] = []  # tree slots replacing a request's own
        self.mm_released: list[str] = []  # rids whose partly prefilled image embeddings forward may drop
        self.next_batch_id = 0
        self.arrivals = 0
        self.rng = random.Random(args.random_seed)
        self.num_retractions = 0
        self.num_generated = 0
        self._stats_at_s = time.monotonic()
        self._stats_generated = 0
        # The batch line's window: busy seconds before the current busy period, when that
        # period began (None while idle), and num_generated at the last line.
        self._log_busy_s, self._log_busy_since, self._log_generated = 0.0, None, 0
        self._checked_idle = True
        # The assembly passes the figure the forward stage sized its rows for; a stage built
        # alone (tests, replay) may still hold 0 ("from the KV capacity"): the rows decide.
        self.max_running = min(args.max_running_requests or model_info.num_rows, model_info.num_rows - 1)
        budget = args.chunked_prefill_size if args.chunked_prefill_size > 0 else 1 << 62
        self.prefill_budget = max(1, min(budget, args.max_prefill_tokens))

    # ------------------------------------------------------------ messages
    def handle(self, message: ScheduleInbox) -> None:
        match message:
            case SampledTokens():
                self._on_sampled(message)
            case TokenizedRequest():
                self._on_request(message)
            case Abort():
                self._on_abort(message)
            case GrammarReady():
                self._on_grammar_ready(message)
            case FlushCache():
                self.kv.flush()
                self.outboxes.constrain.put(message)  # the compiled grammars are a cache too
            case _:
                raise TypeError(f"schedule: unexpected message {type(message).__name__}")

    def has_work(self) -> bool:
        return super().has_work() or bool(self.waiting or self.running_reqs or self.in_flight)

    def _on_request(self, msg: TokenizedRequest) -> None:
        error = self._check_request(msg)
        if error:
            self._emit_error(msg.rid, error, "input_ids")
            return
        bad_option = check_logprob_options(msg.sampling, len(msg.input_ids), self.info.vocab_size)
        if bad_option:
            self._emit_error(msg.rid, *bad_option)
            return
        params = msg.sampling
        room = self.info.context_len - len(msg.input_ids)
        seed = params.seed if params.seed is not None else self.rng.getrandbits(62)
        req = Req(rid=msg.rid, parent_rid=msg.parent_rid, index=msg.index, input_ids=list(msg.input_ids),
                  sampling=params, max_new_tokens=room if params.max_new_tokens is None else min(params.max_new_tokens, room), seed=seed,
                  arrival_order=self.arrivals, media=RequestMedia.of(msg),
                  stop_ids=frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else self.eos_ids))
        self.arrivals += 1
        start_request(req)
        if req.max_new_tokens == 0 and req.prompt_logprobs is None:
            self._emit_outputs([self._finish(req, FinishReason(type="length"))])
            return
        self.live_rids.add(req.rid)
        grammar = _grammar_of(params)
        if grammar is None:
            self.waiting.append(req)
            return
        req.constrained, req.phase = True, Phase.GRAMMAR
        self.grammar_wait[req.rid] = req
        after = params.grammar_after_reasoning  # the constrain stage leaves the think block free
        self.outboxes.constrain.put(GrammarCompile(
            rid=req.rid, kind=grammar[0], spec=grammar[1], after_reasoning=after,
            prompt_tail_ids=req.input_ids[-PROMPT_TAIL_LEN:] if after else []))

    def _check_request(self, msg: TokenizedRequest) -> str | None:
        num = len(msg.input_ids)
        if msg.rid in self.live_rids:
            return f"request id {msg.rid!r} is already in use"
        if num == 0:
            return "the prompt is empty"
        if num >= self.info.context_len:
            return (f"the prompt has {num} tokens; this model's context length is "
                    f"{self.info.context_len} (prompt + output)")
        if num + 1 > self.kv.capacity_tokens:
            return f"the prompt has {num} tokens; the KV cache holds only {self.kv.capacity_tokens}"
        if any(t < 0 or t >= self.info.vocab_size for t in msg.input_ids):
            return f"input_ids must be in [0, {self.info.vocab_size})"
        return None

    def _on_grammar_ready(self, msg: GrammarReady) -> None:
        req = self.grammar_wait.pop(msg.rid, None)
        if req is None:
            return
        if msg.error:
            self.live_rids.discard(req.rid)
            self._emit_error(req.rid, f"invalid grammar: {msg.error}", _grammar_of(req.sampling)[0])
            self.outboxes.constrain.put(GrammarRelease(rid=req.rid))
            return
        req.phase = Phase.WAITING
        self.waiting.append(req)

    def _on_abort(self, msg: Abort) -> None:
        def hit(req: Req) -> bool:
            return req.rid == msg.rid or req.parent_rid == msg.rid

        reason = FinishReason(type="stop" if msg.reason == "stop" else "abort", message=msg.reason)
        outputs = []
        for req in [r for r in self.grammar_wait.values() if hit(r)]:
            del self.grammar_wait[req.rid]
            outputs.append(self._finish(req, reason))
        for queue in (self.waiting, self.running_reqs):
            for req in [r for r in queue if hit(r)]:
                queue.remove(req)
                outputs.append(self._finish(req, reason, keep_in_cache=False))
        if outputs:
            self._emit_outputs(outputs)

    # --------------------------------------------------------------- steps
    def tick(self) -> None:
        ahead = bool(self.in_flight)
        if ahead and not self._can_run_ahead():
            return
        self._maybe_emit_stats()
        if not (self.waiting or self.running_reqs):
            if not self._checked_idle:
                self.kv.check_integrity()
                self._checked_idle = True
            self._end_busy_period()  # idle time does not count toward the next line's throughput
            return
        self._checked_idle = False
        self._maybe_log_batch()
        batch = self._plan(ahead)
        if batch is None:
            return
        self.outboxes.forward.put(batch)
        if any(batch.sampling.constrained):
            self.outboxes.constrain.put(batch)

    def _can_run_ahead(self) -> bool:
        """Plan the next batch before the one in flight returns? (see the module docstring)"""
        if not self.overlap or len(self.in_flight) != 1:
            return False
        prefill_rows = [row for row in self.in_flight[0][1] if row.is_prefill]
        if prefill_rows and (self.waiting or any(row.req.logprob_owed is not None for row in prefill_rows)):
            return False  # an admission would miss the chunk's cache entry; owed logprobs move on arrival
        if self.spec is not None and self.spec.any_eligible(self.running_reqs):
            return False  # speculative steps run synchronously: drafts need the last token on the host
        return not any(r.constrained for r in self.running_reqs) and not any(r.constrained for r in self.waiting)

    def _plan(self, ahead: bool = False) -> ForwardBatch | None:
        """The next batch; ``ahead``: planned while one is in flight (never retracts).

        ``--enable-mixed-chunk``: decodes first, then prefill chunks in the same
        batch. Off (the default, as in SGLang): prefill chunks when any can be
        planned, else the decodes; a step is one or the other.
        """
        running = self.running_reqs
        if ahead:
            running = [r for r in running if r.output_len < r.max_new_tokens]  # the rest finish in flight
            if self.kv.decode_need([r for r in running if not r.is_prefilling]) > self.kv.available_tokens:
                return None
        mixed = self.args.enable_mixed_chunk
        prefill_rows: list[PlannedRow] = []
        row_writes: list[RowWrite] = []
        if not mixed:
            prefill_rows, row_writes = self._plan_prefills(self.prefill_budget)
        decode_rows: list[PlannedRow] = []
        if mixed or not prefill_rows:
            decode_rows = self._plan_decodes(running)
        if mixed:  # the decode rows take their share of the step's token budget (as in SGLang)
            prefill_rows, row_writes = self._plan_prefills(self.prefill_budget - len(decode_rows))
        if self.spec is not None and not ahead:
            self.spec.add_drafts(self.kv, decode_rows)
        rows = prefill_rows + decode_rows
        if not rows:
            if not ahead:
                self._unblock()
            return None
        batch_id = self.next_batch_id
        self.next_batch_id += 1
        self.in_flight.append((batch_id, rows))
        row_writes = self.pending_row_writes + row_writes
        self.pending_row_writes = []
        overlap = self.overlap and not any(row.req.constrained or row.drafts for row in rows)
        batch = attach_media(build_forward_batch(batch_id, rows, row_writes, overlap),
                             [row.req for row in rows], self.mm_released)
        if self.spec is not None and self.spec.kept:  # accepted tree paths: K/V moved first
            batch = msgspec.structs.replace(batch, spec_kept=self.spec.take_kept())
        for row in rows:
            if row.need_sample:
                row.req.pending_tokens += 1
        return batch

    def _plan_prefills(self, budget: int) -> tuple[list[PlannedRow], list[RowWrite]]:
        """Prefill chunks within ``budget`` tokens (admitting waiting requests) and their row writes."""
        prefill_rows, admitted, row_writes = plan_prefills(
            self.kv, self.running_reqs, self.waiting, self.args.schedule_policy, budget, self.max_running)
        for req in admitted:
            self.waiting.remove(req)
            self.running_reqs.append(req)
        return prefill_rows, row_writes

    def _plan_decodes(self, running: list[Req]) -> list[PlannedRow]:
        """One token for each decoding request in ``running``, retracting (or failing) some if KV is short."""
        rows_of = {id(r): r.row for r in self.running_reqs}
        decode_rows, retracted, failed = plan_decodes(self.kv, running)
        if retracted and self.pending_row_writes:
            # A retracted request's row is free now and may go to a request admitted below:
            # its pending writes must not land there.
            freed = {rows_of[id(r)] for r in retracted}
            self.pending_row_writes = [w for w in self.pending_row_writes if w.row not in freed]
        for req in retracted:
            self.running_reqs.remove(req)
            req.phase, req.num_retractions = Phase.WAITING, req.num_retractions + 1
            self.waiting.append(req)
            self.num_retractions += 1
        outputs = []
        for req in failed:
            self.running_reqs.remove(req)
            outputs.append(self._finish(req, FinishReason(type="length", message="KV cache full")))
        if outputs:
            self._emit_outputs(outputs)
        return decode_rows

    def _unblock(self) -> None:
        """Nothing could run: only prefilling requests, none of which could get KV for its chunk.

        Several: all but the earliest go back to the waiting queue (their chunks
        stay cached), so the earliest has the pool to itself next step. One
        alone: its prompt cannot fit, and it ends with an error.
        """
        stuck = [r for r in self.running_reqs if r.is_prefilling]
        if not self.running_reqs or len(stuck) != len(self.running_reqs):
            return
        if len(stuck) > 1:
            keep = min(stuck, key=lambda r: r.arrival_order)
            for req in stuck:
                if req is not keep:
                    self._retract(req)
            return
        req = stuck[0]
        self.running_reqs.remove(req)
        self._emit_outputs([self._finish(req, FinishReason(type="length", message="KV cache full"),
                                         keep_in_cache=False)])

    def _retract(self, req: Req) -> None:
        """A running request back to the waiting queue; its computed prefix stays cached."""
        if req.row and self.pending_row_writes:
            self.pending_row_writes = [w for w in self.pending_row_writes if w.row != req.row]
        self.kv.release(req, keep_in_cache=True)
        self.running_reqs.remove(req)
        req.phase, req.num_retractions = Phase.WAITING, req.num_retractions + 1
        self.waiting.append(req)
        self.num_retractions += 1

    def _on_sampled(self, msg: SampledTokens) -> None:
        if not self.in_flight or self.in_flight[0][0] != msg.batch_id:
            raise RuntimeError(f"schedule: SampledTokens for batch {msg.batch_id}, "
                               f"in flight: {[batch_id for batch_id, _ in self.in_flight]}")
        rows = self.in_flight.popleft()[1]
        for row in rows:
            if row.need_sample:
                row.req.pending_tokens -= 1
        outputs = []
        finished = []
        has_logprobs = bool(msg.token_logprobs)
        running = Phase.RUNNING
        for i, (row, token) in enumerate(zip(rows, msg.token_ids)):
            req = row.req
            if req.phase is not running:
                continue  # aborted while its batch was in flight
            if msg.prompt_logprobs and msg.prompt_logprobs[i] is not None:
                take_chunk(req, row.prompt_first, msg.prompt_logprobs[i])
            if row.is_prefill and req.max_new_tokens == 0 and row.need_sample:  # prompt logprobs only
                done = self._token_output(req, [], FinishReason(type="length"), [], [], [])
                outputs.append(with_extras(done, req, msg, i))
                finished.append(req)
                continue
            if row.is_prefill:  # the chunk's KV is computed now (a later chunk may be in flight)
                self.pending_row_writes.extend(self.kv.cache_prefix(req, row.kv_end))
                if not row.need_sample:
                    continue
            verified = msg.spec_token_ids[i] if msg.spec_token_ids and msg.spec_token_ids[i] else [token]
            new_ids, reason = self._append_tokens(req, verified)
            if has_logprobs and req.sampling.return_logprob:
                outputs.append(self._with_logprobs(req, token, reason, msg, len(outputs)))
            else:
                outputs.append(TokenOutput(
                    rid=req.rid, parent_rid=req.parent_rid, index=req.index, new_token_ids=new_ids,
                    finish_reason=reason, prompt_tokens=len(req.input_ids),
                    completion_tokens=len(req.output_ids), cached_tokens=req.cached_tokens))
            if req.sampling.return_logprob:
                outputs[-1] = with_extras(outputs[-1], req, msg, i)
            if self.spec is not None:
                self.spec.after_step(self.kv, req, len(row.drafts), verified, len(new_ids), reason,
                                     msg.spec_accepted_nodes[i] if msg.spec_accepted_nodes else None)
                outputs[-1] = self.spec.annotate(outputs[-1])
            if reason is not None:
                finished.append(req)
        self.num_generated += sum(len(out.new_token_ids) for out in outputs)
        if finished:
            done = set(map(id, finished))
            self.running_reqs = [r for r in self.running_reqs if id(r) not in done]
            for req in finished:
                self._release(req, keep_in_cache=True)
        self._emit_outputs(outputs)

    def _append_tokens(self, req: Req, tokens: list[int]) -> tuple[list[int], FinishReason | None]:
        """Append a step's tokens (several for a verified draft run) up to the first finish."""
        for count, token in enumerate(tokens, 1):
            req.output_ids.append(token)
            reason = self._finish_reason(req, token)
            if reason is not None:
                return tokens[:count], reason
        return tokens, None

    def _with_logprobs(self, req: Req, token: int, reason, msg: SampledTokens, _: int) -> TokenOutput:
        i = msg.rids.index(req.rid)
        tops = req.sampling.top_logprobs_num > 0 and bool(msg.top_token_ids)
        return self._token_output(req, [token], reason, [msg.token_logprobs[i]],
                                  [msg.top_token_ids[i]] if tops else [], [msg.top_logprobs[i]] if tops else [])

    # --------------------------------------------------------------- finish
    def _finish_reason(self, req: Req, token: int) -> FinishReason | None:
        num_out = len(req.output_ids)
        if token in req.stop_ids and num_out >= req.sampling.min_new_tokens:
            return FinishReason(type="stop", matched=token)
        if num_out >= req.max_new_tokens:
            return FinishReason(type="length")
        return None

    def _release(self, req: Req, keep_in_cache: bool) -> None:
        self.kv.trim(req, req.seq_len - 1)  # a step planned ahead took a slot for a token never fed
        if req.row and self.pending_row_writes:
            self.pending_row_writes = [w for w in self.pending_row_writes if w.row != req.row]
        if req.media is not None and req.media.unfinished(req.kv_len):
            self.mm_released.append(req.rid)
        self.kv.release(req, keep_in_cache)
        req.phase = Phase.DONE
        self.live_rids.discard(req.rid)
        if self.spec is not None:
            self.spec.forget(req.rid)
        if req.constrained:
            self.outboxes.constrain.put(GrammarRelease(rid=req.rid))

    def _finish(self, req: Req, reason: FinishReason, keep_in_cache: bool = True) -> TokenOutput:
        self._release(req, keep_in_cache)
        return self._token_output(req, [], reason, [], [], [])

    def _token_output(self, req: Req, new_ids: list[int], reason: FinishReason | None,
                      logprobs: list[float], top_ids: list, top_lps: list) -> TokenOutput:
        req.finish_reason = reason
        return TokenOutput(
            rid=req.rid, parent_rid=req.parent_rid, index=req.index, new_token_ids=new_ids,
            finish_reason=reason, prompt_tokens=len(req.input_ids), completion_tokens=len(req.output_ids),
            cached_tokens=req.cached_tokens, token_logprobs=logprobs, top_token_ids=top_ids,
            top_logprobs=top_lps)

    def _emit_outputs(self, outputs: list[TokenOutput]) -> None:
        if outputs:
            self.outboxes.detokenize.put(TokenOutputBatch(outputs=outputs))

    def _emit_error(self, rid: str, message: str, param: str | None) -> None:
        self.outboxes.detokenize.put(ErrorOutput(rid=rid, status_code=400, message=message, param=param))

    # ---------------------------------------------------------------- stats
    def _maybe_emit_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._stats_at_s < STATS_INTERVAL_S:
            return
        elapsed = max(now - self._stats_at_s, 1e-9)
        throughput = (self.num_generated - self._stats_generated) / elapsed
        self._stats_at_s, self._stats_generated = now, self.num_generated
        self.outboxes.stats.put(EngineStats(
            time_s=time.time(), num_running_reqs=len(self.running_reqs), num_queue_reqs=len(self.waiting),
            token_usage=self.kv.used_tokens() / self.kv.capacity_tokens,
            cache_hit_rate=self.kv.tree.hit_rate, gen_throughput=throughput,
            max_total_num_tokens=self.kv.capacity_tokens, dp_rank=self.dp_rank,
            num_generated_tokens=self.num_generated, **self._role_stats()))

    def _role_stats(self) -> dict[str, Any]:
        """EngineStats fields of a prefill or decode role (``disagg.py``); none on an ordinary engine."""
        return {}

    def _end_busy_period(self) -> None:
        if self._log_busy_since is not None:
            self._log_busy_s += time.monotonic() - self._log_busy_since
            self._log_busy_since = None

    def _maybe_log_batch(self) -> None:
        """SGLang's periodic batch line, once LOG_INTERVAL_S of busy time has gathered.

        Busy time adds up over busy periods (short requests that finish together
        leave the stage idle between rounds), so the line comes under any load,
        and its throughput counts busy seconds only.
        """
        now = time.monotonic()
        if self._log_busy_since is None:
            self._log_busy_since = now
        busy_s = self._log_busy_s + (now - self._log_busy_since)
        if busy_s < LOG_INTERVAL_S:
            return
        generated = self.num_generated - self._log_generated
        self._log_busy_s, self._log_busy_since, self._log_generated = 0.0, now, self.num_generated
        logger.info("Decode batch. #running-req: %d, #queue-req: %d, #token: %d, token usage: %.2f, "
                    "gen throughput (token/s): %.2f, cache hit rate: %.2f%%", len(self.running_reqs),
                    len(self.waiting), self.kv.used_tokens(), self.kv.used_tokens() / self.kv.capacity_tokens,
                    generated / busy_s, 100.0 * self.kv.tree.hit_rate)

    def check_integrity(self) -> None:
        self.kv.check_integrity()


def _grammar_of(params: SamplingParams) -> tuple[str, str] | None:
    if params.json_schema is not None:
        return "json_schema", params.json_schema
    if params.regex is not None:
        return "regex", params.regex
    if params.choices is not None:
        return "choices", json.dumps(params.choices)
    if params.ebnf is not None:
        return "ebnf", params.ebnf
    return None
