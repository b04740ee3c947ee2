"""Vision attention: non-causal attention over variable-length images, packed.

A vision tower sees every patch of every image (or video frame, or
Qwen2.5-VL window) in one packed tensor; ``cu_seqlens`` (``[S + 1]`` int32,
an exclusive cumsum of the segment lengths) says where each segment starts.
A patch attends to every patch of its own segment and to no other::

    for each segment s = [cu[s], cu[s+1]) and head h:
        o[s, h] = softmax(q[s, h] @ k[s, h]^T * sm_scale) @ v[s, h]

Shapes: ``q``, ``k``, ``v`` are ``[N, H, D]`` (N patches in all; views into a
fused qkv output are fine: only the last dim must be contiguous), ``o`` is a
new contiguous ``[N, H, D]``. Same number of heads for q, k and v (vision
towers have no GQA). fp16 / bf16 / fp32 in, the same dtype out; the
softmax runs online in fp32 in base 2 (FlashAttention-2's loop).

Grid: ``(query blocks of the longest segment, S, H)``. A program owns
``BLOCK_M`` query rows of one head of one segment and walks that segment's
keys in ``BLOCK_N`` blocks; programs whose block starts past their segment's
end do nothing. Only the last key block of a segment needs a mask.

FLOPs: ``4 * H * D * sum(len_s^2)``; compute-bound for any image of more
than a few hundred patches. The anchor is torch SDPA over the same segments
(``perf/bench_kernels.py``, family ``vision_attention``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _vision_attention_kernel(q_ptr, k_ptr, v_ptr, o_ptr, cu_ptr, sm_scale,
                             stride_qn, stride_qh, stride_kn, stride_kh, stride_vn, stride_vh,
                             stride_on, stride_oh,
                             HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2).to(tl.int64)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    seq_len = (tl.load(cu_ptr + seq + 1) - start).to(tl.int32)
    if pid_m * BLOCK_M < seq_len:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mask_m = offs_m < seq_len
        mask_d = offs_d < HEAD_DIM
        # q block [BLOCK_M, BLOCK_D], read once
        q_ptrs = q_ptr + (start + offs_m)[:, None] * stride_qn + head * stride_qh + offs_d[None, :]
        q = tl.load(q_ptrs, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        qk_scale = sm_scale * 1.4426950408889634          # exp(x) = exp2(x * log2 e)
        for n0 in range(0, seq_len, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            mask_n = offs_n < seq_len
            # k block, transposed [BLOCK_D, BLOCK_N]; v block [BLOCK_N, BLOCK_D]
            k_ptrs = k_ptr + (start + offs_n)[None, :] * stride_kn + head * stride_kh + offs_d[:, None]
            k = tl.load(k_ptrs, mask=mask_n[None, :] & mask_d[:, None], other=0.0)
            qk = tl.dot(q, k).to(tl.float32) * qk_scale
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            p = tl.exp2(qk - m_new[:, None])
            alpha = tl.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            v_ptrs = v_ptr + (start + offs_n)[:, None] * stride_vn + head * stride_vh + offs_d[None, :]
            v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v).to(tl.float32)
            m_i = m_new
        acc = acc / tl.where(mask_m, l_i, 1.0)[:, None]
        o_ptrs = o_ptr + (start + offs_m)[:, None] * stride_on + head * stride_oh + offs_d[None, :]
        tl.store(o_ptrs, acc.to(o_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
           max_seqlen: int) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [N, heads, head_dim], got {tuple(getattr(t, 'shape', ()))}")
        if t.shape != q.shape or t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} {tuple(t.shape)} {t.dtype} does not match q {tuple(q.shape)} {q.dtype}")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {t.stride(-1)})")
    if q.dtype not in _DTYPES:
        raise ValueError(f"q dtype {q.dtype} not supported")
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32 [S + 1], got {cu_seqlens.dtype} {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device}, q on {q.device}")
    if max_seqlen <= 0:
        raise ValueError(f"max_seqlen must be positive, got {max_seqlen}")


def vision_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                     max_seqlen: int, sm_scale: float) -> torch.Tensor:
    """o[N, H, D]: each segment of ``cu_seqlens`` attends to itself only (no causal mask).
    ``max_seqlen`` (a host int, >= the longest segment) sizes the grid."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    N, H, D = q.shape
    o = torch.empty((N, H, D), dtype=q.dtype, device=q.device)
    block_d = max(16, triton.next_power_of_2(D))
    block_m, block_n = (64, 64) if block_d <= 128 else (32, 32)
    grid = (triton.cdiv(max_seqlen, block_m), cu_seqlens.shape[0] - 1, H)
    _vision_attention_kernel[grid](
        q, k, v, o, cu_seqlens, float(sm_scale),
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        o.stride(0), o.stride(1),
        HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4, num_stages=2)
    return o


def vision_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               cu_seqlens: torch.Tensor, max_seqlen: int,
                               sm_scale: float) -> torch.Tensor:
    """Plain PyTorch, one segment at a time, softmax in fp32."""
    _check(q, k, v, cu_seqlens, max_seqlen)
    o = torch.empty_like(q, memory_format=torch.contiguous_format)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end <= start:
            continue
        qs, ks, vs = (t[start:end].float().transpose(0, 1) for t in (q, k, v))   # [H, L, D]
        weights = torch.softmax(qs @ ks.transpose(1, 2) * sm_scale, dim=-1)
        o[start:end] = (weights @ vs).transpose(0, 1).to(q.dtype)
    return o


def flops_bytes(seq_lens: list[int], num_heads: int, head_dim: int,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): two GEMMs per (q, k) pair; q, k, v read and o written once."""
    size = torch.empty((), dtype=dtype).element_size()
    pairs = sum(n * n for n in seq_lens)
    return 4 * num_heads * head_dim * pairs, 4 * size * sum(seq_lens) * num_heads * head_dim
