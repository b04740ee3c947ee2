"""CUDA graphs for decode batches: capture once per batch size, replay each step.

A decode step of a small batch is dominated by kernel launch overhead (a few
hundred launches of microsecond kernels). Capturing the whole step -- the
req_to_token write, every layer, the LM head -- into a CUDA graph turns it
into one launch. Graphs are captured for sizes ``1, 2, 4, 8, 16, 24, ...,
--cuda-graph-max-bs``; a batch of B requests replays the smallest captured
size >= B, its extra rows padded: token 0 at position 0, KV slot 0 (the
reserved padding slot), req_to_token row 0 (the dummy row), seq_len 1.

Each captured size owns a static int64 buffer laid out like
``inputs.pack_batch`` (B = T for decode) and a static logits output. A replay
is: one host->device copy into the static buffer, ``graph.replay()``, and a
view of the first B logits rows. Every kernel reads its sizes from the
static shapes (decode attention's split count depends only on the pool row
length), so a captured graph is valid for any request lengths.
"""
from __future__ import annotations

import torch

from models.batch import AttentionMetadata, KVCache

FIELDS = 9  # input_ids positions out_cache_loc rows prefix_lens extend_lens start seq_lens logits_indices


def capture_sizes(max_bs: int) -> list[int]:
    sizes = [s for s in (1, 2, 4, 8) if s <= max_bs]
    sizes += list(range(16, max_bs + 1, 8))
    if max_bs not in sizes:
        sizes.append(max_bs)
    return sizes


def pad_decode(input_ids: list[int], positions: list[int], out_cache_loc: list[int], rows: list[int],
               seq_lens: list[int], size: int) -> list[int]:
    """Packed decode inputs of a graph of ``size`` rows (padded rows: slot 0, row 0)."""
    pad = size - len(input_ids)
    zeros = [0] * pad
    ones = [1] * pad
    index = list(range(size))
    prefix_lens = [n - 1 for n in seq_lens]  # not ``positions``: M-RoPE decode shifts those by a delta
    return (input_ids + zeros + positions + zeros + out_cache_loc + zeros + rows + zeros
            + prefix_lens + zeros + [1] * size + index + seq_lens + ones + index)


class DecodeGraphs:
    """Captured decode steps, one per batch size, sharing one memory pool."""

    def __init__(self, model, kv_cache: KVCache, req_to_token: torch.Tensor, write_fn,
                 max_bs: int, device: torch.device, uploader, resolve_fn=None) -> None:
        self.model, self.kv_cache, self.req_to_token = model, kv_cache, req_to_token
        self.write_fn = write_fn
        self.resolve_fn = resolve_fn  # input_ids -> None: future token ids resolved in place
        self.device = device
        self.uploader = uploader  # stages.staging.Uploader: pinned host buffers, reused
        self.sizes = capture_sizes(max_bs)
        self.max_bs = self.sizes[-1]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.buffers: dict[int, torch.Tensor] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None

    @torch.inference_mode()
    def capture_all(self) -> None:
        stream = torch.cuda.Stream(self.device)
        for size in reversed(self.sizes):  # largest first: smaller graphs reuse its pool
            buffer = torch.tensor(pad_decode([], [], [], [], [], size), dtype=torch.int64, device=self.device)
            self.buffers[size] = buffer
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm up: JIT-compile every kernel outside the capture
                    self._run(size)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.outputs[size] = self._run(size)
            self.pool = graph.pool()
            self.graphs[size] = graph
        torch.cuda.synchronize(self.device)

    def _meta(self, size: int) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata]:
        fields = self.buffers[size].view(FIELDS, size)
        meta = AttentionMetadata(
            mode="decode", req_to_token=self.req_to_token, req_pool_indices=fields[3],
            prefix_lens=fields[4], extend_lens=fields[5], extend_start_loc=fields[6], seq_lens=fields[7],
            out_cache_loc=fields[2], logits_indices=fields[8], max_extend_len=1,
            max_seq_len=int(self.req_to_token.shape[1]))
        return fields[0], fields[1], meta

    def _run(self, size: int) -> torch.Tensor:
        input_ids, positions, meta = self._meta(size)
        self.write_fn(meta)
        return self.model.forward(input_ids, positions, meta, self.kv_cache)

    def size_for(self, batch_size: int) -> int | None:
        for size in self.sizes:
            if size >= batch_size:
                return size
        return None

    def replay(self, packed: list[int], size: int, batch_size: int,
               future_input: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits of the first ``batch_size`` rows, their req_pool_indices), both views of static tensors.

        With ``future_input`` the placeholders in the static input ids are resolved
        (one small kernel) before the replay; the graph itself never changes.
        """
        buffer = self.buffers[size]
        self.uploader.upload_into(packed, buffer)
        fields = buffer.view(FIELDS, size)
        if future_input:
            self.resolve_fn(fields[0])
        self.graphs[size].replay()
        return self.outputs[size][:batch_size], fields[3][:batch_size]
