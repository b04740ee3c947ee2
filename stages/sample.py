"""SampleStage: logits of a batch -> one token per request.

Inbox (``SampleInbox``): Logits, TokenMask. Outboxes (``SampleOutboxes``):
``schedule`` (SampledTokens) and ``constrain`` (the same SampledTokens, only
for batches with a constrained row, so grammar states advance).

Per row, in order (the ``SamplingOps`` table of ``--kernel-backend``:
``triton_kernels/sampling/`` or their PyTorch references):

1. penalties (repetition / frequency / presence) from the counts of tokens
   this request generated so far. Counts live on the device in a
   ``[rows, vocab]`` int32 table keyed by rid (a row is taken on the
   request's ``first_step`` and reset; the least recently used row of a
   request outside the batch is reused);
   it is allocated only once some request asks for a penalty;
2. the grammar bitmask of constrained rows (from the TokenMask with the same
   ``batch_id``: the stage waits for it when a row is constrained);
   then ``logit_bias`` (a sparse add of each row's token biases);
3. temperature, top-k, top-p, min-p and a seeded Gumbel-max draw
   (``seed``, ``step``): greedy when temperature is 0; the same seed and
   step give the same token whatever else is in the batch;
4. logprobs of the chosen token (and the top-n) on request, from the
   penalized, masked logits before temperature; the logprobs of the row's
   ``token_ids_logprob`` ids from the same logits.

Prompt logprobs (``Logits.prompt_logits``, rows of prompt positions the
schedule stage asked for): the log-softmax of the raw logits at each prompt
token that follows (``SamplingBatch.prompt_logprob_ids``), its rank in the
vocabulary, the top-n and the ``token_ids_logprob`` ids, per row a
``PromptLogprobs``.

Exactly one device->host synchronization per batch: every result is copied
into pinned host buffers with non-blocking copies, then the stream is
synchronized once.

Overlap batches (``Logits.future_tokens`` set; see the schedule stage):
the chosen tokens are also stored on the device at ``future_tokens[row]``
(``store_future_tokens``), where the next batch, planned before these
tokens reach the host, reads them. The synchronization is put off: the
results wait here (``ahead``) and are reported at the end of a later
``step`` -- the step that sampled the next batch (the GPU already has that
batch's work queued, so waiting costs it nothing), or the next step with no
new batch at all (the scheduler could not run ahead). SampledTokens always
leave in batch order.
"""
from __future__ import annotations

import collections
import dataclasses

import msgspec
import torch

from pipeline.channel import Channel
from pipeline.config import ServerArgs, running_requests_bound
from pipeline.messages import Logits, PromptLogprobs, SampledTokens, SampleInbox, SamplingBatch, TokenMask
from pipeline.stage import Outbox, Outboxes, Stage
from stages.speculative import chain_verify
from stages.staging import Downloader, Uploader
from triton_kernels import KernelOptions, load_sampling_ops

SEED_MASK = (1 << 63) - 1
DEFERRED_SLOTS = 200  # Downloader slots of deferred results (two sets of 8)


@dataclasses.dataclass(eq=False)
class _Deferred:
    """An overlap batch sampled on the device whose results are still on their way to the host."""

    batch_id: int
    rids: list[str]
    token_ids: torch.Tensor  # device
    host: list[torch.Tensor]  # pinned copies: token ids, then logprobs / top ids / top logprobs
    params: SamplingBatch
    done: "torch.cuda.Event | None"  # recorded after the copies (None on a CPU device)
    step: int  # the stage step that sampled it
    message: Logits | None = None

    def result(self) -> SampledTokens:
        host, params = self.host, self.params
        ids = [t if need else -1 for t, need in zip(host[0].tolist(), params.need_sample)]
        if len(host) == 1:
            return SampledTokens(batch_id=self.batch_id, rids=self.rids, token_ids=ids)
        return SampledTokens(batch_id=self.batch_id, rids=self.rids, token_ids=ids,
                             token_logprobs=host[1].tolist(), top_token_ids=host[2].tolist(),
                             top_logprobs=host[3].tolist())


class PenaltyCounts:
    """Per-request generated-token counts on the device, rows recycled LRU."""

    def __init__(self, num_rows: int, vocab_size: int, device: torch.device) -> None:
        self.counts = torch.zeros((num_rows, vocab_size), dtype=torch.int32, device=device)
        self.rows: collections.OrderedDict[str, int] = collections.OrderedDict()
        self.free = list(range(num_rows - 1, 0, -1))  # row 0 stays all zeros

    def rows_of(self, rids: list[str], resets: list[bool]) -> list[int]:
        """Rows of a batch's requests: every rid of the batch is touched before any row is
        taken, so taking a row for a new request never evicts another request of the same batch."""
        for rid in rids:
            if rid in self.rows:
                self.rows.move_to_end(rid)
        return [self.row_of(rid, reset) for rid, reset in zip(rids, resets)]

    def row_of(self, rid: str, reset: bool) -> int:
        row = self.rows.get(rid)
        if row is None:
            row = self.free.pop() if self.free else self.rows.popitem(last=False)[1]
            self.rows[rid] = row
            reset = True
        self.rows.move_to_end(rid)
        if reset:
            self.counts[row].zero_()
        return row


@dataclasses.dataclass(frozen=True)
class SampleOutboxes(Outboxes):
    schedule: Outbox[SampledTokens]
    constrain: Outbox[SampledTokens]  # batches with a constrained row: grammar states advance


class SampleStage(Stage):
    """Penalties, grammar masks, sampling and logprobs for one batch at a time."""

    Inbox = SampleInbox
    Outboxes = SampleOutboxes
    outboxes: SampleOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: SampleOutboxes | dict[str, Channel | None]) -> None:
        super().__init__("sample", inbox, outboxes)
        self.args = args
        self.ops = load_sampling_ops(args.kernel_backend,
                                     KernelOptions(gemm_ws=not args.disable_gemm_ws, pdl=not args.disable_pdl))
        self.penalty_rows = running_requests_bound(args) + 1  # every running request keeps its row (LRU)
        self.penalties: PenaltyCounts | None = None
        self.pending_logits: dict[int, Logits] = {}
        self.pending_masks: dict[int, TokenMask] = {}
        self.last_done_batch_id = -1
        device = torch.device(args.device if args.device != "auto" else "cpu")
        self.uploader = Uploader(device)      # pinned host buffers, reused every step
        self.downloader = Downloader()
        self.ahead: collections.deque[_Deferred] = collections.deque()  # overlap batches not reported yet

    # ----------------------------------------------------------- messages
    def handle(self, message: SampleInbox) -> None:
        match message:
            case Logits():
                if any(message.sampling.constrained) and message.batch_id not in self.pending_masks:
                    self.pending_logits[message.batch_id] = message
                    return
                self._finish(message, self.pending_masks.pop(message.batch_id, None))
            case TokenMask():
                logits = self.pending_logits.pop(message.batch_id, None)
                if logits is not None:
                    self._finish(logits, message)
                elif message.batch_id > self.last_done_batch_id:
                    self.pending_masks[message.batch_id] = message
            case _:
                raise TypeError(f"sample: unexpected message {type(message).__name__}")

    def _finish(self, message: Logits, mask: TokenMask | None) -> None:
        self.last_done_batch_id = max(self.last_done_batch_id, message.batch_id)
        if message.future_tokens is not None:
            self._sample_ahead(message, mask)
            return
        self._report_ahead()
        if message.sampling.draft_ids:
            out = self._verify(message, mask)
        else:
            out = self.sample_batch(message.batch_id, message.rids, message.logits, message.sampling, mask)
        if message.sampling.token_ids_logprobs or message.prompt_logits is not None:
            out = self._with_logprob_options(out, message)
        self.outboxes.schedule.put(out)
        if any(message.sampling.constrained):
            self.outboxes.constrain.put(out)

    # ------------------------------------------------------ overlap batches
    def _sample_ahead(self, message: Logits, mask: TokenMask | None) -> None:
        """Sample, store the tokens for the next batch on the device, report later."""
        pending = self.sample_batch(message.batch_id, message.rids, message.logits, message.sampling, mask,
                                    defer=True)
        with torch.inference_mode():
            self.ops.store_future_tokens(message.future_tokens, message.future_rows, pending.token_ids)
        pending.message = message
        self.ahead.append(pending)
        if message.sampling.token_ids_logprobs or message.prompt_logits is not None:
            self._report_ahead()  # their extra results are read on the host at once

    def tick(self) -> None:
        """Report every batch sampled before this step's newest (or all, if none is new)."""
        ahead = self.ahead
        newest = ahead[-1] if ahead and ahead[-1].step == self.counters.steps else None
        while ahead and ahead[0] is not newest:
            self._report(ahead.popleft())

    def has_work(self) -> bool:
        return super().has_work() or bool(self.ahead)

    def _report_ahead(self) -> None:
        while self.ahead:
            self._report(self.ahead.popleft())

    def _report(self, pending: "_Deferred") -> None:
        if pending.done is not None:
            pending.done.synchronize()
        out = pending.result()
        message = pending.message
        if message.sampling.token_ids_logprobs or message.prompt_logits is not None:
            out = self._with_logprob_options(out, message)
        self.outboxes.schedule.put(out)
        if any(message.sampling.constrained):
            self.outboxes.constrain.put(out)

    # ------------------------------------------------------------ sampling
    @torch.inference_mode()
    def sample_batch(self, batch_id: int, rids: list[str], logits: torch.Tensor, params: SamplingBatch,
                     mask: TokenMask | None, defer: bool = False) -> "SampledTokens | _Deferred":
        logits = logits.float().contiguous()
        penalized = self._penalty_rows(rids, params, logits)
        if penalized is not None:
            logits = logits.clone()
            rows_t = self.uploader.upload(penalized, torch.int64)
            floats = self.uploader.upload([params.repetition_penalties, params.frequency_penalties,
                                           params.presence_penalties], torch.float32)
            self.ops.apply_penalties(logits, self.penalties.counts.index_select(0, rows_t),
                                 floats[0], floats[1], floats[2])
        if mask is not None and mask.bitmask is not None and mask.row_indices:
            if penalized is None:
                logits = logits.clone()
            rows = self.uploader.upload(mask.row_indices, torch.int64)
            bitmask = self.uploader.upload(mask.bitmask, torch.int32)
            self.ops.apply_token_bitmask(logits, bitmask, rows)
        if params.logit_biases:
            logits = self._apply_logit_bias(logits, params.logit_biases)
        if params.banned_token_ids:
            if penalized is None and mask is None and not params.logit_biases:
                logits = logits.clone()
            self._apply_bans(logits, params.banned_token_ids)
        token_ids = self._draw(logits, params)
        if penalized is not None:
            self._count(token_ids, rows_t, params)
        top_n = max(params.top_logprobs_nums) if any(params.return_logprob) else 0
        logprobs = self.ops.compute_logprobs(logits, token_ids, top_n) if any(params.return_logprob) else None
        if defer:
            return self._start_to_host(batch_id, rids, token_ids, logprobs, params)
        return self._to_host(batch_id, rids, token_ids, logprobs, params)

    def _verify(self, message: Logits, mask: TokenMask | None) -> SampledTokens:
        """A batch with draft rows (speculative decoding, never an overlap batch): sample every
        verified position as a row of its own, keep each row's matching drafts
        (``stages/speculative/chain_verify.py``)."""
        rids, logits, params, mask, expansion = chain_verify.expand(
            message.rids, message.logits, message.draft_logits, message.sampling, mask)
        out = self.sample_batch(message.batch_id, rids, logits, params, mask)
        emitted, paths = chain_verify.accept_paths(out.token_ids, expansion)
        return SampledTokens(
            batch_id=message.batch_id, rids=message.rids,
            token_ids=[tokens[0] for tokens in emitted],
            spec_token_ids=[tokens if ids else [] for tokens, ids in zip(emitted, expansion.drafts)],
            spec_accepted_nodes=paths if message.sampling.draft_parents else [],
            token_logprobs=chain_verify.compact(out.token_logprobs, expansion),
            top_token_ids=chain_verify.compact(out.top_token_ids, expansion),
            top_logprobs=chain_verify.compact(out.top_logprobs, expansion))

    # ----------------------------------------------- prompt logprobs, token_ids_logprob
    @torch.inference_mode()
    def _with_logprob_options(self, out: SampledTokens, message: Logits) -> SampledTokens:
        """Add prompt logprobs and token_ids_logprob values to a batch's SampledTokens."""
        params = message.sampling
        tensors: list[torch.Tensor] = []
        if params.token_ids_logprobs:
            tensors.append(self._ids_logprobs(message.logits.float().contiguous(), params.token_ids_logprobs))
        prompt = message.prompt_logits is not None and bool(params.prompt_logprob_ids)
        if prompt:
            tensors += self._prompt_tensors(message.prompt_logits.float().contiguous(), params)
        host = [self.downloader.start(100 + slot, t) for slot, t in enumerate(tensors)]
        if tensors and tensors[0].device.type == "cuda":
            torch.cuda.current_stream(tensors[0].device).synchronize()
        host = [t.tolist() for t in host]
        changes: dict = {}
        if params.token_ids_logprobs:
            changes["ids_logprobs"] = _split(host.pop(0), [len(ids) for ids in params.token_ids_logprobs])
        if prompt:
            changes["prompt_logprobs"] = _prompt_results(params, *host)
        return msgspec.structs.replace(out, **changes)

    def _ids_logprobs(self, logits: torch.Tensor, ids_per_row: list[list[int]],
                      logsumexp: torch.Tensor | None = None) -> torch.Tensor:
        """log_softmax(logits[row])[id] for each (row, id) pair, flattened row by row:
        ``logits[row, id] - logsumexp(logits[row])``, no row copied."""
        rows = [row for row, ids in enumerate(ids_per_row) for _ in ids]
        ids = [token for token_ids in ids_per_row for token in token_ids]
        if not rows:
            return torch.empty(0, dtype=torch.float32, device=logits.device)
        vocab_size = logits.shape[1]
        ids = [token if token < vocab_size else 0 for token in ids]  # out-of-vocabulary ids: refused upstream
        index = self.uploader.upload([rows, ids], torch.int64)
        if logsumexp is None:  # from the kernel's logprob of token 0: logits[:, 0] - logprob
            first = torch.zeros(logits.shape[0], dtype=torch.int64, device=logits.device)
            logsumexp = logits[:, 0] - self.ops.compute_logprobs(logits, first, 0)[0]
        return logits[index[0], index[1]] - logsumexp[index[0]]

    def _prompt_tensors(self, logits: torch.Tensor, params: SamplingBatch) -> list[torch.Tensor]:
        """[logprob, rank, top ids, top logprobs, token_ids_logprob values] of the prompt rows."""
        targets = self.uploader.upload([t for ids in params.prompt_logprob_ids for t in ids], torch.int64)
        top_n = max((n for n, ids in zip(params.prompt_top_logprobs_nums, params.prompt_logprob_ids) if ids),
                    default=0)
        token_lp, top_ids, top_lp = self.ops.compute_logprobs(logits, targets, top_n)
        ranks = self.ops.token_ranks(logits, targets)
        chosen = logits.gather(1, targets[:, None])
        per_position: list[list[int]] = []
        for b, ids in enumerate(params.prompt_logprob_ids):
            wanted = params.token_ids_logprobs[b] if params.token_ids_logprobs else []
            per_position += [wanted] * len(ids)
        logsumexp = chosen[:, 0] - token_lp
        return [token_lp, ranks, top_ids, top_lp, self._ids_logprobs(logits, per_position, logsumexp)]

    def _penalty_rows(self, rids: list[str], params: SamplingBatch,
                      logits: torch.Tensor) -> list[int] | None:
        used = [r != 1.0 or f != 0.0 or p != 0.0 for r, f, p in
                zip(params.repetition_penalties, params.frequency_penalties, params.presence_penalties)]
        if not any(used):
            return None
        if self.penalties is None:
            self.penalties = PenaltyCounts(self.penalty_rows, logits.shape[1], logits.device)
        penalized = [i for i, on in enumerate(used) if on]
        rows = self.penalties.rows_of([rids[i] for i in penalized], [params.first_step[i] for i in penalized])
        out = [0] * len(rids)
        for i, row in zip(penalized, rows):
            out[i] = row
        return out

    def _apply_logit_bias(self, logits: torch.Tensor, biases: list[dict[int, float]]) -> torch.Tensor:
        """logit_bias: one sparse add of (row, token id, bias) triples into a copy of the logits.

        Runs after the grammar mask, so a bias never re-allows a token the
        grammar ruled out (a masked -inf plus a finite bias stays -inf)."""
        rows, cols, values = [], [], []
        for row, bias in enumerate(biases):
            for token_id, value in bias.items():
                if 0 <= token_id < logits.shape[1]:
                    rows.append(row)
                    cols.append(token_id)
                    values.append(value)
        logits = logits.clone()
        if rows:
            index = self.uploader.upload([rows, cols], torch.int64)
            logits.index_put_((index[0], index[1]), self.uploader.upload(values, torch.float32), accumulate=True)
        return logits

    def _apply_bans(self, logits: torch.Tensor, banned: list[list[int]]) -> None:
        """Ban tokens per row (min_new_tokens): clear their bits in an all-allowed bitmask
        and apply it with the same kernel as grammar masks."""
        rows = [i for i, ids in enumerate(banned) if ids]
        if not rows:
            return
        vocab_size = logits.shape[1]
        words = torch.full((len(rows), (vocab_size + 31) // 32), -1, dtype=torch.int32)
        for k, i in enumerate(rows):
            for token in banned[i]:
                if 0 <= token < vocab_size:
                    word = int(words[k, token // 32]) & 0xFFFFFFFF
                    word &= ~(1 << (token % 32))
                    words[k, token // 32] = word - (1 << 32) if word >= 1 << 31 else word
        self.ops.apply_token_bitmask(logits, self.uploader.upload(words, torch.int32),
                                 self.uploader.upload(rows, torch.int64))

    def _draw(self, logits: torch.Tensor, params: SamplingBatch) -> torch.Tensor:
        if all(t <= 0 for t in params.temperatures):
            return self.ops.greedy(logits)  # every row greedy: argmax, no parameters to upload
        floats = self.uploader.upload([params.temperatures, params.top_ps, params.min_ps], torch.float32)
        ints = self.uploader.upload([params.top_ks, [s & SEED_MASK for s in params.seeds], params.steps],
                                    torch.int64)
        return self.ops.sample(logits, floats[0], ints[0], floats[1], floats[2], ints[1], ints[2])

    def _count(self, token_ids: torch.Tensor, rows_t: torch.Tensor, params: SamplingBatch) -> None:
        keep = self.uploader.upload(params.need_sample, torch.bool) & (rows_t > 0)
        ones = keep.to(torch.int32)
        self.penalties.counts.index_put_((rows_t, token_ids), ones, accumulate=True)

    def _start_to_host(self, batch_id: int, rids: list[str], token_ids: torch.Tensor, logprobs,
                       params: SamplingBatch) -> "_Deferred":
        """Begin copying the results to the host; an event marks when they are there.

        Two batches may wait at once (the one reported next and the newest), so
        their pinned buffers alternate between two sets of download slots.
        """
        tensors = [token_ids] + (list(logprobs) if logprobs is not None else [])
        base = DEFERRED_SLOTS + 8 * (batch_id % 2)
        host = [self.downloader.start(base + slot, t) for slot, t in enumerate(tensors)]
        done = None
        if token_ids.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return _Deferred(batch_id, rids, token_ids, host, params, done, self.counters.steps)

    def _to_host(self, batch_id: int, rids: list[str], token_ids: torch.Tensor, logprobs, params: SamplingBatch
                 ) -> SampledTokens:
        """Every result to the host with one synchronization."""
        tensors = [token_ids] + (list(logprobs) if logprobs is not None else [])
        host = [self.downloader.start(slot, t) for slot, t in enumerate(tensors)]
        if token_ids.device.type == "cuda":
            torch.cuda.current_stream(token_ids.device).synchronize()
        ids = [t if need else -1 for t, need in zip(host[0].tolist(), params.need_sample)]
        if logprobs is None:
            return SampledTokens(batch_id=batch_id, rids=rids, token_ids=ids)
        return SampledTokens(batch_id=batch_id, rids=rids, token_ids=ids,
                             token_logprobs=host[1].tolist(), top_token_ids=host[2].tolist(),
                             top_logprobs=host[3].tolist())


def _split(values: list, sizes: list[int]) -> list[list]:
    """Cut a flat list into consecutive pieces of the given sizes."""
    out, start = [], 0
    for size in sizes:
        out.append(values[start:start + size])
        start += size
    return out


def _prompt_results(params: SamplingBatch, token_lp: list[float], ranks: list[int], top_ids: list[list[int]],
                    top_lp: list[list[float]], ids_lp: list[float]) -> list[PromptLogprobs | None]:
    """One PromptLogprobs per row (None for rows without prompt positions this step)."""
    results: list[PromptLogprobs | None] = []
    position, ids_at = 0, 0
    for b, ids in enumerate(params.prompt_logprob_ids):
        if not ids:
            results.append(None)
            continue
        n, top = len(ids), params.prompt_top_logprobs_nums[b]
        wanted = len(params.token_ids_logprobs[b]) if params.token_ids_logprobs else 0
        span = slice(position, position + n)
        results.append(PromptLogprobs(
            token_ids=list(ids), logprobs=token_lp[span], ranks=ranks[span],
            top_token_ids=[row[:top] for row in top_ids[span]], top_logprobs=[row[:top] for row in top_lp[span]],
            ids_logprobs=_split(ids_lp[ids_at:ids_at + n * wanted], [wanted] * n) if wanted else []))
        position += n
        ids_at += n * wanted
    return results
