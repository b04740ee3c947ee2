"""Token embedding lookup with vocabulary sharding.

``y[t] = weight[ids[t] - vocab_start]`` when ``vocab_start <= ids[t] <
vocab_start + V_shard``, else a zero row. Under tensor parallelism each rank
holds rows ``[vocab_start, vocab_start + V_shard)`` of the table; the zero rows
of the other ranks make an all-reduce (sum) give the full embedding.

Shapes: ``ids[T]`` int32/int64, ``weight[V_shard, H]`` (bf16/fp16/fp32, rows
contiguous), ``y[T, H]`` in the weight's dtype. A pure copy: roofline is
``2*T*H`` elements moved; one program copies ``BLOCK_H`` columns of one row.
Ids are not range-checked against the full vocabulary on the device (that
needs a host sync); out-of-shard ids give zeros by design.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _embedding_kernel(ids_ptr, w_ptr, y_ptr, vocab_start, V, H, stride_wv, stride_yt,
                      BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    row = tl.load(ids_ptr + token).to(tl.int64) - vocab_start
    rows = row + tl.zeros((BLOCK_H,), dtype=tl.int64)       # the row id, per column
    in_shard = (rows >= 0) & (rows < V)
    mask = cols < H
    values = tl.load(w_ptr + rows * stride_wv + cols, mask=mask & in_shard, other=0.0)
    tl.store(y_ptr + token * stride_yt + cols, values, mask=mask)


def _check_embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int) -> None:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 1:
        raise ValueError(f"ids must be 1-D [T], got shape {tuple(getattr(ids, 'shape', ()))}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"ids dtype {ids.dtype} must be int32 or int64")
    if ids.shape[0] == 0:
        raise ValueError("ids is empty: empty batch")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] == 0:
        raise ValueError(f"weight must be a non-empty [V_shard, H] table, got {tuple(weight.shape)}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} not supported")
    if weight.stride(1) != 1:
        raise ValueError("weight rows must be contiguous")
    if ids.device != weight.device:
        raise ValueError(f"ids on {ids.device} but weight on {weight.device}")
    if vocab_start < 0:
        raise ValueError(f"vocab_start must be >= 0, got {vocab_start}")


def embedding(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    """y[T, H]: rows of this shard's table, zeros for ids of other shards."""
    _check_embedding(ids, weight, vocab_start)
    V, H = weight.shape
    T = ids.shape[0]
    y = torch.empty((T, H), dtype=weight.dtype, device=weight.device)
    block_h = min(4096, triton.next_power_of_2(H))
    grid = (T, triton.cdiv(H, block_h))
    _embedding_kernel[grid](ids, weight, y, vocab_start, V, H, weight.stride(0), y.stride(0),
                            BLOCK_H=block_h, num_warps=max(1, min(8, block_h // 512)))
    return y


def embedding_reference(ids: torch.Tensor, weight: torch.Tensor, vocab_start: int = 0) -> torch.Tensor:
    _check_embedding(ids, weight, vocab_start)
    rows = ids.long() - vocab_start
    in_shard = (rows >= 0) & (rows < weight.shape[0])
    y = weight[torch.where(in_shard, rows, torch.zeros_like(rows))]
    return y * in_shard[:, None].to(weight.dtype)


def flops_bytes(num_tokens: int, hidden: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): read one row and write one row per token."""
    size = torch.empty((), dtype=dtype).element_size()
    return 0, 2 * size * num_tokens * hidden
