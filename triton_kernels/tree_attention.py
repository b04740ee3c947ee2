"""Tree attention: the draft tokens of a speculative verify step over prefix + tree.

Request ``b`` brings ``tree_lens[b]`` draft-tree nodes (node 0 the root, see
``stages/speculative/tree.py``) whose rows of ``q``, ``k``, ``v`` start at
``tree_start_loc[b]``; its first ``prefix_lens[b]`` tokens are cached in the
paged pool (``req_to_token``, as in ``triton_kernels/attention``). Node ``i``
attends to every prefix key and, among the nodes, to those where the tree
mask says so (its ancestors and itself)::

    s_j = sm_scale * q_i . k_j                              (fp32)
    key j visible iff  j < prefix_len                       (the whole prefix)
                  or   tree_mask[b][i, j - prefix_len]      (tree ancestors)
    o_i = sum_j softmax(s)_j v_j

``tree_mask`` is every request's ``[n_b, n_b]`` boolean matrix, row-major,
flattened one after another into one 1-D bool/uint8 tensor; request ``b``'s
starts at ``mask_start_loc[b]`` (SGLang's ``custom_mask`` + ``mask_indptr``).
With a chain mask (lower triangle) this is extend attention. A request with
``mask_start_loc[b] < 0`` has no mask in ``tree_mask`` and attends causally
(a prefill chunk or a chain batched with trees: no ``[n, n]`` mask stored).

Sliding window (``sliding_window > 0``, Mistral / Qwen2 layers): with the
nodes' rotary ``positions`` (``prefix_len + depth``), a key is also required
to satisfy ``pos(q) - pos(k) < sliding_window`` (prefix key j sits at
position j), the convention of ``triton_kernels/attention``.

Shapes and dtypes: q [T, Hq, D], k/v [T, Hk, D] (the nodes' keys/values, read
here from k/v, not the pool), k_cache/v_cache [S, Hk, D], all fp16/bf16/fp32
alike; GQA by ``kv head = q head // (Hq // Hk)``; D <= 256 (padded to a power
of two). Output o [T, Hq, D] in q's dtype.

Grid ``(Hq, cdiv(max_tree_len, BLOCK_M), B)``: a program owns BLOCK_M nodes of
one head of one request; phase A streams the prefix through ``req_to_token``
(only the tail block masked), phase B the nodes with the tree mask. Online
softmax in base 2 with fp32 accumulators. A verify step is memory-bound like
decode: the time to beat is reading the prefix's K+V once per kv head
(``flops_bytes``); the tree adds ``n_b^2`` pairs, negligible.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.attention.common import LOG2E, block_d, check_batch_vectors, check_kv_pool


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    if IS_FP32:
        return tl.dot(a, b, input_precision="ieee")
    else:
        return tl.dot(a, b)


@triton.jit
def _online_softmax(acc, l_i, m_i, qk, v, visible, qk_scale, IS_FP32: tl.constexpr):
    """One key block: qk[BM, BN] raw scores, v[BN, BD], visible[BM, BN]."""
    s = tl.where(visible, qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)     # a row with no visible key yet
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    if IS_FP32:
        acc = _dot(p, v, IS_FP32) + acc * alpha[:, None]
    else:
        acc = _dot(p.to(v.dtype), v, IS_FP32) + acc * alpha[:, None]
    return acc, l_i * alpha + tl.sum(p, 1), m_new


@triton.jit(do_not_specialize=["num_m_blocks"])
def _tree_attention_kernel(
    q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, o_ptr, mask_ptr, req_to_token_ptr,
    req_pool_indices_ptr, prefix_lens_ptr, tree_lens_ptr, tree_start_loc_ptr, mask_start_loc_ptr,
    positions_ptr, qk_scale, sliding_window, num_m_blocks,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ks, stride_kch, stride_vs, stride_vch, stride_ot, stride_oh, stride_req,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_FP32: tl.constexpr, USE_WINDOW: tl.constexpr,
):
    head = tl.program_id(0)
    pid_m = tl.program_id(1)
    req = tl.program_id(2)
    tree_len = tl.load(tree_lens_ptr + req).to(tl.int32)
    if pid_m * BLOCK_M < tree_len:
        prefix_len = tl.load(prefix_lens_ptr + req).to(tl.int32)
        row0 = tl.load(tree_start_loc_ptr + req).to(tl.int64)
        mask_row0 = tl.load(mask_start_loc_ptr + req).to(tl.int64)     # < 0: no mask, causal
        slot_row_ptr = req_to_token_ptr + tl.load(req_pool_indices_ptr + req).to(tl.int64) * stride_req
        kv_head = (head // GROUP).to(tl.int64)

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)      # node ids of this block
        has_mask = (offs_m * 0 + mask_row0) >= 0
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        mask_d = offs_d < HEAD_DIM
        rows_m = (row0 + offs_m)[:, None]
        q_mask = (offs_m < tree_len)[:, None] & mask_d[None, :]
        q = tl.load(q_ptr + rows_m * stride_qt + head * stride_qh + offs_d[None, :],
                    mask=q_mask, other=0.0)
        if USE_WINDOW:
            q_pos = tl.load(positions_ptr + row0 + offs_m, mask=offs_m < tree_len, other=0)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

        # ---- phase A: the cached prefix, gathered from the pool (all visible)
        for start_n in range(0, prefix_len, BLOCK_N):
            k_idx = start_n + offs_n
            in_prefix = k_idx < prefix_len
            slots = tl.load(slot_row_ptr + k_idx, mask=in_prefix, other=0).to(tl.int64)
            kv_mask = in_prefix[:, None] & mask_d[None, :]
            k = tl.load(k_cache_ptr + slots[:, None] * stride_ks + kv_head * stride_kch
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_cache_ptr + slots[:, None] * stride_vs + kv_head * stride_vch
                        + offs_d[None, :], mask=kv_mask, other=0.0)
            visible = (offs_m < tree_len)[:, None] & in_prefix[None, :]
            if USE_WINDOW:
                visible = visible & (q_pos[:, None] - k_idx[None, :] < sliding_window)
            acc, l_i, m_i = _online_softmax(acc, l_i, m_i, _dot(q, tl.trans(k), IS_FP32), v,
                                            visible, qk_scale, IS_FP32)

        # ---- phase B: the tree nodes, from k/v, under the tree mask
        for start_n in range(0, tree_len, BLOCK_N):
            k_idx = start_n + offs_n
            in_tree = k_idx < tree_len
            rows_n = (row0 + k_idx)[:, None]
            kv_mask = in_tree[:, None] & mask_d[None, :]
            k = tl.load(k_ptr + rows_n * stride_kt + kv_head * stride_kh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + rows_n * stride_vt + kv_head * stride_vh + offs_d[None, :],
                        mask=kv_mask, other=0.0)
            pair = (offs_m < tree_len)[:, None] & in_tree[None, :]
            bits = tl.load(mask_ptr + mask_row0 + offs_m[:, None] * tree_len + k_idx[None, :],
                           mask=pair & has_mask[:, None], other=0)
            causal = k_idx[None, :] <= offs_m[:, None]                   # a row without a tree
            visible = pair & tl.where(has_mask[:, None], bits != 0, causal)
            if USE_WINDOW:
                k_pos = tl.load(positions_ptr + row0 + k_idx, mask=in_tree, other=0)
                visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
            acc, l_i, m_i = _online_softmax(acc, l_i, m_i, _dot(q, tl.trans(k), IS_FP32), v,
                                            visible, qk_scale, IS_FP32)

        l_safe = tl.where(l_i == 0.0, 1.0, l_i)
        out = (acc / l_safe[:, None]).to(o_ptr.dtype.element_ty)
        tl.store(o_ptr + rows_m * stride_ot + head * stride_oh + offs_d[None, :], out, mask=q_mask)


# ----------------------------------------------------------------------------- launcher


def _check_inputs(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                  tree_lens, tree_start_loc, tree_mask, mask_start_loc) -> tuple[int, int, int]:
    """Shapes, dtypes and strides of every input; returns (Hq, Hk, D). float64 passes
    (the reference's own accuracy check); an fp8 pool does not (no dequantization here)."""
    if q.dtype != torch.float64:
        check_kv_pool(q, k_cache, v_cache, req_to_token)
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"k_cache/v_cache must have q's dtype {q.dtype}, got {k_cache.dtype}")
    num_q_heads, num_kv_heads, head_dim = q.shape[1], k_cache.shape[1], k_cache.shape[2]
    want = (q.shape[0], num_kv_heads, head_dim)
    for name, t in (("k", k), ("v", v)):
        if t.dim() != 3 or tuple(t.shape) != want:
            raise ValueError(f"{name} must be [T, Hk, D] = {list(want)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.stride(-1) != 1:
            raise ValueError(f"{name} must be {q.dtype} and contiguous in its last dim")
    batch = req_pool_indices.shape[0] if req_pool_indices.dim() == 1 else -1
    check_batch_vectors(batch, req_pool_indices=req_pool_indices, prefix_lens=prefix_lens,
                        tree_lens=tree_lens, tree_start_loc=tree_start_loc,
                        mask_start_loc=mask_start_loc)
    if tree_mask.dim() != 1 or tree_mask.dtype not in (torch.bool, torch.uint8, torch.int8):
        raise ValueError(f"tree_mask must be a 1-D bool/uint8 tensor (every request's "
                         f"[n, n] rows, flattened), got {tree_mask.dtype} {tuple(tree_mask.shape)}")
    if not tree_mask.is_contiguous():
        raise ValueError("tree_mask must be contiguous")
    return num_q_heads, num_kv_heads, head_dim


def tree_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                   v_cache: torch.Tensor, req_to_token: torch.Tensor,
                   req_pool_indices: torch.Tensor, prefix_lens: torch.Tensor,
                   tree_lens: torch.Tensor, tree_start_loc: torch.Tensor, tree_mask: torch.Tensor,
                   mask_start_loc: torch.Tensor, max_tree_len: int, sm_scale: float,
                   positions: torch.Tensor | None = None, sliding_window: int = -1) -> torch.Tensor:
    """Attention of each request's draft-tree nodes over its cached prefix and its tree
    ancestors (module docstring). ``max_tree_len`` bounds ``tree_lens`` (grid, no sync);
    ``positions`` [T] (the nodes' rotary positions) are needed with a ``sliding_window``."""
    num_q_heads, num_kv_heads, head_dim = _check_inputs(
        q, k, v, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, tree_lens,
        tree_start_loc, tree_mask, mask_start_loc)
    use_window = _check_window(q, positions, sliding_window)
    if max_tree_len < 1:
        raise ValueError(f"max_tree_len must be >= 1, got {max_tree_len}")
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if q.shape[0] == 0:
        return o
    padded_d = block_d(head_dim)
    block_m = 16 if max_tree_len <= 16 else 32       # trees are small: few wasted rows
    block_n = 64 if padded_d <= 128 else 32
    num_m_blocks = triton.cdiv(max_tree_len, block_m)
    mask = tree_mask.view(torch.uint8) if tree_mask.dtype == torch.bool else tree_mask
    _tree_attention_kernel[(num_q_heads, num_m_blocks, req_pool_indices.shape[0])](
        q, k, v, k_cache, v_cache, o, mask, req_to_token,
        req_pool_indices, prefix_lens, tree_lens, tree_start_loc, mask_start_loc,
        positions if use_window else tree_lens, sm_scale * LOG2E, int(sliding_window), num_m_blocks,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        o.stride(0), o.stride(1), req_to_token.stride(0),
        GROUP=num_q_heads // num_kv_heads, HEAD_DIM=head_dim, BLOCK_D=padded_d,
        BLOCK_M=block_m, BLOCK_N=block_n, IS_FP32=q.dtype == torch.float32, USE_WINDOW=use_window,
        num_warps=4, num_stages=2,
    )
    return o


def _check_window(q: torch.Tensor, positions: torch.Tensor | None, sliding_window: int) -> bool:
    """Whether a sliding window applies; it needs the nodes' positions [T]."""
    if sliding_window is None or sliding_window <= 0:
        return False
    if positions is None or positions.dim() != 1 or positions.shape[0] != q.shape[0]:
        raise ValueError(f"sliding_window {sliding_window} needs positions [T={q.shape[0]}], got "
                         f"{None if positions is None else tuple(positions.shape)}")
    return True


def reference(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens, tree_lens,
              tree_start_loc, tree_mask, mask_start_loc, max_tree_len, sm_scale,
              positions=None, sliding_window=-1) -> torch.Tensor:
    """Same signature and math in plain PyTorch: per request, masked softmax attention
    over [prefix keys from the pool; node keys from k/v] in fp32 (fp64 for fp64)."""
    _check_inputs(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices, prefix_lens,
                  tree_lens, tree_start_loc, tree_mask, mask_start_loc)
    use_window = _check_window(q, positions, sliding_window)
    cdt = torch.float64 if q.dtype == torch.float64 else torch.float32
    o = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    group = q.shape[1] // k.shape[1]
    for b in range(req_pool_indices.shape[0]):
        prefix_len, n = int(prefix_lens[b]), int(tree_lens[b])
        if n == 0:
            continue
        rows = slice(int(tree_start_loc[b]), int(tree_start_loc[b]) + n)
        slots = req_to_token[int(req_pool_indices[b]), :prefix_len].long()
        keys = torch.cat([k_cache[slots], k[rows]]).to(cdt).repeat_interleave(group, dim=1)
        values = torch.cat([v_cache[slots], v[rows]]).to(cdt).repeat_interleave(group, dim=1)
        m0 = int(mask_start_loc[b])
        if m0 < 0:  # no tree: the causal triangle
            tree = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
        else:
            tree = tree_mask[m0: m0 + n * n].view(n, n).bool()
        visible = torch.cat([torch.ones(n, prefix_len, dtype=torch.bool, device=q.device), tree], 1)
        if use_window:
            q_pos = positions[rows].long()
            k_pos = torch.cat([torch.arange(prefix_len, device=q.device), q_pos])
            visible = visible & (q_pos[:, None] - k_pos[None, :] < sliding_window)
        scores = torch.einsum("qhd,khd->hqk", q[rows].to(cdt), keys) * sm_scale
        probs = torch.softmax(scores.masked_fill(~visible[None], float("-inf")), dim=-1)
        o[rows] = torch.einsum("hqk,khd->qhd", probs.nan_to_num(0.0), values).to(q.dtype)
    return o


tree_attention_reference = reference  # the op table's name (triton_kernels/__init__.py)


def flops_bytes(prefix_lens: list[int], tree_lens: list[int], num_q_heads: int, num_kv_heads: int,
                head_dim: int, elem_bytes: int = 2) -> tuple[float, float]:
    """FLOPs of the visible pairs (QK^T and PV; a chain's, the most a tree of n nodes
    has) and the bytes of one read of every key,
    value, query and output (the memory-bound roofline term)."""
    pairs = sum(n * p + n * (n + 1) / 2 for p, n in zip(prefix_lens, tree_lens))
    keys = sum(p + n for p, n in zip(prefix_lens, tree_lens))
    nbytes = elem_bytes * head_dim * (2 * keys * num_kv_heads + 2 * sum(tree_lens) * num_q_heads)
    return 4.0 * num_q_heads * head_dim * pairs, float(nbytes)
