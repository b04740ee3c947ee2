"""Sampling kernels: penalties, grammar masks, temperature/top-k/top-p/min-p
sampling with per-request seeds, and log-probabilities. One batch, per-row
parameters, ``logits[B, V]`` fp32 (contiguous rows).

Launchers (the sample stage calls these; ``*_reference`` twins in PyTorch)::

    apply_penalties(logits, token_counts[B, V] int32, repetition_penalties[B],
                    frequency_penalties[B], presence_penalties[B]) -> None   (in place)
        seen = counts > 0;  l = seen ? (l > 0 ? l / rep : l * rep) : l
        l -= counts * freq + seen * pres                  (rep 1, freq 0, pres 0: off)
    apply_token_bitmask(logits, bitmask[N, ceil(V/32)] int32, row_indices[N] int) -> None
        row row_indices[i] keeps token 32*w + j iff bit j of bitmask[i, w]; else -inf
    sample(logits, temperatures[B], top_ks[B] int, top_ps[B], min_ps[B],
           seeds[B] int64, steps[B] int64) -> token_ids[B] int64
    greedy(logits) -> token_ids[B] int64
        argmax per row, lowest index on ties (the all-greedy fast path)
    compute_logprobs(logits, token_ids[B], top_n) ->
           (token_logprobs[B] fp32, top_ids[B, top_n] int64, top_logprobs[B, top_n] fp32)
    token_ranks(logits, token_ids[B]) -> ranks[B] int64
        1 + the number of logits in the row strictly above the token's (one pass)

``sample``, per row (one program per row, several passes over the row):

1. ``temperature <= 0``: greedy, ``argmax(logits)`` (lowest index on ties).
2. ``x = logits / temperature``; ``m = max x``.
3. top-k (``0 < k < V``): keep ``x >= t_k``, the k-th largest value.
4. top-p (``p < 1``): among the kept, keep the smallest top set whose
   probability mass is ``>= p`` of the kept mass (threshold ``t_p``).
5. min-p (``min_p > 0``): keep ``x >= m + ln(min_p)`` (prob >= min_p * max prob).
6. Gumbel-max over the kept set: ``argmax x_i - ln(-ln u_i)`` with
   ``u_i = philox4x32-10(key=seed, counter=(i, step))`` -- the same
   ``(seed, step)`` gives the same token whatever else is in the batch.

Ties at a threshold are all kept (sets are ``{x >= t}``). Thresholds are
found without sorting (``select.py``): a coarse pass brackets the threshold,
a compaction pass copies the few candidates above the bracket into a scratch
of CAPACITY entries per row, and a 16-way search over the order-preserving
int32 image of the floats finishes on the candidates (or on the whole row
when they do not fit). ``compute_logprobs`` finds its top-n the same way.
Cost with peaked logits: four passes over the row (stats, bracket, compact,
plus the penalty kernel's read and write), ``B*V*4`` bytes each.

Measured on an H200 (B=128, V=151936, ``perf/bench_kernels.py``):
penalties + top-k 50 + top-p 0.9 503 us vs 3188 us for the sort-based
PyTorch path; compute_logprobs with top-5 423 us vs 476 us for
log_softmax + topk; top-p 0.9 alone 442 us once the candidate scratch held
every row (see CAPACITY).

Files: ``select.py`` (device helpers, the search), ``kernels.py`` (the
kernels), this file (launchers), ``reference.py`` (PyTorch references).
"""
from __future__ import annotations

import torch
import triton

from triton_kernels.sampling.kernels import (
    argmax_partial_kernel, argmax_reduce_kernel, bitmask_kernel, logprobs_kernel,
    penalties_kernel, sample_kernel, token_rank_kernel,
)
from triton_kernels.runtime import interpreting
from triton_kernels.sampling.reference import (  # noqa: F401
    apply_penalties_reference, apply_token_bitmask_reference, compute_logprobs_reference,
    greedy_reference, philox_uniform_reference, sample_reference, sampling_bytes, token_ranks_reference,
)

NUM_CUTS = 16
# Candidates kept per row after the coarse pass. On an H200 (B=128, V=151936,
# T=0.8, top-p 0.9 over randn*3 logits) rows held 1-2k candidates, but the
# slowest row sets the batch time: capacity 4096 took 1136 us (a few rows fell
# back to the full row), 65536 took 442 us.
CAPACITY = 16384


def _blocks(vocab_size: int, capacity: int) -> tuple[int, int, int]:
    """(BLOCK over the row, BLOCK over the candidates, num_warps)."""
    if interpreting():  # few, large tiles
        block = min(4096, triton.next_power_of_2(vocab_size))
        return block, min(block, triton.next_power_of_2(capacity)), 4
    # H200, B=128, V=151936: 2048/8 beat 1024/8 by 1.2-1.3x and 4096/16 on top-p rows.
    return 2048, min(1024, triton.next_power_of_2(capacity)), 8


# ----------------------------------------------------------------------------- launchers
def apply_penalties(logits: torch.Tensor, token_counts: torch.Tensor,
                    repetition_penalties: torch.Tensor, frequency_penalties: torch.Tensor,
                    presence_penalties: torch.Tensor) -> None:
    """Repetition, frequency and presence penalties from per-row token counts, in place."""
    batch, vocab_size = _check_logits(logits)
    if token_counts.shape != logits.shape or token_counts.dtype != torch.int32 \
            or token_counts.stride(1) != 1:
        raise ValueError(f"token_counts must be int32 {tuple(logits.shape)} with contiguous rows, "
                         f"got {token_counts.dtype} {tuple(token_counts.shape)}")
    _check_rows(batch, repetition_penalties=repetition_penalties,
                frequency_penalties=frequency_penalties, presence_penalties=presence_penalties)
    block = 1024
    penalties_kernel[(batch, triton.cdiv(vocab_size, block))](
        logits, token_counts, repetition_penalties, frequency_penalties, presence_penalties,
        vocab_size, logits.stride(0), token_counts.stride(0), BLOCK=block, num_warps=4)


def apply_token_bitmask(logits: torch.Tensor, bitmask: torch.Tensor,
                        row_indices: torch.Tensor) -> None:
    """Set disallowed tokens of rows `row_indices` to -inf (bitmask row i -> logits row
    row_indices[i]), in place."""
    _, vocab_size = _check_logits(logits)
    num_words = triton.cdiv(vocab_size, 32)
    if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.shape[1] != num_words \
            or bitmask.stride(1) != 1:
        raise ValueError(f"bitmask must be int32 [N, {num_words}] with contiguous rows, got "
                         f"{bitmask.dtype} {tuple(bitmask.shape)}")
    if row_indices.dim() != 1 or row_indices.shape[0] != bitmask.shape[0] \
            or row_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_indices must be int [{bitmask.shape[0]}], got "
                         f"{row_indices.dtype} {tuple(row_indices.shape)}")
    if bitmask.shape[0] == 0:
        return
    block = 1024
    bitmask_kernel[(bitmask.shape[0], triton.cdiv(vocab_size, block))](
        logits, bitmask, row_indices, vocab_size, logits.stride(0), bitmask.stride(0),
        BLOCK=block, num_warps=4)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
           top_ps: torch.Tensor, min_ps: torch.Tensor, seeds: torch.Tensor,
           steps: torch.Tensor) -> torch.Tensor:
    """One token per row (see the module docstring); returns token_ids[B] int64.
    top_ks <= 0 or >= V, top_ps >= 1 and min_ps <= 0 switch a filter off."""
    return launch_sample(logits, temperatures, top_ks, top_ps, min_ps, seeds, steps, CAPACITY)


def launch_sample(logits, temperatures, top_ks, top_ps, min_ps, seeds, steps,
                  capacity: int) -> torch.Tensor:
    """`sample` with an explicit candidate capacity (tests use a tiny one)."""
    batch, vocab_size = _check_logits(logits)
    _check_rows(batch, temperatures=temperatures, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps,
                seeds=seeds, steps=steps)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    cand_vals = torch.empty((batch, capacity), dtype=torch.float32, device=logits.device)
    cand_ids = torch.empty((batch, capacity), dtype=torch.int32, device=logits.device)
    block, cand_block, num_warps = _blocks(vocab_size, capacity)
    sample_kernel[(batch,)](logits, out, temperatures, top_ks, top_ps, min_ps, seeds, steps,
                            cand_vals, cand_ids, vocab_size, logits.stride(0),
                            CAPACITY=capacity, BLOCK=block, CAND_BLOCK=cand_block,
                            CUTS=NUM_CUTS, num_warps=num_warps)
    return out


GREEDY_CHUNKS = 32  # programs per row of the greedy path (a power of two)


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """argmax of each row (lowest index on ties): ``sample`` with every temperature 0,
    split over GREEDY_CHUNKS programs per row so that a batch of one still uses the
    whole GPU. Returns token_ids[B] int64."""
    batch, vocab_size = _check_logits(logits)
    chunk_size = triton.cdiv(vocab_size, GREEDY_CHUNKS)
    block = min(1024, triton.next_power_of_2(chunk_size))
    part_vals = torch.empty((batch, GREEDY_CHUNKS), dtype=torch.float32, device=logits.device)
    part_ids = torch.empty((batch, GREEDY_CHUNKS), dtype=torch.int32, device=logits.device)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    argmax_partial_kernel[(batch, GREEDY_CHUNKS)](
        logits, part_vals, part_ids, vocab_size, logits.stride(0), chunk_size,
        NUM_CHUNKS=GREEDY_CHUNKS, BLOCK=block, num_warps=4)
    argmax_reduce_kernel[(batch,)](part_vals, part_ids, out, NUM_CHUNKS=GREEDY_CHUNKS, num_warps=1)
    return out


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                     top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax(logits) at token_ids and its top_n entries (value desc, id asc)."""
    return launch_compute_logprobs(logits, token_ids, top_n, CAPACITY)


def token_ranks(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Each row's rank of its token: 1 + how many logits are strictly larger (prompt logprobs)."""
    batch, vocab_size = _check_logits(logits)
    _check_rows(batch, token_ids=token_ids)
    ranks = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch:
        block = 1024 if interpreting() else 4096
        token_rank_kernel[(batch,)](logits, token_ids, ranks, vocab_size, logits.stride(0), BLOCK=block,
                                    num_warps=4 if interpreting() else 8)
    return ranks


def launch_compute_logprobs(logits, token_ids, top_n: int, capacity: int):
    """`compute_logprobs` with an explicit candidate capacity (tests use a tiny one)."""
    batch, vocab_size = _check_logits(logits)
    _check_rows(batch, token_ids=token_ids)
    if not 0 <= top_n <= min(vocab_size, 1024):
        raise ValueError(f"top_n must be in 0..{min(vocab_size, 1024)}, got {top_n}")
    token_lp = torch.empty(batch, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty((batch, top_n), dtype=torch.int64, device=logits.device)
    top_lp = torch.empty((batch, top_n), dtype=torch.float32, device=logits.device)
    cand_vals = torch.empty((batch, capacity), dtype=torch.float32, device=logits.device)
    cand_ids = torch.empty((batch, capacity), dtype=torch.int32, device=logits.device)
    block, cand_block, num_warps = _blocks(vocab_size, capacity)
    logprobs_kernel[(batch,)](logits, token_ids, token_lp, top_ids, top_lp, cand_vals, cand_ids,
                              vocab_size, logits.stride(0), TOP_N=top_n,
                              BLOCK_TOP=triton.next_power_of_2(max(top_n, 1)),
                              CAPACITY=capacity, BLOCK=block, CAND_BLOCK=cand_block,
                              CUTS=NUM_CUTS, num_warps=num_warps)
    return token_lp, top_ids, top_lp


def _check_logits(logits: torch.Tensor) -> tuple[int, int]:
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be fp32 [B, V] with contiguous rows, got "
                         f"{logits.dtype} {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("logits has no rows: empty batch")
    if logits.shape[1] == 0:
        raise ValueError("logits has an empty vocabulary")
    return logits.shape[0], logits.shape[1]


def _check_rows(batch: int, **rows: torch.Tensor) -> None:
    for name, t in rows.items():
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must be a [{batch}] tensor, got "
                             f"{getattr(t, 'shape', type(t))}")
