"""Quantized mixture-of-experts: ``fused_moe`` with 8-bit (W8A8) or 4-bit (W4A16) experts.

Same math and the same three launches as ``moe/gemm.py`` (gate/up + SiLU-and-mul,
down scaled by the routing weight, sum of the k rows per token), over the same
expert-grouped pair list from ``moe_align_block_size``; only the weight tile of
each K step is made differently. Shapes: T tokens, H hidden, E experts, I expert
intermediate size, k experts per token. Every expert tensor is stacked along a
leading E axis; w13 holds each expert's gate rows over its up rows (``[2I, H]``
as a linear ``[N, K]``), w2 its down rows (``[H, I]``).

=============  ======================================  ===================================
scheme         expert weight, scale (per expert)       activation scale (dynamic)
=============  ======================================  ===================================
w8a8 channel   w fp8e4m3 or int8 [N, K], ws fp32 [N]   per token: max|a[m, :]| / qmax
fp8 block      w fp8e4m3 [N, K],                       per token and K group of bk:
               ws fp32 [rows, ceil(K/bk)]              max|a[m, group]| / 448
w4a16          qweight int32 [K/8, N] (nibble k % 8    none (16-bit a); the 4-bit tile is
               of row k // 8), scales [G, N] a's       dequantised in registers:
               dtype, zeros uint8 [G, N], g_idx [K]    ``(q - z[g(k)]) * s[g(k)]``
               or None (``g(k) = k // group``)
=============  ======================================  ===================================

Block scales of w13: the gate rows' ``ceil(I/bn)`` scale rows come first, then
the up rows' (the checkpoint's per-projection ``weight_scale_inv`` stacked), so
I need not be a multiple of bn; a column ``n`` of the up half reads scale row
``ceil(I/bn) + n // bn``. The quantisation formulas (fp8 rounding to nearest
even in fp32 bits, int8 half up) are ``quant_w8a8``'s; the 4-bit layout is
``quant_w4a16``'s, one expert after the other.

The gate/up kernel runs the K loop twice per program (gate columns, then the
matching up columns) through one tile routine per scheme (``_expert_tile``);
the x rows are re-read from cache, the weight bytes once. ``act`` and
``partial`` are stored in x's dtype, products accumulate in fp32 (int32 for
int8 products), as in ``fused_moe``.

W8A8 modes, as in ``quant_w8a8`` (its module doc has the GPU measurement), chosen
by the routed rows T*k (``_modes``). Fused: each tile quantises the a tiles it loads,
after (channel) a walk over all of K for its rows' maxima, in every program. That
walk delays the first product of a decode step, which is a weight stream anyway, so
on CUDA with T*k <= ``WEIGHT_ONLY_MAX_PAIRS`` (``_pick_config``'s decode tier) the
launch is weight-only: the 8-bit tile is converted to a's dtype for 16-bit products
and only the weight scales multiply the sum (block: per K group). Above that
(prefill) x, then act, is quantised once by ``quantize_rows`` (8-bit values, fp32
scales per row or row and K group), and the grouped GEMM gathers the 8-bit rows and
their scales by the sorted pair ids as it gathers x. The interpreter and CPU keep
the fused mode, the references' default.

Roofline: decode streams every touched expert's weights once: ``3*I*H`` bytes
per expert at 8 bits, ``1.5*I*H`` (+ scales) at 4 bits, against ``6*I*H`` in
bf16. FLOPs ``6*T*k*H*I``.

The references loop over the experts and call the dense quantized references
of ``quant_w8a8`` / ``quant_w4a16`` on each expert's rows (same quantisation),
then the bf16-free fp32 math of ``fused_moe_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.moe.gemm import DECODE_TIER_PAIRS, _check_moe, _moe_sum_kernel, _pick_config
from triton_kernels.moe.routing import moe_align_block_size
from triton_kernels.quant_w4a16 import load_nibbles, w4a16_linear_reference
from triton_kernels.quant_w8a8 import (
    FP8_MAX,
    INT8_MAX,
    _quantize,
    fp8_block_linear_reference,
    quantize_rows,
    w8a8_linear_reference,
)
from triton_kernels.runtime import dot_precision, interpreting

__all__ = ["fused_moe_w4a16", "fused_moe_w4a16_reference", "fused_moe_w8a8",
           "fused_moe_w8a8_reference", "flops_bytes"]
CHANNEL, BLOCK, W4A16 = 0, 1, 2          # SCHEME constexpr values
# W8A8 launches with at most this many routed rows (T * k) are weight-only on CUDA:
# moe.gemm._pick_config's decode tier, where the step streams the experts' weights.
WEIGHT_ONLY_MAX_PAIRS = DECODE_TIER_PAIRS


# ----------------------------------------------------------------------------- weight tiles


@triton.jit
def _row_scales(a_rows, K, QMAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, 1] per-token activation scales max|a[m, :]| / QMAX: one walk over K."""
    offs_k = tl.arange(0, BLOCK_K)
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        a = tl.load(a_rows + kk[None, :], mask=(kk < K)[None, :], other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.max(tl.abs(a), axis=1))
    return (tl.maximum(amax, 1e-10) / QMAX)[:, None]


@triton.jit
def _tile_channel(a_rows, a_scales, K, w_ptr, ws_ptr, cols, stride_wn, stride_wk,
                  IS_INT8: tl.constexpr, QMAX: tl.constexpr, ACT_QUANT: tl.constexpr,
                  X_PREQUANT: tl.constexpr, INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 of a_rows @ W[cols]^T with per-token activation scales (a
    quantised here after a max pass, or already 8-bit with its scales at a_scales), or,
    weight-only, W converted to a's dtype and only the weight scales applied."""
    if ACT_QUANT and X_PREQUANT:
        a_scale = tl.load(a_scales)[:, None]                                  # [BLOCK_M, 1]
    elif ACT_QUANT:
        a_scale = _row_scales(a_rows, K, QMAX, BLOCK_M, BLOCK_K)
    if ACT_QUANT and IS_INT8:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn                   # [1, BLOCK_N]
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_rows + kk[None, :], mask=mask_k[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        if ACT_QUANT and X_PREQUANT:
            acc = tl.dot(a, w, acc, out_dtype=acc.dtype)
        elif ACT_QUANT:
            acc = tl.dot(_quantize(a.to(tl.float32), a_scale, IS_INT8), w, acc, out_dtype=acc.dtype)
        else:
            acc = tl.dot(a, w.to(a.dtype), acc, input_precision=INPUT_PRECISION)
    out = acc.to(tl.float32) * tl.load(ws_ptr + cols)[None, :]
    if ACT_QUANT:
        out = out * a_scale
    return out


@triton.jit
def _tile_fp8_block(a_rows, a_scales, K, w_ptr, ws_ptr, cols, scale_rows, stride_wn, stride_wk,
                    stride_sn, stride_sk, ACT_QUANT: tl.constexpr, X_PREQUANT: tl.constexpr,
                    INPUT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_K: tl.constexpr):
    """Block-scaled fp8: BLOCK_K is the scale group along K; activations per token and group
    (quantised here, or already fp8 with scales a_scales[m, j]), or weight-only."""
    offs_k = tl.arange(0, BLOCK_K)
    w_cols = w_ptr + cols.to(tl.int64)[None, :] * stride_wn
    s_cols = ws_ptr + scale_rows * stride_sn                                  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for j in range(0, tl.cdiv(K, BLOCK_K)):
        kk = j * BLOCK_K + offs_k
        mask_k = kk < K
        a = tl.load(a_rows + kk[None, :], mask=mask_k[None, :], other=0.0)
        w = tl.load(w_cols + kk[:, None] * stride_wk, mask=mask_k[:, None], other=0.0)
        w_scale = tl.load(s_cols + j * stride_sk)[None, :]                    # [1, BLOCK_N]
        if ACT_QUANT and X_PREQUANT:
            acc += tl.dot(a, w) * tl.load(a_scales + j)[:, None] * w_scale
        elif ACT_QUANT:
            a32 = a.to(tl.float32)
            a_scale = (tl.maximum(tl.max(tl.abs(a32), axis=1), 1e-10) / 448.0)[:, None]
            acc += tl.dot(_quantize(a32, a_scale, False), w) * a_scale * w_scale
        else:
            acc += tl.dot(a, w.to(a.dtype), input_precision=INPUT_PRECISION) * w_scale
    return acc


@triton.jit
def _tile_w4a16(a_rows, K, qw_ptr, s_ptr, z_ptr, g_ptr, cols, stride_qn, stride_qk,
                stride_sn, stride_sg, GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                INPUT_PRECISION: tl.constexpr):
    """4-bit weight dequantised per K step: w[k, n] = (q - z[g(k), n]) * s[g(k), n]."""
    offs_k = tl.arange(0, BLOCK_K)
    cols64 = cols.to(tl.int64)
    all_cols = cols64 >= 0                    # every column: the callers clamp them (past N: column 0)
    ROW_OF_SCALES: tl.constexpr = (not HAS_G_IDX) and (GROUP_SIZE % BLOCK_K == 0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        mask_k = kk < K
        a = tl.load(a_rows + kk[None, :], mask=mask_k[None, :], other=0.0)
        q = load_nibbles(qw_ptr, k0, K, cols64, all_cols, stride_qk, stride_qn, BLOCK_K, BLOCK_N)
        if ROW_OF_SCALES:                     # the whole K step sits in one group
            g = k0 // GROUP_SIZE
            s = tl.load(s_ptr + g * stride_sg + cols64 * stride_sn)[None, :]
            z = tl.load(z_ptr + g * stride_sg + cols64 * stride_sn)[None, :]
        else:
            if HAS_G_IDX:
                g = tl.load(g_ptr + kk, mask=mask_k, other=0)
            else:
                g = kk // GROUP_SIZE
            at = g.to(tl.int64)[:, None] * stride_sg + cols64[None, :] * stride_sn
            s = tl.load(s_ptr + at, mask=mask_k[:, None], other=0.0)
            z = tl.load(z_ptr + at, mask=mask_k[:, None], other=0)
        w = ((q - z.to(tl.int32)).to(tl.float32) * s.to(tl.float32)).to(a.dtype)
        acc = tl.dot(a, w, acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _expert_tile(a_rows, a_scales, K, w_ptr, s_ptr, z_ptr, g_ptr, cols, scale_rows,
                 stride_wn, stride_wk, stride_sn, stride_sk,
                 SCHEME: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
                 GROUP_SIZE: tl.constexpr, HAS_G_IDX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                 ACT_QUANT: tl.constexpr, X_PREQUANT: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """One expert's [BLOCK_M, BLOCK_N] product tile, fp32, scales applied (by SCHEME).
    a_scales: each row's activation scales when X_PREQUANT (a is 8-bit), else unused."""
    if SCHEME == 0:
        return _tile_channel(a_rows, a_scales, K, w_ptr, s_ptr, cols, stride_wn, stride_wk,
                             IS_INT8, QMAX, ACT_QUANT, X_PREQUANT, INPUT_PRECISION,
                             BLOCK_M, BLOCK_N, BLOCK_K)
    elif SCHEME == 1:
        return _tile_fp8_block(a_rows, a_scales, K, w_ptr, s_ptr, cols, scale_rows, stride_wn,
                               stride_wk, stride_sn, stride_sk, ACT_QUANT, X_PREQUANT,
                               INPUT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        return _tile_w4a16(a_rows, K, w_ptr, s_ptr, z_ptr, g_ptr, cols, stride_wn, stride_wk,
                           stride_sn, stride_sk, GROUP_SIZE, HAS_G_IDX, BLOCK_M, BLOCK_N, BLOCK_K,
                           INPUT_PRECISION)


# ----------------------------------------------------------------------------- kernels


@triton.jit
def _qmoe_gate_up_kernel(x_ptr, xs_ptr, w_ptr, s_ptr, z_ptr, g_ptr, act_ptr, sorted_ids_ptr,
                         expert_ids_ptr, num_post_pad_ptr, num_pairs, inter_size, hidden_size,
                         up_scale_row, stride_xt, stride_xst, stride_we, stride_wn, stride_wk,
                         stride_se, stride_sn, stride_sk, stride_ge, stride_at,
                         SCHEME: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
                         SCALE_BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr,
                         HAS_G_IDX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                         ACT_QUANT: tl.constexpr, X_PREQUANT: tl.constexpr,
                         TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_K: tl.constexpr):
    """X_PREQUANT: x is 8-bit (``quantize_rows``), its per-row (group) scales at xs_ptr."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = tl.where(valid, pairs // TOP_K, 0).to(tl.int64)   # padding reads row 0, never stored
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.where(offs_n < inter_size, offs_n, 0)
        a_rows = x_ptr + rows[:, None] * stride_xt                                # [BLOCK_M, 1]
        a_scales = xs_ptr + rows * stride_xst                                     # [BLOCK_M]
        w_e = w_ptr + expert * stride_we
        s_e = s_ptr + expert * stride_se
        z_e = z_ptr + expert * stride_se
        g_e = g_ptr + expert * stride_ge
        gate = _expert_tile(a_rows, a_scales, hidden_size, w_e, s_e, z_e, g_e, cols,
                            cols // SCALE_BLOCK_N, stride_wn, stride_wk, stride_sn, stride_sk,
                            SCHEME, IS_INT8, QMAX, GROUP_SIZE, HAS_G_IDX, INPUT_PRECISION,
                            ACT_QUANT, X_PREQUANT, BLOCK_M, BLOCK_N, BLOCK_K)
        up = _expert_tile(a_rows, a_scales, hidden_size, w_e, s_e, z_e, g_e, cols + inter_size,
                          up_scale_row + cols // SCALE_BLOCK_N, stride_wn, stride_wk, stride_sn,
                          stride_sk, SCHEME, IS_INT8, QMAX, GROUP_SIZE, HAS_G_IDX, INPUT_PRECISION,
                          ACT_QUANT, X_PREQUANT, BLOCK_M, BLOCK_N, BLOCK_K)
        act = gate / (1.0 + tl.exp(-gate)) * up                                  # silu(gate) * up
        out_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * stride_at + offs_n[None, :]
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < inter_size))


@triton.jit
def _qmoe_down_kernel(act_ptr, act_s_ptr, w_ptr, s_ptr, z_ptr, g_ptr, out_ptr, topk_weights_ptr,
                      sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr, num_pairs, hidden_size,
                      inter_size, stride_at, stride_ast, stride_we, stride_wn, stride_wk,
                      stride_se, stride_sn, stride_sk, stride_ge, stride_ot,
                      SCHEME: tl.constexpr, IS_INT8: tl.constexpr, QMAX: tl.constexpr,
                      SCALE_BLOCK_N: tl.constexpr, GROUP_SIZE: tl.constexpr,
                      HAS_G_IDX: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                      ACT_QUANT: tl.constexpr, X_PREQUANT: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """X_PREQUANT: act is 8-bit (``quantize_rows``), its per-row (group) scales at act_s_ptr."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = tl.where(valid, pairs, 0).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        cols = tl.where(offs_n < hidden_size, offs_n, 0)
        acc = _expert_tile(act_ptr + rows[:, None] * stride_at, act_s_ptr + rows * stride_ast,
                           inter_size, w_ptr + expert * stride_we, s_ptr + expert * stride_se,
                           z_ptr + expert * stride_se, g_ptr + expert * stride_ge,
                           cols, cols // SCALE_BLOCK_N, stride_wn, stride_wk, stride_sn, stride_sk,
                           SCHEME, IS_INT8, QMAX, GROUP_SIZE, HAS_G_IDX, INPUT_PRECISION,
                           ACT_QUANT, X_PREQUANT, BLOCK_M, BLOCK_N, BLOCK_K)
        acc *= tl.load(topk_weights_ptr + rows)[:, None]
        out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < hidden_size))


# ----------------------------------------------------------------------------- launchers


class _Weights:
    """One GEMM's expert tensors as the kernels read them: pointers and strides
    (w: per output column / per input row; s: per column / per row of scales)."""

    def __init__(self, w, s, z=None, g=None, w_axes=(1, 2), s_axes=(1, 2)):
        self.w, self.s = w, s
        self.z = z if z is not None else s
        self.g = g if g is not None else w
        self.strides = (w.stride(0), w.stride(w_axes[0]), w.stride(w_axes[1]), s.stride(0),
                        s.stride(s_axes[0]), s.stride(s_axes[1]) if s.dim() > 2 else 0,
                        g.stride(0) if g is not None else 0)

    def args(self):
        return self.w, self.s, self.z, self.g


def _prequant(a: torch.Tensor, quant: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, its scales) as a GEMM reads them: 8-bit values and fp32 scales from
    ``quantize_rows`` when ``quant`` is (dtype, K group or None for per row), else a as it
    is (the scale pointer then unused)."""
    return quantize_rows(a, *quant) if quant is not None else (a, a)


def _launch(x, topk_weights, topk_ids, w13: _Weights, w2: _Weights, inter_size: int, up_scale_row: int,
            block_k: int, meta13: dict, meta2: dict, quant: tuple | None = None) -> torch.Tensor:
    """Align the pairs, then the gate/up, down and sum launches; with ``quant``, x and then
    act are quantised once before their GEMM (``_prequant``)."""
    num_tokens, hidden_size = x.shape
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    config = _pick_config(num_pairs, x.dtype)
    sorted_ids, expert_ids, num_post_pad = moe_align_block_size(topk_ids, w13.w.shape[0], config.block_m)
    num_blocks = expert_ids.shape[0]
    act = torch.empty((num_pairs, inter_size), dtype=x.dtype, device=x.device)
    partial = torch.empty((num_pairs, hidden_size), dtype=x.dtype, device=x.device)
    y = torch.empty((num_tokens, hidden_size), dtype=x.dtype, device=x.device)
    tiles = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=block_k,
                 INPUT_PRECISION=dot_precision(x.dtype),
                 num_warps=config.num_warps, num_stages=config.num_stages)
    a, a_s = _prequant(x, quant)
    _qmoe_gate_up_kernel[(num_blocks, triton.cdiv(inter_size, config.block_n))](
        a, a_s, *w13.args(), act, sorted_ids, expert_ids, num_post_pad, num_pairs, inter_size,
        hidden_size, up_scale_row, a.stride(0), a_s.stride(0), *w13.strides, act.stride(0),
        TOP_K=top_k, **meta13, **tiles)
    a, a_s = _prequant(act, quant)
    _qmoe_down_kernel[(num_blocks, triton.cdiv(hidden_size, config.block_n))](
        a, a_s, *w2.args(), partial, topk_weights, sorted_ids, expert_ids, num_post_pad, num_pairs,
        hidden_size, inter_size, a.stride(0), a_s.stride(0), *w2.strides, partial.stride(0),
        **meta2, **tiles)
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        partial, y, hidden_size, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return y


def _modes(num_pairs: int, device: torch.device, act_quant: bool | None,
           prequant: bool | None) -> tuple[bool, bool]:
    """(act_quant, prequant) of a W8A8 launch: the caller's, else on CUDA weight-only for at
    most WEIGHT_ONLY_MAX_PAIRS routed rows and x quantised once above; fused under the
    interpreter and on CPU (the references' default)."""
    compiled = device.type == "cuda" and not interpreting()
    if act_quant is None:
        act_quant = not compiled or num_pairs > WEIGHT_ONLY_MAX_PAIRS
    if prequant is None:
        prequant = compiled
    return act_quant, act_quant and prequant


def fused_moe_w8a8(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                   w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   block_size: tuple[int, int] | None = None, act_quant: bool | None = None,
                   prequant: bool | None = None) -> torch.Tensor:
    """x[T, H], w13[E, 2I, H] and w2[E, H, I] fp8 (or int8 per channel) -> y[T, H].

    ``block_size`` None: per-channel scales ``w13_scale[E, 2I]``, ``w2_scale[E, H]``,
    per-token activation scales. ``(bn, bk)``: block scales ``w13_scale[E,
    2*ceil(I/bn), ceil(H/bk)]`` (gate rows' blocks, then up rows'), ``w2_scale[E,
    ceil(H/bn), ceil(I/bk)]``, activation scales per token and K group of bk.
    ``act_quant``: quantise the activations (8-bit products) or not (weight-only, 16-bit
    products); ``prequant``: quantise them once before each GEMM instead of in it;
    defaults: ``_modes``, by the number of routed rows."""
    _, hidden_size, _, inter_size, _ = _check_w8a8(x, w13, w13_scale, w2, w2_scale, topk_weights,
                                                   topk_ids, block_size)
    act_quant, prequant = _modes(topk_ids.numel(), x.device, act_quant, prequant)
    modes = dict(ACT_QUANT=act_quant, X_PREQUANT=prequant, GROUP_SIZE=1, HAS_G_IDX=False)
    if block_size is None:
        is_int8 = w13.dtype == torch.int8
        meta = dict(SCHEME=CHANNEL, IS_INT8=is_int8, QMAX=INT8_MAX if is_int8 else FP8_MAX,
                    SCALE_BLOCK_N=1, **modes)
        block_k, up_scale_row, group = (64 if interpreting() else 128), 0, None
    else:
        bn, bk = block_size
        meta = dict(SCHEME=BLOCK, IS_INT8=False, QMAX=FP8_MAX, SCALE_BLOCK_N=bn, **modes)
        block_k, up_scale_row, group = bk, -(-inter_size // bn), bk
    return _launch(x, topk_weights, topk_ids, _Weights(w13, w13_scale), _Weights(w2, w2_scale),
                   inter_size, up_scale_row, block_k, meta, meta, (w13.dtype, group) if prequant else None)


def fused_moe_w4a16(x: torch.Tensor, w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                    w13_zeros: torch.Tensor, w2_qweight: torch.Tensor, w2_scales: torch.Tensor,
                    w2_zeros: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    group_size: int, w13_g_idx: torch.Tensor | None = None,
                    w2_g_idx: torch.Tensor | None = None) -> torch.Tensor:
    """x[T, H]; w13_qweight[E, H/8, 2I], w13_scales / w13_zeros [E, G13, 2I];
    w2_qweight[E, I/8, H], w2_scales / w2_zeros [E, G2, H]; g_idx [E, K] int32 or
    None; ``group_size`` <= 0: one group over all of K -> y[T, H]."""
    _, hidden_size, _, inter_size, _ = _check_w4a16(
        x, (w13_qweight, w13_scales, w13_zeros, w13_g_idx), (w2_qweight, w2_scales, w2_zeros, w2_g_idx),
        topk_weights, topk_ids, group_size)
    group13 = group_size if group_size > 0 else hidden_size
    group2 = group_size if group_size > 0 else inter_size
    block_k = 32 if interpreting() else (64 if min(group13, group2) % 64 == 0 else 32)
    axes = dict(w_axes=(2, 1), s_axes=(2, 1))
    w13 = _Weights(w13_qweight, w13_scales, w13_zeros, w13_g_idx, **axes)
    w2 = _Weights(w2_qweight, w2_scales, w2_zeros, w2_g_idx, **axes)
    base = dict(SCHEME=W4A16, IS_INT8=False, QMAX=1.0, SCALE_BLOCK_N=1, ACT_QUANT=False, X_PREQUANT=False)
    return _launch(x, topk_weights, topk_ids, w13, w2, inter_size, 0, block_k,
                   dict(base, GROUP_SIZE=group13, HAS_G_IDX=w13_g_idx is not None),
                   dict(base, GROUP_SIZE=group2, HAS_G_IDX=w2_g_idx is not None))


# ----------------------------------------------------------------------------- checks


def _shape_of(x, topk_weights, topk_ids, w13_shape, w2_shape):
    """_check_moe on meta stand-ins of the 16-bit shapes the quantized tensors encode."""
    meta = dict(dtype=x.dtype, device="meta")
    return _check_moe(x, torch.empty(w13_shape, **meta), torch.empty(w2_shape, **meta),
                      topk_weights, topk_ids)


def _want(name: str, t: torch.Tensor, shape: tuple, dtypes: tuple) -> None:
    if tuple(t.shape) != tuple(shape) or t.dtype not in dtypes:
        raise ValueError(f"{name} must be {'/'.join(str(d) for d in dtypes)} {list(shape)}, got "
                         f"{t.dtype} {list(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _check_w8a8(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block_size):
    if w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"w13 / w2 must be [E, 2I, H] / [E, H, I], got {list(w13.shape)}, {list(w2.shape)}")
    dims = _shape_of(x, topk_weights, topk_ids, w13.shape, w2.shape)
    _, H, E, I, _ = dims
    dtypes = (torch.float8_e4m3fn,) if block_size is not None else (torch.float8_e4m3fn, torch.int8)
    _want("w13", w13, (E, 2 * I, H), dtypes)
    _want("w2", w2, (E, H, I), (w13.dtype,))
    if block_size is None:
        _want("w13_scale", w13_scale, (E, 2 * I), (torch.float32,))
        _want("w2_scale", w2_scale, (E, H), (torch.float32,))
        return dims
    bn, bk = block_size
    if bn < 1 or bk < 16 or bk & (bk - 1):
        raise ValueError(f"block_size {block_size}: the K block must be a power of 2 >= 16")
    _want("w13_scale", w13_scale, (E, 2 * -(-I // bn), -(-H // bk)), (torch.float32,))
    _want("w2_scale", w2_scale, (E, -(-H // bn), -(-I // bk)), (torch.float32,))
    return dims


def _check_w4a16(x, w13, w2, topk_weights, topk_ids, group_size):
    q13, q2 = w13[0], w2[0]
    if q13.dim() != 3 or q2.dim() != 3:
        raise ValueError(f"w13_qweight / w2_qweight must be [E, K/8, N], got {list(q13.shape)}, "
                         f"{list(q2.shape)}")
    E, H, I = q13.shape[0], 8 * q13.shape[1], q13.shape[2] // 2
    dims = _shape_of(x, topk_weights, topk_ids, (E, 2 * I, H), (E, H, 8 * q2.shape[1]))
    for name, (q, s, z, g), (K, N) in (("w13", w13, (H, 2 * I)), ("w2", w2, (I, H))):
        groups = -(-K // group_size) if group_size > 0 else 1
        _want(f"{name}_qweight", q, (E, K // 8, N), (torch.int32,))
        if g is None:
            _want(f"{name}_scales", s, (E, groups, N), (x.dtype,))
        else:
            _want(f"{name}_scales", s, (E, s.shape[1], N), (x.dtype,))
            _want(f"{name}_g_idx", g, (E, K), (torch.int32,))
        _want(f"{name}_zeros", z, tuple(s.shape), (torch.uint8,))
    if x.dtype == torch.float64:
        raise ValueError("x must be fp16/bf16/fp32 for the 4-bit kernel")
    return dims


# ----------------------------------------------------------------------------- references


def _moe_loop(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, experts) -> torch.Tensor:
    """sum_j w[t, j] * down_e(silu(gate_e x) * up_e x); ``experts(e, rows)`` -> (gate_up [n, 2I]
    fp32, down(act) -> [n, H] fp32). act is rounded to x's dtype, as the kernel stores it."""
    y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        token_idx, slot_idx = torch.nonzero(topk_ids == expert, as_tuple=True)
        gate_up, down = experts(expert)
        h = gate_up(x[token_idx])
        inter = h.shape[1] // 2
        act = (torch.nn.functional.silu(h[:, :inter]) * h[:, inter:]).to(x.dtype)
        out = down(act) * topk_weights[token_idx, slot_idx, None]
        y.index_add_(0, token_idx, out.to(x.dtype).float())
    return y.to(x.dtype)


def fused_moe_w8a8_reference(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                             block_size=None, act_quant: bool = True) -> torch.Tensor:
    """Reference of `fused_moe_w8a8`: each expert through quant_w8a8's references
    (``act_quant=False``: weight-only, x and act as they are times the dequantised weights)."""
    _, _, _, inter_size, _ = _check_w8a8(x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids,
                                         block_size)
    f32 = dict(out_dtype=torch.float32, act_quant=act_quant)

    def experts(e):
        if block_size is None:
            return (lambda a: w8a8_linear_reference(a, w13[e], w13_scale[e], **f32),
                    lambda a: w8a8_linear_reference(a, w2[e], w2_scale[e], **f32))
        rows = -(-inter_size // block_size[0])

        def gate_up(a):
            gate = fp8_block_linear_reference(a, w13[e, :inter_size], w13_scale[e, :rows].contiguous(),
                                              block_size, **f32)
            up = fp8_block_linear_reference(a, w13[e, inter_size:], w13_scale[e, rows:].contiguous(),
                                            block_size, **f32)
            return torch.cat([gate, up], dim=1)
        return gate_up, lambda a: fp8_block_linear_reference(a, w2[e], w2_scale[e], block_size, **f32)

    return _moe_loop(x, topk_weights, topk_ids, experts)


def fused_moe_w4a16_reference(x, w13_qweight, w13_scales, w13_zeros, w2_qweight, w2_scales, w2_zeros,
                              topk_weights, topk_ids, group_size, w13_g_idx=None,
                              w2_g_idx=None) -> torch.Tensor:
    """Reference of `fused_moe_w4a16`: each expert through quant_w4a16's reference."""
    _, hidden_size, _, inter_size, _ = _check_w4a16(
        x, (w13_qweight, w13_scales, w13_zeros, w13_g_idx), (w2_qweight, w2_scales, w2_zeros, w2_g_idx),
        topk_weights, topk_ids, group_size)
    group13 = group_size if group_size > 0 else hidden_size
    group2 = group_size if group_size > 0 else inter_size

    def experts(e):
        g13 = w13_g_idx[e] if w13_g_idx is not None else None
        g2 = w2_g_idx[e] if w2_g_idx is not None else None
        return (lambda a: w4a16_linear_reference(a, w13_qweight[e], w13_scales[e], w13_zeros[e], g13,
                                                 group13, out_dtype=torch.float32),
                lambda a: w4a16_linear_reference(a, w2_qweight[e], w2_scales[e], w2_zeros[e], g2, group2,
                                                 out_dtype=torch.float32))

    return _moe_loop(x, topk_weights, topk_ids, experts)


def flops_bytes(num_tokens: int, top_k: int, num_experts: int, hidden_size: int, inter_size: int,
                weight_bits: int = 8, group_size: int = 128) -> tuple[float, float]:
    """(FLOPs, bytes): the routed GEMMs and the touched experts' quantized weights (+ 4-bit
    scales/zeros, 3 bytes per group and column), with uniform routing's expected experts hit."""
    pairs = num_tokens * top_k
    experts_hit = num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** pairs)
    weight_bytes = 3 * hidden_size * inter_size * weight_bits / 8
    if weight_bits == 4:
        weight_bytes += 3 * 3 * hidden_size * inter_size / group_size
    nbytes = experts_hit * weight_bytes + 2 * 2 * num_tokens * hidden_size
    return 6.0 * pairs * hidden_size * inter_size, float(nbytes)
