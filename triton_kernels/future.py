"""Future token ids: the next step's inputs that the device knows before the host does.

With overlap scheduling the host plans step N+1 while the GPU still runs step
N, so a request decoding in both steps feeds step N+1 a token nobody on the
host has seen yet. The scheduler writes the placeholder ``-row`` (the
request's ``req_to_token`` row, always >= 1, so a placeholder is never a token
id) and two tiny kernels close the loop on the device:

* ``store_future_tokens(future[R], rows[B], tokens[B])``: after sampling
  step N, ``future[rows[b]] = tokens[b]`` (the sample stage);
* ``resolve_future_tokens(input_ids[T], future[R])``: before step N+1,
  ``input_ids[t] = future[-input_ids[t]]`` where ``input_ids[t] < 0``, in
  place (the forward stage).

Both run on the same stream as the model, so stream order alone makes step
N+1 read what step N wrote; no host synchronization sits between them. A
row holds at most one future token: the scheduler keeps at most one batch
ahead. Memory-trivial; the cost is one launch each (int64; sampled tokens may be int32).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _store_future_kernel(future_ptr, rows_ptr, tokens_ptr, num, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num
    rows = tl.load(rows_ptr + offs, mask=mask, other=0).to(tl.int64)
    tokens = tl.load(tokens_ptr + offs, mask=mask, other=0).to(tl.int64)
    tl.store(future_ptr + rows, tokens, mask=mask)


@triton.jit
def _resolve_future_kernel(ids_ptr, future_ptr, num, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < num
    ids = tl.load(ids_ptr + offs, mask=mask, other=0)
    is_future = ids < 0
    resolved = tl.load(future_ptr + tl.where(is_future, -ids, 0), mask=mask & is_future, other=0)
    tl.store(ids_ptr + offs, tl.where(is_future, resolved, ids), mask=mask & is_future)


def _check(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.int64,)) -> None:
    if t.dim() != 1 or t.dtype not in dtypes or t.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous 1-D {dtypes} tensor, got {t.dtype} {tuple(t.shape)}")


def store_future_tokens(future: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """future[rows[b]] = tokens[b] (in place)."""
    _check("future", future)
    _check("rows", rows)
    _check("tokens", tokens, (torch.int32, torch.int64))
    if rows.shape != tokens.shape:
        raise ValueError(f"rows {tuple(rows.shape)} and tokens {tuple(tokens.shape)} differ")
    num = rows.numel()
    if num:
        _store_future_kernel[(triton.cdiv(num, BLOCK),)](future, rows, tokens, num, BLOCK=BLOCK, num_warps=4)


def resolve_future_tokens(input_ids: torch.Tensor, future: torch.Tensor) -> None:
    """input_ids[t] = future[-input_ids[t]] wherever input_ids[t] < 0 (in place)."""
    _check("input_ids", input_ids)
    _check("future", future)
    num = input_ids.numel()
    if num:
        _resolve_future_kernel[(triton.cdiv(num, BLOCK),)](input_ids, future, num, BLOCK=BLOCK, num_warps=4)


def store_future_tokens_reference(future: torch.Tensor, rows: torch.Tensor, tokens: torch.Tensor) -> None:
    """Reference of `store_future_tokens`."""
    future[rows] = tokens.to(future.dtype)


def resolve_future_tokens_reference(input_ids: torch.Tensor, future: torch.Tensor) -> None:
    """Reference of `resolve_future_tokens`."""
    is_future = input_ids < 0
    input_ids.copy_(torch.where(is_future, future[(-input_ids).clamp(min=0)], input_ids))
