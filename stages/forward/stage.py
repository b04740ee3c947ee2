"""ForwardStage: run the model on a ForwardBatch, return next-token logits.

Inbox (``ForwardInbox``): ForwardBatch. Outbox (``ForwardOutboxes``)
``sample``: Logits (one row per request, fp32, a process-local tensor),
carrying the batch's SamplingBatch along.

The one stage that loads something itself: the model weights (from
``--model-path``, or random with ``--load-format dummy``). What it measured
(KV slots, rows, context length, vocabulary, EOS ids) is ``model_info``,
which the assembly hands to the schedule and constrain stages.

Owns: the model weights, the KV pool tensors (``models.batch.KVCache``), the
``req_to_token`` table and the CUDA graphs. Does NOT own which slots are
free -- the schedule stage decides that and tells this stage through
``out_cache_loc`` and ``row_writes``; this stage never sees a request.

KV pool size (measured once, here, after the weights are loaded):

* GPU: ``--mem-fraction-static`` of the memory still free after the weights
  goes to K and V (``2 * layers * kv_heads * head_dim * dtype bytes`` per
  token), unless ``--max-total-tokens`` asks for less;
* CPU: ``--max-total-tokens``, or ``CPU_DEFAULT_TOKENS`` when 0.

One step: pack the batch's ints, one host->device copy, write
``req_to_token`` (Triton index helper), run the model (or replay a captured
CUDA graph for decode batches up to ``--cuda-graph-max-bs``). The model, the
pool and the graphs are a ``ModelRunner`` (``runner.py``).

Overlap scheduling (see the schedule stage): a batch planned before the
tokens of the batch in flight reached the host feeds ``-row`` placeholders;
the runner resolves them on the device from ``future_tokens[row]``, which
the sample stage filled when it sampled that batch (the Logits of an
``overlap`` batch carry the buffer and the batch's rows there). No host
synchronization sits between the two steps.

Tensor parallel (``--tp-size N``): this stage is rank 0. Every other rank is
a ``ForwardRankStage`` (``rank.py``) in a process of its own, holding its
shard of the weights and of the KV heads. Before running a batch, rank 0
broadcasts it (``peers.py``); every rank then runs the same forward in
lockstep, the layers' collectives joining them, and rank 0 hands the logits
on. Closing rank 0 tells the other ranks to end.
"""
from __future__ import annotations

import dataclasses
import logging

import msgspec
import torch

from models.parallel import TPGroup
from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import ForwardBatch, ForwardInbox, Logits, ModelInfo
from pipeline.stage import Outbox, Outboxes, Stage
from stages.forward.inputs import num_draft_logit_rows
from stages.forward.peers import BatchBroadcast
from stages.forward.runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ForwardOutboxes(Outboxes):
    sample: Outbox[Logits]


class ForwardStage(Stage):
    """Model + KV tensors + CUDA graphs; ForwardBatch in, Logits out (tensor-parallel rank 0)."""

    Inbox = ForwardInbox
    Outboxes = ForwardOutboxes
    outboxes: ForwardOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: ForwardOutboxes | dict[str, Channel | None], *, tp: TPGroup = TPGroup(),
                 peers: BatchBroadcast | None = None) -> None:
        super().__init__("forward", inbox, outboxes)
        if tp.rank != 0:
            raise ValueError(f"the forward stage is tensor-parallel rank 0, not rank {tp.rank}")
        self.args = args
        self.runner = ModelRunner(args, tp)
        self.peers = peers  # the other ranks (None: a single rank)
        self.model, self.config, self.device = self.runner.model, self.runner.config, self.runner.device

    @property
    def model_info(self) -> ModelInfo:
        runner = self.runner
        return ModelInfo(num_slots=runner.kv_cache.num_slots, num_rows=runner.num_rows,
                         context_len=runner.context_len, vocab_size=self.config.vocab_size,
                         eos_token_ids=tuple(self.config.eos_token_ids))

    def telemetry(self) -> dict[str, float]:
        """A vision-language model's encoder and multimodal-cache counters (none for a text model)."""
        return self.runner.multimodal.stats.as_counters() if self.runner.multimodal is not None else {}

    # --------------------------------------------------------------- step
    def handle(self, message: ForwardInbox) -> None:
        match message:
            case ForwardBatch():
                logits = self.run_batch(message)
                num_reqs, prompt_logits, draft_logits = len(message.rids), None, None
                num_drafts = num_draft_logit_rows(message)
                if num_drafts:  # draft-verifying rows come last
                    logits, draft_logits = logits[:-num_drafts], logits[-num_drafts:]
                if logits.shape[0] > num_reqs:  # prompt-logprob rows follow the last rows
                    logits, prompt_logits = logits[:num_reqs], logits[num_reqs:]
                future = (self.runner.future_tokens, self.runner.batch_rows) if message.overlap else (None, None)
                sampling = message.sampling
                if num_drafts and self.runner.drafter is not None:  # EAGLE: the head's drafts
                    sampling = msgspec.structs.replace(sampling, draft_ids=self.runner.batch_drafts,
                                                       draft_parents=self.runner.batch_parents)
                self.outboxes.sample.put(Logits(batch_id=message.batch_id, rids=message.rids, logits=logits,
                                                sampling=sampling, prompt_logits=prompt_logits,
                                                draft_logits=draft_logits,
                                                future_tokens=future[0], future_rows=future[1]))
            case _:
                raise TypeError(f"forward: unexpected message {type(message).__name__}")

    def run_batch(self, batch: ForwardBatch) -> torch.Tensor:
        """logits[B, vocab] fp32 of each request's last new token (every rank runs it too), then
        the rows of the prompt positions ``sampling.prompt_logprob_ids`` asks for."""
        if self.peers is not None:
            self.peers.send(batch)
        return self.runner.run_batch(batch)

    def close(self) -> None:
        """Tell the other ranks to end (they wait for the next batch), then leave the process group."""
        if self.peers is None:
            return
        peers, self.peers = self.peers, None
        try:
            peers.send(None)
        except RuntimeError as error:  # a rank already gone: nobody left to tell
            logger.warning("could not tell the other tensor-parallel ranks to end: %s", error)
        peers.leave()
