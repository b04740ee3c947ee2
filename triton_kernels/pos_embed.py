"""A learned position table resampled to each image and added to its patches (Qwen3-VL).

Qwen3-VL's vision tower learns a ``side x side`` table of position embeddings
and bilinearly resamples it to every image's patch grid. Which rows and which
weights each patch takes depends only on the grid, so the host computes them
once per encode call (``models/vision.py``: ``interp_indices``,
``interp_weights``); this kernel does the per-patch work on the device::

    blend[n] = sum_k weights[n, k] * table[indices[n, k]]      (fp32, rounded to x's dtype)
    y[n]     = x[n] + blend[n]                                  (fp32 add, one rounding)

The two roundings are HF's: the blended embedding is a tensor of the model
dtype that is then added to the patch embeddings.

Shapes: ``x[N, D]``, ``table[P, D]`` (rows contiguous), ``indices[N, K]``
int32/int64 (K taps, 4 for bilinear), ``weights[N, K]`` fp32, ``y[N, D]`` in
x's dtype. Dtypes bf16/fp16/fp32 (x and table alike). Roofline: a gather,
memory-bound: ``(K + 2) * N * D`` elements moved at most (table rows are
shared by neighbouring patches, so L2 serves most of the K reads). One
program handles ``BLOCK_D`` columns of one patch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _add_interpolated_kernel(x_ptr, table_ptr, idx_ptr, w_ptr, y_ptr, D, P, stride_xn, stride_tp,
                             stride_in, stride_wn, stride_yn, K: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = cols < D
    blend = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for k in tl.static_range(K):
        row = tl.load(idx_ptr + n * stride_in + k).to(tl.int64)
        weight = tl.load(w_ptr + n * stride_wn + k).to(tl.float32)
        rows = row + tl.zeros((BLOCK_D,), dtype=tl.int64)          # the row id, per column
        valid = (rows >= 0) & (rows < P)
        taps = tl.load(table_ptr + rows * stride_tp + cols, mask=mask & valid, other=0.0)
        blend += weight * taps.to(tl.float32)
    x = tl.load(x_ptr + n * stride_xn + cols, mask=mask, other=0.0).to(tl.float32)
    blend = blend.to(y_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + n * stride_yn + cols, (x + blend).to(y_ptr.dtype.element_ty), mask=mask)


def _check(x: torch.Tensor, table: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
    for name, t in (("x", x), ("table", table), ("indices", indices), ("weights", weights)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(getattr(t, 'shape', ()))}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    if x.dtype not in _DTYPES or table.dtype != x.dtype:
        raise ValueError(f"x and table must share one of bf16/fp16/fp32, got {x.dtype} and {table.dtype}")
    if x.shape[0] == 0:
        raise ValueError("x has no rows: empty batch")
    if table.shape[1] != x.shape[1] or table.shape[0] == 0:
        raise ValueError(f"table shape {tuple(table.shape)} does not hold rows of width {x.shape[1]}")
    if indices.shape != weights.shape or indices.shape[0] != x.shape[0]:
        raise ValueError(f"indices {tuple(indices.shape)} and weights {tuple(weights.shape)} must both be "
                         f"[{x.shape[0]}, K]")
    if indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"indices dtype {indices.dtype} must be int32 or int64")
    if weights.dtype != torch.float32:
        raise ValueError(f"weights dtype {weights.dtype} must be float32")
    if x.stride(1) != 1 or table.stride(1) != 1:
        raise ValueError("x and table must be contiguous in their last dim")


def add_interpolated_pos_embed(x: torch.Tensor, table: torch.Tensor, indices: torch.Tensor,
                               weights: torch.Tensor) -> torch.Tensor:
    """y[N, D] = x + sum_k weights[:, k] * table[indices[:, k]] (blend rounded to x's dtype first).
    Out-of-range indices read zero rows (no device-side error: that needs a host sync)."""
    _check(x, table, indices, weights)
    N, D = x.shape
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    block = min(1024, triton.next_power_of_2(D))
    grid = (N, triton.cdiv(D, block))
    _add_interpolated_kernel[grid](x, table, indices, weights, y, D, table.shape[0], x.stride(0),
                                   table.stride(0), indices.stride(0), weights.stride(0), y.stride(0),
                                   K=indices.shape[1], BLOCK_D=block, num_warps=max(1, min(8, block // 256)))
    return y


def add_interpolated_pos_embed_reference(x: torch.Tensor, table: torch.Tensor, indices: torch.Tensor,
                                         weights: torch.Tensor) -> torch.Tensor:
    _check(x, table, indices, weights)
    rows = indices.long()
    valid = (rows >= 0) & (rows < table.shape[0])
    taps = table[torch.where(valid, rows, torch.zeros_like(rows))].float()      # [N, K, D]
    blend = (taps * (weights * valid)[..., None]).sum(1).to(x.dtype)
    return (x.float() + blend.float()).to(x.dtype)


def flops_bytes(num_rows: int, hidden: int, taps: int = 4, dtype: torch.dtype = torch.bfloat16
                ) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): read x and K table rows, write y (index/weight bytes aside)."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * (taps + 1) * num_rows * hidden, size * (taps + 2) * num_rows * hidden
