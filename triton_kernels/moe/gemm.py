"""Grouped expert GEMMs of ``fused_moe`` (see the package docstring, step 3).

Both GEMM kernels walk the expert-grouped pair list from
``moe_align_block_size``: program ``(pid_m, pid_n)`` takes BLOCK_M pairs that
all belong to expert ``expert_ids[pid_m]`` and one BLOCK_N column tile, and
gathers its A rows by pair id (``x`` rows are ``pair // k``). Padding pairs
(the sentinel) read row 0 and are never stored; blocks past
``num_tokens_post_padded`` return at once. Tiles come from ``_pick_config``,
an explicit table keyed by the number of pairs.
"""
from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from triton_kernels.moe.decode import DECODE_MAX_PAIRS, fused_moe_decode
from triton_kernels.moe.routing import moe_align_block_size
from triton_kernels.runtime import interpreting

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@dataclasses.dataclass(frozen=True)
class MoeConfig:
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


DECODE_TIER_PAIRS = 64  # up to this many (token, expert) rows a launch is a decode weight stream


def _pick_config(num_pairs: int, dtype: torch.dtype) -> MoeConfig:
    if interpreting():
        return MoeConfig(16, 64, 64, 4, 1)
    if dtype == torch.float32:
        return MoeConfig(32, 32, 32, 4, 2)
    # From an H200 sweep on Qwen3-30B-A3B shapes (E=128, k=8, H=2048, I=768).
    if num_pairs <= DECODE_TIER_PAIRS:  # decode: a weight stream, thin M
        return MoeConfig(16, 64, 128, 4, 4)
    if num_pairs <= 1024:
        return MoeConfig(16, 128, 128, 4, 3)
    if num_pairs <= 4096:
        return MoeConfig(32, 128, 64, 4, 3)
    if num_pairs <= 16384:
        return MoeConfig(64, 128, 64, 8, 3)
    return MoeConfig(128, 128, 64, 8, 3)


@triton.jit
def _moe_gate_up_kernel(x_ptr, w13_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
                        num_pairs, inter_size, hidden_size,
                        stride_xt, stride_we, stride_wn, stride_at,
                        TOP_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, IS_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = tl.where(valid, pairs // TOP_K, 0).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        cols = tl.where(offs_n < inter_size, offs_n, 0).to(tl.int64)
        x_ptrs = x_ptr + rows[:, None] * stride_xt + offs_k[None, :]
        gate_ptrs = w13_ptr + expert * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
        up_ptrs = gate_ptrs + inter_size * stride_wn
        acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, hidden_size, BLOCK_K):
            k_mask = (k0 + offs_k) < hidden_size
            a = tl.load(x_ptrs, mask=k_mask[None, :], other=0.0)
            gate = tl.load(gate_ptrs, mask=k_mask[:, None], other=0.0)
            up = tl.load(up_ptrs, mask=k_mask[:, None], other=0.0)
            if IS_FP32:
                acc_gate += tl.dot(a, gate, input_precision="ieee")
                acc_up += tl.dot(a, up, input_precision="ieee")
            else:
                acc_gate += tl.dot(a, gate)
                acc_up += tl.dot(a, up)
            x_ptrs += BLOCK_K
            gate_ptrs += BLOCK_K
            up_ptrs += BLOCK_K
        act = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up  # silu(gate) * up
        out_ptrs = act_ptr + pairs.to(tl.int64)[:, None] * stride_at + offs_n[None, :]
        tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < inter_size))


@triton.jit
def _moe_down_kernel(act_ptr, w2_ptr, out_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr,
                     num_post_pad_ptr, num_pairs, hidden_size, inter_size,
                     stride_at, stride_we, stride_wn, stride_ot,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     IS_FP32: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if pid_m * BLOCK_M < tl.load(num_post_pad_ptr):
        pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = pairs < num_pairs
        rows = tl.where(valid, pairs, 0).to(tl.int64)
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        cols = tl.where(offs_n < hidden_size, offs_n, 0).to(tl.int64)
        a_ptrs = act_ptr + rows[:, None] * stride_at + offs_k[None, :]
        w_ptrs = w2_ptr + expert * stride_we + cols[None, :] * stride_wn + offs_k[:, None]
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for k0 in range(0, inter_size, BLOCK_K):
            k_mask = (k0 + offs_k) < inter_size
            a = tl.load(a_ptrs, mask=k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[:, None], other=0.0)
            if IS_FP32:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
            a_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        acc *= tl.load(topk_weights_ptr + rows)[:, None]
        out_ptrs = out_ptr + pairs.to(tl.int64)[:, None] * stride_ot + offs_n[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & (offs_n[None, :] < hidden_size))


@triton.jit
def _moe_sum_kernel(partial_ptr, y_ptr, hidden_size, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs_h < hidden_size
    total = tl.zeros([BLOCK_H], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        total += tl.load(partial_ptr + (token * TOP_K + j) * hidden_size + offs_h,
                         mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + token * hidden_size + offs_h, total.to(y_ptr.dtype.element_ty), mask=mask)


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x[T, H], w13[E, 2I, H], w2[E, H, I], topk_weights[T, k] fp32, topk_ids[T, k] int32
    -> y[T, H] = sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]).
    At most DECODE_MAX_PAIRS (token, expert) pairs take decode.py's two-launch path."""
    num_tokens, _, _, _, top_k = _check_moe(x, w13, w2, topk_weights, topk_ids)
    if num_tokens * top_k <= DECODE_MAX_PAIRS and x.dtype != torch.float64:
        return fused_moe_decode(x, w13, w2, topk_weights, topk_ids)
    return launch_fused_moe(x, w13, w2, topk_weights, topk_ids, config=None)


def launch_fused_moe(x, w13, w2, topk_weights, topk_ids, config: MoeConfig | None = None):
    """`fused_moe` with an optional explicit tile config (benchmarks)."""
    num_tokens, hidden_size, num_experts, inter_size, top_k = _check_moe(
        x, w13, w2, topk_weights, topk_ids)
    num_pairs = num_tokens * top_k
    config = config or _pick_config(num_pairs, x.dtype)
    sorted_ids, expert_ids, num_post_pad = moe_align_block_size(topk_ids, num_experts,
                                                                config.block_m)
    num_blocks = expert_ids.shape[0]
    act = torch.empty((num_pairs, inter_size), dtype=x.dtype, device=x.device)
    partial = torch.empty((num_pairs, hidden_size), dtype=x.dtype, device=x.device)
    y = torch.empty((num_tokens, hidden_size), dtype=x.dtype, device=x.device)
    meta = dict(BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
                IS_FP32=x.dtype == torch.float32, num_warps=config.num_warps,
                num_stages=config.num_stages)
    _moe_gate_up_kernel[(num_blocks, triton.cdiv(inter_size, config.block_n))](
        x, w13, act, sorted_ids, expert_ids, num_post_pad, num_pairs, inter_size, hidden_size,
        x.stride(0), w13.stride(0), w13.stride(1), act.stride(0), TOP_K=top_k, **meta)
    _moe_down_kernel[(num_blocks, triton.cdiv(hidden_size, config.block_n))](
        act, w2, partial, topk_weights, sorted_ids, expert_ids, num_post_pad, num_pairs,
        hidden_size, inter_size, act.stride(0), w2.stride(0), w2.stride(1), partial.stride(0),
        **meta)
    block_h = min(1024, triton.next_power_of_2(hidden_size))
    _moe_sum_kernel[(num_tokens, triton.cdiv(hidden_size, block_h))](
        partial, y, hidden_size, TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return y


def fused_moe_reference(x, w13, w2, topk_weights, topk_ids) -> torch.Tensor:
    """Reference of `fused_moe`: a loop over experts in fp32 (fp64 stays fp64)."""
    _check_moe(x, w13, w2, topk_weights, topk_ids)
    cdt = torch.float64 if x.dtype == torch.float64 else torch.float32
    inter_size = w2.shape[2]
    y = torch.zeros(x.shape, dtype=cdt, device=x.device)
    for expert in torch.unique(topk_ids).tolist():
        token_idx, slot_idx = torch.nonzero(topk_ids == expert, as_tuple=True)
        h = x[token_idx].to(cdt) @ w13[expert].to(cdt).t()
        act = torch.nn.functional.silu(h[:, :inter_size]) * h[:, inter_size:]
        out = (act @ w2[expert].to(cdt).t()) * topk_weights[token_idx, slot_idx, None].to(cdt)
        y.index_add_(0, token_idx, out)
    return y.to(x.dtype)


def moe_flops_bytes(num_tokens: int, top_k: int, num_experts: int, hidden_size: int,
                    inter_size: int, elem_bytes: int = 2) -> tuple[float, float]:
    """FLOPs of the routed GEMMs and the weight bytes touched, with the expected number of
    distinct experts hit by uniform routing: E * (1 - (1 - 1/E)^pairs)."""
    pairs = num_tokens * top_k
    flops = 6.0 * pairs * hidden_size * inter_size
    experts_hit = num_experts * (1.0 - (1.0 - 1.0 / num_experts) ** pairs)
    nbytes = elem_bytes * (experts_hit * 3 * hidden_size * inter_size + 2 * num_tokens * hidden_size)
    return flops, float(nbytes)


def _check_moe(x, w13, w2, topk_weights, topk_ids) -> tuple[int, int, int, int, int]:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3:
        raise ValueError(f"expected x[T,H], w13[E,2I,H], w2[E,H,I]; got {tuple(x.shape)}, "
                         f"{tuple(w13.shape)}, {tuple(w2.shape)}")
    num_tokens, hidden_size = x.shape
    num_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    if w13.shape[2] != hidden_size or two_inter % 2 or w2.shape != (num_experts, hidden_size, inter_size):
        raise ValueError(f"w13 {tuple(w13.shape)} / w2 {tuple(w2.shape)} do not match x hidden "
                         f"size {hidden_size}")
    if x.dtype not in _DTYPES + (torch.float64,) or w13.dtype != x.dtype or w2.dtype != x.dtype:
        raise ValueError(f"x, w13, w2 must share fp16/bf16/fp32, got {x.dtype}, {w13.dtype}, {w2.dtype}")
    for name, t in (("x", x), ("w13", w13), ("w2", w2)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != num_tokens or topk_ids.dtype != torch.int32:
        raise ValueError(f"topk_ids must be [{num_tokens}, k] int32, got {topk_ids.dtype} "
                         f"{tuple(topk_ids.shape)}")
    if topk_weights.shape != topk_ids.shape or topk_weights.dtype != torch.float32:
        raise ValueError(f"topk_weights must be {tuple(topk_ids.shape)} fp32, got "
                         f"{topk_weights.dtype} {tuple(topk_weights.shape)}")
    if num_tokens == 0:
        raise ValueError("x is empty: fused_moe needs at least one token")
    return num_tokens, hidden_size, num_experts, inter_size, topk_ids.shape[1]
