"""ModelRunner: the model, its KV pool, the req_to_token table and the decode CUDA graphs.

What every tensor-parallel rank holds (rank 0 inside the forward stage, the
others inside ``ForwardRankStage``): its shard of the weights, a KV pool of
its share of the KV heads, the same ``req_to_token`` table, and the same
captured graphs. ``run_batch`` is one step of the model on one ForwardBatch.

KV pool size (measured once, after the weights are loaded):

* GPU: ``--mem-fraction-static`` of the memory still free after the weights
  goes to K and V (``2 * layers * local kv heads * head_dim * dtype bytes``
  per token), unless ``--max-total-tokens`` asks for less; under tensor
  parallelism every rank takes the smallest count any rank measured, so the
  slots the scheduler hands out exist on every rank;
* CPU: ``--max-total-tokens``, or ``CPU_DEFAULT_TOKENS`` when 0.

Rows of ``req_to_token`` (requests that may run at once) follow from the
pool: ``--max-running-requests``, or when 0 SGLang's rule
(``pipeline.config.running_requests_limit``), logged once.
"""
from __future__ import annotations

import logging

import torch

from models.batch import KV_ONLY_DTYPES, KVCache
from models.loader import load_model, resolve_dtype
from models.parallel import TPGroup
from pipeline.config import ServerArgs, running_requests_limit
from pipeline.messages import ForwardBatch
from stages.forward.graphs import DecodeGraphs, DraftGraphs, VerifyGraphs, pad_decode
from stages.forward.inputs import num_draft_logit_rows, pack_batch, unpack, write_req_to_token
from stages.forward.multimodal import MultimodalInputs
from stages.forward.speculative import EagleDrafter, move_kept_kv, parents_metadata, tree_metadata
from stages.speculative.tree import num_draft_slots
from stages.staging import Uploader
from triton_kernels import KernelOptions, load_index_ops, load_ops

logger = logging.getLogger(__name__)

CPU_DEFAULT_TOKENS = 8192
VERIFY_MAX_BS = 64  # the largest verify batch captured (tokens per row times this many rows)


class ModelRunner:
    """One rank's model, KV pool and graphs; ``run_batch`` runs one ForwardBatch."""

    def __init__(self, args: ServerArgs, tp: TPGroup = TPGroup()) -> None:
        self.args = args
        self.tp = tp
        self.device = torch.device(args.device if args.device != "auto" else "cpu")
        options = KernelOptions(gemm_ws=not args.disable_gemm_ws, pdl=not args.disable_pdl)
        self.ops = load_ops(args.kernel_backend, options)
        self.index_ops = load_index_ops(args.kernel_backend, options)
        self.model, self.config = load_model(args.model_path, self.ops, args.dtype, self.device,
                                             args.load_format, seed=args.random_seed, tp=tp,
                                             quantization=args.quantization)
        self.context_len = min(args.context_length or self.config.context_length,
                               self.config.context_length)
        kv_dtype = KV_ONLY_DTYPES.get(args.kv_cache_dtype) or resolve_dtype(args.kv_cache_dtype, self.config)
        num_slots = self._kv_slots(kv_dtype)
        self.kv_cache = KVCache.allocate(self.config.num_hidden_layers, num_slots, self.model.num_kv_heads,
                                         self.config.head_dim, kv_dtype, self.device)
        self.max_running_requests = running_requests_limit(args.max_running_requests, num_slots - args.page_size,
                                                           self.context_len)
        self.num_rows = self.max_running_requests + 1
        row_len = min(self.context_len, num_slots) + args.page_size
        self.req_to_token = torch.zeros((self.num_rows, row_len), dtype=torch.int32, device=self.device)
        # Overlap scheduling: the token each row sampled last, written by the sample stage
        # on the device and read through -row placeholders (triton_kernels/future.py).
        self.future_tokens = torch.zeros(self.num_rows, dtype=torch.int64, device=self.device)
        self.batch_rows: torch.Tensor | None = None  # req_pool_indices of the batch run last (device)
        logger.info("KV pool: %d slots (page size %d, %d KV heads on rank %d of %d), req_to_token %s", num_slots,
                    args.page_size, self.model.num_kv_heads, tp.rank, tp.size, tuple(self.req_to_token.shape))
        logger.info("max_running_requests=%d (%s; %d KV tokens, context length %d)", self.max_running_requests,
                    "--max-running-requests" if args.max_running_requests else "from the KV capacity",
                    num_slots - args.page_size, self.context_len)
        self.uploader = Uploader(self.device)
        # Vision-language models: the encoder's cache and each batch's image rows (multimodal.py).
        self.multimodal = (MultimodalInputs(self.model, self.device, args.mm_cache_size)
                           if hasattr(self.model, "encode") else None)
        if self.device.type == "cuda" and args.kernel_backend == "triton":
            self._compile_gemm_tiles()
        # EAGLE / EAGLE3: the draft head fills each drafting row's drafts (speculative.py)
        self.drafter = EagleDrafter.of(args, self.model, self.ops, num_slots, self.context_len,
                                       self.model.dtype, self.device)
        self.batch_drafts: list[list[int]] | None = None  # the drafts the last batch verifies
        self.batch_parents: list[list[int]] = []  # their trees (per row; [] when every row is a chain)
        self.graphs: DecodeGraphs | None = None
        self.verify_graphs: VerifyGraphs | None = None  # speculative verify steps (graphs.py)
        if self.device.type == "cuda" and not args.disable_cuda_graph and args.cuda_graph_max_bs > 0:
            self.use_graphs(eager=False)

    def use_graphs(self, eager: bool) -> None:
        """Decode graphs, and verify graphs when speculating (EAGLE: the head's draft step graphs
        too), up to --cuda-graph-max-bs rows (``eager``: the same static buffers and padded forwards, not captured; CPU tests)."""
        args = self.args
        max_bs = min(args.cuda_graph_max_bs, self.max_running_requests)
        self.graphs = DecodeGraphs(self.model, self.kv_cache, self.req_to_token, self._write_decode, max_bs,
                                   self.device, self.uploader, self._resolve_futures, eager=eager)
        self.graphs.capture_all()
        if args.speculative_algorithm:
            drafts = num_draft_slots(args.speculative_num_steps, args.speculative_num_draft_tokens,
                                     args.speculative_eagle_topk)
            self.verify_graphs = VerifyGraphs(self.model, self.kv_cache, self.req_to_token, self._write_decode,
                                              min(max_bs, VERIFY_MAX_BS), drafts + 1, args.speculative_eagle_topk > 1,
                                              self.device, self.uploader, eager=eager)
            self.verify_graphs.capture_all(self.graphs.pool)
            if self.drafter is not None:  # the EAGLE head's own steps, per decode bucket
                self.drafter.graphs = DraftGraphs(self.drafter, self.req_to_token, max_bs, drafts + 1, drafts,
                                                  self.device, self.uploader, eager=eager)
                self.drafter.graphs.capture_all(self.verify_graphs.pool)

    def _compile_gemm_tiles(self) -> None:
        """Every prefill gemm tile for every weight shape, before the first request."""
        from triton_kernels.gemm import compile_prefill_tiles

        shapes_done = set()
        for name, param in self.model.named_parameters():  # the lm_head's fp32 logits take no TMA
            if name.endswith("proj.weight") and param.dim() == 2 and param.shape not in shapes_done:
                shapes_done.add(param.shape)
                compile_prefill_tiles(param)

    def _kv_slots(self, kv_dtype: torch.dtype) -> int:
        page = self.args.page_size
        requested = self.args.max_total_tokens
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
            per_token = KVCache.bytes_per_token(self.config.num_hidden_layers, self.model.num_kv_heads,
                                                self.config.head_dim, kv_dtype)
            fit = int(free_bytes * self.args.mem_fraction_static) // per_token
            tokens = _smallest_on_any_rank(self.tp, min(requested, fit) if requested > 0 else fit, self.device)
        else:
            tokens = requested if requested > 0 else CPU_DEFAULT_TOKENS
        return (tokens // page + 1) * page  # + page 0, the padding page

    @torch.inference_mode()
    def run_batch(self, batch: ForwardBatch) -> torch.Tensor:
        """logits[B, vocab] fp32 of each request's last new token."""
        num_reqs = len(batch.rids)
        if batch.spec_kept:  # verified draft trees: accepted K/V into place before anything is written
            move_kept_kv(self.kv_cache, self.req_to_token, batch.spec_kept)
        size = self.graphs.size_for_batch(batch) if self.graphs is not None else None
        if size is not None:
            return self._replay_decode(batch, size)
        key = self.verify_graphs.key_for(batch) if self.verify_graphs is not None else None
        if key is not None:
            return self._replay_verify(batch, key)
        packed, num_writes, num_write_slots = pack_batch(batch)
        device_batch = unpack(self.uploader.upload(packed, torch.int64), batch, num_writes, num_write_slots,
                              self.req_to_token)
        self.batch_rows = device_batch.meta.req_pool_indices
        if batch.future_input:
            self._resolve_futures(device_batch.input_ids)
        write_req_to_token(self.index_ops.write_req_to_token, device_batch)
        if self.drafter is not None:
            return self._run_drafting(batch, device_batch)
        if batch.mm is not None and self.multimodal is not None:
            positions, embeds = self.multimodal.prepare(batch.mm, device_batch.positions)
            return self.model.forward(device_batch.input_ids, positions, device_batch.meta, self.kv_cache,
                                      mm=embeds)
        meta = device_batch.meta
        if batch.sampling.draft_parents:  # NGRAM draft trees, drafted on the host
            meta = parents_metadata(meta, batch.sampling.draft_parents)
        return self.model.forward(device_batch.input_ids, device_batch.positions, meta, self.kv_cache)

    def _replay_decode(self, batch: ForwardBatch, size: int) -> torch.Tensor:
        """A decode batch through its captured graph (EAGLE: the head catches up first and
        keeps the graph's features after)."""
        num_reqs = len(batch.rids)
        packed = pad_decode(batch.input_ids, batch.positions, batch.out_cache_loc, batch.req_pool_indices,
                            batch.seq_lens, size)
        if self.drafter is None:
            logits, self.batch_rows = self.graphs.replay(packed, size, num_reqs, batch.future_input)
            return logits
        input_ids, _, rows = self.graphs.load(packed, size, batch.future_input)
        self.batch_rows = rows[:num_reqs]
        drafted = self.drafter.draft(batch, input_ids, self.req_to_token)
        logits = self.graphs.launch(size, num_reqs)
        self.batch_drafts, self.batch_parents = drafted.host()
        self.model.model.captured = self.graphs.features[size]
        self.drafter.keep(batch, input_ids, self.req_to_token)
        return logits

    def _replay_verify(self, batch: ForwardBatch, key: tuple[int, int]) -> torch.Tensor:
        """A verify batch through its (batch size, tokens per row) graph; EAGLE drafts into the
        graph's static inputs (row b's tokens at b * tokens) and keeps its features after."""
        num_reqs, tokens = len(batch.rids), key[1]
        input_ids, positions, rows = self.verify_graphs.load(batch, key)
        self.batch_rows = rows[:num_reqs]
        offsets = [b * tokens for b in range(num_reqs)]
        if self.drafter is not None:  # trees: drawn on the device into the graph's causal mask
            mask = (self.verify_graphs.clear_mask(key), tokens) if self.verify_graphs.tree else None
            drafted = self.drafter.draft(batch, input_ids, self.req_to_token, positions, offsets, mask)
        elif self.verify_graphs.tree:  # NGRAM trees: their parents came with the batch
            self.verify_graphs.set_mask(key, batch.extend_lens, batch.sampling.draft_parents)
        logits = self.verify_graphs.launch(key, num_reqs + num_draft_logit_rows(batch))
        if self.drafter is not None:
            self.batch_drafts, self.batch_parents = drafted.host()  # after the launch: no wait before it
            self.model.model.captured = self.verify_graphs.features[key]
            self.drafter.keep(batch, input_ids, self.req_to_token, offsets)
        return logits

    def _run_drafting(self, batch: ForwardBatch, device_batch) -> torch.Tensor:
        """Draft into the batch's draft positions, run the target, keep its features."""
        drafted = self.drafter.draft(batch, device_batch.input_ids, self.req_to_token, device_batch.positions)
        meta = device_batch.meta
        if drafted.tree_mask is not None:  # draft trees: one verify forward under each row's tree mask
            meta = tree_metadata(meta, len(batch.rids), drafted)
        logits = self.model.forward(device_batch.input_ids, device_batch.positions, meta, self.kv_cache)
        self.batch_drafts, self.batch_parents = drafted.host()  # after the launch: no wait before it
        self.drafter.keep(batch, device_batch.input_ids, self.req_to_token)
        return logits

    def _resolve_futures(self, input_ids: torch.Tensor) -> None:
        """Replace ``-row`` placeholders by the tokens the sample stage stored (rank 0), then
        hand the resolved ids to the other tensor-parallel ranks, whose buffers are empty."""
        if self.tp.rank == 0:
            self.index_ops.resolve_future_tokens(input_ids, self.future_tokens)
        if self.tp.size > 1:
            import torch.distributed as dist

            src = 0 if self.tp.group is None else dist.get_global_rank(self.tp.group, 0)
            dist.broadcast(input_ids, src=src, group=self.tp.group)

    def _write_decode(self, meta) -> None:
        self.index_ops.write_req_to_token(meta.req_to_token, meta.req_pool_indices, meta.prefix_lens,
                                          meta.seq_lens, meta.out_cache_loc, meta.extend_start_loc)


def _smallest_on_any_rank(tp: TPGroup, value: int, device: torch.device) -> int:
    """The minimum of ``value`` over the tensor-parallel ranks (every rank calls this)."""
    if tp.size == 1:
        return value
    import torch.distributed as dist

    smallest = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(smallest, op=dist.ReduceOp.MIN, group=tp.group)
    return int(smallest.item())
