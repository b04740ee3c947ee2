"""The sampling and logprob kernels (one program per row) and the elementwise
penalty / bitmask kernels. Helpers and the search are in ``select.py``."""
from __future__ import annotations

import triton
import triton.language as tl

from triton_kernels.sampling.select import (
    coarse_bracket, compact, mass_above, noisy_argmax, ordered_key, row_stats, search_threshold,
)


@triton.jit
def _kept_floor(vals_ptr, n, inv_temp, row_max, lo, hi, top_key, total_mass, do_top_k, top_k,
                top_p, BLOCK: tl.constexpr, CUTS: tl.constexpr):
    """Key of the smallest kept value after top-k then top-p (one of them is on)."""
    if do_top_k:
        floor = search_threshold(vals_ptr, n, inv_temp, row_max, lo, hi, top_k.to(tl.float32),
                                 True, BLOCK, CUTS)
        if top_p < 1.0:
            kept_mass = mass_above(vals_ptr, n, inv_temp, row_max, floor, BLOCK)
            floor = search_threshold(vals_ptr, n, inv_temp, row_max, floor, top_key,
                                     top_p * kept_mass, False, BLOCK, CUTS)
    else:
        floor = search_threshold(vals_ptr, n, inv_temp, row_max, lo, hi, top_p * total_mass,
                                 False, BLOCK, CUTS)
    return floor


@triton.jit
def sample_kernel(logits_ptr, out_ptr, temperatures_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr,
                  seeds_ptr, steps_ptr, cand_vals_ptr, cand_ids_ptr, vocab_size, stride_row,
                  CAPACITY: tl.constexpr, BLOCK: tl.constexpr, CAND_BLOCK: tl.constexpr,
                  CUTS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperatures_ptr + row).to(tl.float32)
    if temperature <= 0.0:
        token = noisy_argmax(row_ptr, row_ptr, vocab_size, 0, 0, 0, 1.0, False, False, BLOCK)
    else:
        inv_temp = 1.0 / temperature
        top_k = tl.load(top_ks_ptr + row).to(tl.int32)
        top_p = tl.load(top_ps_ptr + row).to(tl.float32)
        min_p = tl.load(min_ps_ptr + row).to(tl.float32)
        seed = tl.load(seeds_ptr + row).to(tl.int64)
        step = tl.load(steps_ptr + row).to(tl.int64)
        row_max, min_key, total_mass = row_stats(row_ptr, vocab_size, inv_temp, BLOCK)
        top_key = ordered_key(row_max).to(tl.int64)
        min_p_key = tl.where(min_p > 0.0, ordered_key(row_max + tl.log(tl.maximum(min_p, 1e-30))),
                             min_key)
        do_top_k = (top_k > 0) & (top_k < vocab_size)
        if do_top_k | (top_p < 1.0):
            if do_top_k:
                lo, hi = coarse_bracket(row_ptr, vocab_size, inv_temp, row_max, min_key,
                                        top_k.to(tl.float32), True, BLOCK, CUTS)
            else:
                lo, hi = coarse_bracket(row_ptr, vocab_size, inv_temp, row_max, min_key,
                                        top_p * total_mass, False, BLOCK, CUTS)
            cand_vals = cand_vals_ptr + row.to(tl.int64) * CAPACITY
            cand_ids = cand_ids_ptr + row.to(tl.int64) * CAPACITY
            num_cand = compact(row_ptr, vocab_size, inv_temp, lo, cand_vals, cand_ids,
                               CAPACITY, BLOCK)
            if num_cand <= CAPACITY:
                floor = _kept_floor(cand_vals, num_cand, inv_temp, row_max, lo, hi, top_key,
                                    total_mass, do_top_k, top_k, top_p, CAND_BLOCK, CUTS)
                floor = tl.maximum(floor, min_p_key)
                token = noisy_argmax(cand_vals, cand_ids, num_cand, seed, step, floor, inv_temp,
                                     True, True, CAND_BLOCK)
            else:
                floor = _kept_floor(row_ptr, vocab_size, inv_temp, row_max, lo, hi, top_key,
                                    total_mass, do_top_k, top_k, top_p, BLOCK, CUTS)
                floor = tl.maximum(floor, min_p_key)
                token = noisy_argmax(row_ptr, row_ptr, vocab_size, seed, step, floor, inv_temp,
                                     False, True, BLOCK)
        else:
            token = noisy_argmax(row_ptr, row_ptr, vocab_size, seed, step, min_p_key, inv_temp,
                                 False, True, BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _collect_top(vals_ptr, ids_ptr, n, nth_key, out_ids_ptr, TOP_N: tl.constexpr,
                 HAS_IDS: tl.constexpr, BLOCK: tl.constexpr):
    """Store the ids of the TOP_N largest (keys above the n-th first, then ties at it)."""
    offs0 = tl.arange(0, BLOCK)
    found = 0
    for strict in tl.static_range(2):
        for start in range(0, n, BLOCK):
            offs = start + offs0
            key = ordered_key(tl.load(vals_ptr + offs, mask=offs < n, other=float("-inf")))
            if strict == 0:
                hit = (key > nth_key) & (offs < n)
            else:
                hit = (key == nth_key) & (offs < n)
            if HAS_IDS:
                token = tl.load(ids_ptr + offs, mask=offs < n, other=0)
            else:
                token = offs
            slot = found + tl.cumsum(hit.to(tl.int32), 0) - 1
            tl.store(out_ids_ptr + slot, token.to(tl.int64), mask=hit & (slot < TOP_N))
            found += tl.sum(hit.to(tl.int32), 0)


@triton.jit
def logprobs_kernel(logits_ptr, token_ids_ptr, token_lp_ptr, top_ids_ptr, top_lp_ptr,
                    cand_vals_ptr, cand_ids_ptr, vocab_size, stride_row,
                    TOP_N: tl.constexpr, BLOCK_TOP: tl.constexpr, CAPACITY: tl.constexpr,
                    BLOCK: tl.constexpr, CAND_BLOCK: tl.constexpr, CUTS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    row_max, min_key, total = row_stats(row_ptr, vocab_size, 1.0, BLOCK)
    log_norm = row_max + tl.log(total)
    token = tl.load(token_ids_ptr + row)
    tl.store(token_lp_ptr + row, tl.load(row_ptr + token) - log_norm)
    if TOP_N > 0:
        out_base = row.to(tl.int64) * TOP_N
        lo, hi = coarse_bracket(row_ptr, vocab_size, 1.0, row_max, min_key, TOP_N * 1.0, True,
                                BLOCK, CUTS)
        cand_vals = cand_vals_ptr + row.to(tl.int64) * CAPACITY
        cand_ids = cand_ids_ptr + row.to(tl.int64) * CAPACITY
        num_cand = compact(row_ptr, vocab_size, 1.0, lo, cand_vals, cand_ids, CAPACITY, BLOCK)
        if num_cand <= CAPACITY:
            nth_key = search_threshold(cand_vals, num_cand, 1.0, row_max, lo, hi, TOP_N * 1.0,
                                       True, CAND_BLOCK, CUTS)
            _collect_top(cand_vals, cand_ids, num_cand, nth_key, top_ids_ptr + out_base, TOP_N,
                         True, CAND_BLOCK)
        else:
            nth_key = search_threshold(row_ptr, vocab_size, 1.0, row_max, lo, hi, TOP_N * 1.0,
                                       True, BLOCK, CUTS)
            _collect_top(row_ptr, row_ptr, vocab_size, nth_key, top_ids_ptr + out_base, TOP_N,
                         False, BLOCK)
        # order the n winners: value descending, id ascending
        tl.debug_barrier()  # the winners were stored by other threads of this program
        offs_top = tl.arange(0, BLOCK_TOP)
        in_top = offs_top < TOP_N
        ids = tl.load(top_ids_ptr + out_base + offs_top, mask=in_top, other=0)
        vals = tl.where(in_top, tl.load(row_ptr + ids, mask=in_top, other=0.0), float("-inf"))
        taken = offs_top < 0
        sorted_ids = tl.zeros([BLOCK_TOP], dtype=tl.int64)
        sorted_vals = tl.zeros([BLOCK_TOP], dtype=tl.float32)
        for j in tl.static_range(TOP_N):
            best = tl.max(tl.where(taken, float("-inf"), vals), 0)
            pick = tl.min(tl.where((vals == best) & ~taken & in_top, ids, vocab_size), 0)
            taken = taken | ((ids == pick) & in_top)
            sorted_ids = tl.where(offs_top == j, pick, sorted_ids)
            sorted_vals = tl.where(offs_top == j, best, sorted_vals)
        tl.debug_barrier()
        tl.store(top_ids_ptr + out_base + offs_top, sorted_ids, mask=in_top)
        tl.store(top_lp_ptr + out_base + offs_top, sorted_vals - log_norm, mask=in_top)
@triton.jit
def penalties_kernel(logits_ptr, counts_ptr, rep_ptr, freq_ptr, pres_ptr, vocab_size,
                      stride_row, stride_count, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row + offs
    logits = tl.load(row_ptr, mask=mask, other=0.0)
    counts = tl.load(counts_ptr + row.to(tl.int64) * stride_count + offs, mask=mask, other=0)
    rep = tl.load(rep_ptr + row).to(tl.float32)
    freq = tl.load(freq_ptr + row).to(tl.float32)
    pres = tl.load(pres_ptr + row).to(tl.float32)
    seen = counts > 0
    logits = tl.where(seen, tl.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - counts.to(tl.float32) * freq - tl.where(seen, pres, 0.0)
    tl.store(row_ptr, logits, mask=mask)


@triton.jit
def bitmask_kernel(logits_ptr, bitmask_ptr, row_indices_ptr, vocab_size, stride_row,
                    stride_mask, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    row = tl.load(row_indices_ptr + i).to(tl.int64)
    words = tl.load(bitmask_ptr + i.to(tl.int64) * stride_mask + offs // 32, mask=mask, other=0)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_row + offs, float("-inf"), mask=mask & ~allowed)



@triton.jit
def argmax_partial_kernel(logits_ptr, part_vals_ptr, part_ids_ptr, vocab_size, stride_row,
                          chunk_size, NUM_CHUNKS: tl.constexpr, BLOCK: tl.constexpr):
    """Greedy, step 1: the max and its lowest index over one chunk of one row.

    A row of a 150k vocabulary is 600 KB: one program per row (as in
    ``sample_kernel``) reads it at the speed of one SM, so at batch 1 the row
    is split into NUM_CHUNKS programs and ``argmax_reduce_kernel`` joins them.
    """
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, vocab_size)
    offs0 = tl.arange(0, BLOCK)
    best_val = float("-inf")
    best_id = start
    for block_start in range(start, end, BLOCK):
        offs = block_start + offs0
        x = tl.load(row_ptr + offs, mask=offs < end, other=float("-inf"))
        block_max = tl.max(x, 0)
        block_id = tl.min(tl.where(x == block_max, offs, vocab_size), 0)
        better = block_max > best_val
        best_id = tl.where(better, block_id, best_id)
        best_val = tl.where(better, block_max, best_val)
    tl.store(part_vals_ptr + row * NUM_CHUNKS + chunk, best_val)
    tl.store(part_ids_ptr + row * NUM_CHUNKS + chunk, best_id)


@triton.jit
def argmax_reduce_kernel(part_vals_ptr, part_ids_ptr, out_ptr, NUM_CHUNKS: tl.constexpr):
    """Greedy, step 2: the best chunk of each row (lowest token id on ties)."""
    row = tl.program_id(0)
    offs = tl.arange(0, NUM_CHUNKS)
    vals = tl.load(part_vals_ptr + row * NUM_CHUNKS + offs)
    ids = tl.load(part_ids_ptr + row * NUM_CHUNKS + offs)
    best = tl.max(vals, 0)
    token = tl.min(tl.where(vals == best, ids, 2147483647), 0)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def token_rank_kernel(logits_ptr, token_ids_ptr, ranks_ptr, vocab_size, stride_row, BLOCK: tl.constexpr):
    """ranks[row] = 1 + the number of logits in the row strictly above the token's own."""
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    chosen = tl.load(row_ptr + tl.load(token_ids_ptr + row))
    above = tl.zeros([BLOCK], dtype=tl.int32)
    for start in range(0, vocab_size, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        values = tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf"))
        above += (values > chosen).to(tl.int32)
    tl.store(ranks_ptr + row, tl.sum(above, 0).to(tl.int64) + 1)
