"""Drive one of our models through the paged KV cache, as the forward stage does.

``PagedRunner`` owns a KV pool and a ``req_to_token`` table for a fixed set of
requests. Slots are handed out in a shuffled order (slot 0 stays unused, as
in the real pool), so every test also checks that attention reads keys
through ``req_to_token`` and never assumes contiguous pages.

* ``prefill(prompts)``: all prompts in ONE ragged extend batch;
  returns the fp32 logits of each prompt's last token, ``[B, vocab]``.
* ``extend(chunks)``: the next chunk of every request after its cached
  prefix (chunked prefill, prefix-hit extend).
* ``decode(tokens)``: one new token per request; returns ``[B, vocab]``.
* ``greedy(prompts, n)``: prefill then n-1 decode steps, argmax each time.
"""
from __future__ import annotations

import dataclasses

import torch

from models.batch import KVCache, build_metadata_reference


class PagedRunner:
    def __init__(self, model: torch.nn.Module, num_reqs: int, max_len: int, seed: int = 0) -> None:
        self.model = model
        self.device = model.device
        num_slots = 1 + num_reqs * max_len
        order = torch.randperm(num_slots - 1, generator=torch.Generator().manual_seed(seed)) + 1
        self.req_to_token = order.view(num_reqs, max_len).to(torch.int32).to(self.device)
        self.kv_cache = KVCache.allocate(model.num_layers, num_slots, model.num_kv_heads,
                                         model.head_dim, model.dtype, self.device)
        self.seq_lens = [0] * num_reqs

    def _slots(self, row: int, start: int, count: int) -> list[int]:
        return self.req_to_token[row, start:start + count].tolist()

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.seq_lens = [0] * len(self.seq_lens)
        return self.extend(prompts)

    def extend(self, chunks: list[list[int]], all_logits: bool = False) -> torch.Tensor:
        """Append chunks[r] to request r (after its cached prefix) in one extend batch.

        Returns the last-token logits [B, vocab], or with `all_logits` the
        logits of every new token [sum(len(chunk)), vocab].
        """
        rows = list(range(len(chunks)))
        prefix_lens = [self.seq_lens[r] for r in rows]
        lens = [len(c) for c in chunks]
        out_cache_loc = [s for r, n in zip(rows, lens) for s in self._slots(r, prefix_lens[r], n)]
        meta = build_metadata_reference("extend", self.req_to_token, rows, prefix_lens, lens,
                                        out_cache_loc, self.device)
        if all_logits:
            meta = dataclasses.replace(meta, logits_indices=torch.arange(sum(lens), device=self.device))
        ids = torch.tensor([t for c in chunks for t in c], device=self.device)
        positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, lens)]).to(self.device)
        self.seq_lens = [p + n for p, n in zip(prefix_lens, lens)]
        return self.model.forward(ids, positions, meta, self.kv_cache)

    def decode(self, tokens: list[int]) -> torch.Tensor:
        rows = list(range(len(tokens)))
        out_cache_loc = [self._slots(r, self.seq_lens[r], 1)[0] for r in rows]
        meta = build_metadata_reference("decode", self.req_to_token, rows, self.seq_lens,
                                        [1] * len(rows), out_cache_loc, self.device)
        positions = torch.tensor(self.seq_lens, device=self.device)
        self.seq_lens = [n + 1 for n in self.seq_lens]
        return self.model.forward(torch.tensor(tokens, device=self.device), positions, meta,
                                  self.kv_cache)

    def greedy(self, prompts: list[list[int]], num_tokens: int) -> tuple[torch.Tensor, list[list[int]]]:
        """(prefill logits [B, vocab], greedy continuations of num_tokens each)."""
        first = self.prefill(prompts)
        tokens = first.argmax(dim=-1).tolist()
        outputs = [[t] for t in tokens]
        for _ in range(num_tokens - 1):
            tokens = self.decode(tokens).argmax(dim=-1).tolist()
            for out, t in zip(outputs, tokens):
                out.append(t)
        return first, outputs
