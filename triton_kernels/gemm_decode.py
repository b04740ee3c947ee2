"""Decode linear (M <= 64 tokens): the weight stream, ``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias)``.

At decode a linear does at most 64 FLOPs per weight byte, far under the ~260
an H100/H200 needs to be compute-bound: the time to beat is
``N*K*2 bytes / bandwidth``. So the kernel here is built to keep every SM
streaming weight rows, not to reuse tiles:

* one program per ``[BLOCK_M, BLOCK_N]`` output tile and K slice, the tile thin
  in M and narrow in N, so that hundreds of programs stream disjoint weight
  rows with several K tiles in flight (``num_stages``);
* when N alone gives too few programs, K is split (``SPLIT_K``) and each slice
  writes fp32 partial sums that ``_splitk_reduce_kernel`` adds up
  (deterministic, no atomics);
* ``SWAP_AB``: the MMA computes ``W x^T``. Hopper's wgmma needs 64 rows on one
  side, which 1-16 tokens cannot fill but weight rows can (cuBLAS's layout
  for these shapes);
* ``USE_DOT=False`` multiplies on the CUDA cores (1-4 rows, GEMV style);
* ``STAGGER_K``: neighbouring programs start their K loop at different tiles.

``decode_config`` picks the recipe from triton_kernels/gemm_tables.py: the
warp-specialised kernel (gemm_ws.py) where its table has the shape and the
device is Hopper, else a tuned stream tile, else one by shape class. Decode
launches use programmatic dependent launch (pdl.py). Entry point:
``gemm.linear``; the reference is ``gemm.linear_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.gemm_tables import (
    DECODE_TABLE, DECODE_TUNED, DECODE_WS, WS_MAX_PAD_ROWS, WS_TILE_ROWS, GemmConfig,
)
from triton_kernels.pdl import pdl_wait
from triton_kernels.runtime import dot_precision, is_hopper, num_sms


# M is not specialised, so one compiled variant serves every decode batch size.
@triton.jit(do_not_specialize=["M"])
def _linear_stream_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr = False, STAGGER_K: tl.constexpr = 0, USE_PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    # Weight rows past N wrap around (modulo) so weight loads need no N mask;
    # their results are dropped by the masked store. Activation rows past M
    # are masked instead: at decode M is often 1..4 inside a 16-row tile, and
    # wrapped rows would make the tile re-read one row 16 times (measured
    # 10-35% slower at M == 1 than at M == 4 on the same weights).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    # This program's K slice, in whole BLOCK_K tiles.
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_tile_begin = pid_k * tiles_per_split
    k_tile_end = tl.minimum(k_tile_begin + tiles_per_split, k_tiles)
    k_begin = k_tile_begin * BLOCK_K
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_ptrs = x_rows + (k_begin + offs_k)[None, :] * stride_xk
    w_ptrs = w_rows + (k_begin + offs_k)[None, :] * stride_wk
    if USE_PDL:
        pdl_wait()
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.maximum(k_tile_end - k_tile_begin, 1)
    shift = (pid_n * STAGGER_K) % num_k
    for k_tile in range(k_tile_begin, k_tile_end):
        if STAGGER_K > 0:  # neighbouring programs start at different K offsets
            k_tile = k_tile_begin + (k_tile - k_tile_begin + shift) % num_k
            x_ptrs = x_rows + (k_tile * BLOCK_K + offs_k)[None, :] * stride_xk
            w_ptrs = w_rows + (k_tile * BLOCK_K + offs_k)[None, :] * stride_wk
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_mask = (k_tile * BLOCK_K + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        if SWAP_AB:  # y^T = W x^T: weight rows on the MMA's long side, tokens on its short one
            acc = tl.dot(w, tl.trans(x), acc, input_precision=INPUT_PRECISION)
        elif USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:  # GEMV-style: products on the CUDA cores, for M of 1..4 rows
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if SWAP_AB:
        acc = tl.trans(acc)
    rows = offs_m
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_ptrs = part_ptr + (pid_k * M + rows.to(tl.int64))[:, None] * N + cols[None, :]
        tl.store(part_ptrs, acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, y_ptr, M, N, stride_ym, stride_yn,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr = False):
    """y[m, n] = sum_s part[s, m, n] (+ bias[n]), partials in fp32."""
    if USE_PDL:
        pdl_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(part_ptr + split * M * N + offs, mask=mask, other=0.0)
    rows = offs // N
    cols = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_ym + cols * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- configs


def _ws_config(M: int, N: int, K: int, pdl: bool) -> GemmConfig | None:
    """The warp-specialised entry for this batch: the smallest listed tile that
    holds M rows with at most WS_MAX_PAD_ROWS zero-filled ones (None if none)."""
    for rows in WS_TILE_ROWS:
        tile = DECODE_WS.get((N, K, rows))
        if tile is not None and 0 <= rows - M <= WS_MAX_PAD_ROWS:
            return GemmConfig("ws", rows, tile.block_n, tile.block_k, num_warps=tile.num_warps,
                              num_stages=tile.num_stages, swap_ab=tile.swap_ab,
                              pdl=tile.pdl and pdl, stream_k=tile.stream_k)
    return None


def decode_shape_class(N: int, K: int) -> str:
    """DECODE_TABLE's class of a weight: "deep" (K >= 2N), else "narrow", "mid", "wide" by N."""
    if K >= 2 * N:
        return "deep"
    return "narrow" if N <= 4096 else "mid" if N <= 8192 else "wide"


def _decode_split_k(num_n_tiles: int, k_tiles: int, sms: int) -> int:
    """Split K only when N alone leaves most SMs idle (e.g. tensor-parallel
    shards): the smallest split giving one program per SM, >= 8 K tiles each."""
    split_k = 1
    if num_n_tiles * 2 >= sms:
        return split_k
    while num_n_tiles * split_k < sms and k_tiles // (split_k * 2) >= 8 and split_k < 16:
        split_k *= 2
    return split_k


def decode_config(M: int, N: int, K: int, device: torch.device, ws_ok: bool,
                  gemm_ws: bool = True, pdl: bool = True) -> GemmConfig:
    """The recipe for a 16-bit decode linear (M <= 64) on a CUDA device. ``ws_ok``:
    the tensors suit the warp-specialised kernel (TMA-aligned); ``gemm_ws=False``
    never takes it; ``pdl=False`` launches without PDL."""
    bm = 16 if M <= 16 else 32 if M <= 32 else 64
    ws = _ws_config(M, N, K, pdl) if gemm_ws and ws_ok and is_hopper(device) else None
    if ws is not None:
        return ws
    tile = DECODE_TUNED.get((N, K, bm)) or DECODE_TABLE[(bm, decode_shape_class(N, K))]
    split_k = tile.split_k
    if split_k == 1:
        split_k = _decode_split_k(triton.cdiv(N, tile.block_n), triton.cdiv(K, tile.block_k),
                                  num_sms(device))
    return GemmConfig("stream", bm, tile.block_n, tile.block_k, split_k=split_k,
                      num_warps=tile.num_warps, num_stages=tile.num_stages,
                      swap_ab=tile.swap_ab, pdl=tile.pdl and pdl, stagger_k=tile.stagger_k)


# ----------------------------------------------------------------------------- launcher


def launch_stream(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  y: torch.Tensor, config: GemmConfig, pdl: dict) -> None:
    """Run a "stream" config on 2-D x[M, K] into y[M, N]; ``pdl``: the launch keywords."""
    M, K = x.shape
    N = weight.shape[0]
    precision = dot_precision(x.dtype)
    bias_arg = bias if bias is not None else y
    split_k = max(1, min(config.split_k, triton.cdiv(K, config.block_k)))
    part = (torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
            if split_k > 1 else y)
    grid = (triton.cdiv(N, config.block_n), triton.cdiv(M, config.block_m), split_k)
    _linear_stream_kernel[grid](
        x, weight, bias_arg, y, part, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split_k, EVEN_K=K % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=config.use_dot, INPUT_PRECISION=precision, SWAP_AB=config.swap_ab and config.use_dot,
        STAGGER_K=config.stagger_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
            part, bias_arg, y, M, N, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block, **pdl)
