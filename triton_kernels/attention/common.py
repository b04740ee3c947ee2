"""Input checks and small Triton helpers shared by extend and decode attention."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2E = 1.4426950408889634


def check_kv_pool(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  req_to_token: torch.Tensor) -> tuple[int, int, int]:
    """Validate q[*, Hq, D] against the pool; return (Hq, Hk, D)."""
    if q.dim() != 3:
        raise ValueError(f"q must be [tokens, Hq, D], got shape {tuple(q.shape)}")
    if k_cache.dim() != 3 or v_cache.shape != k_cache.shape:
        raise ValueError(f"k_cache/v_cache must both be [num_slots, Hk, D], got "
                         f"{tuple(k_cache.shape)} and {tuple(v_cache.shape)}")
    cache_ok = k_cache.dtype in (q.dtype, torch.float8_e4m3fn) and v_cache.dtype == k_cache.dtype
    if q.dtype not in ATTENTION_DTYPES or not cache_ok:
        raise ValueError(f"q, k_cache, v_cache must share fp16/bf16/fp32 (or the pool be "
                         f"float8_e4m3fn), got {q.dtype}, {k_cache.dtype}, {v_cache.dtype}")
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[1]
    if k_cache.shape[2] != head_dim:
        raise ValueError(f"k_cache head_dim {k_cache.shape[2]} != q head_dim {head_dim}")
    if head_dim > 256 or head_dim < 1:
        raise ValueError(f"head_dim {head_dim} unsupported (1..256)")
    if num_q_heads % num_kv_heads != 0:
        raise ValueError(f"q heads {num_q_heads} not a multiple of kv heads {num_kv_heads}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim")
    if req_to_token.dim() != 2 or req_to_token.dtype != torch.int32:
        raise ValueError(f"req_to_token must be a 2-D int32 tensor, got "
                         f"{req_to_token.dtype} {tuple(req_to_token.shape)}")
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token must be contiguous in its last dim")
    return num_q_heads, num_kv_heads, head_dim


def check_batch_vectors(batch: int, **vectors: torch.Tensor) -> None:
    """Each per-request vector must be 1-D of length `batch` and integer."""
    if batch == 0:
        raise ValueError("empty batch: attention needs at least one request")
    for name, t in vectors.items():
        if t.dim() != 1 or t.shape[0] != batch:
            raise ValueError(f"{name} must be [{batch}], got shape {tuple(t.shape)}")
        if t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be int32 or int64, got {t.dtype}")


@triton.jit
def soft_cap(s, logit_cap):
    """cap * tanh(s / cap), with tanh written through exp (portable)."""
    y = s / logit_cap
    return logit_cap * (1.0 - 2.0 / (tl.exp(2.0 * y) + 1.0))


def block_d(head_dim: int) -> int:
    """Head dim padded to a power of two (>= 16 for tl.dot)."""
    return max(16, triton.next_power_of_2(head_dim))
