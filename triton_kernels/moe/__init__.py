"""Mixture-of-experts: router top-k, token/expert alignment, fused expert GEMMs.

Shapes: T tokens, H hidden, E experts, I expert intermediate size, k experts
per token. ``w13[E, 2I, H]`` stacks each expert's gate rows over its up rows
(Hugging Face ``gate_proj``/``up_proj``, ``[out, in]``); ``w2[E, H, I]`` is
``down_proj``.

1. ``moe_topk(router_logits[T, E], top_k, renormalize)``: softmax over the
   experts in fp32, the k largest (ties: lowest expert id), optionally
   renormalized to sum 1 (Qwen3-MoE ``norm_topk_prob``; Qwen2-MoE keeps the
   raw probabilities). Returns ``topk_weights[T, k]`` fp32, ``topk_ids`` int32.
2. ``moe_align_block_size(topk_ids, E, BLOCK_M)``: the ``T*k`` (token, slot)
   pairs, flattened as ``t*k + j``, are grouped by expert and each group is
   padded to a multiple of BLOCK_M with the sentinel ``T*k``. Every GEMM block
   of BLOCK_M rows then belongs to one expert: ``expert_ids[block]``. One
   program per expert: it histograms all ids (``tl.histogram``), takes its
   padded offset from the prefix sum and scatters its own pairs in token
   order (deterministic, no atomics). Buffers have a shape-only upper bound
   ``(cdiv(T*k, BLOCK_M) + min(E, T*k)) * BLOCK_M``; the true length is
   ``num_tokens_post_padded[0]``, read on the device (CUDA-graph friendly).
3. ``fused_moe``: ``y[t] = sum_j w[t,j] * down_e(silu(gate_e x_t) * up_e x_t)``
   with ``e = topk_ids[t, j]``, in three launches:
   ``_moe_gate_up_kernel`` (both halves of w13 in one program, SiLU-and-mul
   fused, writes ``act[T*k, I]``), ``_moe_down_kernel`` (scales by the routing
   weight, writes ``partial[T*k, H]``), ``_moe_sum_kernel`` (adds the k rows of
   each token in fp32). Products accumulate in fp32; ``act`` and ``partial``
   are stored in x's dtype.

Roofline: decode (T*k rows over up to E experts) streams every touched
expert's weights once, ``3*I*H*2`` bytes per expert; prefill does
``6*T*k*H*I`` FLOPs.

Measured on an H200 (bf16, triton 3.6; Qwen3-30B-A3B: E=128, k=8, H=2048,
I=768): T=1 39 us (44% of copy bandwidth in weight bytes), T=16..256
89-97%, T=1024 151 TFLOP/s, T=4096 286 TFLOP/s.
"""
from triton_kernels.moe.gemm import fused_moe, fused_moe_reference, moe_flops_bytes
from triton_kernels.moe.routing import (
    max_padded_pairs,
    moe_align_block_size,
    moe_align_block_size_reference,
    moe_topk,
    moe_topk_reference,
)

__all__ = [
    "moe_topk", "moe_topk_reference", "moe_align_block_size", "moe_align_block_size_reference",
    "max_padded_pairs", "fused_moe", "fused_moe_reference", "moe_flops_bytes",
]
