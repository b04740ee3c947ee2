"""Write new tokens' keys and values into the paged KV pool.

``k_cache[slots[t]] = k[t]`` and ``v_cache[slots[t]] = v[t]`` for every token
t, in place. Pools are ``[num_slots, num_kv_heads, head_dim]`` per layer
(contiguous); ``k``/``v`` are ``[T, num_kv_heads, head_dim]`` and may be views
into a fused qkv output (only the last dim must be contiguous). Slots are
int64 (int32 accepted); slot 0 is the padding slot that padded rows write to.
Slots are not range-checked on the device (that needs a host sync).

An FP8 pool (``float8_e4m3fn``, ``--kv-cache-dtype fp8_e4m3``) takes k/v of any
16/32-bit dtype and stores ``e4m3(k / k_scale)`` and ``e4m3(v / v_scale)``
(``kv_fp8.py``); other pools ignore the scales and store k/v as they are.

A scatter copy: roofline is ``4*T*Hk*D`` elements moved (read k, v; write
both). One program copies one token's K and V rows (all heads).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.kv_fp8 import (
    KV_DTYPES, check_kv_scales, is_fp8_cache, store_kv_values, store_values_reference,
)

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _store_kv_kernel(k_cache_ptr, v_cache_ptr, k_ptr, v_ptr, slots_ptr, num_heads, D,
                     stride_kt, stride_kh, stride_vt, stride_vh, stride_cs, stride_ch,
                     k_scale, v_scale,
                     BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr, KV_FP8: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < D)
    slot = tl.load(slots_ptr + token).to(tl.int64)
    cache_offs = slot * stride_cs + heads[:, None] * stride_ch + dims[None, :]
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=mask)
    tl.store(k_cache_ptr + cache_offs,
             store_kv_values(k, k_scale, k_cache_ptr.dtype.element_ty, KV_FP8), mask=mask)
    tl.store(v_cache_ptr + cache_offs,
             store_kv_values(v, v_scale, v_cache_ptr.dtype.element_ty, KV_FP8), mask=mask)


def _check_store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, slots: torch.Tensor) -> None:
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be 3-D, got shape {tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in (KV_DTYPES if name.endswith("cache") else _DTYPES):
            raise ValueError(f"{name} dtype {t.dtype} not supported")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim")
        if t.device != k_cache.device:
            raise ValueError(f"{name} is on {t.device} but k_cache is on {k_cache.device}")
    if v_cache.shape != k_cache.shape or v_cache.stride() != k_cache.stride():
        raise ValueError(f"v_cache {tuple(v_cache.shape)} differs from k_cache {tuple(k_cache.shape)}")
    if k.shape != v.shape:
        raise ValueError(f"v shape {tuple(v.shape)} != k shape {tuple(k.shape)}")
    if k.shape[0] == 0:
        raise ValueError("k has no tokens: empty batch")
    if k.shape[1:] != k_cache.shape[1:]:
        raise ValueError(f"k heads/head_dim {tuple(k.shape[1:])} != k_cache {tuple(k_cache.shape[1:])}")
    if v_cache.dtype != k_cache.dtype or v.dtype != k.dtype:
        raise ValueError(f"k_cache/v_cache dtypes {k_cache.dtype}/{v_cache.dtype} and k/v dtypes "
                         f"{k.dtype}/{v.dtype} must agree")
    if not is_fp8_cache(k_cache) and k.dtype != k_cache.dtype:
        raise ValueError(f"k/v dtype {k.dtype} must equal cache dtype {k_cache.dtype}")
    if slots.dim() != 1 or slots.shape[0] != k.shape[0]:
        raise ValueError(f"slots shape {tuple(slots.shape)} != ({k.shape[0]},)")
    if slots.dtype not in (torch.int64, torch.int32) or slots.device != k.device:
        raise ValueError(f"slots must be int64/int32 on {k.device}, got {slots.dtype} on {slots.device}")


def store_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slots: torch.Tensor, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    """k_cache[slots] = k; v_cache[slots] = v (in place; quantised for an FP8 pool)."""
    _check_store_kv(k_cache, v_cache, k, v, slots)
    check_kv_scales(k_scale, v_scale)
    T, num_heads, D = k.shape
    block_d = triton.next_power_of_2(D)
    block_heads = min(triton.next_power_of_2(num_heads), max(1, 4096 // block_d))
    grid = (T, triton.cdiv(num_heads, block_heads))
    _store_kv_kernel[grid](k_cache, v_cache, k, v, slots, num_heads, D,
                           k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                           k_cache.stride(0), k_cache.stride(1), float(k_scale), float(v_scale),
                           BLOCK_HEADS=block_heads, BLOCK_D=block_d, KV_FP8=is_fp8_cache(k_cache),
                           num_warps=4)


def store_kv_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor,
                       v: torch.Tensor, slots: torch.Tensor, k_scale: float = 1.0,
                       v_scale: float = 1.0) -> None:
    _check_store_kv(k_cache, v_cache, k, v, slots)
    check_kv_scales(k_scale, v_scale)
    k_cache[slots.long()] = store_values_reference(k_cache, k, k_scale)
    v_cache[slots.long()] = store_values_reference(v_cache, v, v_scale)


def flops_bytes(num_tokens: int, num_kv_heads: int, head_dim: int,
                dtype: torch.dtype = torch.bfloat16) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): read k, v and write both into the pool."""
    size = torch.empty((), dtype=dtype).element_size()
    return 0, 4 * size * num_tokens * num_kv_heads * head_dim + 8 * num_tokens
