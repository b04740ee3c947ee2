"""Packed allowed-token bitmasks: layout, unpacking and a plain-PyTorch apply.

Layout (the TokenMask contract): one row per constrained request, int32 words,
``ceil(vocab_size / 32)`` words per row; bit ``j`` of word ``w`` (``(word >> j)
& 1``, two's complement, so bit 31 is the sign bit) allows token ``32*w + j``.
Ids at or past ``vocab_size`` (padding of the model's embedding beyond the
tokenizer) are never allowed. A 150k vocabulary costs 4,688 words = 18.3 KiB
per row.

The sample stage applies the mask with the Triton kernel in
``triton_kernels.sampling``; ``apply_token_bitmask_reference`` is the same
math in PyTorch, used by tests and the CPU path: disallowed logits become -inf.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable

import numpy as np
import torch

BITS_PER_WORD = 32


def bitmask_words(vocab_size: int) -> int:
    """int32 words per row for ``vocab_size`` tokens."""
    return (vocab_size + BITS_PER_WORD - 1) // BITS_PER_WORD


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[rows, words] int32 -> [rows, vocab_size] bool (True = allowed)."""
    if bitmask.dtype != torch.int32 or bitmask.dim() != 2:
        raise ValueError(f"bitmask must be a 2-D int32 tensor, got {bitmask.dtype} {tuple(bitmask.shape)}")
    if bitmask.shape[1] * BITS_PER_WORD < vocab_size:
        raise ValueError(f"bitmask has {bitmask.shape[1]} words, too few for vocab_size={vocab_size}")
    shifts = torch.arange(BITS_PER_WORD, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].bool()


def pack_bitmask(allowed: torch.Tensor) -> torch.Tensor:
    """[rows, vocab] bool -> [rows, ceil(vocab/32)] int32 (inverse of unpack_bitmask)."""
    rows, vocab_size = allowed.shape
    padded = torch.zeros(rows, bitmask_words(vocab_size) * BITS_PER_WORD, dtype=torch.int64, device=allowed.device)
    padded[:, :vocab_size] = allowed.long()
    weights = torch.ones(BITS_PER_WORD, dtype=torch.int64, device=allowed.device) << torch.arange(
        BITS_PER_WORD, device=allowed.device)
    words = (padded.view(rows, -1, BITS_PER_WORD) * weights).sum(-1)  # [rows, words] in [0, 2^32)
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def apply_token_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor,
                                  row_indices: list[int]) -> torch.Tensor:
    """Logits with disallowed tokens set to -inf on ``row_indices`` (a new tensor)."""
    if len(row_indices) != bitmask.shape[0]:
        raise ValueError(f"bitmask has {bitmask.shape[0]} rows for {len(row_indices)} row_indices")
    vocab_size = logits.shape[-1]
    allowed = unpack_bitmask(bitmask.to(logits.device), vocab_size)
    masked = logits.clone()
    rows = torch.tensor(row_indices, dtype=torch.long, device=logits.device)
    masked[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return masked


def allowed_token_ids(bitmask_row: torch.Tensor, vocab_size: int) -> list[int]:
    """Sorted token ids allowed by one packed row."""
    return unpack_bitmask(bitmask_row.view(1, -1), vocab_size)[0].nonzero().flatten().tolist()


class MaskRowCache:
    """Packed rows already computed, keyed by (grammar, automaton state, vocab size); LRU by bytes.

    The state part is an Index state, or a tuple when string lengths are counted beside it.

    outlines' ``write_mask_into`` walks every allowed token: ~0.8 ms for a
    state inside a JSON string on a 150k vocabulary (148k tokens allowed). A
    request spends most steps in a handful of states (inside a string, after
    a comma), and requests with the same schema share them, so a copy of the
    finished row (18 KiB, ~2 us) replaces the walk after the first visit.
    """

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self.max_bytes = max_bytes
        self.num_bytes = 0
        self.rows: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.hits = self.misses = 0

    def get(self, key: Hashable) -> np.ndarray | None:
        row = self.rows.get(key)
        if row is None:
            self.misses += 1
            return None
        self.hits += 1
        self.rows.move_to_end(key)
        return row

    def put(self, key: Hashable, row: np.ndarray) -> None:
        if key in self.rows or row.nbytes > self.max_bytes:
            return
        self.rows[key] = row.copy()
        self.num_bytes += row.nbytes
        while self.num_bytes > self.max_bytes:
            _, evicted = self.rows.popitem(last=False)
            self.num_bytes -= evicted.nbytes

    def clear(self) -> None:
        self.rows.clear()
        self.num_bytes = 0
