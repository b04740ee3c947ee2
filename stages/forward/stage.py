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
CUDA graph for decode batches up to ``--cuda-graph-max-bs``).
"""
from __future__ import annotations

import dataclasses
import logging

import torch

from models.batch import KVCache
from models.loader import load_model, resolve_dtype
from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import ForwardBatch, ForwardInbox, Logits, ModelInfo
from pipeline.stage import Outbox, Outboxes, Stage
from stages.forward.graphs import DecodeGraphs, pad_decode
from stages.forward.inputs import pack_batch, unpack, write_req_to_token
from stages.staging import Uploader
from triton_kernels import KernelOptions, load_index_ops, load_ops

logger = logging.getLogger(__name__)

CPU_DEFAULT_TOKENS = 8192


@dataclasses.dataclass(frozen=True)
class ForwardOutboxes(Outboxes):
    sample: Outbox[Logits]


class ForwardStage(Stage):
    """Model + KV tensors + CUDA graphs; ForwardBatch in, Logits out."""

    Inbox = ForwardInbox
    Outboxes = ForwardOutboxes
    outboxes: ForwardOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: ForwardOutboxes | dict[str, Channel | None]) -> None:
        super().__init__("forward", inbox, outboxes)
        self.args = args
        self.device = torch.device(args.device if args.device != "auto" else "cpu")
        options = KernelOptions(gemm_ws=not args.disable_gemm_ws, pdl=not args.disable_pdl)
        self.ops = load_ops(args.kernel_backend, options)
        self.index_ops = load_index_ops(args.kernel_backend, options)
        self.model, self.config = load_model(args.model_path, self.ops, args.dtype, self.device,
                                             args.load_format, seed=args.random_seed)
        self.context_len = min(args.context_length or self.config.context_length,
                               self.config.context_length)
        kv_dtype = resolve_dtype(args.kv_cache_dtype, self.config)
        num_slots = self._kv_slots(kv_dtype)
        self.kv_cache = KVCache.allocate(self.config.num_hidden_layers, num_slots,
                                         self.config.num_key_value_heads, self.config.head_dim,
                                         kv_dtype, self.device)
        self.num_rows = args.max_running_requests + 1
        row_len = min(self.context_len, num_slots) + args.page_size
        self.req_to_token = torch.zeros((self.num_rows, row_len), dtype=torch.int32, device=self.device)
        logger.info("KV pool: %d slots (page size %d), req_to_token %s", num_slots, args.page_size,
                    tuple(self.req_to_token.shape))
        self.uploader = Uploader(self.device)
        if self.device.type == "cuda" and args.kernel_backend == "triton":
            self._compile_gemm_tiles()
        self.graphs: DecodeGraphs | None = None
        if self.device.type == "cuda" and not args.disable_cuda_graph and args.cuda_graph_max_bs > 0:
            self.graphs = DecodeGraphs(self.model, self.kv_cache, self.req_to_token, self._write_decode,
                                       min(args.cuda_graph_max_bs, args.max_running_requests), self.device,
                                       self.uploader)
            self.graphs.capture_all()

    def _compile_gemm_tiles(self) -> None:
        """Every prefill gemm tile for every weight shape, before the first request."""
        from triton_kernels.gemm import compile_prefill_tiles

        shapes_done = set()
        for name, param in self.model.named_parameters():  # the lm_head's fp32 logits take no TMA
            if name.endswith("proj.weight") and param.dim() == 2 and param.shape not in shapes_done:
                shapes_done.add(param.shape)
                compile_prefill_tiles(param)

    # ------------------------------------------------------------- sizing
    def _kv_slots(self, kv_dtype: torch.dtype) -> int:
        page = self.args.page_size
        requested = self.args.max_total_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            per_token = KVCache.bytes_per_token(self.config.num_hidden_layers,
                                                self.config.num_key_value_heads,
                                                self.config.head_dim, kv_dtype)
            fit = int(free_bytes * self.args.mem_fraction_static) // per_token
            tokens = min(requested, fit) if requested > 0 else fit
        else:
            tokens = requested if requested > 0 else CPU_DEFAULT_TOKENS
        return (tokens // page + 1) * page  # + page 0, the padding page

    @property
    def model_info(self) -> ModelInfo:
        return ModelInfo(num_slots=self.kv_cache.num_slots, num_rows=self.num_rows,
                         context_len=self.context_len, vocab_size=self.config.vocab_size,
                         eos_token_ids=tuple(self.config.eos_token_ids))

    # --------------------------------------------------------------- step
    def handle(self, message: ForwardInbox) -> None:
        match message:
            case ForwardBatch():
                logits = self.run_batch(message)
                self.outboxes.sample.put(Logits(batch_id=message.batch_id, rids=message.rids, logits=logits,
                                                sampling=message.sampling))
            case _:
                raise TypeError(f"forward: unexpected message {type(message).__name__}")

    @torch.inference_mode()
    def run_batch(self, batch: ForwardBatch) -> torch.Tensor:
        """logits[B, vocab] fp32 of each request's last new token."""
        num_reqs = len(batch.rids)
        if self.graphs is not None and batch.mode == "decode" and not batch.row_writes:
            size = self.graphs.size_for(num_reqs)
            if size is not None:
                packed = pad_decode(batch.input_ids, batch.positions, batch.out_cache_loc,
                                    batch.req_pool_indices, batch.seq_lens, size)
                return self.graphs.replay(packed, size, num_reqs)
        packed, num_writes, num_write_slots = pack_batch(batch)
        device_batch = unpack(self.uploader.upload(packed, torch.int64), batch, num_writes, num_write_slots,
                              self.req_to_token)
        write_req_to_token(self.index_ops.write_req_to_token, device_batch)
        return self.model.forward(device_batch.input_ids, device_batch.positions, device_batch.meta,
                                  self.kv_cache)

    def _write_decode(self, meta) -> None:
        self.index_ops.write_req_to_token(meta.req_to_token, meta.req_pool_indices, meta.prefix_lens,
                                          meta.seq_lens, meta.out_cache_loc, meta.extend_start_loc)
