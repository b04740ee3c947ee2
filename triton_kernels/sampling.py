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
    compute_logprobs(logits, token_ids[B], top_n) ->
           (token_logprobs[B] fp32, top_ids[B, top_n] int64, top_logprobs[B, top_n] fp32)

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
found without sorting: a 16-way search over the order-preserving int32 image
of the floats (``bits ^ 0x7fffffff`` for negatives), each pass counting
(top-k) or summing ``exp(x - m)`` (top-p) above 16 cut points, so about 8
passes pin the exact threshold. ``compute_logprobs`` uses the same search
(count) for its top-n. Cost: memory passes over ``B*V*4`` bytes (about 10
for sample, 11 for logprobs with top-n).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NUM_CUTS = 16
_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def _block(vocab_size: int) -> tuple[int, int]:
    """(BLOCK, num_warps): big tiles; the interpreter covers small rows in one tile."""
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return min(4096, triton.next_power_of_2(vocab_size)), 4
    return 1024, 8


# ----------------------------------------------------------------------------- device helpers
@triton.jit
def _ordered_key(x):
    """int32 whose order is the float order of x (fp32)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def _philox_uniform(seed, step, offs):
    """Uniform (0, 1) floats from Philox4x32-10: key = seed (64 bit), counter = (offs, step)."""
    k0 = (seed & 0xFFFFFFFF).to(tl.uint32)
    k1 = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    c0 = offs.to(tl.uint32)
    c1 = (offs * 0 + (step & 0xFFFFFFFF)).to(tl.uint32)
    c2 = (offs * 0 + ((step >> 32) & 0xFFFFFFFF)).to(tl.uint32)
    c3 = (offs * 0).to(tl.uint32)
    round_a = tl.full([1], 0xD2511F53, tl.uint32)
    round_b = tl.full([1], 0xCD9E8D57, tl.uint32)
    for _ in tl.static_range(10):
        prev_c0 = c0
        prev_c2 = c2
        c0 = tl.umulhi(round_b, prev_c2) ^ c1 ^ k0
        c2 = tl.umulhi(round_a, prev_c0) ^ c3 ^ k1
        c1 = round_b * prev_c2
        c3 = round_a * prev_c0
        k0 = k0 + 0x9E3779B9
        k1 = k1 + 0xBB67AE85
    return ((c0 >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)


@triton.jit
def _load_scaled(row_ptr, offs, vocab_size, inv_temp):
    return tl.load(row_ptr + offs, mask=offs < vocab_size, other=float("-inf")) * inv_temp


@triton.jit
def _row_stats(row_ptr, vocab_size, inv_temp, BLOCK: tl.constexpr):
    """(max, key of the min, sum exp(x - max)) of the scaled row."""
    offs0 = tl.arange(0, BLOCK)
    row_max = float("-inf")
    row_min = float("inf")
    total = 0.0
    for start in range(0, vocab_size, BLOCK):
        offs = start + offs0
        x = _load_scaled(row_ptr, offs, vocab_size, inv_temp)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        total = total * tl.exp(row_max - safe_max) + tl.sum(tl.exp(x - safe_max), 0)
        row_max = new_max
        row_min = tl.minimum(row_min, tl.min(tl.where(offs < vocab_size, x, float("inf")), 0))
    return row_max, _ordered_key(row_min).to(tl.int64), total


@triton.jit
def _search_threshold(row_ptr, vocab_size, inv_temp, row_max, lo, hi, target,
                      IS_COUNT: tl.constexpr, BLOCK: tl.constexpr, CUTS: tl.constexpr):
    """Largest key t in [lo, hi] with f(t) >= target, f(t) = sum over key(x) >= t of
    1 (IS_COUNT) or exp(x - row_max). Needs f(lo) >= target."""
    offs0 = tl.arange(0, BLOCK)
    cut_index = tl.arange(0, CUTS).to(tl.int64) + 1
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    while lo < hi:
        step = (hi - lo + CUTS) // (CUTS + 1)
        cuts = lo + cut_index * step
        above = tl.zeros([CUTS], dtype=tl.float32)
        for start in range(0, vocab_size, BLOCK):
            offs = start + offs0
            x = _load_scaled(row_ptr, offs, vocab_size, inv_temp)
            key = _ordered_key(x).to(tl.int64)
            if IS_COUNT:
                weight = tl.where(offs < vocab_size, 1.0, 0.0)
            else:
                weight = tl.exp(x - safe_max)
            above += tl.sum(tl.where(key[:, None] >= cuts[None, :], weight[:, None], 0.0), 0)
        ok = (above >= target) & (cuts <= hi)
        best = tl.max(tl.where(ok, cuts, lo), 0)
        hi = tl.where(best + step <= hi, best + step - 1, hi)
        lo = best
    return lo


@triton.jit
def _mass_above(row_ptr, vocab_size, inv_temp, row_max, threshold_key, BLOCK: tl.constexpr):
    offs0 = tl.arange(0, BLOCK)
    total = 0.0
    for start in range(0, vocab_size, BLOCK):
        x = _load_scaled(row_ptr, start + offs0, vocab_size, inv_temp)
        keep = _ordered_key(x).to(tl.int64) >= threshold_key
        total += tl.sum(tl.where(keep, tl.exp(x - row_max), 0.0), 0)
    return total


@triton.jit
def _argmax_row(row_ptr, vocab_size, seed, step, floor_key, inv_temp,
                USE_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """argmax over key(x) >= floor_key of x (+ Gumbel noise); lowest index on ties."""
    offs0 = tl.arange(0, BLOCK)
    best_val = float("-inf")
    best_idx = 0
    for start in range(0, vocab_size, BLOCK):
        offs = start + offs0
        x = _load_scaled(row_ptr, offs, vocab_size, inv_temp)
        if USE_NOISE:
            keep = _ordered_key(x).to(tl.int64) >= floor_key
            u = _philox_uniform(seed, step, offs)
            x = tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))
        tile_max = tl.max(x, 0)
        tile_idx = tl.min(tl.where(x == tile_max, offs, 2147483647), 0)
        better = tile_max > best_val
        best_idx = tl.where(better, tile_idx, best_idx)
        best_val = tl.where(better, tile_max, best_val)
    return best_idx


# ----------------------------------------------------------------------------- kernels
@triton.jit
def _sample_kernel(logits_ptr, out_ptr, temperatures_ptr, top_ks_ptr, top_ps_ptr, min_ps_ptr,
                   seeds_ptr, steps_ptr, vocab_size, stride_row,
                   BLOCK: tl.constexpr, CUTS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    temperature = tl.load(temperatures_ptr + row).to(tl.float32)
    if temperature <= 0.0:
        token = _argmax_row(row_ptr, vocab_size, 0, 0, 0, 1.0, False, BLOCK)
    else:
        inv_temp = 1.0 / temperature
        top_k = tl.load(top_ks_ptr + row).to(tl.int32)
        top_p = tl.load(top_ps_ptr + row).to(tl.float32)
        min_p = tl.load(min_ps_ptr + row).to(tl.float32)
        row_max, floor_key, kept_mass = _row_stats(row_ptr, vocab_size, inv_temp, BLOCK)
        top_key = _ordered_key(row_max).to(tl.int64)
        if (top_k > 0) & (top_k < vocab_size):
            floor_key = _search_threshold(row_ptr, vocab_size, inv_temp, row_max, floor_key,
                                          top_key, top_k.to(tl.float32), True, BLOCK, CUTS)
            if top_p < 1.0:
                kept_mass = _mass_above(row_ptr, vocab_size, inv_temp, row_max, floor_key, BLOCK)
        if top_p < 1.0:
            floor_key = _search_threshold(row_ptr, vocab_size, inv_temp, row_max, floor_key,
                                          top_key, top_p * kept_mass, False, BLOCK, CUTS)
        if min_p > 0.0:
            min_p_key = _ordered_key(row_max + tl.log(min_p)).to(tl.int64)
            floor_key = tl.maximum(floor_key, min_p_key)
        seed = tl.load(seeds_ptr + row).to(tl.int64)
        step = tl.load(steps_ptr + row).to(tl.int64)
        token = _argmax_row(row_ptr, vocab_size, seed, step, floor_key, inv_temp, True, BLOCK)
    tl.store(out_ptr + row, token.to(tl.int64))


@triton.jit
def _logprobs_kernel(logits_ptr, token_ids_ptr, token_lp_ptr, top_ids_ptr, top_lp_ptr,
                     vocab_size, stride_row, TOP_N: tl.constexpr, BLOCK_TOP: tl.constexpr,
                     BLOCK: tl.constexpr, CUTS: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    row_max, min_key, total = _row_stats(row_ptr, vocab_size, 1.0, BLOCK)
    log_norm = row_max + tl.log(total)
    token = tl.load(token_ids_ptr + row)
    tl.store(token_lp_ptr + row, tl.load(row_ptr + token) - log_norm)
    if TOP_N > 0:
        top_key = _ordered_key(row_max).to(tl.int64)
        nth_key = _search_threshold(row_ptr, vocab_size, 1.0, row_max, min_key, top_key,
                                    TOP_N * 1.0, True, BLOCK, CUTS)
        out_base = row.to(tl.int64) * TOP_N
        offs0 = tl.arange(0, BLOCK)
        found = 0
        for strict in tl.static_range(2):  # first keys above the n-th, then ties at it
            for start in range(0, vocab_size, BLOCK):
                offs = start + offs0
                key = _ordered_key(_load_scaled(row_ptr, offs, vocab_size, 1.0)).to(tl.int64)
                if strict == 0:
                    hit = (key > nth_key) & (offs < vocab_size)
                else:
                    hit = (key == nth_key) & (offs < vocab_size)
                slot = found + tl.cumsum(hit.to(tl.int32), 0) - 1
                tl.store(top_ids_ptr + out_base + slot, offs.to(tl.int64), mask=hit & (slot < TOP_N))
                found += tl.sum(hit.to(tl.int32), 0)
        # order the n winners: value descending, index ascending
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
def _penalties_kernel(logits_ptr, counts_ptr, rep_ptr, freq_ptr, pres_ptr, vocab_size,
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
def _bitmask_kernel(logits_ptr, bitmask_ptr, row_indices_ptr, vocab_size, stride_row,
                    stride_mask, BLOCK: tl.constexpr):
    i = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < vocab_size
    row = tl.load(row_indices_ptr + i).to(tl.int64)
    words = tl.load(bitmask_ptr + i.to(tl.int64) * stride_mask + offs // 32, mask=mask, other=0)
    allowed = ((words >> (offs % 32)) & 1) != 0
    tl.store(logits_ptr + row * stride_row + offs, float("-inf"), mask=mask & ~allowed)


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
    _penalties_kernel[(batch, triton.cdiv(vocab_size, block))](
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
    _bitmask_kernel[(bitmask.shape[0], triton.cdiv(vocab_size, block))](
        logits, bitmask, row_indices, vocab_size, logits.stride(0), bitmask.stride(0),
        BLOCK=block, num_warps=4)


def sample(logits: torch.Tensor, temperatures: torch.Tensor, top_ks: torch.Tensor,
           top_ps: torch.Tensor, min_ps: torch.Tensor, seeds: torch.Tensor,
           steps: torch.Tensor) -> torch.Tensor:
    """One token per row (see the module docstring); returns token_ids[B] int64.
    top_ks <= 0 or >= V, top_ps >= 1 and min_ps <= 0 switch a filter off."""
    batch, vocab_size = _check_logits(logits)
    _check_rows(batch, temperatures=temperatures, top_ks=top_ks, top_ps=top_ps, min_ps=min_ps,
                seeds=seeds, steps=steps)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    block, num_warps = _block(vocab_size)
    _sample_kernel[(batch,)](logits, out, temperatures, top_ks, top_ps, min_ps, seeds, steps,
                             vocab_size, logits.stride(0), BLOCK=block, CUTS=NUM_CUTS,
                             num_warps=num_warps)
    return out


def compute_logprobs(logits: torch.Tensor, token_ids: torch.Tensor,
                     top_n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax(logits) at token_ids and its top_n entries (value desc, id asc)."""
    batch, vocab_size = _check_logits(logits)
    _check_rows(batch, token_ids=token_ids)
    if not 0 <= top_n <= min(vocab_size, 1024):
        raise ValueError(f"top_n must be in 0..{min(vocab_size, 1024)}, got {top_n}")
    token_lp = torch.empty(batch, dtype=torch.float32, device=logits.device)
    top_ids = torch.empty((batch, top_n), dtype=torch.int64, device=logits.device)
    top_lp = torch.empty((batch, top_n), dtype=torch.float32, device=logits.device)
    block, num_warps = _block(vocab_size)
    _logprobs_kernel[(batch,)](logits, token_ids, token_lp, top_ids, top_lp, vocab_size,
                               logits.stride(0), TOP_N=top_n,
                               BLOCK_TOP=triton.next_power_of_2(max(top_n, 1)), BLOCK=block,
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


# ----------------------------------------------------------------------------- references
def apply_penalties_reference(logits, token_counts, repetition_penalties, frequency_penalties,
                              presence_penalties) -> None:
    """Reference of `apply_penalties` (in place)."""
    seen = token_counts > 0
    rep = repetition_penalties.float()[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits)
                 - token_counts.float() * frequency_penalties.float()[:, None]
                 - seen.float() * presence_penalties.float()[:, None])


def apply_token_bitmask_reference(logits, bitmask, row_indices) -> None:
    """Reference of `apply_token_bitmask` (in place)."""
    vocab_size = logits.shape[1]
    tokens = torch.arange(vocab_size, device=logits.device)
    words = bitmask[:, tokens // 32]
    allowed = ((words >> (tokens % 32)) & 1) != 0
    rows = row_indices.long()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def philox_uniform_reference(seed: int, step: int, num: int, device=None) -> torch.Tensor:
    """The kernel's Philox4x32-10 uniforms for tokens 0..num-1, in int64 PyTorch."""
    mask32 = 0xFFFFFFFF

    def mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b_hi, b_lo = b >> 16, b & 0xFFFF
        mid = a * b_hi
        hi = (mid + ((a * b_lo) >> 16)) >> 16
        lo = (((mid & 0xFFFF) << 16) + a * b_lo) & mask32
        return hi, lo

    c0 = torch.arange(num, dtype=torch.int64, device=device)
    c1 = torch.full_like(c0, step & mask32)
    c2 = torch.full_like(c0, (step >> 32) & mask32)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & mask32, (seed >> 32) & mask32
    for _ in range(10):
        hi_b, lo_b = mulhilo(_ROUND_B, c2)
        hi_a, lo_a = mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & mask32, (k1 + _KEY_B) & mask32
    return ((c0 >> 8).float() + 0.5) * (1.0 / 16777216.0)


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x, k).values[-1]


def _top_p_threshold(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Value of the last token (descending) needed to reach mass top_p (x: kept logits)."""
    ordered = torch.sort(x, descending=True).values
    probs = torch.softmax(ordered.double(), dim=0)
    needed = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(top_p, dtype=torch.float64,
                                                                         device=x.device)))
    return ordered[min(needed, ordered.numel() - 1)]


def sample_reference(logits, temperatures, top_ks, top_ps, min_ps, seeds, steps) -> torch.Tensor:
    """Reference of `sample`: sort-based thresholds, the same Philox noise."""
    batch, vocab_size = _check_logits(logits)
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    for b in range(batch):
        temperature = float(temperatures[b])
        if temperature <= 0:
            out[b] = torch.argmax(logits[b])
            continue
        x = logits[b] * (1.0 / temperature)
        floor = torch.tensor(float("-inf"), device=x.device)
        top_k, top_p, min_p = int(top_ks[b]), float(top_ps[b]), float(min_ps[b])
        if 0 < top_k < vocab_size:
            floor = _kth_largest(x, top_k)
        if top_p < 1.0:
            floor = torch.maximum(floor, _top_p_threshold(x[x >= floor], top_p))
        if min_p > 0:
            floor = torch.maximum(floor, x.max() + torch.log(torch.tensor(min_p)))
        noise = -torch.log(-torch.log(philox_uniform_reference(int(seeds[b]), int(steps[b]),
                                                               vocab_size, x.device)))
        out[b] = torch.argmax(torch.where(x >= floor, x + noise, float("-inf")))
    return out


def compute_logprobs_reference(logits, token_ids, top_n):
    """Reference of `compute_logprobs`."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    token_lp = logprobs.gather(1, token_ids.long()[:, None])[:, 0].float()
    top_lp, top_ids = torch.topk(logprobs, top_n, dim=-1)
    return token_lp, top_ids, top_lp.float()


def sampling_bytes(batch: int, vocab_size: int, passes: int = 10) -> float:
    """Bytes a sample call streams: `passes` reads of the fp32 logits."""
    return float(passes * batch * vocab_size * 4)
