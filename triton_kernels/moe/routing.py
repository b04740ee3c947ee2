"""Router top-k and token/expert alignment (see the package docstring, steps 1 and 2)."""
from __future__ import annotations


import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# ----------------------------------------------------------------------------- router top-k
@triton.jit
def _moe_topk_kernel(logits_ptr, weights_ptr, ids_ptr, num_tokens, num_experts, stride_lt,
                     TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                     BLOCK_K: tl.constexpr, RENORMALIZE: tl.constexpr):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_e = tl.arange(0, BLOCK_E)
    offs_k = tl.arange(0, BLOCK_K)
    mask_t = offs_t < num_tokens
    mask_e = offs_e < num_experts
    logits = tl.load(logits_ptr + offs_t.to(tl.int64)[:, None] * stride_lt + offs_e[None, :],
                     mask=mask_t[:, None] & mask_e[None, :], other=0.0).to(tl.float32)
    logits = tl.where(mask_e[None, :], logits, float("-inf"))
    row_max = tl.max(logits, 1)
    probs = tl.exp(logits - row_max[:, None])
    probs = probs / tl.sum(probs, 1)[:, None]
    probs = tl.where(mask_e[None, :], probs, -1.0)  # padding is never picked
    top_w = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.float32)
    top_id = tl.zeros([BLOCK_T, BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        best = tl.max(probs, 1)
        best_id = tl.min(tl.where(probs == best[:, None], offs_e[None, :], BLOCK_E), 1)
        top_w = tl.where(offs_k[None, :] == j, best[:, None], top_w)
        top_id = tl.where(offs_k[None, :] == j, best_id[:, None], top_id)
        probs = tl.where(offs_e[None, :] == best_id[:, None], -1.0, probs)
    if RENORMALIZE:
        top_w = top_w / tl.sum(top_w, 1)[:, None]
    out = offs_t.to(tl.int64)[:, None] * TOP_K + offs_k[None, :]
    mask = mask_t[:, None] & (offs_k[None, :] < TOP_K)
    tl.store(weights_ptr + out, top_w, mask=mask)
    tl.store(ids_ptr + out, top_id, mask=mask)


def moe_topk(router_logits: torch.Tensor, top_k: int,
             renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits[T, E] -> (topk_weights[T, k] fp32, topk_ids[T, k] int32)."""
    num_tokens, num_experts = _check_router(router_logits, top_k)
    weights = torch.empty((num_tokens, top_k), dtype=torch.float32, device=router_logits.device)
    ids = torch.empty((num_tokens, top_k), dtype=torch.int32, device=router_logits.device)
    if num_tokens == 0:
        return weights, ids
    block_e = triton.next_power_of_2(num_experts)
    block_t = max(1, min(64, 4096 // block_e, triton.next_power_of_2(num_tokens)))
    _moe_topk_kernel[(triton.cdiv(num_tokens, block_t),)](
        router_logits, weights, ids, num_tokens, num_experts, router_logits.stride(0),
        TOP_K=top_k, BLOCK_T=block_t, BLOCK_E=block_e,
        BLOCK_K=triton.next_power_of_2(top_k), RENORMALIZE=bool(renormalize), num_warps=4)
    return weights, ids


def moe_topk_reference(router_logits: torch.Tensor, top_k: int,
                       renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference of `moe_topk`."""
    _check_router(router_logits, top_k)
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids.to(torch.int32)


def _check_router(router_logits: torch.Tensor, top_k: int) -> tuple[int, int]:
    if router_logits.dim() != 2 or router_logits.dtype not in _DTYPES:
        raise ValueError(f"router_logits must be [T, E] fp16/bf16/fp32, got "
                         f"{router_logits.dtype} {tuple(router_logits.shape)}")
    if router_logits.stride(1) != 1:
        raise ValueError("router_logits must be contiguous in its last dim")
    num_tokens, num_experts = router_logits.shape
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be in 1..{num_experts} (experts), got {top_k}")
    return num_tokens, num_experts


# ----------------------------------------------------------------------------- alignment
@triton.jit
def _moe_align_kernel(topk_ids_ptr, sorted_ids_ptr, expert_ids_ptr, num_post_pad_ptr,
                      numel, num_experts,
                      BLOCK_M: tl.constexpr, BLOCK_E: tl.constexpr, TILE: tl.constexpr):
    expert = tl.program_id(0)
    offs_e = tl.arange(0, BLOCK_E)
    offs_tile = tl.arange(0, TILE)
    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for start in range(0, numel, TILE):  # pass 1: pairs per expert (padding -> bin E)
        offs = start + offs_tile
        ids = tl.load(topk_ids_ptr + offs, mask=offs < numel, other=num_experts)
        counts += tl.histogram(ids, BLOCK_E)
    counts = tl.where(offs_e < num_experts, counts, 0)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    starts = tl.cumsum(padded, 0) - padded
    is_mine = offs_e == expert
    my_start = tl.sum(tl.where(is_mine, starts, 0), 0)
    my_count = tl.sum(tl.where(is_mine, counts, 0), 0)
    my_end = my_start + tl.sum(tl.where(is_mine, padded, 0), 0)
    written = my_start
    for start in range(0, numel, TILE):  # pass 2: scatter my pairs in token order
        offs = start + offs_tile
        ids = tl.load(topk_ids_ptr + offs, mask=offs < numel, other=num_experts)
        hit = ids == expert
        rank = tl.cumsum(hit.to(tl.int32), 0) - 1
        tl.store(sorted_ids_ptr + written + rank, offs, mask=hit)
        written += tl.sum(hit.to(tl.int32), 0)
    for start in range(my_start + my_count, my_end, TILE):  # sentinel padding
        offs = start + offs_tile
        tl.store(sorted_ids_ptr + offs, numel + offs * 0, mask=offs < my_end)
    for start in range(my_start // BLOCK_M, my_end // BLOCK_M, TILE):  # block -> expert
        offs = start + offs_tile
        tl.store(expert_ids_ptr + offs, expert + offs * 0, mask=offs < my_end // BLOCK_M)
    if expert == 0:
        tl.store(num_post_pad_ptr, tl.sum(padded, 0))


def max_padded_pairs(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Shape-only upper bound of the padded, expert-grouped pair count."""
    return (triton.cdiv(num_pairs, block_m) + min(num_experts, num_pairs)) * block_m


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids[T, k] -> (sorted_ids[P] int32, expert_ids[P // block_m] int32,
    num_tokens_post_padded[1] int32); entries past num_tokens_post_padded are unused."""
    numel = _check_ids(topk_ids, num_experts)
    max_pairs = max_padded_pairs(numel, num_experts, block_m)
    # No fill: the kernel writes every entry below num_post_pad (pairs, sentinels, block owners,
    # the count itself), and the MoE GEMMs read nothing past it.
    sorted_ids = torch.empty((max_pairs,), dtype=torch.int32, device=topk_ids.device)
    expert_ids = torch.empty((max_pairs // block_m,), dtype=torch.int32, device=topk_ids.device)
    num_post_pad = torch.empty(1, dtype=torch.int32, device=topk_ids.device)
    _moe_align_kernel[(num_experts,)](
        topk_ids, sorted_ids, expert_ids, num_post_pad, numel, num_experts,
        BLOCK_M=block_m, BLOCK_E=triton.next_power_of_2(num_experts + 1), TILE=1024, num_warps=4)
    return sorted_ids, expert_ids, num_post_pad


def moe_align_block_size_reference(topk_ids, num_experts, block_m):
    """Reference of `moe_align_block_size` (stable sort by expert)."""
    numel = _check_ids(topk_ids, num_experts)
    flat = topk_ids.reshape(-1).long()
    counts = torch.bincount(flat, minlength=num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat, stable=True).indices
    rank = torch.arange(numel, device=flat.device) - (torch.cumsum(counts, 0) - counts)[flat[order]]
    max_pairs = max_padded_pairs(numel, num_experts, block_m)
    sorted_ids = torch.full((max_pairs,), numel, dtype=torch.int32, device=flat.device)
    sorted_ids[starts[flat[order]] + rank] = order.to(torch.int32)
    expert_ids = torch.full((max_pairs // block_m,), -1, dtype=torch.int32, device=flat.device)
    block_expert = torch.repeat_interleave(torch.arange(num_experts, device=flat.device),
                                           padded // block_m)
    expert_ids[: block_expert.numel()] = block_expert.to(torch.int32)
    return sorted_ids, expert_ids, padded.sum().reshape(1).to(torch.int32)


def _check_ids(topk_ids: torch.Tensor, num_experts: int) -> int:
    if topk_ids.dim() != 2 or topk_ids.dtype != torch.int32 or not topk_ids.is_contiguous():
        raise ValueError(f"topk_ids must be a contiguous [T, k] int32 tensor, got "
                         f"{topk_ids.dtype} {tuple(topk_ids.shape)}")
    if topk_ids.numel() == 0:
        raise ValueError("topk_ids is empty: MoE needs at least one token")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    return topk_ids.numel()
