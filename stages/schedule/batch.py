"""Choosing the next batch: decodes first, then prefill chunks, then the ForwardBatch.

``plan_batch`` runs once per engine step when no batch is in flight:

1. **Decodes.** Every running request that finished its prefill adds one
   token. If the pool (free + evictable) cannot hold them, requests are
   *retracted* (fewest generated tokens first): their computed KV goes into
   the radix cache, they return to the waiting queue and later re-prefill
   prompt + generated tokens (mostly a cache hit). Running out of KV is a
   scheduling event, not an error.
2. **Prefill.** A token budget of ``min(--chunked-prefill-size,
   --max-prefill-tokens)`` is spent on requests still prefilling, then on
   waiting requests in policy order. A prompt longer than the budget is cut
   into chunks, one per step, interleaved with the decodes. Admission needs a
   free row, ``< --max-running-requests`` running, and KV for the chunk plus
   a reserve for the tokens running requests are still expected to generate
   (``NEW_TOKEN_RATIO`` of their remaining max_new_tokens), so that
   retractions stay rare.
3. **Batch.** Prefill rows then decode rows; mode ``extend`` if any prefill
   row, else ``decode``. The schedule stage decides whether both kinds share
   a batch (``--enable-mixed-chunk``) or a step is one kind only. Only a prompt's last chunk samples a token. A chunk
   of a request that wants prompt logprobs lists the prompt tokens its rows
   predict (``SamplingBatch.prompt_logprob_ids``, see ``prompt_logprobs.py``).
"""
from __future__ import annotations

import dataclasses
import math

import msgspec

from pipeline.messages import ForwardBatch, RowWrite, SamplingBatch
from stages.schedule.kv_manager import KVManager
from stages.schedule.policy import order_waiting
from stages.schedule.prompt_logprobs import chunk_targets
from stages.schedule.req_table import Phase, Req

NEW_TOKEN_RATIO = 0.3
# Prompt tokens owing logprobs per step, over the whole batch: each brings an fp32 logits row
# (vocab wide) to the LM head and the sample stage, so a long prompt is scored in slices.
PROMPT_LOGPROB_ROWS = 2048


@dataclasses.dataclass
class PlannedRow:
    req: Req
    extend_len: int
    need_sample: bool
    is_prefill: bool
    prompt_first: int = 0  # prompt position of the first logprob this row computes (if any)
    kv_end: int = 0  # the request's KV length once this row is computed (prefill rows)
    drafts: list[int] = dataclasses.field(default_factory=list)  # speculative tokens fed after the last one
    draft_parents: list[int] = dataclasses.field(default_factory=list)  # a draft tree's ([] a chain)


def plan_decodes(kv: KVManager, running: list[Req]) -> tuple[list[PlannedRow], list[Req], list[Req]]:
    """(decode rows, retracted, failed): retract until one more token per decoding request fits.

    Victims are requests still prefilling (latest arrival first; their computed
    chunks stay in the radix cache), then decodes with the fewest generated
    tokens. The last decode is never retracted: if it alone overflows the pool
    it fails, which only happens when prompt + output exceed the pool.
    """
    decoding = [r for r in running if len(r.slots) >= r.prefill_target]
    prefilling = [r for r in running if len(r.slots) < r.prefill_target]
    retracted: list[Req] = []
    while (decoding and (prefilling or len(decoding) > 1)
           and kv.decode_need(decoding) > kv.available_tokens):
        if prefilling:
            victim = max(prefilling, key=lambda r: r.arrival_order)
            prefilling.remove(victim)
        else:
            victim = min(decoding, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
            decoding.remove(victim)
        retracted.append(victim)
        kv.release(victim, keep_in_cache=True)
    if not decoding:
        return [], retracted, []
    if not kv.grow_decodes(decoding):  # a single request alone overflows the pool
        return [], retracted, decoding
    return [PlannedRow(req, 1, True, False) for req in decoding], retracted, []


def plan_prefills(kv: KVManager, running: list[Req], waiting: list[Req], policy: str, budget: int,
                  max_running: int) -> tuple[list[PlannedRow], list[Req], list[RowWrite]]:
    """(prefill rows, newly admitted requests, their row writes) within the token budget."""
    rows: list[PlannedRow] = []
    prefilling_parents: set[str] = set()
    logit_rows = PROMPT_LOGPROB_ROWS
    for req in running:
        if req.is_prefilling and budget > 0:
            chunk = _logprob_cap(req, min(req.prefill_target - req.kv_len, budget), logit_rows)
            if chunk <= 0 or kv.grow(req, chunk) is None:
                continue
            budget -= chunk
            logit_rows -= chunk if req.logprob_owed is not None else 0
            rows.append(PlannedRow(req, chunk, req.kv_len == req.prefill_target, True, kv_end=req.kv_len))
            prefilling_parents.add(req.parent_rid)
    admitted: list[Req] = []
    writes: list[RowWrite] = []
    if not waiting or len(running) >= max_running or kv.rows.num_free == 0:
        return rows, admitted, writes
    num_running = len(running)
    reserve = sum(math.ceil(r.remaining_new_tokens * NEW_TOKEN_RATIO) for r in running)
    for req in order_waiting(waiting, policy, kv.match):
        if budget <= 0 or num_running >= max_running or kv.rows.num_free == 0:
            break
        if req.parent_rid in prefilling_parents and req.parent_rid != req.rid:
            continue  # a sibling is prefilling the shared prompt: wait for its cache entry
        target = req.seq_len
        cached = kv.match(req)
        chunk = _logprob_cap(req, min(target - cached, budget), logit_rows)
        if chunk <= 0:
            continue
        need = kv.tokens_to_grow_from(cached, chunk)
        req_reserve = math.ceil(req.remaining_new_tokens * NEW_TOKEN_RATIO)
        busy = num_running > 0 or bool(rows)
        if busy and need + reserve + req_reserve > kv.available_tokens - cached:
            break
        row_writes = kv.admit(req)
        if row_writes is None:
            break
        if kv.grow(req, chunk) is None:
            kv.release(req, keep_in_cache=False)
            break
        writes.extend(row_writes)
        req.prefill_target = target
        req.phase = Phase.RUNNING
        if not req.admitted_once:
            req.cached_tokens = req.cached_len
            req.admitted_once = True
        budget -= chunk
        logit_rows -= chunk if req.logprob_owed is not None else 0
        reserve += req_reserve
        num_running += 1
        admitted.append(req)
        rows.append(PlannedRow(req, chunk, req.kv_len == req.prefill_target, True, kv_end=req.kv_len))
        prefilling_parents.add(req.parent_rid)
    return rows, admitted, writes


def _logprob_cap(req: Req, chunk: int, logit_rows: int) -> int:
    """A chunk owing prompt logprobs takes at most ``logit_rows`` tokens (one logits row each)."""
    return chunk if req.logprob_owed is None else min(chunk, logit_rows)


def build_forward_batch(batch_id: int, rows: list[PlannedRow], row_writes: list[RowWrite],
                        overlap: bool = False) -> ForwardBatch:
    """Flatten planned rows (their slots already allocated) into the plain-int ForwardBatch.

    A request whose last token is still in flight (``pending_tokens``) feeds
    ``-row``: the forward stage reads that token on the device. ``overlap``:
    the sample stage keeps this batch's tokens there for the next batch.
    """
    batch = _build(batch_id, rows, row_writes)
    future_input = any(row.req.pending_tokens for row in rows)
    if overlap or future_input:
        batch = msgspec.structs.replace(batch, overlap=overlap, future_input=future_input)
    return batch


def _token_at(req: Req, position: int) -> int:
    """Token ``position`` of ``fill_ids``, or ``-row`` for the one still in flight."""
    num_input = len(req.input_ids)
    if position < num_input:
        return req.input_ids[position]
    if position - num_input == len(req.output_ids):
        return -req.row
    return req.output_ids[position - num_input]


def _last_token(req: Req) -> int:
    """The token a decode feeds: the last generated one, or ``-row`` while it is in flight."""
    return -req.row if req.pending_tokens else req.output_ids[-1]


def _build(batch_id: int, rows: list[PlannedRow], row_writes: list[RowWrite]) -> ForwardBatch:
    if not any(row.is_prefill or row.drafts for row in rows):
        return _decode_batch(batch_id, rows, row_writes)
    input_ids: list[int] = []
    positions: list[int] = []
    out_cache_loc: list[int] = []
    prefix_lens, extend_lens, seq_lens = [], [], []
    for row in rows:
        req, n = row.req, row.extend_len
        end = req.kv_len
        start = end - n
        if row.drafts:  # the last token, then the drafts at the positions after it
            input_ids.append(_token_at(req, start))
            input_ids.extend(row.drafts)
            positions.extend(start + d for d in _depths(row.draft_parents, n))
            out_cache_loc.extend(req.slots[start:end])
        elif n == 1:
            input_ids.append(_token_at(req, start))
            positions.append(start)
            out_cache_loc.append(req.slots[start])
        else:
            input_ids.extend(req.fill_ids[start:end])
            positions.extend(range(start, end))
            out_cache_loc.extend(req.slots[start:end])
        prefix_lens.append(start)
        extend_lens.append(n)
        seq_lens.append(end)
    reqs = [row.req for row in rows]
    mode = "extend"
    return ForwardBatch(
        batch_id=batch_id, mode=mode, rids=[r.rid for r in reqs], input_ids=input_ids,
        positions=positions, out_cache_loc=out_cache_loc, req_pool_indices=[r.row for r in reqs],
        prefix_lens=prefix_lens, extend_lens=extend_lens, seq_lens=seq_lens,
        row_writes=row_writes, sampling=sampling_batch(rows))


def _depths(parents: list[int], n: int) -> list[int]:
    """Each node's depth in a draft tree (a chain's when ``parents`` is empty)."""
    if not parents:
        return list(range(n))
    depth = [0] * n
    for i in range(1, n):
        depth[i] = depth[parents[i]] + 1
    return depth


def _decode_batch(batch_id: int, rows: list[PlannedRow], row_writes: list[RowWrite]) -> ForwardBatch:
    """The common case, kept lean: every request feeds its last token at position kv_len - 1."""
    reqs = [row.req for row in rows]
    positions = [len(r.slots) - 1 for r in reqs]
    return ForwardBatch(
        batch_id=batch_id, mode="decode", rids=[r.rid for r in reqs],
        input_ids=[_last_token(r) for r in reqs], positions=positions,
        out_cache_loc=[r.slots[-1] for r in reqs], req_pool_indices=[r.row for r in reqs],
        prefix_lens=positions, extend_lens=[1] * len(reqs), seq_lens=[p + 1 for p in positions],
        row_writes=row_writes, sampling=sampling_batch(rows))


def sampling_batch(rows: list[PlannedRow]) -> SamplingBatch:
    params = [row.req.sampling for row in rows]
    reqs = [row.req for row in rows]
    return SamplingBatch(
        temperatures=[p.temperature for p in params],
        top_ps=[p.top_p for p in params],
        top_ks=[p.top_k for p in params],
        min_ps=[p.min_p for p in params],
        repetition_penalties=[p.repetition_penalty for p in params],
        frequency_penalties=[p.frequency_penalty for p in params],
        presence_penalties=[p.presence_penalty for p in params],
        seeds=[r.seed for r in reqs],
        steps=[r.output_len for r in reqs],
        need_sample=[row.need_sample for row in rows],
        first_step=[row.need_sample and r.output_len == 0 for row, r in zip(rows, reqs)],
        return_logprob=[p.return_logprob for p in params],
        top_logprobs_nums=[p.top_logprobs_num for p in params],
        constrained=[r.constrained for r in reqs],
        banned_token_ids=_banned_token_ids(rows),
        logit_biases=[dict(p.logit_bias) for p in params] if any(p.logit_bias for p in params) else [],
        draft_ids=[list(row.drafts) for row in rows] if any(row.drafts for row in rows) else [],
        draft_parents=([list(row.draft_parents) for row in rows] if any(row.draft_parents for row in rows)
                       else []),
        **_logprob_options(rows),
    )


def _logprob_options(rows: list[PlannedRow]) -> dict:
    """prompt_logprob_ids (and the top-n per row) for chunks owing prompt logprobs; token_ids_logprobs.

    Sets each such row's ``prompt_first``; empty lists when no row needs them.
    """
    options: dict = {}
    targets: list[list[int]] = []
    for row in rows:
        req = row.req
        ids: list[int] = []
        if row.is_prefill and req.logprob_owed is not None:
            end = req.kv_len
            row.prompt_first = max(req.logprob_owed, end - row.extend_len + 1)
            ids = chunk_targets(req.input_ids, req.logprob_owed, end - row.extend_len, end)
        targets.append(ids)
    if any(targets):
        options["prompt_logprob_ids"] = targets
        options["prompt_top_logprobs_nums"] = [r.req.sampling.prompt_top_logprobs_num for r in rows]
    if any(r.req.sampling.return_logprob and r.req.sampling.token_ids_logprob for r in rows):
        options["token_ids_logprobs"] = [list(r.req.sampling.token_ids_logprob) if r.req.sampling.return_logprob
                                         else [] for r in rows]
    return options


def _banned_token_ids(rows: list[PlannedRow]) -> list[list[int]]:
    """Stop ids are banned while a request is under min_new_tokens (SGLang's rule).

    Constrained rows are left alone: their grammar decides when EOS may come.
    """
    banned = [sorted(r.req.stop_ids) if _under_min_tokens(r) else [] for r in rows]
    return banned if any(banned) else []


def _under_min_tokens(row: PlannedRow) -> bool:
    req = row.req
    return row.need_sample and not req.constrained and req.output_len < req.sampling.min_new_tokens
