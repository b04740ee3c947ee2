"""Rows written into a tensor at given indices, in place: the vision embeddings of a VL prompt.

``scatter_rows(dst[T, H], rows[n], src[n, H], accumulate=False) -> None``::

    dst[rows[i]]  = src[i]          (accumulate=False: the image/video pad rows' embeddings)
    dst[rows[i]] += src[i]          (accumulate=True: Qwen3-VL's deepstack features)

The add is done in fp32 and rounded once to dst's dtype (torch's
``index_add_`` on bf16 rounds the same sum). ``src`` may have another float
dtype than ``dst``; it is converted at the store. Rows must be distinct when
accumulating (each is one program: no atomics). Dtypes bf16/fp16/fp32; rows
int32/int64, not range-checked on the device (that needs a host sync).
Roofline: a copy, ``2*n*H`` elements moved (``3*n*H`` accumulating); one
program handles ``BLOCK_H`` columns of one row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _scatter_rows_kernel(dst_ptr, rows_ptr, src_ptr, H, stride_dst, stride_src,
                         ACCUMULATE: tl.constexpr, BLOCK_H: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = cols < H
    row = tl.load(rows_ptr + i).to(tl.int64)
    value = tl.load(src_ptr + i * stride_src + cols, mask=mask, other=0.0).to(tl.float32)
    if ACCUMULATE:
        value += tl.load(dst_ptr + row * stride_dst + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(dst_ptr + row * stride_dst + cols, value.to(dst_ptr.dtype.element_ty), mask=mask)


def _check(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor) -> None:
    if not isinstance(dst, torch.Tensor) or dst.dim() != 2 or not isinstance(src, torch.Tensor) or src.dim() != 2:
        raise ValueError(f"dst and src must be 2-D, got {tuple(getattr(dst, 'shape', ()))} and "
                         f"{tuple(getattr(src, 'shape', ()))}")
    if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype not in (torch.int32, torch.int64):
        raise ValueError("rows must be a 1-D int32/int64 tensor")
    if rows.shape[0] != src.shape[0] or src.shape[1] != dst.shape[1]:
        raise ValueError(f"src {tuple(src.shape)} must be [len(rows)={rows.shape[0]}, {dst.shape[1]}]")
    if dst.dtype not in _DTYPES or src.dtype not in _DTYPES:
        raise ValueError(f"dst {dst.dtype} and src {src.dtype} must be bf16, fp16 or fp32")
    if len({dst.device, rows.device, src.device}) != 1:
        raise ValueError(f"dst, rows and src must share a device, got {dst.device}, {rows.device}, {src.device}")
    if dst.stride(1) != 1 or src.stride(1) != 1:
        raise ValueError("dst and src must be contiguous in their last dim")


def scatter_rows(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor, accumulate: bool = False) -> None:
    """dst[rows] = src (or += src), in place."""
    _check(dst, rows, src)
    n, H = src.shape
    if n == 0:
        return
    block = min(2048, triton.next_power_of_2(H))
    _scatter_rows_kernel[(n, triton.cdiv(H, block))](dst, rows, src, H, dst.stride(0), src.stride(0),
                                                     ACCUMULATE=accumulate, BLOCK_H=block,
                                                     num_warps=max(1, min(8, block // 256)))


def scatter_rows_reference(dst: torch.Tensor, rows: torch.Tensor, src: torch.Tensor,
                           accumulate: bool = False) -> None:
    _check(dst, rows, src)
    index = rows.long()
    if accumulate:
        dst[index] = (dst[index].float() + src.float()).to(dst.dtype)
    else:
        dst[index] = src.to(dst.dtype)
