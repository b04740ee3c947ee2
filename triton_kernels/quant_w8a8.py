"""8-bit weights and 8-bit activations: FP8 (e4m3) and INT8 GEMMs with the activation
quantisation fused into the kernel.

``y[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` where the weight is stored 8-bit with
fp32 scales and x (bf16/fp16/fp32) is quantised on the fly, per token:

=============  ============================  =====================================
scheme         weight, scale                 activation scale (dynamic)
=============  ============================  =====================================
channel fp8    W fp8e4m3 [N, K], ws [N]      xs[m] = max|x[m, :]| / 448
channel int8   W int8 [N, K], ws [N]         xs[m] = max|x[m, :]| / 127
block fp8      W fp8e4m3 [N, K],             xs[m, j] = max|x[m, j*bk:(j+1)*bk]| / 448
               ws [ceil(N/bn), ceil(K/bk)]   (per token and K group, DeepSeek-V3 style)
=============  ============================  =====================================

Quantising ``v = x / xs``: fp8 rounds to nearest even (saturating at 448); int8
rounds half up (``floor(v + 0.5)``) and clamps to [-128, 127]. Per-tensor
weight scales are per-channel scales that happen to be equal (the loader
expands them). The products ``xq @ Wq^T`` run on the 8-bit tensor cores (fp32
accumulation for fp8, int32 for int8) and the scales multiply the sum:

    channel:  y[m, n] = xs[m] * ws[n] * sum_k xq[m, k] Wq[n, k]
    block:    y[m, n] = sum_j xs[m, j] * ws[n // bn, j] * sum_{k in group j} xq[m, k] Wq[n, k]

Fusion: the channel kernel first walks K once over its x rows to find each
row's max, then runs the matmul quantising each x tile as it loads it; the
block kernel takes ``BLOCK_K = bk`` so each K step is one scale group and
quantises in registers. No quantised copy of x is ever written to memory.

Decode is weight-only (``act_quant=False``, the decode tiles of
``quant_tiles.py``): with 1-16 tokens the step is bound by the weight stream,
so 8-bit products buy nothing, while the channel kernel's max pass is a
serial walk over all of K before the first product, in every program. So at
decode the weight tile is converted to x's dtype in registers, the products
run on the 16-bit tensor cores and only the weight scales multiply the sum
(``y = (x @ Wq^T) * ws``, block: per K group). The weight bytes are the same;
x is not rounded to 8 bits, so the result is closer to the bf16 layer's.
With ``QuantTile.gemv`` (1-4 tokens) the products leave the tensor cores too:
``_w8a8_gemv_kernel`` converts each weight to fp32 where it was loaded and
adds ``w * x`` to a per-weight sum, so the dequantised tile never takes the
round trip through shared memory that ``tl.dot``'s operand layout costs
(quant_w4a16.py's GEMV kernel, same reasoning). It is taken when a launch
passes the tile; the default stays the tensor-core tile.

Prefill quantises x once (``prequant``, the prefill tiles): fused, every
output-column tile would requantise the same x tiles (N / block_n times) and
the channel kernel would walk K for the row maxima in every program. There
``quantize_rows`` writes the 8-bit x and its scales first (one program per row
and K group), and the GEMM loads 8-bit x tiles; same values, same result.
Above 64 rows (``QuantTile.tma``) that GEMM is ``_w8a8_tma_kernel``, gemm.py's
persistent TMA kernel with 8-bit operands; where the strides don't suit TMA
descriptors, the pointer kernels above.

Roofline: the weight stream is ``N*K`` bytes, half of bf16's, so batch-1
decode can approach 2x; prefill runs at the 8-bit tensor-core rate (2x bf16
on Hopper). FLOPs ``2*M*N*K``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.gemm import _grouped_tile, _operand_descriptors
from triton_kernels.quant_tiles import QuantTile, partials, reduce_partials, split_k, tile_for
from triton_kernels.runtime import dot_precision, ensure_tma_allocator, interpreting, num_sms

__all__ = ["FP8_MAX", "INT8_MAX", "flops_bytes", "fp8_block_linear", "fp8_block_linear_reference",
           "quantize_rows", "quantize_rows_reference", "w8a8_linear", "w8a8_linear_reference"]
FP8_MAX = 448.0          # largest finite float8_e4m3fn
INT8_MAX = 127.0
SCALE_EPS = 1e-10        # floor of a row's max, so an all-zero row gets a finite scale
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_WEIGHT_DTYPES = (torch.float8_e4m3fn, torch.int8)


@triton.jit
def round_to_fp8(v):
    """fp32 v in [-448, 448] -> the nearest e4m3 value (ties to even), still fp32.

    The cast below would round by itself on a GPU, but the Triton interpreter
    (3.9) drops the carry when rounding crosses a power of two (124.8 -> 64),
    so the rounding is done here in plain fp32 bit arithmetic and the cast only
    converts exact values. Normal range: keep 3 mantissa bits; below 2**-6
    (subnormals) round to a multiple of 2**-9 with the 1.5 * 2**23 trick.
    """
    bits = v.to(tl.int32, bitcast=True)
    lsb = (bits >> 20) & 1
    normal = ((bits + 0x7FFFF + lsb) & -1048576).to(tl.float32, bitcast=True)
    subnormal = ((v * 512.0 + 12582912.0) - 12582912.0) / 512.0
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def _quantize(x, scale, IS_INT8: tl.constexpr):
    """x [BM, BK] fp32, scale [BM, 1] -> 8-bit values of x / scale (see the module doc)."""
    v = x / scale
    if IS_INT8:
        v = tl.minimum(tl.maximum(tl.floor(v + 0.5), -128.0), 127.0)
        return v.to(tl.int8)
    else:
        v = tl.minimum(tl.maximum(v, -448.0), 448.0)
        return round_to_fp8(v).to(tl.float8e4nv)


@triton.jit
def _k_slice(K, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
    """[k_begin, k_end) of this program's K slice (axis 1 of the grid): whole BLOCK_K steps."""
    if SPLIT_K == 1:
        return 0, K
    else:
        steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)
        k_begin = tl.program_id(1) * steps * BLOCK_K
        return k_begin, tl.minimum(k_begin + steps * BLOCK_K, K)


@triton.jit
def _store_tile(out, offs_m, offs_n, mask_m, mask_n, b_ptr, y_ptr, part_ptr, M, N, stride_ym, stride_yn,
                HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
    """The fp32 tile: to y (+ bias), or, when K is split, to this slice's partial sums
    (quant_tiles.reduce_partials adds the slices and the bias)."""
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        rows = tl.program_id(1) * M + offs_m.to(tl.int64)
        tl.store(part_ptr + rows[:, None] * N + offs_n[None, :], out, mask=mask)


@triton.jit
def _quantize_rows_kernel(x_ptr, xq_ptr, xs_ptr, K, group, stride_xm, stride_qm, stride_sm,
                          IS_INT8: tl.constexpr, QMAX: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (row, g): columns [g * group, (g + 1) * group) of one row -> 8-bit values and
    their scale max|x| / QMAX (two walks over the group: its max, then the values)."""
    row = tl.program_id(0).to(tl.int64)
    begin = tl.program_id(1) * group
    end = tl.minimum(begin + group, K)
    offs = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for k0 in range(begin, end, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=k0 + offs < end, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, axis=0), 1e-10) / QMAX
    for k0 in range(begin, end, BLOCK_K):
        mask = k0 + offs < end
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(xq_ptr + row * stride_qm + k0 + offs, _quantize(x, scale, IS_INT8), mask=mask)
    tl.store(xs_ptr + row * stride_sm + tl.program_id(1), scale)


@triton.jit(do_not_specialize=["M"])
def _w8a8_channel_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, xs_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    IS_INT8: tl.constexpr, QMAX: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACT_QUANT: tl.constexpr = True, X_PREQUANT: tl.constexpr = False, INPUT_PRECISION: tl.constexpr = "ieee",
):
    """X_PREQUANT: x is already 8-bit (``quantize_rows``), its row scales at xs_ptr."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_begin, k_end = _k_slice(K, BLOCK_K, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    if ACT_QUANT and X_PREQUANT:
        x_scale = tl.load(xs_ptr + offs_m, mask=mask_m, other=1.0)[:, None]
    elif ACT_QUANT:
        # Pass 1: each row's max |x| -> its scale                           [BLOCK_M, 1]
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + offs_k
            x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & (kk < K)[None, :],
                        other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
        x_scale = (tl.maximum(amax, 1e-10) / QMAX)[:, None]
    # Pass 2: quantise each x tile as it loads, 8-bit products, exact integer / fp32 sums
    # (or, weight-only, the weight tile in x's dtype and 16-bit products).
    if ACT_QUANT and IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        if ACT_QUANT and X_PREQUANT:
            acc = tl.dot(x, tl.trans(w), acc, out_dtype=acc.dtype)
        elif ACT_QUANT:
            acc = tl.dot(_quantize(x.to(tl.float32), x_scale, IS_INT8), tl.trans(w), acc, out_dtype=acc.dtype)
        else:
            acc = tl.dot(x, tl.trans(w.to(x.dtype)), acc, input_precision=INPUT_PRECISION)
    w_scale = tl.load(ws_ptr + offs_n, mask=mask_n, other=0.0)
    out = acc.to(tl.float32) * w_scale[None, :]
    if ACT_QUANT:
        out = out * x_scale
    _store_tile(out, offs_m, offs_n, mask_m, mask_n, b_ptr, y_ptr, part_ptr, M, N, stride_ym, stride_yn,
                HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _fp8_block_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, xs_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn, stride_xsm,
    BLOCK_SIZE_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ACT_QUANT: tl.constexpr = True, X_PREQUANT: tl.constexpr = False, INPUT_PRECISION: tl.constexpr = "ieee",
):
    """BLOCK_K is the scale group along K; BLOCK_N divides BLOCK_SIZE_N or is a multiple.
    X_PREQUANT: x is already fp8 (``quantize_rows``), its [M, K groups] scales at xs_ptr."""
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_begin, k_end = _k_slice(K, BLOCK_K, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    s_rows = ws_ptr + (offs_n // BLOCK_SIZE_N) * stride_sn       # each column's scale row [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(k_begin // BLOCK_K, tl.cdiv(k_end, BLOCK_K)):
        kk = j * BLOCK_K + offs_k
        mask_k = kk < K
        x = tl.load(x_rows + kk[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_rows + kk[None, :] * stride_wk, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        w_scale = tl.load(s_rows + j * stride_sk, mask=mask_n, other=0.0)            # [BLOCK_N]
        if ACT_QUANT and X_PREQUANT:
            x_scale = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xsm + j, mask=mask_m, other=1.0)[:, None]
            acc += tl.dot(x, tl.trans(w)) * x_scale * w_scale[None, :]
        elif ACT_QUANT:
            x32 = x.to(tl.float32)
            x_scale = (tl.maximum(tl.max(tl.abs(x32), axis=1), 1e-10) / 448.0)[:, None]   # [BLOCK_M, 1]
            partial = tl.dot(_quantize(x32, x_scale, False), tl.trans(w))
            acc += partial * x_scale * w_scale[None, :]
        else:
            partial = tl.dot(x, tl.trans(w.to(x.dtype)), input_precision=INPUT_PRECISION)
            acc += partial * w_scale[None, :]
    _store_tile(acc, offs_m, offs_n, mask_m, mask_n, b_ptr, y_ptr, part_ptr, M, N, stride_ym, stride_yn,
                HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _w8a8_gemv_kernel(
    x_ptr, w_ptr, ws_ptr, b_ptr, y_ptr, part_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn,
    BLOCK_SCALES: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Weight-only products on the CUDA cores for 1-4 tokens (``QuantTile.gemv``), one row of
    x per program (its neighbours in the grid are the other rows of the same column tile).
    Each thread keeps fp32 sums for its own weights, ``acc[n, k] += w[n, k] * x[k]``, and the
    rows are summed once at the end, so nothing moves between threads inside the K loop;
    the next K step's weights are loaded before this step's arithmetic. Channel scales
    multiply the sums at the end; block scales (BLOCK_SCALES, BLOCK_K = the scale block)
    each step's products."""
    row = tl.program_id(0) % M
    pid_n = tl.program_id(0) // M
    k_begin, k_end = _k_slice(K, BLOCK_K, SPLIT_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_n = offs_n < N
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    w = tl.load(w_rows + (k_begin + offs_k)[None, :] * stride_wk,
                mask=mask_n[:, None] & (k_begin + offs_k < k_end)[None, :], other=0.0)    # [BLOCK_N, BLOCK_K]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + offs_k
        next_kk = kk + BLOCK_K
        next_w = tl.load(w_rows + next_kk[None, :] * stride_wk,
                         mask=mask_n[:, None] & (next_kk < k_end)[None, :], other=0.0)
        x = tl.load(x_row + kk * stride_xk, mask=kk < K, other=0.0).to(tl.float32)           # [BLOCK_K]
        if BLOCK_SCALES:
            scale = tl.load(ws_ptr + (offs_n // BLOCK_SIZE_N) * stride_sn + (k0 // BLOCK_K) * stride_sk,
                            mask=mask_n, other=0.0)
            acc += (w.to(tl.float32) * x[None, :]) * scale[:, None]
        else:
            acc += w.to(tl.float32) * x[None, :]
        w = next_w
    out = tl.sum(acc, axis=1)                                                                 # [BLOCK_N]
    if not BLOCK_SCALES:
        out = out * tl.load(ws_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
    rows = tl.full((1,), 0, tl.int32) + row
    _store_tile(out[None, :], rows, offs_n, rows < M, mask_n, b_ptr, y_ptr, part_ptr, M, N,
                stride_ym, stride_yn, HAS_BIAS, SPLIT_K)


@triton.jit(do_not_specialize=["M"])
def _w8a8_tma_kernel(
    xq_ptr, w_ptr, xs_ptr, ws_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_wn, stride_ym, stride_xsm, stride_sn, stride_sk,
    BLOCK_SCALES: tl.constexpr, BLOCK_SIZE_N: tl.constexpr, IS_INT8: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    NUM_SMS: tl.constexpr,
):
    """Prefill on Hopper: gemm.py's persistent TMA kernel with 8-bit operands. x comes
    quantised (``quantize_rows``: scales per row, or per row and K block), tiles move by
    TMA descriptors (zeros past the edges) and the 8-bit tensor cores multiply them.
    Channel scales: the sums chain through every K step and the scales multiply them once.
    Block scales (BLOCK_K = the scale block): each K step's fp32 products are scaled and
    added, the DeepSeek-V3 recipe."""
    x_desc, w_desc = _operand_descriptors(xq_ptr, w_ptr, M, N, K, stride_xm, stride_wn,
                                          BLOCK_M, BLOCK_N, BLOCK_K)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile_id in tl.range(tl.program_id(0), num_pid_m * num_pid_n, NUM_SMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        mask_m = offs_m < M
        mask_n = offs_n < N
        if BLOCK_SCALES:
            out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for k_tile in range(k_tiles):
                x = x_desc.load([pid_m * BLOCK_M, k_tile * BLOCK_K])
                w = w_desc.load([pid_n * BLOCK_N, k_tile * BLOCK_K])
                x_scale = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xsm + k_tile, mask=mask_m, other=0.0)
                w_scale = tl.load(ws_ptr + (offs_n // BLOCK_SIZE_N) * stride_sn + k_tile * stride_sk,
                                  mask=mask_n, other=0.0)
                out += tl.dot(x, w.T) * x_scale[:, None] * w_scale[None, :]
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if IS_INT8 else tl.float32)
            for k_tile in range(k_tiles):
                x = x_desc.load([pid_m * BLOCK_M, k_tile * BLOCK_K])
                w = w_desc.load([pid_n * BLOCK_N, k_tile * BLOCK_K])
                acc = tl.dot(x, w.T, acc, out_dtype=acc.dtype)
            x_scale = tl.load(xs_ptr + offs_m.to(tl.int64) * stride_xsm, mask=mask_m, other=0.0)
            w_scale = tl.load(ws_ptr + offs_n * stride_sn, mask=mask_n, other=0.0)
            out = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
        if HAS_BIAS:
            out += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- launchers


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; expected bf16, fp16 or fp32")
    if weight.dim() != 2 or weight.dtype not in _WEIGHT_DTYPES:
        raise ValueError(f"weight must be float8_e4m3fn or int8 [N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x last dim {x.shape[-1]} != weight in_features {weight.shape[1]}")
    if x.numel() == 0:
        raise ValueError(f"x has no rows (shape {tuple(x.shape)}): empty batch")
    N = weight.shape[0]
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{N}], got {bias.dtype} {tuple(bias.shape)}")


def _check_channel_scale(weight: torch.Tensor, weight_scale: torch.Tensor) -> None:
    if weight_scale.shape != (weight.shape[0],) or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 [{weight.shape[0]}], got "
                         f"{weight_scale.dtype} {tuple(weight_scale.shape)}")


def _check_block_scale(weight: torch.Tensor, weight_scale: torch.Tensor,
                       block_size: tuple[int, int]) -> None:
    if weight.dtype != torch.float8_e4m3fn:
        raise ValueError(f"block-scaled weight must be float8_e4m3fn, got {weight.dtype}")
    bn, bk = block_size
    if bn < 1 or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_size {block_size}: the K block must be a power of 2 >= 16")
    N, K = weight.shape
    want = (-(-N // bn), -(-K // bk))
    if tuple(weight_scale.shape) != want or weight_scale.dtype != torch.float32:
        raise ValueError(f"weight_scale must be float32 {list(want)}, got {weight_scale.dtype} "
                         f"{list(weight_scale.shape)}")


def quantize_rows(x2d: torch.Tensor, dtype: torch.dtype,
                  group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] of ``dtype`` (fp8 e4m3 or int8), scale [M, ceil(K / group)] fp32):
    the activation quantisation of the kernels above as a kernel of its own (per row, or per
    row and K group of ``group``), for launches that quantise x once (``prequant``)."""
    M, K = x2d.shape
    group = group or K
    xq = torch.empty((M, K), dtype=dtype, device=x2d.device)
    xs = torch.empty((M, triton.cdiv(K, group)), dtype=torch.float32, device=x2d.device)
    is_int8 = dtype == torch.int8
    _quantize_rows_kernel[(M, xs.shape[1])](
        x2d, xq, xs, K, group, x2d.stride(0), xq.stride(0), xs.stride(0),
        IS_INT8=is_int8, QMAX=INT8_MAX if is_int8 else FP8_MAX,
        BLOCK_K=min(triton.next_power_of_2(group), 1024 if x2d.is_cuda else 64))
    return xq, xs


def _modes(tile: QuantTile, act_quant: bool | None, prequant: bool | None) -> tuple[bool, bool]:
    act_quant = tile.act_quant if act_quant is None else act_quant
    return act_quant, act_quant and (tile.prequant if prequant is None else prequant)


def _scale_strides(weight_scale: torch.Tensor, block_size_n: int) -> tuple[int, int]:
    """(per weight row, per K block) strides of the weight scales: block scales [rows, K blocks],
    or channel scales [N] (no K axis)."""
    return tuple(weight_scale.stride()) if block_size_n else (weight_scale.stride(0), 0)


def _launch_gemv(x2d: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                 bias: torch.Tensor | None, y: torch.Tensor, tile: QuantTile, block_k: int,
                 block_size_n: int = 0) -> None:
    """The CUDA-core weight-only kernel; ``block_size_n`` > 0: block scales of [bn, block_k]."""
    M, K = x2d.shape
    N = weight.shape[0]
    split = split_k(tile, M, N, K, block_k, x2d.device)
    part = partials(split, M, N, y)
    _w8a8_gemv_kernel[(M * triton.cdiv(N, tile.block_n), split)](
        x2d, weight, weight_scale, bias if bias is not None else y, y, part, M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        *_scale_strides(weight_scale, block_size_n), y.stride(0), y.stride(1),
        BLOCK_SCALES=block_size_n > 0, BLOCK_SIZE_N=max(block_size_n, 1), HAS_BIAS=bias is not None,
        SPLIT_K=split, BLOCK_N=tile.block_n, BLOCK_K=block_k, num_warps=tile.num_warps, num_stages=tile.num_stages)
    if split > 1:
        reduce_partials(part, bias, y)


def _tma_ok(tile: QuantTile, *tensors: torch.Tensor) -> bool:
    """The tile asks for the TMA kernel and the tensors suit descriptors (16-byte aligned
    bases and row strides, unit last stride)."""
    return tile.tma and all(t.stride(-1) == 1 and t.data_ptr() % 16 == 0
                            and (t.stride(0) * t.element_size()) % 16 == 0 for t in tensors)


def _launch_tma(xq: torch.Tensor, xs: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, y: torch.Tensor, tile: QuantTile, block_k: int,
                block_size_n: int = 0) -> None:
    """The persistent TMA kernel on quantised x; ``block_size_n`` > 0: block scales."""
    M, K = xq.shape
    N = weight.shape[0]
    ensure_tma_allocator(xq.device)
    programs = num_sms(xq.device) if xq.is_cuda else 4
    _w8a8_tma_kernel[(programs,)](
        xq, weight, xs, weight_scale, bias if bias is not None else y, y, M, N, K,
        xq.stride(0), weight.stride(0), y.stride(0), xs.stride(0), *_scale_strides(weight_scale, block_size_n),
        BLOCK_SCALES=block_size_n > 0, BLOCK_SIZE_N=max(block_size_n, 1), IS_INT8=weight.dtype == torch.int8,
        HAS_BIAS=bias is not None, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP_M=8,
        NUM_SMS=programs, num_warps=tile.num_warps, num_stages=tile.num_stages)


def _pick_tile(tile: QuantTile | None, M: int, device: torch.device, act_quant: bool | None) -> QuantTile:
    """The given tile, else the table's tensor-core one (``GEMV_TILE`` is opt-in here until
    a GPU comparison says which is faster: perf/bench_kernels.py times both); a GEMV tile
    asked to quantise activations is refused."""
    tile = tile or tile_for(M, device)
    if tile.gemv and act_quant:
        raise ValueError("the GEMV tile multiplies weight-only (act_quant=False); got act_quant=True")
    return tile


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                tile: QuantTile | None = None, act_quant: bool | None = None,
                prequant: bool | None = None) -> torch.Tensor:
    """Per-channel fp8 or int8 weight (by its dtype), dynamic per-token activation scales.
    ``tile``: the launch shape (default: quant_tiles' table for M); ``act_quant``: quantise x
    (8-bit products) or not (weight-only, 16-bit products); ``prequant``: quantise x first
    with ``quantize_rows`` instead of in the GEMM; defaults: the tile's choices."""
    _check(x, weight, bias)
    _check_channel_scale(weight, weight_scale)
    x2d = x.reshape(-1, x.shape[-1])
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    tile = _pick_tile(tile, M, x.device, act_quant)
    block_k = tile.block_k if interpreting() or x.device.type != "cuda" else max(tile.block_k, 128)
    if tile.gemv:
        _launch_gemv(x2d, weight, weight_scale, bias, y, tile, block_k)
        return y.reshape(*x.shape[:-1], N)
    split = split_k(tile, M, N, K, block_k, x.device)
    part = partials(split, M, N, y)
    is_int8 = weight.dtype == torch.int8
    act_quant, prequant = _modes(tile, act_quant, prequant)
    xs = y
    if prequant:
        x2d, xs = quantize_rows(x2d, weight.dtype)
        if _tma_ok(tile, x2d, weight):
            _launch_tma(x2d, xs, weight, weight_scale, bias, y, tile, block_k)
            return y.reshape(*x.shape[:-1], N)
    grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n), split)
    _w8a8_channel_kernel[grid](
        x2d, weight, weight_scale, bias if bias is not None else y, y, part, xs, M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        IS_INT8=is_int8, QMAX=INT8_MAX if is_int8 else FP8_MAX, HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_k, GROUP_M=8,
        ACT_QUANT=act_quant, X_PREQUANT=prequant, INPUT_PRECISION=dot_precision(x.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    if split > 1:
        reduce_partials(part, bias, y)
    return y.reshape(*x.shape[:-1], N)


def fp8_block_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                     block_size: tuple[int, int], bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None, tile: QuantTile | None = None,
                     act_quant: bool | None = None, prequant: bool | None = None) -> torch.Tensor:
    """Block-scaled fp8 weight (``weight_scale_inv`` [ceil(N/bn), ceil(K/bk)]), activations
    quantised per token and K group of ``bk`` (the kernel's K step; ``tile.block_k`` unused),
    or not quantised (``act_quant`` and ``prequant`` as in ``w8a8_linear``)."""
    _check(x, weight, bias)
    _check_block_scale(weight, weight_scale, block_size)
    x2d = x.reshape(-1, x.shape[-1])
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    tile = tile or tile_for(M, x.device, block_scales=True)
    tile = _pick_tile(tile, M, x.device, act_quant)
    if tile.gemv:
        _launch_gemv(x2d, weight, weight_scale, bias, y, tile, block_size[1], block_size[0])
        return y.reshape(*x.shape[:-1], N)
    split = split_k(tile, M, N, K, block_size[1], x.device)
    part = partials(split, M, N, y)
    act_quant, prequant = _modes(tile, act_quant, prequant)
    xs = y
    if prequant:
        x2d, xs = quantize_rows(x2d, weight.dtype, block_size[1])
        if _tma_ok(tile, x2d, weight) and block_size[1] >= 16:
            _launch_tma(x2d, xs, weight, weight_scale, bias, y, tile, block_size[1], block_size[0])
            return y.reshape(*x.shape[:-1], N)
    grid = (triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n), split)
    _fp8_block_kernel[grid](
        x2d, weight, weight_scale, bias if bias is not None else y, y, part, xs, M, N, K,
        x2d.stride(0), x2d.stride(1), weight.stride(0), weight.stride(1),
        weight_scale.stride(0), weight_scale.stride(1), y.stride(0), y.stride(1), xs.stride(0),
        BLOCK_SIZE_N=block_size[0], HAS_BIAS=bias is not None, SPLIT_K=split,
        BLOCK_M=tile.block_m, BLOCK_N=tile.block_n, BLOCK_K=block_size[1], GROUP_M=8,
        ACT_QUANT=act_quant, X_PREQUANT=prequant, INPUT_PRECISION=dot_precision(x.dtype),
        num_warps=tile.num_warps, num_stages=tile.num_stages)
    if split > 1:
        reduce_partials(part, bias, y)
    return y.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- references


def quantize_rows_reference(x: torch.Tensor, dtype: torch.dtype,
                            group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (xq [M, K] as fp32 values of `dtype`, scale [M, K / group] fp32):
    dynamic symmetric quantisation per row (group None) or per row and K group."""
    x = x.float()
    M, K = x.shape
    group = group or K
    pad = -K % group
    xg = torch.nn.functional.pad(x, (0, pad)).view(M, -1, group)             # [M, G, group]
    qmax = INT8_MAX if dtype == torch.int8 else FP8_MAX
    scale = xg.abs().amax(dim=-1, keepdim=True).clamp_min(SCALE_EPS) / qmax  # [M, G, 1]
    v = xg / scale
    if dtype == torch.int8:
        q = torch.floor(v + 0.5).clamp(-128, 127)
    else:
        q = v.clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
    return q.view(M, -1)[:, :K], scale.squeeze(-1)


def w8a8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                          bias: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                          act_quant: bool = True) -> torch.Tensor:
    """The same quantisation in PyTorch, then fp32 (exact for int8 at these sizes) math;
    ``act_quant=False``: x as it is times the dequantised weight."""
    _check(x, weight, bias)
    _check_channel_scale(weight, weight_scale)
    x2d = x.reshape(-1, x.shape[-1])
    if act_quant:
        xq, xs = quantize_rows_reference(x2d, weight.dtype)
        y = (xq @ weight.float().t()) * xs * weight_scale[None, :]
    else:
        y = (x2d.float() @ weight.float().t()) * weight_scale[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).reshape(*x.shape[:-1], weight.shape[0])


def fp8_block_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                               block_size: tuple[int, int], bias: torch.Tensor | None = None,
                               out_dtype: torch.dtype | None = None, act_quant: bool = True) -> torch.Tensor:
    """Per-(token, K group) quantised x (or x as it is) times the block-dequantised weight, in fp32."""
    _check(x, weight, bias)
    _check_block_scale(weight, weight_scale, block_size)
    bn, bk = block_size
    N, K = weight.shape
    x2d = x.reshape(-1, K)
    if act_quant:
        xq, xs = quantize_rows_reference(x2d, torch.float8_e4m3fn, bk)
        x_deq = xq * xs.repeat_interleave(bk, dim=1)[:, :K]
    else:
        x_deq = x2d.float()
    w_deq = weight.float() * weight_scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:N, :K]
    y = x_deq @ w_deq.t()
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype).reshape(*x.shape[:-1], N)


def flops_bytes(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): 8-bit weight, 16-bit x and y, scales neglected."""
    size = torch.empty((), dtype=dtype).element_size()
    return 2 * M * N * K, N * K + size * (M * K + M * N)
