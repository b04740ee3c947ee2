"""Decode attention over the paged KV pool: split-KV flash-decoding.

One query per request. Decode is memory-bound: every key and value of the
request is read once, so the time to beat is ``K+V bytes / bandwidth``. To
fill the GPU at batch 1 the keys of a request are cut into ``num_kv_splits``
contiguous, BLOCK_N-aligned splits:

* stage 1, grid ``(B, Hk, num_kv_splits)``: a program loads the
  ``Hq // Hk`` query heads of one kv head (GQA: each K/V tile is read once
  for the whole group; the group is padded to 16 rows for ``tl.dot``), walks
  its split and writes the normalized partial output ``mid_o[B, Hq, S, D]``
  and its log-sum-exp ``mid_lse[B, Hq, S]`` (fp32, base 2; ``-inf`` for an
  empty split);
* stage 2, grid ``(B, Hq)``: ``o = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M)``.

``num_kv_splits`` fixes the grid, and split boundaries are computed on the
device from ``seq_lens``: the launch depends on shapes only, so it can be
captured in a CUDA graph. The default comes from the batch, the kv heads,
the SM count and the pool row length ``L`` (the longest possible context).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from triton_kernels.attention.common import (
    LOG2E, block_d, check_batch_vectors, check_kv_pool, soft_cap,
)
from triton_kernels.kv_fp8 import check_kv_scales, dequantize_kv, is_fp8_cache
from triton_kernels.pdl import pdl_args, pdl_wait
from triton_kernels.runtime import interpreting

MAX_KV_SPLITS = 64
MIN_KEYS_PER_SPLIT = 256


@functools.lru_cache(maxsize=8)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def default_num_kv_splits(batch: int, num_kv_heads: int, max_context_len: int,
                          device: torch.device) -> int:
    """About 4 programs per SM (rounded down to a power of two), no split shorter than
    MIN_KEYS_PER_SPLIT keys. H200 sweep (Hq=32, Hk=8, D=128): B=1 x 32k best at 64
    splits, B=32 x 4k at 2, B>=128 at 1."""
    if device.type != "cuda":
        return max(1, min(4, triton.cdiv(max_context_len, 64)))
    wanted = triton.cdiv(4 * _sm_count(device.index or 0), batch * num_kv_heads)
    wanted = 1 << (wanted.bit_length() - 1)  # power of two at or below
    by_length = triton.cdiv(max_context_len, MIN_KEYS_PER_SPLIT)
    return max(1, min(wanted, by_length, MAX_KV_SPLITS))


@triton.jit
def _decode_split_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, req_to_token_ptr, req_pool_indices_ptr, seq_lens_ptr,
    mid_o_ptr, mid_lse_ptr, qk_scale, logit_cap, sliding_window,
    stride_qb, stride_qh, stride_ks, stride_kh, stride_req,
    stride_mb, stride_mh, stride_ms, k_scale, v_scale,
    NUM_SPLITS: tl.constexpr, GROUP: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr, IS_FP32: tl.constexpr,
    KV_FP8: tl.constexpr = False, USE_PDL: tl.constexpr = False,
):
    if USE_PDL:
        pdl_wait()
    req = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + req).to(tl.int32)
    req_row = tl.load(req_pool_indices_ptr + req).to(tl.int64)
    kv_lo = 0
    if USE_WINDOW:
        kv_lo = tl.maximum(seq_len - sliding_window, 0)
    keys_per_split = tl.cdiv(tl.cdiv(seq_len - kv_lo, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = kv_lo + split * keys_per_split
    end = tl.minimum(start + keys_per_split, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_h
    q = tl.load(q_ptr + req * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_h[:, None] & mask_d[None, :], other=0.0)
    kv_base = kv_head.to(tl.int64) * stride_kh
    slot_row_ptr = req_to_token_ptr + req_row * stride_req
    # An FP8 pool with 16-bit queries: the dots run in fp16, whose conversion from e4m3 is one
    # instruction per two values (bf16 would take a second conversion per value, as many as
    # the bytes the pool saves). The scales leave the loop: qk_scale goes into q (before its
    # rounding to fp16, which keeps |q| far from fp16's limit), k_scale multiplies the
    # scores, v_scale the output.
    FP16_DOTS: tl.constexpr = KV_FP8 and not IS_FP32
    if FP16_DOTS:
        q = (q.to(tl.float32) * qk_scale).to(tl.float16)
        score_scale = k_scale
    else:
        score_scale = qk_scale

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        k_pos = start_n + offs_n
        in_split = k_pos < end
        slots = tl.load(slot_row_ptr + k_pos, mask=in_split, other=0).to(tl.int64)
        kv_offs = kv_base + slots[:, None] * stride_ks + offs_d[None, :]
        kv_mask = in_split[:, None] & mask_d[None, :]
        k = tl.load(k_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        v = tl.load(v_cache_ptr + kv_offs, mask=kv_mask, other=0.0)
        if FP16_DOTS:
            k = k.to(tl.float16)
            v = v.to(tl.float16)
        else:
            k = dequantize_kv(k, k_scale, q.dtype, KV_FP8)
            v = dequantize_kv(v, v_scale, q.dtype, KV_FP8)
        if IS_FP32:
            s = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        if USE_CAP:
            s = soft_cap(s * score_scale, logit_cap) * 1.4426950408889634
        else:
            s = s * score_scale
        s = tl.where(in_split[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        if IS_FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if FP16_DOTS:
        out = out * v_scale
    lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
    mid = req * stride_mb + heads * stride_mh + split * stride_ms
    tl.store(mid_o_ptr + mid[:, None] + offs_d[None, :], out, mask=mask_h[:, None])
    tl.store(mid_lse_ptr + (mid // BLOCK_D), lse, mask=mask_h)


@triton.jit
def _decode_reduce_kernel(
    mid_o_ptr, mid_lse_ptr, o_ptr,
    stride_mb, stride_mh, stride_ms, stride_ob, stride_oh,
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    if USE_PDL:
        pdl_wait()
    req = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    mid = req * stride_mb + head * stride_mh + offs_s * stride_ms
    lse = tl.load(mid_lse_ptr + mid // BLOCK_D, mask=mask_s, other=float("-inf"))
    lse_max = tl.max(lse, 0)
    lse_max = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    weights = tl.exp2(lse - lse_max)
    parts = tl.load(mid_o_ptr + mid[:, None] + offs_d[None, :], mask=mask_s[:, None], other=0.0)
    total = tl.sum(weights, 0)
    out = tl.sum(parts * weights[:, None], 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(o_ptr + req * stride_ob + head * stride_oh + offs_d,
             out.to(o_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     seq_lens: torch.Tensor, sm_scale: float, sliding_window: int = -1,
                     logit_cap: float = 0.0, num_kv_splits: int | None = None,
                     k_scale: float = 1.0, v_scale: float = 1.0, *,
                     pdl: bool = True) -> torch.Tensor:
    """One query per request over its first seq_lens[b] keys in the pool.

    q: [B, Hq, D]; k_cache, v_cache: [num_slots, Hk, D]; req_to_token: [R, L] int32;
    req_pool_indices, seq_lens: [B] int. num_kv_splits: fixed split count (a
    CUDA-graph friendly constant), default `default_num_kv_splits`. An FP8 pool
    is read as ``float(cache) * k_scale`` (``v_scale``). ``pdl``:
    launch with programmatic dependent launch where the GPU has it (pdl.py).
    Returns o: [B, Hq, D] in q's dtype.
    """
    return launch_decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices,
                                   seq_lens, sm_scale, sliding_window, logit_cap, num_kv_splits,
                                   k_scale=k_scale, v_scale=v_scale, pdl=pdl)


def launch_decode_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                            sm_scale, sliding_window=-1, logit_cap=0.0, num_kv_splits=None,
                            block_n: int | None = None, num_warps: int = 4,
                            num_stages: int = 2, pdl: bool = True, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """`decode_attention` with explicit tiles (benchmarks)."""
    num_q_heads, num_kv_heads, head_dim = check_kv_pool(q, k_cache, v_cache, req_to_token)
    check_kv_scales(k_scale, v_scale)
    batch = q.shape[0]
    check_batch_vectors(batch, req_pool_indices=req_pool_indices, seq_lens=seq_lens)
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    if num_kv_splits is None:
        num_kv_splits = default_num_kv_splits(batch, num_kv_heads, req_to_token.shape[1], q.device)
    if not 1 <= num_kv_splits <= 1024:
        raise ValueError(f"num_kv_splits must be in 1..1024, got {num_kv_splits}")
    group = num_q_heads // num_kv_heads
    padded_d = block_d(head_dim)
    if block_n is None:  # long splits stream better with wider tiles
        block_n = 32 if interpreting() or padded_d > 128 else (128 if num_kv_splits == 1 else 64)
    # mid_o rows are padded to BLOCK_D so that mid_lse shares its index (offset // BLOCK_D).
    mid_o = torch.empty((batch, num_q_heads, num_kv_splits, padded_d), dtype=torch.float32,
                        device=q.device)
    mid_lse = torch.empty((batch, num_q_heads, num_kv_splits), dtype=torch.float32,
                          device=q.device)
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _decode_split_kernel[(batch, num_kv_heads, num_kv_splits)](
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, mid_o, mid_lse,
        sm_scale * (1.0 if logit_cap > 0 else LOG2E), float(logit_cap), int(sliding_window),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2), float(k_scale), float(v_scale),
        NUM_SPLITS=num_kv_splits, GROUP=group, HEAD_DIM=head_dim, BLOCK_D=padded_d,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        USE_WINDOW=sliding_window > 0, USE_CAP=logit_cap > 0, IS_FP32=q.dtype == torch.float32,
        KV_FP8=is_fp8_cache(k_cache),
        num_warps=num_warps, num_stages=num_stages, **pdl_args(q.device, pdl),
    )
    _decode_reduce_kernel[(batch, num_q_heads)](
        mid_o, mid_lse, o, mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        o.stride(0), o.stride(1),
        NUM_SPLITS=num_kv_splits, HEAD_DIM=head_dim,
        BLOCK_S=triton.next_power_of_2(num_kv_splits), BLOCK_D=padded_d,
        num_warps=4, **pdl_args(q.device, pdl),
    )
    return o
