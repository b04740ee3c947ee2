"""Plain-PyTorch references of extend/decode attention and their FLOP/byte counts.

Same signatures as the Triton launchers. One request at a time: gather its
keys from the pool through ``req_to_token`` (extend: the prefix from the pool,
the new tokens from ``k``/``v``), expand kv heads to q heads,
masked softmax in fp32 (or the input's dtype if wider), cast at the end.
An FP8 pool's rows are dequantised to q's dtype first (``kv_fp8.py``), as the
kernels do in registers.
These are also the CPU backend of the models.
"""
from __future__ import annotations

import torch

from triton_kernels.attention.common import check_batch_vectors, check_kv_pool
from triton_kernels.attention.extend import check_new_kv
from triton_kernels.kv_fp8 import check_kv_scales, dequantize_kv_reference


def _attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, q_pos: torch.Tensor,
            sm_scale: float, sliding_window: int, logit_cap: float) -> torch.Tensor:
    """q[n, Hq, D] over keys/values[S, Hk, D] at positions 0..S-1 -> [n, Hq, D] (compute dtype)."""
    group = q.shape[1] // keys.shape[1]
    keys = keys.repeat_interleave(group, dim=1)
    values = values.repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, keys) * sm_scale
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    k_pos = torch.arange(keys.shape[0], device=q.device)
    visible = k_pos[None, :] <= q_pos[:, None]
    if sliding_window > 0:
        visible &= (q_pos[:, None] - k_pos[None, :]) < sliding_window
    scores = scores.masked_fill(~visible[None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return torch.einsum("hqk,khd->qhd", probs, values)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def extend_attention_reference(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices,
                               prefix_lens, extend_lens, extend_start_loc, max_extend_len,
                               sm_scale, sliding_window=-1, logit_cap=0.0, k_scale=1.0,
                               v_scale=1.0) -> torch.Tensor:
    """Reference of `extend_attention` (same signature and math): the prefix's keys
    gathered from the pool, the new tokens' keys taken from k/v."""
    if q.dtype != torch.float64:
        check_kv_pool(q, k_cache, v_cache, req_to_token)
    check_new_kv(q, k, v, k_cache)
    check_kv_scales(k_scale, v_scale)
    batch = req_pool_indices.shape[0] if req_pool_indices.dim() == 1 else -1
    check_batch_vectors(batch, req_pool_indices=req_pool_indices, prefix_lens=prefix_lens,
                        extend_lens=extend_lens, extend_start_loc=extend_start_loc)
    cdt = _compute_dtype(q.dtype)
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b in range(batch):
        prefix_len, extend_len = int(prefix_lens[b]), int(extend_lens[b])
        start, row = int(extend_start_loc[b]), int(req_pool_indices[b])
        if extend_len == 0:
            continue
        slots = req_to_token[row, :prefix_len].long()
        new = slice(start, start + extend_len)
        keys = torch.cat([dequantize_kv_reference(k_cache[slots], k_scale, q.dtype), k[new]]).to(cdt)
        values = torch.cat([dequantize_kv_reference(v_cache[slots], v_scale, q.dtype), v[new]]).to(cdt)
        q_pos = torch.arange(prefix_len, prefix_len + extend_len, device=q.device)
        out = _attend(q[new].to(cdt), keys, values, q_pos, sm_scale, sliding_window, logit_cap)
        o[new] = out.to(q.dtype)
    return o


def decode_attention_reference(q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens,
                               sm_scale, sliding_window=-1, logit_cap=0.0,
                               num_kv_splits=None, k_scale=1.0, v_scale=1.0) -> torch.Tensor:
    """Reference of `decode_attention` (num_kv_splits is ignored: it changes no math)."""
    if q.dtype != torch.float64:
        check_kv_pool(q, k_cache, v_cache, req_to_token)
    check_batch_vectors(q.shape[0], req_pool_indices=req_pool_indices, seq_lens=seq_lens)
    check_kv_scales(k_scale, v_scale)
    cdt = _compute_dtype(q.dtype)
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    for b in range(q.shape[0]):
        seq_len, row = int(seq_lens[b]), int(req_pool_indices[b])
        if seq_len == 0:
            continue
        slots = req_to_token[row, :seq_len].long()
        q_pos = torch.tensor([seq_len - 1], device=q.device)
        keys = dequantize_kv_reference(k_cache[slots], k_scale, q.dtype).to(cdt)
        values = dequantize_kv_reference(v_cache[slots], v_scale, q.dtype).to(cdt)
        out = _attend(q[b:b + 1].to(cdt), keys, values, q_pos, sm_scale, sliding_window, logit_cap)
        o[b] = out[0].to(q.dtype)
    return o


def extend_flops_bytes(extend_lens: list[int], prefix_lens: list[int], num_q_heads: int,
                       num_kv_heads: int, head_dim: int, elem_bytes: int = 2) -> tuple[float, float]:
    """FLOPs (causal pairs only, QK^T and PV) and minimum bytes (q, o, K, V once)."""
    pairs = sum(e * p + e * (e + 1) / 2 for e, p in zip(extend_lens, prefix_lens))
    flops = 4.0 * num_q_heads * head_dim * pairs
    tokens, keys = sum(extend_lens), sum(e + p for e, p in zip(extend_lens, prefix_lens))
    nbytes = elem_bytes * head_dim * (2 * tokens * num_q_heads + 2 * keys * num_kv_heads)
    return flops, float(nbytes)


def decode_flops_bytes(seq_lens: list[int], num_q_heads: int, num_kv_heads: int, head_dim: int,
                       elem_bytes: int = 2) -> tuple[float, float]:
    """FLOPs and the K+V bytes a decode step must read (the roofline term)."""
    keys = sum(seq_lens)
    flops = 4.0 * num_q_heads * head_dim * keys
    return flops, float(2 * elem_bytes * keys * num_kv_heads * head_dim)
