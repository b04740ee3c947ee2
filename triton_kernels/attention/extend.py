"""Extend (prefill) attention: new tokens over a cached prefix plus themselves.

Where the keys come from (the way SGLang's extend kernel splits them):

* phase A, the cached PREFIX (positions ``0 .. prefix_len-1``) is read from the
  paged pool through ``req_to_token`` (a gather by slot). Every prefix key is
  visible to every new query (causal), so only the tail block (a partial
  ``BLOCK_N``) and sliding-window blocks are masked;
* phase B, the NEW tokens' keys (positions ``prefix_len ..``) come from the
  contiguous ``k``/``v`` the layer just computed (the same rows it stores into
  the pool). Blocks wholly below the query block (``j < m_start``) run without
  a mask; only the diagonal blocks are masked. 16-bit ``k``/``v`` with
  16-byte aligned bases and token strides are read by the Hopper tensor-memory
  engine (TMA): the launcher builds one descriptor per tensor over the
  ``[T, Hk * D]`` rows (a program offsets it by its request's first row and its
  kv head's column), or, when the heads of a row are not packed, each program
  builds one bounded by its request's rows. Diagonal rows past the request
  (another request's tokens) are masked out of the scores and zeroed in ``v``.
  Otherwise (fp32, unaligned rows, D=256) plain masked pointer loads.

``q`` and ``o`` go through pointer loads/stores (q is read once per program).
Grid: ``(Hq, query blocks, B)``, heads fastest and the heavy causal tail first,
so the longest programs start in the first wave (longest-job-first); with
``pair_blocks`` a program owns blocks ``p`` and ``n-1-p`` instead (equal work).
A program owns ``BLOCK_M`` query rows of one head of one request. The softmax
runs online in fp32 in base 2: unmasked blocks fold the scale into one FMA
(``qk * scale - m``) and need no ``-inf`` guard; masked blocks use ``-inf`` and
guard rows with no visible key yet. Tiles come from an explicit table (no
autotune).

FLOPs: ``4 * Hq * D * (visible (q, k) pairs)``; compute-bound for any
prefill worth a kernel.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from triton_kernels.attention.common import (
    LOG2E, block_d, check_batch_vectors, check_kv_pool, soft_cap,
)
from triton_kernels.kv_fp8 import check_kv_scales, dequantize_kv, is_fp8_cache
from triton_kernels.runtime import ensure_tma_allocator, interpreting


@dataclasses.dataclass(frozen=True)
class ExtendConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    tma: bool = True              # new k/v through tensor descriptors (16-bit, aligned)
    kv_desc_on_host: bool = True  # built once by the launcher (else per program on the device)
    pair_blocks: bool = False     # a program owns query blocks p and n-1-p (equal causal work)


# padded head dim -> tiles (bf16/fp16), from perf/sweep_attention.py on an H200 (triton 3.6;
# perf/results/attention-extend-nvidia-h200.json; earlier sweeps in git at e9fc771, 3e350c2).
# D=128 at S=1k/2k/4k/8k: 128x64 w4 s2
# 246/415/459/491 TFLOP/s = 0.89/0.99/0.93/0.89x SDPA. Its shared memory (q 32 KB +
# 2 stages x 32 KB of k/v) lets two programs share an SM, one's softmax hiding behind the
# other's tensor-core work; 128x128 w8 s3 (one per SM) 0.96/0.84/0.89/0.87x. Descriptors
# built per program on the device cost 2-8% (7% at 1k); q/o through descriptors as well,
# another 1-4%; plain pointer loads of k/v 2-12%. Paired 64x64 blocks reach 1.05x at S=1k
# (the whole grid in one wave) but lose 15-25% from 2k on and a third with a cached prefix,
# which the launcher cannot see without a sync: not in the table. D=64: 64x64 w4 s2 1.02x at
# 4k. D=256 takes pointer loads (a 512-byte descriptor row is too wide): 128x64 w8 s2 0.90x.
_GPU_CONFIGS: dict[int, ExtendConfig] = {
    16: ExtendConfig(64, 64, 4, 2),
    32: ExtendConfig(64, 64, 4, 2),
    64: ExtendConfig(64, 64, 4, 2),
    128: ExtendConfig(128, 64, 4, 2),
    256: ExtendConfig(128, 64, 8, 2),
}


def pick_extend_config(padded_head_dim: int, dtype: torch.dtype) -> ExtendConfig:
    """Tile table lookup; fp32 halves the tiles (pointer loads); the interpreter takes
    the GPU entry's code paths with small tiles."""
    config = _GPU_CONFIGS[padded_head_dim]
    if interpreting():
        return dataclasses.replace(config, block_m=32, block_n=32, num_stages=1)
    if dtype == torch.float32:
        return ExtendConfig(min(config.block_m, 64), min(config.block_n, 32), 4, 2, tma=False)
    return config


# ----------------------------------------------------------------------------- kernel


@triton.jit
def _softmax_update(acc, l_i, m_i, qk, v, visible, qk_scale, logit_cap,
                    MASKED: tl.constexpr, USE_CAP: tl.constexpr, IS_FP32: tl.constexpr):
    """Online-softmax step for one key block: qk[BM, BN] raw dot products, v[BN, BD]."""
    if USE_CAP:
        s = soft_cap(qk * qk_scale, logit_cap) * 1.4426950408889634
    elif MASKED:
        s = qk * qk_scale
    if MASKED:
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet
        p = tl.math.exp2(s - m_use[:, None])
    elif USE_CAP:
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        p = tl.math.exp2(s - m_use[:, None])
    else:  # every score finite: the max is finite, the scale folds into one FMA
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        m_use = m_new
        p = tl.math.exp2(qk * qk_scale - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    acc = acc * alpha[:, None]
    if IS_FP32:
        acc = tl.dot(p, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    l_i = l_i * alpha + tl.sum(p, 1)
    return acc, l_i, m_new


@triton.jit
def _qk(q, k, IS_FP32: tl.constexpr):
    if IS_FP32:
        return tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        return tl.dot(q, tl.trans(k))


@triton.jit
def _prefix_block(acc, l_i, m_i, q, q_pos, start_n, prefix_len, slot_row_ptr,
                  k_cache_ptr, v_cache_ptr, kv_head_off, stride_ks, stride_vs,
                  qk_scale, logit_cap, sliding_window, offs_n, offs_d, mask_d, k_scale, v_scale,
                  MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr,
                  IS_FP32: tl.constexpr, EVEN_D: tl.constexpr, KV_FP8: tl.constexpr):
    """Phase A: keys start_n.. of the cached prefix, gathered from the pool by slot."""
    k_pos = start_n + offs_n
    in_prefix = k_pos < prefix_len
    if MASKED:
        slots = tl.load(slot_row_ptr + k_pos, mask=in_prefix, other=0).to(tl.int64)
        kv_mask = in_prefix[:, None] & mask_d[None, :]
    else:
        slots = tl.load(slot_row_ptr + k_pos).to(tl.int64)
        kv_mask = mask_d[None, :]
    k_ptrs = k_cache_ptr + kv_head_off + slots[:, None] * stride_ks + offs_d[None, :]
    v_ptrs = v_cache_ptr + kv_head_off + slots[:, None] * stride_vs + offs_d[None, :]
    if EVEN_D and not MASKED:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    else:
        k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
        v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    k = dequantize_kv(k, k_scale, q.dtype, KV_FP8)
    v = dequantize_kv(v, v_scale, q.dtype, KV_FP8)
    qk = _qk(q, k, IS_FP32)
    visible = in_prefix[None, :]
    if USE_WINDOW:
        visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
    return _softmax_update(acc, l_i, m_i, qk, v, visible, qk_scale, logit_cap,
                           MASKED, USE_CAP, IS_FP32)


@triton.jit
def _new_block(acc, l_i, m_i, q, q_idx, start_n, extend_len, k_desc, v_desc, kv_row0, kv_col0,
               k_rows_ptr,
               v_rows_ptr, stride_kt, stride_vt, qk_scale, logit_cap, sliding_window,
               offs_n, offs_d, mask_d,
               MASKED: tl.constexpr, USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr,
               IS_FP32: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr):
    """Phase B: new keys start_n.. (extend indices) from the contiguous k/v rows."""
    k_idx = start_n + offs_n
    if USE_TMA:
        k = k_desc.load([kv_row0 + start_n, kv_col0])
        v = v_desc.load([kv_row0 + start_n, kv_col0])
        if MASKED:  # rows past extend_len may be another request's: keep them out of p @ v
            v = tl.where((k_idx < extend_len)[:, None], v, 0.0)
    else:
        rows = k_idx.to(tl.int64)
        k_ptrs = k_rows_ptr + rows[:, None] * stride_kt + offs_d[None, :]
        v_ptrs = v_rows_ptr + rows[:, None] * stride_vt + offs_d[None, :]
        if EVEN_D and not MASKED:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            kv_mask = (k_idx < extend_len)[:, None] & mask_d[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
    qk = _qk(q, k, IS_FP32)
    visible = (k_idx[None, :] <= q_idx[:, None]) & (k_idx < extend_len)[None, :]
    if USE_WINDOW:
        visible = visible & (q_idx[:, None] - k_idx[None, :] < sliding_window)
    return _softmax_update(acc, l_i, m_i, qk, v, visible, qk_scale, logit_cap,
                           MASKED, USE_CAP, IS_FP32)


@triton.jit
def _query_block(pid_m, extend_len, prefix_len, slot_row_ptr, kv_head_off,
                 k_desc, v_desc, kv_row0, kv_col0, q_rows_ptr, o_rows_ptr, k_rows_ptr, v_rows_ptr,
                 k_cache_ptr, v_cache_ptr, qk_scale, logit_cap, sliding_window,
                 stride_qt, stride_kt, stride_vt, stride_ks, stride_vs, stride_ot,
                 k_scale, v_scale,
                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr, IS_FP32: tl.constexpr,
                 EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, KV_FP8: tl.constexpr):
    """BLOCK_M query rows (extend indices pid_m * BLOCK_M ..) of one head: A, B, store."""
    m_start = pid_m * BLOCK_M
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_idx = m_start + offs_m          # extend indices of the block's queries
    q_pos = prefix_len + q_idx        # their absolute positions
    q_mask = (q_idx < extend_len)[:, None] & mask_d[None, :]
    q = tl.load(q_rows_ptr + q_idx.to(tl.int64)[:, None] * stride_qt + offs_d[None, :],
                mask=q_mask, other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # ---- phase A: the cached prefix, from the pool
    if USE_WINDOW:
        first_key = tl.maximum(prefix_len + m_start - sliding_window + 1, 0)
        a_lo = (first_key // BLOCK_N) * BLOCK_N
        a_unmasked_end = a_lo
    else:
        a_lo = 0
        a_unmasked_end = (prefix_len // BLOCK_N) * BLOCK_N
    for start_n in range(a_lo, a_unmasked_end, BLOCK_N):
        acc, l_i, m_i = _prefix_block(
            acc, l_i, m_i, q, q_pos, start_n, prefix_len, slot_row_ptr,
            k_cache_ptr, v_cache_ptr, kv_head_off, stride_ks, stride_vs,
            qk_scale, logit_cap, sliding_window, offs_n, offs_d, mask_d, k_scale, v_scale,
            False, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D, KV_FP8)
    for start_n in range(a_unmasked_end, prefix_len, BLOCK_N):
        acc, l_i, m_i = _prefix_block(
            acc, l_i, m_i, q, q_pos, start_n, prefix_len, slot_row_ptr,
            k_cache_ptr, v_cache_ptr, kv_head_off, stride_ks, stride_vs,
            qk_scale, logit_cap, sliding_window, offs_n, offs_d, mask_d, k_scale, v_scale,
            True, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D, KV_FP8)

    # ---- phase B: the new tokens, from k/v
    if USE_WINDOW:
        b_lo = (tl.maximum(m_start - sliding_window + 1, 0) // BLOCK_N) * BLOCK_N
        b_unmasked_end = b_lo
    else:
        b_lo = 0
        b_unmasked_end = (m_start // BLOCK_N) * BLOCK_N
    b_end = tl.minimum(m_start + BLOCK_M, extend_len)
    for start_n in range(b_lo, b_unmasked_end, BLOCK_N):
        acc, l_i, m_i = _new_block(
            acc, l_i, m_i, q, q_idx, start_n, extend_len, k_desc, v_desc, kv_row0, kv_col0,
            k_rows_ptr, v_rows_ptr, stride_kt, stride_vt, qk_scale, logit_cap, sliding_window,
            offs_n, offs_d, mask_d, False, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D, USE_TMA)
    for start_n in range(b_unmasked_end, b_end, BLOCK_N):
        acc, l_i, m_i = _new_block(
            acc, l_i, m_i, q, q_idx, start_n, extend_len, k_desc, v_desc, kv_row0, kv_col0,
            k_rows_ptr, v_rows_ptr, stride_kt, stride_vt, qk_scale, logit_cap, sliding_window,
            offs_n, offs_d, mask_d, True, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D, USE_TMA)

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = (acc / l_safe[:, None]).to(o_rows_ptr.dtype.element_ty)
    tl.store(o_rows_ptr + q_idx.to(tl.int64)[:, None] * stride_ot + offs_d[None, :],
             out, mask=q_mask)


# num_m_blocks changes with every batch: left unspecialised (Triton would otherwise
# compile a new variant when it happens to be 1 or a multiple of 16, mid-serving).
@triton.jit(do_not_specialize=["num_m_blocks"])
def _extend_attention_kernel(
    q_ptr, k_src, v_src, k_cache_ptr, v_cache_ptr, o_ptr, req_to_token_ptr,
    req_pool_indices_ptr, prefix_lens_ptr, extend_lens_ptr, extend_start_loc_ptr,
    qk_scale, logit_cap, sliding_window, num_m_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ks, stride_kcache_h, stride_vs, stride_ot, stride_oh, stride_req, k_scale, v_scale,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_CAP: tl.constexpr, IS_FP32: tl.constexpr,
    EVEN_D: tl.constexpr, USE_TMA: tl.constexpr, HOST_KV_DESC: tl.constexpr,
    PAIR_BLOCKS: tl.constexpr, KV_FP8: tl.constexpr = False,
):
    head = tl.program_id(0)
    pid = tl.program_id(1)
    req = tl.program_id(2)
    extend_len = tl.load(extend_lens_ptr + req).to(tl.int32)
    req_m_blocks = tl.cdiv(extend_len, BLOCK_M)
    if PAIR_BLOCKS:  # program p owns blocks n-1-p and p: the same causal work for all
        first_block = req_m_blocks - 1 - pid
        has_work = pid <= first_block
    else:            # the heavy causal tail first
        first_block = num_m_blocks - 1 - pid
        has_work = first_block < req_m_blocks
    if has_work:
        prefix_len = tl.load(prefix_lens_ptr + req).to(tl.int32)
        q_start = tl.load(extend_start_loc_ptr + req).to(tl.int64)
        req_row = tl.load(req_pool_indices_ptr + req).to(tl.int64)
        slot_row_ptr = req_to_token_ptr + req_row * stride_req
        kv_head = (head // GROUP).to(tl.int64)
        kv_head_off = kv_head * stride_kcache_h  # same head stride for v_cache (checked)
        q_rows_ptr = q_ptr + q_start * stride_qt + head * stride_qh
        o_rows_ptr = o_ptr + q_start * stride_ot + head * stride_oh
        if HOST_KV_DESC:  # k_src, v_src: descriptors of [T, Hk * D], built by the launcher
            k_desc = k_src
            v_desc = v_src
            kv_row0 = q_start.to(tl.int32)
            kv_col0 = (kv_head * HEAD_DIM).to(tl.int32)
            k_rows_ptr = q_ptr  # unused placeholders
            v_rows_ptr = q_ptr
        else:
            k_rows_ptr = k_src + q_start * stride_kt + kv_head * stride_kh
            v_rows_ptr = v_src + q_start * stride_vt + kv_head * stride_vh
            kv_row0 = 0
            kv_col0 = 0
            if USE_TMA:  # bounded by this request's rows: past them loads give zeros
                k_desc = tl.make_tensor_descriptor(k_rows_ptr, shape=[extend_len, HEAD_DIM],
                                                   strides=[stride_kt, 1],
                                                   block_shape=[BLOCK_N, BLOCK_D])
                v_desc = tl.make_tensor_descriptor(v_rows_ptr, shape=[extend_len, HEAD_DIM],
                                                   strides=[stride_vt, 1],
                                                   block_shape=[BLOCK_N, BLOCK_D])
            else:
                k_desc = k_rows_ptr  # unused placeholders
                v_desc = v_rows_ptr
        _query_block(first_block, extend_len, prefix_len, slot_row_ptr, kv_head_off,
                     k_desc, v_desc, kv_row0, kv_col0, q_rows_ptr, o_rows_ptr, k_rows_ptr,
                     v_rows_ptr, k_cache_ptr, v_cache_ptr, qk_scale, logit_cap, sliding_window,
                     stride_qt, stride_kt, stride_vt, stride_ks, stride_vs, stride_ot,
                     k_scale, v_scale,
                     HEAD_DIM, BLOCK_D, BLOCK_M, BLOCK_N, USE_WINDOW, USE_CAP, IS_FP32,
                     EVEN_D, USE_TMA, KV_FP8)
        if PAIR_BLOCKS:
            if pid < first_block:
                _query_block(pid, extend_len, prefix_len, slot_row_ptr, kv_head_off,
                             k_desc, v_desc, kv_row0, kv_col0, q_rows_ptr, o_rows_ptr,
                             k_rows_ptr, v_rows_ptr, k_cache_ptr, v_cache_ptr, qk_scale, logit_cap,
                             sliding_window, stride_qt, stride_kt, stride_vt, stride_ks,
                             stride_vs, stride_ot, k_scale, v_scale, HEAD_DIM, BLOCK_D, BLOCK_M,
                             BLOCK_N, USE_WINDOW, USE_CAP, IS_FP32, EVEN_D, USE_TMA, KV_FP8)


# ----------------------------------------------------------------------------- launcher


def check_new_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 k_cache: torch.Tensor) -> None:
    """k, v: the new tokens' keys/values, [T, Hk, D] like q's rows and the pool's heads."""
    want = (q.shape[0], k_cache.shape[1], k_cache.shape[2])
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3 or tuple(t.shape) != want:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be [T, Hk, D] = {list(want)} (q's tokens, the pool's "
                             f"heads and head_dim), got {got}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name} dtype {t.dtype} must match q dtype {q.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device}, q on {q.device}")


def _tma_ok(padded_d: int, *tensors: torch.Tensor) -> bool:
    """Tensor descriptors: 16-bit data, 16-byte aligned bases, token and head strides."""
    for t in tensors:
        es = t.element_size()
        if t.dtype not in (torch.float16, torch.bfloat16) or padded_d * es > 256:
            return False
        if t.data_ptr() % 16 or (t.stride(0) * es) % 16 or (t.stride(1) * es) % 16:
            return False
    return True


def extend_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor,
                     req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     extend_start_loc: torch.Tensor, max_extend_len: int, sm_scale: float,
                     sliding_window: int = -1, logit_cap: float = 0.0, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> torch.Tensor:
    """Attention of the new tokens of a ragged batch over their prefix and themselves.

    q: [T, Hq, D] (T = sum of extend_lens); k, v: [T, Hk, D], the new tokens'
    keys/values in q's row order (row ``extend_start_loc[b] + i`` is token
    ``prefix_lens[b] + i`` of request b); k_cache, v_cache: [num_slots, Hk, D]
    holding the prefixes; req_to_token: [R, L] int32 (only the first
    ``prefix_lens[b]`` entries of a row are read); req_pool_indices,
    prefix_lens, extend_lens, extend_start_loc: [B] int; max_extend_len: an
    upper bound of extend_lens (sets the grid; no device sync). An FP8 pool is
    read as ``float(cache) * k_scale`` (``v_scale``); k, v stay in q's dtype.
    Returns o: [T, Hq, D] in q's dtype.
    """
    return launch_extend_attention(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices,
                                   prefix_lens, extend_lens, extend_start_loc, max_extend_len,
                                   sm_scale, sliding_window, logit_cap, config=None,
                                   k_scale=k_scale, v_scale=v_scale)


def launch_extend_attention(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices,
                            prefix_lens, extend_lens, extend_start_loc, max_extend_len,
                            sm_scale, sliding_window=-1, logit_cap=0.0,
                            config: ExtendConfig | None = None, k_scale: float = 1.0,
                            v_scale: float = 1.0) -> torch.Tensor:
    """`extend_attention` with an optional explicit tile config (benchmarks)."""
    num_q_heads, num_kv_heads, head_dim = check_kv_pool(q, k_cache, v_cache, req_to_token)
    check_kv_scales(k_scale, v_scale)
    check_new_kv(q, k, v, k_cache)
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
    use_tma = config.tma and _tma_ok(padded_d, q, k, v, o)
    if use_tma:
        ensure_tma_allocator(q.device)
    host_kv_desc = (use_tma and config.kv_desc_on_host
                    and k.stride(1) == head_dim and v.stride(1) == head_dim)
    k_src, v_src = k, v
    if host_kv_desc:  # [T, Hk * D] views; a program offsets rows by its request, columns by head
        block = [config.block_n, padded_d]
        k_src = TensorDescriptor(k, [k.shape[0], num_kv_heads * head_dim], [k.stride(0), 1], block)
        v_src = TensorDescriptor(v, [v.shape[0], num_kv_heads * head_dim], [v.stride(0), 1], block)
    num_m_blocks = triton.cdiv(max_extend_len, config.block_m)
    grid = (num_q_heads, triton.cdiv(num_m_blocks, 2) if config.pair_blocks else num_m_blocks,
            batch)
    _extend_attention_kernel[grid](
        q, k_src, v_src, k_cache, v_cache, o, req_to_token,
        req_pool_indices, prefix_lens, extend_lens, extend_start_loc,
        sm_scale * (1.0 if logit_cap > 0 else LOG2E), float(logit_cap), int(sliding_window),
        num_m_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), o.stride(0), o.stride(1),
        req_to_token.stride(0), float(k_scale), float(v_scale),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=padded_d,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        USE_WINDOW=sliding_window > 0, USE_CAP=logit_cap > 0,
        IS_FP32=q.dtype == torch.float32, EVEN_D=head_dim == padded_d,
        USE_TMA=use_tma, HOST_KV_DESC=host_kv_desc, PAIR_BLOCKS=config.pair_blocks,
        KV_FP8=is_fp8_cache(k_cache),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )
    return o
