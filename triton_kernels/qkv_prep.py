"""From the qkv projection to the KV pool in one kernel: q/k norm, RoPE, cache write.

Between the qkv projection and attention every layer does, per token:

1. (Qwen3) a per-head RMSNorm of q and of k (``norm.head_rms_norm``);
2. RoPE on q and k (``rotary.apply_rotary``);
3. the write of k and v into the paged pool at the token's slot
   (``kv_cache.store_kv``).

Each step alone moves a few KB per token: at decode batch sizes the three or
four launches cost more than their bytes, so ``qk_norm_rope_store`` does all of
them in one pass. q and k are updated in place (attention reads q, and the new
tokens' k and v, from the qkv output), and k, v are written to the pool.

Math and roundings are the unfused ops' (up to fp32 contraction order): the norm is computed in fp32 and rounded to the input dtype before and
after its weight (HF Qwen3RMSNorm); RoPE reads those rounded values, rotates in
fp32 and rounds once. Pairs are ``(x[i], x[i + rotary_dim/2])`` (neox) or
``(x[2i], x[2i+1])`` (interleaved); dims past ``rotary_dim`` only get the norm.

Layout: each program takes ``BLOCK_HEADS`` whole head rows of one token (q
heads first, then k heads, whose programs also copy v). A row is loaded twice:
once as is and once permuted to its rotation partner (``x[i + half]`` beside
``x[i]``), which is how a register tile rotates without a shuffle.

Shapes: q[T, Hq, D], k and v[T, Hk, D] (views into the qkv output are fine:
only the last dim must be contiguous), positions[T], cos_sin_cache[P,
rotary_dim] (``rotary.build_cos_sin_cache``), k_cache/v_cache[S, Hk, D],
slots[T]; norm weights [D] or None. An FP8 pool (``float8_e4m3fn``) stores k and
v quantised with the per-tensor ``k_scale`` / ``v_scale`` (``kv_fp8.py``); k is
rounded to its own dtype first, exactly as the unfused path stores it.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.kv_cache import _check_store_kv, store_kv_reference
from triton_kernels.kv_fp8 import check_kv_scales, is_fp8_cache, store_kv_values
from triton_kernels.norm import head_rms_norm_reference
from triton_kernels.pdl import pdl_args, pdl_wait
from triton_kernels.rotary import _check_rotary, apply_rotary_reference


@triton.jit
def _norm_rows(x, w_ptr, w_offs, w_mask, rstd, dtype):
    """HF rounding: (x * rstd) to dtype, times the weight, to dtype (values in fp32)."""
    w = tl.load(w_ptr + w_offs, mask=w_mask, other=0.0).to(tl.float32)
    return ((x * rstd[:, None]).to(dtype).to(tl.float32) * w).to(dtype).to(tl.float32)


@triton.jit
def _prep_rows(x_ptr, token, heads, num_heads, stride_t, stride_h, w_ptr, eps, cos, sin,
               dims, partner, sign, rotating, D: tl.constexpr, HAS_NORM: tl.constexpr):
    """Norm (optional) and rotate rows ``heads`` of one token in place; return them (fp32)."""
    head_mask = heads[:, None] < num_heads
    mask = head_mask & (dims[None, :] < D)
    base = x_ptr + token * stride_t + heads[:, None] * stride_h
    x = tl.load(base + dims[None, :], mask=mask, other=0.0).to(tl.float32)
    x_partner = tl.load(base + partner[None, :], mask=head_mask & rotating[None, :],
                        other=0.0).to(tl.float32)
    if HAS_NORM:
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
        x = _norm_rows(x, w_ptr, dims[None, :], dims[None, :] < D, rstd, x_ptr.dtype.element_ty)
        x_partner = _norm_rows(x_partner, w_ptr, partner[None, :], rotating[None, :], rstd,
                               x_ptr.dtype.element_ty)
    y = tl.where(rotating[None, :], x * cos + (sign * x_partner) * sin, x)
    tl.store(base + dims[None, :], y.to(x_ptr.dtype.element_ty), mask=mask)
    return y, mask


@triton.jit
def _qk_norm_rope_store_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cache_ptr, k_cache_ptr, v_cache_ptr, slots_ptr,
    q_norm_ptr, k_norm_ptr, eps, num_q_heads, num_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cos,
    stride_cs, stride_ch, k_scale, v_scale,
    D: tl.constexpr, HALF: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HEADS: tl.constexpr,
    IS_NEOX: tl.constexpr, HAS_NORM: tl.constexpr, KV_FP8: tl.constexpr,
    USE_PDL: tl.constexpr = False,
):
    if USE_PDL:
        pdl_wait()
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    dims = tl.arange(0, BLOCK_D)
    rotating = dims < 2 * HALF
    if IS_NEOX:  # pair (i, i + HALF)
        pair = tl.where(dims < HALF, dims, dims - HALF)
        partner = tl.where(dims < HALF, dims + HALF, dims - HALF)
        sign = tl.where(dims < HALF, -1.0, 1.0)
    else:        # pair (2i, 2i + 1)
        pair = dims // 2
        partner = dims ^ 1
        sign = tl.where(dims % 2 == 0, -1.0, 1.0)
    partner = tl.where(rotating, partner, 0)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_cos + pair, mask=rotating, other=1.0).to(tl.float32)
    sin = tl.load(cache_ptr + pos * stride_cos + HALF + pair, mask=rotating, other=0.0).to(tl.float32)
    cos = cos[None, :]
    sin = sin[None, :]
    sign = sign[None, :]
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_HEADS)
    if head_block < num_q_blocks:
        heads = head_block * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        _prep_rows(q_ptr, token, heads, num_q_heads, stride_qt, stride_qh, q_norm_ptr, eps,
                   cos, sin, dims, partner, sign, rotating, D, HAS_NORM)
    else:
        heads = (head_block - num_q_blocks) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        k, mask = _prep_rows(k_ptr, token, heads, num_k_heads, stride_kt, stride_kh, k_norm_ptr,
                             eps, cos, sin, dims, partner, sign, rotating, D, HAS_NORM)
        slot = tl.load(slots_ptr + token).to(tl.int64)
        cache_offs = slot * stride_cs + heads[:, None] * stride_ch + dims[None, :]
        k = store_kv_values(k.to(k_ptr.dtype.element_ty), k_scale, k_cache_ptr.dtype.element_ty, KV_FP8)
        tl.store(k_cache_ptr + cache_offs, k, mask=mask)
        v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
        v = store_kv_values(v, v_scale, v_cache_ptr.dtype.element_ty, KV_FP8)
        tl.store(v_cache_ptr + cache_offs, v, mask=mask)


def _check_norm_weights(q: torch.Tensor, q_norm_weight: torch.Tensor | None,
                        k_norm_weight: torch.Tensor | None) -> bool:
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError("q_norm_weight and k_norm_weight must be given together (or neither)")
    if q_norm_weight is None:
        return False
    for name, w in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if w.dim() != 1 or w.shape[0] != q.shape[2] or w.device != q.device:
            raise ValueError(f"{name} must be [{q.shape[2]}] on {q.device}, got "
                             f"{tuple(w.shape)} on {w.device}")
    return True


def _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots, q_norm_weight,
           k_norm_weight) -> tuple[int, bool]:
    rotary_dim = _check_rotary(q, k, positions, cos_sin_cache)
    _check_store_kv(k_cache, v_cache, k, v, slots)
    return rotary_dim, _check_norm_weights(q, q_norm_weight, k_norm_weight)


# Token count from which programs take the wider prefill head blocks.
PREFILL_TOKENS = 512


def qk_norm_rope_store(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                       cos_sin_cache: torch.Tensor, is_neox: bool, k_cache: torch.Tensor,
                       v_cache: torch.Tensor, slots: torch.Tensor,
                       q_norm_weight: torch.Tensor | None = None,
                       k_norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                       k_scale: float = 1.0, v_scale: float = 1.0, *, pdl: bool = True) -> None:
    """In place: q, k <- rope(head_rms_norm(q, k)) (norm only with weights); then
    k_cache[slots] = k, v_cache[slots] = v (quantised with k_scale / v_scale for an
    FP8 pool). ``pdl``: see triton_kernels/pdl.py."""
    rotary_dim, has_norm = _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots,
                                  q_norm_weight, k_norm_weight)
    check_kv_scales(k_scale, v_scale)
    T, num_q_heads, D = q.shape
    num_k_heads = k.shape[1]
    block_d = triton.next_power_of_2(D)
    # Small head blocks at decode (a few tokens: many programs beat few wide ones),
    # twice as many heads per program at prefill (H200, Qwen3-8B heads: 52% -> 63-66%
    # of copy bandwidth at 4096-16384 tokens; programs walking several tokens each
    # were slower).
    row_elems = 512 if T < PREFILL_TOKENS else 1024
    block_heads = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)),
                      max(1, row_elems // block_d))
    grid = (T, triton.cdiv(num_q_heads, block_heads) + triton.cdiv(num_k_heads, block_heads))
    norm_q = q_norm_weight if has_norm else cos_sin_cache  # any pointer when unused
    norm_k = k_norm_weight if has_norm else cos_sin_cache
    _qk_norm_rope_store_kernel[grid](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots, norm_q, norm_k, float(eps),
        num_q_heads, num_k_heads, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), cos_sin_cache.stride(0), k_cache.stride(0), k_cache.stride(1),
        float(k_scale), float(v_scale),
        D=D, HALF=rotary_dim // 2, BLOCK_D=block_d, BLOCK_HEADS=block_heads,
        IS_NEOX=bool(is_neox), HAS_NORM=has_norm, KV_FP8=is_fp8_cache(k_cache), num_warps=4,
        **pdl_args(q.device, pdl))


def qk_norm_rope_store_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                                 is_neox: bool, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                 slots: torch.Tensor, q_norm_weight: torch.Tensor | None = None,
                                 k_norm_weight: torch.Tensor | None = None,
                                 eps: float = 1e-6, k_scale: float = 1.0,
                                 v_scale: float = 1.0) -> None:
    """The three unfused references in sequence (same math, in place)."""
    _, has_norm = _check(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slots,
                         q_norm_weight, k_norm_weight)
    if has_norm:
        q.copy_(head_rms_norm_reference(q, q_norm_weight, eps))
        k.copy_(head_rms_norm_reference(k, k_norm_weight, eps))
    apply_rotary_reference(q, k, positions, cos_sin_cache, is_neox)
    store_kv_reference(k_cache, v_cache, k, v, slots, k_scale, v_scale)
