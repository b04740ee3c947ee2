"""4-bit weights, 16-bit activations: ``y[M, N] = x[M, K] @ dequant(qweight)[K, N] (+ bias)``.

Weight-only quantisation (AWQ, GPTQ) stores each weight as a 4-bit integer
``q`` in [0, 15] with a scale ``s`` and a zero point ``z`` shared by a group of
``group_size`` consecutive input rows (one group per row of ``scales``)::

    w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]      g(k) = g_idx[k] or k // group_size

The kernel layout (the loaders of ``models/quantization.py`` bring AWQ and
GPTQ checkpoints to it, so one kernel serves both):

==========  =====================  ===========================================
tensor      shape, dtype           meaning
==========  =====================  ===========================================
qweight     [K // 8, N] int32      row k // 8 packs input rows k with
                                   ``q[k, n] = (qweight[k // 8, n] >> 4 * (k % 8)) & 15``
scales      [G, N] x's dtype       one scale per group and output column
zeros       [G, N] uint8           zero point per group and column, in [0, 15]
g_idx       [K] int32 or None      group of each input row (GPTQ act-order);
                                   None: ``k // group_size``
==========  =====================  ===========================================

The kernel is the blocked matmul of ``gemm.py`` with the weight tile made on
the fly: each K step loads ``qweight[k0/8 : k0/8 + BLOCK_K/8, n-tile]``
(``QuantTile.packed_loads``, the CUDA tiles: each int32 once, its 8 nibbles
spread over 8 rows in registers; without, row k loads word k // 8 again),
shifts out the nibbles, subtracts the zero points and multiplies by the
scales in fp32, rounds once to x's dtype and feeds ``tl.dot``. Products
accumulate in fp32; one rounding at the store, as in ``linear``.

At 1-4 tokens (``QuantTile.gemv``, the decode tile) a second kernel skips the
tensor cores. There the step is a stream of 4-bit weights, and what limits it is
the work per weight, not the products: ``tl.dot`` wants the dequantised tile in
its operand layout, which costs a round trip through shared memory per K step,
and the unpacking itself (shift, mask, convert, subtract, scale) is several
instructions per weight on 128 lanes per SM. The GEMV kernel keeps each packed
word in the register that loaded it and makes the 8 weights of a word with

    nibble j of word w, left in place:  (w & (15 << 4j)) | 0x4B000000
                                        (as fp32: 2**23 + q * 16**j, exact)

(the top three nibbles are shifted down 12 bits first, to stay inside the
mantissa); one subtraction of ``2**23 + z * 16**j`` gives ``(q - z) * 16**j``
exactly, and one FMA adds ``x[k] * 16**-j * (q - z) * 16**j`` to a per-weight
fp32 accumulator (x scaled by the power of two, exact). The scale is constant
over a group, so it multiplies the accumulator once per K step (``BLOCK_K``
divides the group), not once per weight, and the rows are summed once at the
end. Word row ``r`` of a K step holds input rows ``k0 + 8r + j``, so the x
values of nibble j are the strided slice ``x[k0 + j :: 8]``. The product is
``sum_k x * (q - z) * s`` in fp32, without the kernel's rounding of each weight
to x's dtype: closer to the float64 result than the reference, by less than
the tolerance a 16-bit output has anyway.

At prefill sizes (``DEQUANTIZE_MIN_ROWS`` tokens or more) the best use of 4-bit
weights is not to multiply them in 4 bits at all: ``dequantize_w4`` writes the
16-bit weight once (``N*K*2`` bytes, a few percent of the GEMM's time there) and
``gemm.linear`` runs its tuned TMA kernel on it. The dequantised values are the
reference's (rounded once to x's dtype). Between the decode tiles and that
(65-255 rows: batched decode) ``W4A16_MID_TILE`` unpacks each weight once for up
to 128 rows, where writing and re-reading a 16-bit copy would move ~9x the
4-bit weight's bytes.

Roofline: the weight stream is ``N*K/2`` bytes plus ``G*N*3`` bytes of scales
and zeros, a quarter of the bf16 weight, so a decode step (M <= 16) can run
up to ~4x faster than bf16 when bandwidth-bound. FLOPs are ``2*M*N*K`` as for
a dense linear (the dequantisation adds ~4 ops per weight per M tile).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.gemm import _grouped_tile, linear
from triton_kernels.quant_tiles import (
    GEMV_TILE, W4A16_MID_TILE, QuantTile, partials, reduce_partials, split_k, tile_for,
)
from triton_kernels.quant_w8a8 import _k_slice, _store_tile
from triton_kernels.runtime import dot_precision, interpreting

__all__ = ["dequantize_w4", "flops_bytes", "load_nibbles", "unpack_int4_rows", "w4a16_linear",
           "w4a16_linear_reference"]
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
FP32_TWO_POW_23 = 0x4B000000   # the bits of the fp32 2**23 (exponent 150, mantissa 0)
DEQUANTIZE_MIN_ROWS = 256      # from here on: dequantise the weight, then the 16-bit GEMM (module doc)


@triton.jit
def load_nibbles(qw_ptr, k0, K, cols, col_mask, stride_qk, stride_qn,
                 BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """q[k0 : k0 + BLOCK_K, cols] as int32 in [0, 15], rows past K zero: each packed word is
    loaded once and its 8 nibbles spread over 8 rows in registers (a reshape)."""
    words = k0 // 8 + tl.arange(0, BLOCK_K // 8)
    packed = tl.load(qw_ptr + words[:, None] * stride_qk + cols[None, :] * stride_qn,
                     mask=(words < K // 8)[:, None] & col_mask[None, :], other=0)   # [BLOCK_K/8, BLOCK_N]
    nibbles = (packed[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF    # [BLOCK_K/8, 8, BLOCK_N]
    return tl.reshape(nibbles, (BLOCK_K, BLOCK_N))


@triton.jit(do_not_specialize=["M"])
def _w4a16_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, g_ptr, b_ptr, y_ptr, part_ptr, M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
    stride_zg, stride_zn, stride_ym, stride_yn,
    GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, PACKED_LOADS: tl.constexpr = False,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    k_begin, k_end = _k_slice(K, BLOCK_K, SPLIT_K)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)    # rows of x and y         [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)    # output columns          [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                       # the K step's input rows [BLOCK_K]
    mask_m = offs_m < M
    mask_n = offs_n < N
    # One scale/zero row serves the whole K step when the step sits inside one group.
    ROW_OF_SCALES: tl.constexpr = (not HAS_G_IDX) and (GROUP_SIZE % BLOCK_K == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        kk = k0 + offs_k                                 # absolute input rows    [BLOCK_K]
        mask_k = kk < K
        x = tl.load(x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mask_kn = mask_k[:, None] & mask_n[None, :]
        if PACKED_LOADS:
            q = load_nibbles(qw_ptr, k0, K, offs_n, mask_n, stride_qk, stride_qn, BLOCK_K, BLOCK_N)
        else:              # row k reads word k // 8 (8 loads of one word, served from L1)
            packed = tl.load(qw_ptr + (kk // 8)[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                             mask=mask_kn, other=0)     # [BLOCK_K, BLOCK_N] int32
            q = (packed >> ((kk % 8) * 4)[:, None]) & 0xF
        if ROW_OF_SCALES:
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0)[None, :]
            z = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0)[None, :]
        else:
            if HAS_G_IDX:
                g = tl.load(g_ptr + kk, mask=mask_k, other=0)
            else:
                g = kk // GROUP_SIZE
            s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn,
                        mask=mask_kn, other=0.0)
            z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn,
                        mask=mask_kn, other=0)
        w = ((q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)).to(x_ptr.dtype.element_ty)
        acc = tl.dot(x, w, acc, input_precision=INPUT_PRECISION)
    _store_tile(acc, offs_m, offs_n, mask_m, mask_n, b_ptr, y_ptr, part_ptr, M, N, stride_ym, stride_yn,
                HAS_BIAS, SPLIT_K)


@triton.jit
def _nibbles_as_float(packed, j: tl.constexpr, exponent_bits):
    """Nibble j of each packed word as the exact fp32 ``2**23 + q * 16**p``, p = j - 3 * (j // 5):
    the nibble stays where it is while it lies inside fp32's 23 mantissa bits (j < 5); the
    top three are shifted down 12 bits first. ``exponent_bits`` is FP32_TWO_POW_23 passed
    as a kernel argument: in a register, the AND with the mask and the OR are one LOP3
    instruction, where two immediates would take two."""
    if j < 5:
        bits = (packed & (0xF << (4 * j))) | exponent_bits
    else:
        bits = ((packed >> 12) & (0xF << (4 * j - 12))) | exponent_bits
    return bits.to(tl.float32, bitcast=True)


@triton.jit(do_not_specialize=["M"])
def _w4a16_gemv_kernel(
    x_ptr, qw_ptr, s_ptr, z_ptr, b_ptr, y_ptr, part_ptr, M, N, K,
    stride_xm, stride_xk, stride_qk, stride_qn, stride_sg, stride_sn,
    stride_zg, stride_zn, stride_ym, stride_yn, exponent_bits,
    GROUP_SIZE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Products on the CUDA cores (module doc), one row of x per program: every tensor is
    2-D in the packed tile's layout, so nothing moves between threads inside the K loop.
    The M programs of a column tile are neighbours in the grid and read its weights
    together (once from memory, then from L2). The next K step's words are loaded before
    this step's arithmetic (two steps in flight per warp). Needs GROUP_SIZE % BLOCK_K == 0,
    no g_idx."""
    WORDS: tl.constexpr = BLOCK_K // 8                   # packed rows per K step
    row = tl.program_id(0) % M
    pid_n = tl.program_id(0) // M
    k_begin, k_end = _k_slice(K, BLOCK_K, SPLIT_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)    # output columns          [BLOCK_N]
    offs_w = tl.arange(0, WORDS)                         # packed rows of a step   [WORDS]
    mask_n = offs_n < N
    x_row = x_ptr + row.to(tl.int64) * stride_xm
    w_cols = qw_ptr + offs_n[None, :] * stride_qn
    words = k_begin // 8 + offs_w
    packed = tl.load(w_cols + words[:, None] * stride_qk, mask=(words < k_end // 8)[:, None] & mask_n[None, :],
                     other=0)                                                       # [WORDS, BLOCK_N]
    acc = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        mask_w = (k0 // 8 + offs_w) < K // 8
        next_words = (k0 + BLOCK_K) // 8 + offs_w
        next_packed = tl.load(w_cols + next_words[:, None] * stride_qk,
                              mask=(next_words < k_end // 8)[:, None] & mask_n[None, :], other=0)
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + g * stride_sg + offs_n * stride_sn, mask=mask_n, other=0.0).to(tl.float32)
        zero = tl.load(z_ptr + g * stride_zg + offs_n * stride_zn, mask=mask_n, other=0).to(tl.float32)
        step = tl.zeros((WORDS, BLOCK_N), dtype=tl.float32)
        for j in tl.static_range(8):
            power = 16.0 ** (j - 3 * (j // 5))                              # 16**p, a constant
            w = _nibbles_as_float(packed, j, exponent_bits) - (zero * power + 8388608.0)[None, :]
            x = tl.load(x_row + (k0 + 8 * offs_w + j) * stride_xk, mask=mask_w, other=0.0).to(tl.float32)
            step += (x * (1.0 / power))[:, None] * w                         # += x (q - z)
        acc += step * scale[None, :]
        packed = next_packed
    out = tl.sum(acc, axis=0)[None, :]                                                # [1, BLOCK_N]
    rows = tl.full((1,), 0, tl.int32) + row
    _store_tile(out, rows, offs_n, rows < M, mask_n, b_ptr, y_ptr, part_ptr, M, N, stride_ym, stride_yn,
                HAS_BIAS, SPLIT_K)

@triton.jit
def _dequantize_kernel(qw_ptr, s_ptr, z_ptr, g_ptr, w_ptr, N, K,
                       stride_qk, stride_qn, stride_sg, stride_sn, stride_zg, stride_zn, stride_wn,
                       GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Program (k tile, n tile): w[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n], rounded once to
    w's dtype, written in the dense layout [N, K] (the tile transposed on the way out)."""
    WORDS: tl.constexpr = BLOCK_K // 8
    offs_w = tl.program_id(0) * WORDS + tl.arange(0, WORDS)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    packed = tl.load(qw_ptr + offs_w[:, None] * stride_qk + offs_n[None, :] * stride_qn,
                     mask=(offs_w < K // 8)[:, None] & mask_n[None, :], other=0)        # [WORDS, BLOCK_N]
    nibbles = (packed[:, None, :] >> (tl.arange(0, 8) * 4)[None, :, None]) & 0xF        # [WORDS, 8, BLOCK_N]
    q = tl.reshape(nibbles, (BLOCK_K, BLOCK_N))
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (kk < K)[:, None] & mask_n[None, :]
    if HAS_G_IDX:
        g = tl.load(g_ptr + kk, mask=kk < K, other=0)
    else:
        g = kk // GROUP_SIZE
    s = tl.load(s_ptr + g[:, None] * stride_sg + offs_n[None, :] * stride_sn, mask=mask, other=0.0)
    z = tl.load(z_ptr + g[:, None] * stride_zg + offs_n[None, :] * stride_zn, mask=mask, other=0)
    w = ((q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)).to(w_ptr.dtype.element_ty)
    tl.store(w_ptr + offs_n.to(tl.int64)[None, :] * stride_wn + kk[:, None], w, mask=mask)


# ----------------------------------------------------------------------------- launcher


def _check(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
           g_idx: torch.Tensor | None, group_size: int, bias: torch.Tensor | None) -> None:
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; expected bf16, fp16 or fp32")
    if qweight.dim() != 2 or qweight.dtype != torch.int32:
        raise ValueError(f"qweight must be int32 [K // 8, N], got {qweight.dtype} {tuple(qweight.shape)}")
    K, N = x.shape[-1], qweight.shape[1]
    if K != 8 * qweight.shape[0]:
        raise ValueError(f"x last dim {K} != 8 * qweight rows ({qweight.shape[0]})")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    groups = -(-K // group_size)
    if scales.dim() != 2 or scales.shape[1] != N or scales.dtype != x.dtype:
        raise ValueError(f"scales must be {x.dtype} [G, {N}], got {scales.dtype} {tuple(scales.shape)}")
    if g_idx is None and scales.shape[0] < groups:
        raise ValueError(f"scales has {scales.shape[0]} groups, K {K} / group_size {group_size} needs {groups}")
    if zeros.shape != scales.shape or zeros.dtype != torch.uint8:
        raise ValueError(f"zeros must be uint8 {tuple(scales.shape)}, got {zeros.dtype} {tuple(zeros.shape)}")
    if g_idx is not None and (g_idx.shape != (K,) or g_idx.dtype != torch.int32):
        raise ValueError(f"g_idx must be int32 [{K}], got {g_idx.dtype} {tuple(g_idx.shape)}")
    if bias is not None and (bias.shape != (N,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be {x.dtype} [{N}], got {bias.dtype} {tuple(bias.shape)}")
    if x.numel() == 0:
        raise ValueError(f"x has no rows (shape {tuple(x.shape)}): empty batch")


def _gemv_serves(g_idx: torch.Tensor | None, group_size: int, block_k: int) -> bool:
    """The GEMV kernel's condition: consecutive groups, each a whole number of K steps."""
    return g_idx is None and group_size % block_k == 0


DEQUANTIZE_BLOCKS_CUDA = (64, 64)   # (columns, input rows) per program


def dequantize_w4(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                  g_idx: torch.Tensor | None, group_size: int,
                  blocks: tuple[int, int] | None = None) -> torch.Tensor:
    """The dense weight [N, K] in the scales' dtype (``dequantize``, rounded once, transposed).
    ``blocks``: (columns, input rows) per program (default: DEQUANTIZE_BLOCKS_CUDA on CUDA)."""
    K, N = 8 * qweight.shape[0], qweight.shape[1]
    w = torch.empty((N, K), dtype=scales.dtype, device=qweight.device)
    block_n, block_k = blocks or (DEQUANTIZE_BLOCKS_CUDA if qweight.is_cuda and not interpreting() else (32, 32))
    _dequantize_kernel[(triton.cdiv(K, block_k), triton.cdiv(N, block_n))](
        qweight, scales, zeros, g_idx if g_idx is not None else qweight, w, N, K,
        qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
        zeros.stride(0), zeros.stride(1), w.stride(0),
        GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return w


def _default_tile(M: int, device: torch.device, g_idx: torch.Tensor | None, group_size: int) -> QuantTile | None:
    """The launch for M rows (module doc): the GEMV tile at 1-4 where groups allow, the
    decode table's tiles up to 64, W4A16_MID_TILE up to DEQUANTIZE_MIN_ROWS, then None:
    dequantise and run the 16-bit GEMM. Off CUDA, the interpreter's tile."""
    if device.type == "cuda" and not interpreting():
        if M >= DEQUANTIZE_MIN_ROWS:
            return None
        if M > 64:
            return W4A16_MID_TILE
    return tile_for(M, device, gemv_ok=_gemv_serves(g_idx, group_size, GEMV_TILE.block_k))


def w4a16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor | None, group_size: int, bias: torch.Tensor | None = None,
                 out_dtype: torch.dtype | None = None, tile: QuantTile | None = None) -> torch.Tensor:
    """y[*, N] = x[*, K] @ dequant(qweight, scales, zeros, g_idx)[K, N] (+ bias).
    ``tile``: the launch shape (default: ``_default_tile``)."""
    _check(x, qweight, scales, zeros, g_idx, group_size, bias)
    x2d = x.reshape(-1, x.shape[-1])
    M, K = x2d.shape
    N = qweight.shape[1]
    tile = tile or _default_tile(M, x.device, g_idx, group_size)
    if tile is None:
        weight = dequantize_w4(qweight, scales, zeros, g_idx, group_size)
        return linear(x, weight, bias, out_dtype=out_dtype)
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    if tile.gemv and not _gemv_serves(g_idx, group_size, tile.block_k):
        raise ValueError(f"the GEMV tile needs consecutive groups (no g_idx) of a multiple of its K "
                         f"step ({tile.block_k} rows); got group_size {group_size}, "
                         f"g_idx {'set' if g_idx is not None else 'None'}")
    split = split_k(tile, M, N, K, tile.block_k, x.device)
    part = partials(split, M, N, y)
    grid = (triton.cdiv(M, 1 if tile.gemv else tile.block_m) * triton.cdiv(N, tile.block_n), split)
    tensors = (x2d, qweight, scales, zeros)
    shape_and_strides = (M, N, K, x2d.stride(0), x2d.stride(1), qweight.stride(0), qweight.stride(1),
                         scales.stride(0), scales.stride(1), zeros.stride(0), zeros.stride(1),
                         y.stride(0), y.stride(1))
    blocks = dict(BLOCK_N=tile.block_n, BLOCK_K=tile.block_k, num_warps=tile.num_warps,
                  num_stages=tile.num_stages)
    bias_arg = bias if bias is not None else y
    if tile.gemv:
        _w4a16_gemv_kernel[grid](*tensors, bias_arg, y, part, *shape_and_strides, FP32_TWO_POW_23,
                                 GROUP_SIZE=group_size,
                                 HAS_BIAS=bias is not None, SPLIT_K=split, **blocks)
    else:
        _w4a16_kernel[grid](*tensors, g_idx if g_idx is not None else qweight, bias_arg, y, part,
                            *shape_and_strides, GROUP_SIZE=group_size, HAS_G_IDX=g_idx is not None,
                            HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK_M=tile.block_m, GROUP_M=8,
                            INPUT_PRECISION=dot_precision(x.dtype), PACKED_LOADS=tile.packed_loads, **blocks)
    if split > 1:
        reduce_partials(part, bias, y)
    return y.reshape(*x.shape[:-1], N)


# ----------------------------------------------------------------------------- reference


def unpack_int4_rows(qweight: torch.Tensor) -> torch.Tensor:
    """[K // 8, N] int32 -> [K, N] int32 in [0, 15]: row k is nibble k % 8 of row k // 8."""
    shifts = torch.arange(0, 32, 4, device=qweight.device, dtype=torch.int32)     # [8]
    nibbles = (qweight.unsqueeze(1) >> shifts[None, :, None]) & 0xF                  # [K/8, 8, N]
    return nibbles.reshape(-1, qweight.shape[1])


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
               g_idx: torch.Tensor | None, group_size: int) -> torch.Tensor:
    """The fp32 weight [K, N] the kernel multiplies by (before rounding to x's dtype)."""
    q = unpack_int4_rows(qweight)
    K = q.shape[0]
    g = g_idx.long() if g_idx is not None else torch.arange(K, device=q.device) // group_size
    return (q - zeros[g].to(torch.int32)).float() * scales[g].float()


def w4a16_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                           zeros: torch.Tensor, g_idx: torch.Tensor | None, group_size: int,
                           bias: torch.Tensor | None = None,
                           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Dequantise (rounded once to x's dtype, as the kernel does), then the fp32 matmul."""
    _check(x, qweight, scales, zeros, g_idx, group_size, bias)
    w = dequantize(qweight, scales, zeros, g_idx, group_size).to(x.dtype).float()
    y = x.float() @ w
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype or x.dtype)


def flops_bytes(M: int, N: int, K: int, group_size: int = 128,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): 4-bit weights, scales and zeros per group, x and y."""
    size = torch.empty((), dtype=dtype).element_size()
    groups = -(-K // group_size)
    num_bytes = N * K // 2 + groups * N * (size + 1) + size * (M * K + M * N)
    return 2 * M * N * K, num_bytes
