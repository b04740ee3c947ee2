"""MoE at decode: a few tokens, each routed expert's rows streamed once, no alignment pass.

``fused_moe`` for many tokens sorts the (token, slot) pairs into expert blocks
(``moe_align_block_size``) so each MMA tile belongs to one expert. At decode
there are only ``T * k`` pairs (8 at batch 1 on Qwen3-30B-A3B): the sort is a
launch of its own, every pair fills a 16-row MMA tile alone, and the k
partial outputs of a token need a third launch to be summed. Here, for
``T * k <= DECODE_MAX_PAIRS``, two launches do it all on the CUDA cores:

1. ``_decode_gate_up_kernel``, grid ``(T * k, cdiv(I, BLOCK_N))``: program
   ``(p, n)`` takes pair ``p = t * k + j`` and expert ``e = topk_ids[t, j]``;
   it streams rows ``n`` of ``gate_e`` and ``up_e`` against ``x[t]`` and
   stores ``act[p] = silu(gate) * up`` in x's dtype (as ``fused_moe`` does);
2. ``_decode_down_kernel``, grid ``(T, cdiv(H, BLOCK_N))``: program ``(t, n)``
   adds ``topk_weights[t, j] * down_e(act[t * k + j])`` over the token's k
   slots in fp32 registers and stores ``y[t]`` once: no partial buffer, no
   sum launch, the same order of additions every time.

Each thread keeps an fp32 sum per weight position of its tile (``acc[n, k] +=
w[n, k] * x[k]``) and the rows are summed across threads once, after the K
loop: a sum per K step would put a cross-warp reduction (shuffles, shared
memory, barriers: 8 ``BAR.SYNC`` per step in the sm90 SASS) between each
step's loads and the next. The K loops are ``tl.range(..., num_stages=...)``:
Triton's pipeliner then keeps that many K steps of weights in flight through
``cp.async`` (with a plain ``range`` and the launch's ``num_stages`` the sm90
SASS has plain loads, one step in flight: the loads feed no ``tl.dot``). At
batch 1 the down kernel has one program per SM or fewer, so the loads in
flight per SM are what sets its speed.

Only the routed experts' rows are read, ``3 * I * H`` weights per pair (pairs
of different tokens may read one expert twice; at T <= 4 that is rare and L2
often serves the second read). ``DecodeMoeConfig`` is the tile data.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from triton_kernels.runtime import interpreting

DECODE_MAX_PAIRS = 32          # T * k at or below this takes the decode path (batch <= 4 at k = 8)


@dataclasses.dataclass(frozen=True)
class DecodeMoeConfig:
    """Rows of w13 (per half) and of w2 per program, the K step, warps, pipeline stages."""

    gate_up_block_n: int
    down_block_n: int
    block_k: int
    num_warps: int
    num_stages: int


INTERPRETER_CONFIG = DecodeMoeConfig(16, 16, 32, 4, 1)
CUDA_CONFIG = DecodeMoeConfig(16, 16, 256, 4, 3)


@triton.jit
def _decode_gate_up_kernel(x_ptr, w13_ptr, ids_ptr, act_ptr, inter_size, hidden_size,
                           stride_xt, stride_we, stride_wn, stride_ap,
                           TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           EVEN_K: tl.constexpr = False, NUM_STAGES: tl.constexpr = 1):
    pair = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < inter_size
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_xt
    gate_rows = w13_ptr + expert * stride_we + tl.where(row_mask, rows, 0).to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + inter_size * stride_wn
    acc_gate = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)    # per-weight sums (module doc)
    acc_up = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    for k0 in tl.range(0, hidden_size, BLOCK_K, num_stages=NUM_STAGES):   # pipelined loads (module doc)
        kk = k0 + offs_k
        k_mask = (kk < hidden_size) | EVEN_K         # EVEN_K: BLOCK_K divides K, no masked lanes
        x = tl.load(tl.broadcast_to(x_row + kk[None, :], (BLOCK_N, BLOCK_K)), mask=k_mask[None, :],
                    other=0.0).to(tl.float32)
        gate = tl.load(gate_rows + kk[None, :], mask=k_mask[None, :], other=0.0).to(tl.float32)
        up = tl.load(up_rows + kk[None, :], mask=k_mask[None, :], other=0.0).to(tl.float32)
        acc_gate += gate * x
        acc_up += up * x
    gate_sum = tl.sum(acc_gate, axis=1)
    act = gate_sum / (1.0 + tl.exp(-gate_sum)) * tl.sum(acc_up, axis=1)
    tl.store(act_ptr + pair.to(tl.int64) * stride_ap + rows, act.to(act_ptr.dtype.element_ty), mask=row_mask)


@triton.jit
def _decode_down_kernel(act_ptr, w2_ptr, ids_ptr, weights_ptr, y_ptr, hidden_size, inter_size,
                        stride_ap, stride_we, stride_wn, stride_yt,
                        TOP_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        EVEN_K: tl.constexpr = False, NUM_STAGES: tl.constexpr = 1):
    token = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < hidden_size
    safe_rows = tl.where(row_mask, rows, 0).to(tl.int64)[:, None] * stride_wn
    offs_k = tl.arange(0, BLOCK_K)
    out = tl.zeros([BLOCK_N], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        pair = token * TOP_K + j
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        routing = tl.load(weights_ptr + pair).to(tl.float32)
        act_row = act_ptr + pair.to(tl.int64) * stride_ap
        w_rows = w2_ptr + expert * stride_we + safe_rows
        acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, inter_size, BLOCK_K, num_stages=NUM_STAGES):
            kk = k0 + offs_k
            k_mask = (kk < inter_size) | EVEN_K
            a = tl.load(tl.broadcast_to(act_row + kk[None, :], (BLOCK_N, BLOCK_K)), mask=k_mask[None, :],
                        other=0.0).to(tl.float32)
            w = tl.load(w_rows + kk[None, :], mask=k_mask[None, :], other=0.0).to(tl.float32)
            acc += w * a
        out += routing * tl.sum(acc, axis=1)
    tl.store(y_ptr + token.to(tl.int64) * stride_yt + rows, out.to(y_ptr.dtype.element_ty), mask=row_mask)


def fused_moe_decode(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, config: DecodeMoeConfig | None = None) -> torch.Tensor:
    """``fused_moe``'s math for a few tokens (shapes checked by the caller, ``gemm.fused_moe``):
    x[T, H], w13[E, 2I, H], w2[E, H, I], topk_weights[T, k] fp32, topk_ids[T, k] -> y[T, H]."""
    num_tokens, hidden_size = x.shape
    inter_size = w2.shape[2]
    top_k = topk_ids.shape[1]
    config = config or (INTERPRETER_CONFIG if interpreting() or x.device.type != "cuda" else CUDA_CONFIG)
    ids = topk_ids.reshape(-1)
    weights = topk_weights.reshape(-1)
    act = torch.empty((num_tokens * top_k, inter_size), dtype=x.dtype, device=x.device)
    y = torch.empty_like(x)
    meta = dict(BLOCK_K=config.block_k, NUM_STAGES=config.num_stages, num_warps=config.num_warps)
    _decode_gate_up_kernel[(num_tokens * top_k, triton.cdiv(inter_size, config.gate_up_block_n))](
        x, w13, ids, act, inter_size, hidden_size, x.stride(0), w13.stride(0), w13.stride(1), act.stride(0),
        TOP_K=top_k, BLOCK_N=config.gate_up_block_n, EVEN_K=hidden_size % config.block_k == 0, **meta)
    _decode_down_kernel[(num_tokens, triton.cdiv(hidden_size, config.down_block_n))](
        act, w2, ids, weights, y, hidden_size, inter_size, act.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        TOP_K=top_k, BLOCK_N=config.down_block_n, EVEN_K=inter_size % config.block_k == 0, **meta)
    return y
