"""Device helpers of the sampling kernels: order-preserving keys, Philox noise,
and the threshold search over a row (or over its compacted candidates).

Threshold search. ``f(t)`` is the count (top-k, top-n) or the mass
``sum exp(x - max)`` (top-p) of the elements whose key is ``>= t``; it never
increases with ``t``. We want the largest key ``t`` with ``f(t) >= target``.

1. ``coarse_bracket``: one pass over the row evaluates ``f`` at 16 cuts
   ``max - i * COARSE_SPAN / 16`` (in logit units), giving a bracket
   ``[lo, hi]`` of keys that holds the answer.
2. ``compact``: one pass copies the elements with key ``>= lo`` (value and
   token id) into a per-row scratch of CAPACITY entries. With peaked LLM
   logits these are a few hundred; if there are more than CAPACITY the
   kernel stays on the full row (slower, same result).
3. ``search_threshold``: 16-way search in key space on the candidates; each
   pass shrinks the bracket 17x, about 8 passes pin the exact key.

Sums run per lane in a [BLOCK, CUTS] register tile and reduce once per pass.
"""
from __future__ import annotations

import triton
import triton.language as tl

COARSE_SPAN = 32.0  # logit units below the row max covered by the coarse pass


@triton.jit
def ordered_key(x):
    """int32 whose order is the float order of x (fp32)."""
    bits = x.to(tl.int32, bitcast=True)
    return tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


@triton.jit
def philox_uniform(seed, step, offs):
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
    # 23 random bits: (k + 0.5) / 2**23 is exact in fp32 and strictly inside (0, 1). With 24
    # bits the top value rounds to 1.0, whose Gumbel noise is +inf (and -inf + inf = NaN).
    return ((c0 >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)


@triton.jit
def load_scaled(vals_ptr, offs, n, inv_temp):
    return tl.load(vals_ptr + offs, mask=offs < n, other=float("-inf")) * inv_temp


@triton.jit
def row_stats(row_ptr, n, inv_temp, BLOCK: tl.constexpr):
    """(max, key of the min, sum exp(x - max)) of the scaled row."""
    offs0 = tl.arange(0, BLOCK)
    row_max = float("-inf")
    row_min = float("inf")
    total = 0.0
    for start in range(0, n, BLOCK):
        offs = start + offs0
        x = load_scaled(row_ptr, offs, n, inv_temp)
        new_max = tl.maximum(row_max, tl.max(x, 0))
        safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)
        total = total * tl.exp(row_max - safe_max) + tl.sum(tl.exp(x - safe_max), 0)
        row_max = new_max
        row_min = tl.minimum(row_min, tl.min(tl.where(offs < n, x, float("inf")), 0))
    return row_max, ordered_key(row_min), total


@triton.jit
def _weight(x, offs, n, safe_max, IS_COUNT: tl.constexpr):
    if IS_COUNT:
        return tl.where(offs < n, 1.0, 0.0)
    else:
        return tl.exp(x - safe_max)


@triton.jit
def coarse_bracket(row_ptr, n, inv_temp, row_max, min_key, target,
                   IS_COUNT: tl.constexpr, BLOCK: tl.constexpr, CUTS: tl.constexpr):
    """One pass: keys (lo, hi) with f(lo) >= target > f(hi + 1)."""
    offs0 = tl.arange(0, BLOCK)
    cut_vals = row_max - (tl.arange(0, CUTS) + 1).to(tl.float32) * (32.0 / CUTS)
    cut_keys = ordered_key(cut_vals)
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    acc = tl.zeros([BLOCK, CUTS], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        offs = start + offs0
        x = load_scaled(row_ptr, offs, n, inv_temp)
        weight = _weight(x, offs, n, safe_max, IS_COUNT)
        acc += tl.where(ordered_key(x)[:, None] >= cut_keys[None, :], weight[:, None], 0.0)
    ok = tl.sum(acc, 0) >= target
    lo = tl.max(tl.where(ok, cut_keys, min_key), 0)
    hi = tl.min(tl.where(ok, ordered_key(row_max), cut_keys - 1), 0)
    return tl.maximum(lo, min_key).to(tl.int64), hi.to(tl.int64)


@triton.jit
def compact(row_ptr, n, inv_temp, lo, cand_vals_ptr, cand_ids_ptr, CAPACITY: tl.constexpr,
            BLOCK: tl.constexpr):
    """Copy elements with key >= lo (raw value, token id) in token order; return their count."""
    offs0 = tl.arange(0, BLOCK)
    found = 0
    for start in range(0, n, BLOCK):
        offs = start + offs0
        hit = (ordered_key(load_scaled(row_ptr, offs, n, inv_temp)) >= lo) & (offs < n)
        slot = found + tl.cumsum(hit.to(tl.int32), 0) - 1
        keep = hit & (slot < CAPACITY)
        tl.store(cand_vals_ptr + slot, tl.load(row_ptr + offs, mask=keep, other=0.0), mask=keep)
        tl.store(cand_ids_ptr + slot, offs, mask=keep)
        found += tl.sum(hit.to(tl.int32), 0)
    tl.debug_barrier()  # the candidates are read back by other threads of this program
    return found


@triton.jit
def search_threshold(vals_ptr, n, inv_temp, row_max, lo, hi, target,
                     IS_COUNT: tl.constexpr, BLOCK: tl.constexpr, CUTS: tl.constexpr):
    """Largest key t in [lo, hi] with f(t) >= target (needs f(lo) >= target)."""
    offs0 = tl.arange(0, BLOCK)
    cut_index = tl.arange(0, CUTS).to(tl.int64) + 1
    safe_max = tl.where(row_max == float("-inf"), 0.0, row_max)
    while lo < hi:
        step = (hi - lo + CUTS) // (CUTS + 1)
        cuts = lo + cut_index * step
        cuts32 = tl.minimum(cuts, hi).to(tl.int32)
        acc = tl.zeros([BLOCK, CUTS], dtype=tl.float32)
        for start in range(0, n, BLOCK):
            offs = start + offs0
            x = load_scaled(vals_ptr, offs, n, inv_temp)
            weight = _weight(x, offs, n, safe_max, IS_COUNT)
            acc += tl.where(ordered_key(x)[:, None] >= cuts32[None, :], weight[:, None], 0.0)
        ok = (tl.sum(acc, 0) >= target) & (cuts <= hi)
        best = tl.max(tl.where(ok, cuts, lo), 0)
        hi = tl.where(best + step <= hi, best + step - 1, hi)
        lo = best
    return lo


@triton.jit
def mass_above(vals_ptr, n, inv_temp, row_max, threshold_key, BLOCK: tl.constexpr):
    offs0 = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, n, BLOCK):
        x = load_scaled(vals_ptr, start + offs0, n, inv_temp)
        total += tl.where(ordered_key(x) >= threshold_key, tl.exp(x - row_max), 0.0)
    return tl.sum(total, 0)


@triton.jit
def noisy_argmax(vals_ptr, ids_ptr, n, seed, step, floor_key, inv_temp,
                 HAS_IDS: tl.constexpr, USE_NOISE: tl.constexpr, BLOCK: tl.constexpr):
    """Token id of the max of x (+ Gumbel noise over key(x) >= floor_key); lowest id on ties."""
    offs0 = tl.arange(0, BLOCK)
    best_val = float("-inf")
    best_id = 2147483647
    for start in range(0, n, BLOCK):
        offs = start + offs0
        x = load_scaled(vals_ptr, offs, n, inv_temp)
        if HAS_IDS:
            token = tl.load(ids_ptr + offs, mask=offs < n, other=2147483647)
        else:
            token = offs
        if USE_NOISE:
            u = philox_uniform(seed, step, token)
            keep = (ordered_key(x) >= floor_key) & (x > float("-inf"))  # masked tokens stay out
            x = tl.where(keep, x - tl.log(-tl.log(u)), float("-inf"))
        x = tl.where(offs < n, x, float("-inf"))
        tile_max = tl.max(x, 0)
        tile_id = tl.min(tl.where(x == tile_max, token, 2147483647), 0)
        better = (tile_max > best_val) | ((tile_max == best_val) & (tile_id < best_id))
        best_id = tl.where(better, tile_id, best_id)
        best_val = tl.where(better, tile_max, best_val)
    return best_id
