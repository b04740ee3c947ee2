"""Extend (prefill) attention over the paged KV pool (see the package docstring).

Grid: ``(query blocks, Hq, B)``. A program owns ``BLOCK_M`` query rows of one
head of one request and walks the request's keys ``BLOCK_N`` at a time,
reading their slots from ``req_to_token``:

* keys ``< prefix_len + m_start`` are visible to every row of the block
  (causal), so those blocks run without any mask (phase 1);
* the remaining blocks up to the block's last query (the diagonal) apply the
  causal / length mask (phase 2); fully masked blocks past it are skipped.

With a sliding window every block is masked and blocks wholly left of the
window are skipped. The softmax runs online in fp32 in base 2 (the scale is
folded with log2(e)). Heavier query blocks (the causal tail) launch first.
Tiles come from an explicit table keyed by the padded head dim (no autotune).
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from triton_kernels.attention.common import (
    LOG2E, block_d, check_batch_vectors, check_kv_pool, interpreting, soft_cap,
)


@dataclasses.dataclass(frozen=True)
class ExtendConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


# padded head dim -> tiles (bf16/fp16), from a sweep on an H200 (triton 3.6) at
# S = 1k/4k/8k: D=128 (128, 128, 8, 3) 175/324/377 TFLOP/s, next best (128, 64, 4, 3);
# D=64 (64, 128, 4, 3) 257; D=256 (128, 64, 8, 2) 343 at S=4k. BLOCK_M=256 and
# tl.range(warp_specialize=True) gained nothing on Hopper with triton 3.6.
_GPU_CONFIGS: dict[int, ExtendConfig] = {
    16: ExtendConfig(64, 128, 4, 3),
    32: ExtendConfig(64, 128, 4, 3),
    64: ExtendConfig(64, 128, 4, 3),
    128: ExtendConfig(128, 128, 8, 3),
    256: ExtendConfig(128, 64, 8, 2),
}


def pick_extend_config(padded_head_dim: int, dtype: torch.dtype) -> ExtendConfig:
    """Tile table lookup; fp32 halves the tiles, the interpreter takes big cheap ones."""
    if interpreting():
        return ExtendConfig(32, 32, 4, 1)
    config = _GPU_CONFIGS[padded_head_dim]
    if dtype == torch.float32:
        return ExtendConfig(min(config.block_m, 64), min(config.block_n, 32), 4, 2)
    return config


@triton.jit
def _attend_block(acc, l_i, m_i, q, q_pos, start_n, seq_len, kv_base, slot_row_ptr,
                  k_cache_ptr, v_cache_ptr, stride_ks, stride_vs, qk_scale, logit_cap,
                  sliding_window, offs_n, offs_d, mask_d,
                  MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr,
                  IS_FP32: tl.constexpr, EVEN_D: tl.constexpr):
    """One BLOCK_N slice of keys: scores, online-softmax update, P @ V."""
    k_pos = start_n + offs_n
    if MASKED:
        in_seq = k_pos < seq_len
        slots = tl.load(slot_row_ptr + k_pos, mask=in_seq, other=0).to(tl.int64)
        kv_mask = in_seq[:, None] & mask_d[None, :]
    else:
        slots = tl.load(slot_row_ptr + k_pos).to(tl.int64)
        kv_mask = mask_d[None, :]
    k_ptrs = k_cache_ptr + kv_base + slots[:, None] * stride_ks + offs_d[None, :]
    if EVEN_D and not MASKED:  # no mask at all: full-width vector loads
        k = tl.load(k_ptrs)
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
    if IS_FP32:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    if USE_CAP:
        s = soft_cap(s * qk_scale, logit_cap) * 1.4426950408889634
    else:
        s = s * qk_scale
    if MASKED:
        visible = (k_pos[None, :] <= q_pos[:, None]) & in_seq[None, :]
        if USE_WINDOW:
            visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = v_cache_ptr + kv_base + slots[:, None] * stride_vs + offs_d[None, :]
    if EVEN_D and not MASKED:
        v = tl.load(v_ptrs)
    else:
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    if IS_FP32:
        acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return acc, l_i, m_new


@triton.jit
def _extend_attention_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, o_ptr, req_to_token_ptr,
    req_pool_indices_ptr, prefix_lens_ptr, extend_lens_ptr, extend_start_loc_ptr,
    qk_scale, logit_cap, sliding_window, num_m_blocks,
    stride_qt, stride_qh, stride_ks, stride_kh, stride_vs, stride_vh,
    stride_ot, stride_oh, stride_req,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr, IS_FP32: tl.constexpr,
    EVEN_D: tl.constexpr,
):
    pid_m = num_m_blocks - 1 - tl.program_id(0)  # the heavy causal tail first
    head = tl.program_id(1)
    req = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + req).to(tl.int32)
    m_start = pid_m * BLOCK_M
    if m_start < extend_len:
        prefix_len = tl.load(prefix_lens_ptr + req).to(tl.int32)
        q_start = tl.load(extend_start_loc_ptr + req).to(tl.int64)
        req_row = tl.load(req_pool_indices_ptr + req).to(tl.int64)
        slot_row_ptr = req_to_token_ptr + req_row * stride_req
        kv_base = (head // GROUP).to(tl.int64) * stride_kh  # stride_vh == stride_kh (checked)
        seq_len = prefix_len + extend_len

        offs_m = m_start + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < extend_len
        mask_d = offs_d < HEAD_DIM
        q_rows = (q_start + offs_m).to(tl.int64)
        q = tl.load(q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        q_pos = prefix_len + offs_m  # absolute positions of the block's queries

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        block_end = prefix_len + tl.minimum(m_start + BLOCK_M, extend_len)  # keys < this
        if USE_WINDOW:
            first_key = tl.maximum(prefix_len + m_start - sliding_window + 1, 0)
            lo = (first_key // BLOCK_N) * BLOCK_N
            unmasked_end = lo
        else:
            lo = 0
            unmasked_end = ((prefix_len + m_start) // BLOCK_N) * BLOCK_N
        # phase 1: keys every query of the block sees (no mask)
        for start_n in range(lo, unmasked_end, BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, q_pos, start_n, seq_len, kv_base, slot_row_ptr,
                k_cache_ptr, v_cache_ptr, stride_ks, stride_vs, qk_scale, logit_cap,
                sliding_window, offs_n, offs_d, mask_d,
                False, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D)
        # phase 2: the diagonal (and the window edge): masked
        for start_n in range(unmasked_end, block_end, BLOCK_N):
            acc, l_i, m_i = _attend_block(
                acc, l_i, m_i, q, q_pos, start_n, seq_len, kv_base, slot_row_ptr,
                k_cache_ptr, v_cache_ptr, stride_ks, stride_vs, qk_scale, logit_cap,
                sliding_window, offs_n, offs_d, mask_d,
                True, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = acc / l_safe[:, None]
        tl.store(o_ptr + q_rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def extend_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     extend_start_loc: torch.Tensor, max_extend_len: int, sm_scale: float,
                     sliding_window: int = -1, logit_cap: float = 0.0) -> torch.Tensor:
    """Attention of the new tokens of a ragged batch over the paged pool.

    q: [T, Hq, D] (T = sum of extend_lens); k_cache, v_cache: [num_slots, Hk, D];
    req_to_token: [R, L] int32; req_pool_indices, prefix_lens, extend_lens,
    extend_start_loc: [B] int; max_extend_len: an upper bound of extend_lens
    (sets the grid; no device sync). Returns o: [T, Hq, D] in q's dtype.
    """
    return launch_extend_attention(q, k_cache, v_cache, req_to_token, req_pool_indices,
                                   prefix_lens, extend_lens, extend_start_loc, max_extend_len,
                                   sm_scale, sliding_window, logit_cap, config=None)


def launch_extend_attention(q, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                            extend_lens, extend_start_loc, max_extend_len, sm_scale,
                            sliding_window=-1, logit_cap=0.0,
                            config: ExtendConfig | None = None) -> torch.Tensor:
    """`extend_attention` with an optional explicit tile config (benchmarks)."""
    num_q_heads, num_kv_heads, head_dim = check_kv_pool(q, k_cache, v_cache, req_to_token)
    batch = req_pool_indices.shape[0] if req_pool_indices.dim() == 1 else -1
    check_batch_vectors(batch, req_pool_indices=req_pool_indices, prefix_lens=prefix_lens,
                        extend_lens=extend_lens, extend_start_loc=extend_start_loc)
    if max_extend_len < 1:
        raise ValueError(f"max_extend_len must be >= 1, got {max_extend_len}")
    if k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same strides")
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return o
    padded_d = block_d(head_dim)
    config = config or pick_extend_config(padded_d, q.dtype)
    num_m_blocks = triton.cdiv(max_extend_len, config.block_m)
    grid = (num_m_blocks, num_q_heads, batch)
    _extend_attention_kernel[grid](
        q, k_cache, v_cache, o, req_to_token,
        req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
        sm_scale * (1.0 if logit_cap > 0 else LOG2E), float(logit_cap), int(sliding_window),
        num_m_blocks,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1),
        v_cache.stride(0), v_cache.stride(1), o.stride(0), o.stride(1), req_to_token.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=padded_d,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        USE_WINDOW=sliding_window > 0, USE_CAP=logit_cap > 0,
        IS_FP32=q.dtype == torch.float32, EVEN_D=head_dim == padded_d,
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o
