"""FP8 (e4m3) KV cache: the quantise-on-store and dequantise-on-load pieces.

With ``--kv-cache-dtype fp8_e4m3`` the KV pool holds ``float8_e4m3fn`` K and V,
one byte per element, so the pool holds twice the tokens of a bf16 pool and
decode attention reads half the bytes. Each layer has one fp32 scale for K
and one for V (per tensor; 1.0 unless the checkpoint stores ``k_scale`` /
``v_scale``):

    store:  cache = e4m3(clamp(x / scale, -448, 448))   (round to nearest even)
    load:   x~    = float(cache) * scale                 (in registers)

The store kernels (``kv_cache.store_kv``, ``qkv_prep.qk_norm_rope_store``)
call ``quantize_kv`` and the attention kernels call ``dequantize_kv`` on every
K/V tile read from the pool; the new tokens' K/V of an extend step are read
unquantised from the layer's own k/v, as SGLang does. The rounding is done in
fp32 bits by ``quant_w8a8.round_to_fp8`` (the interpreter's cast alone rounds
wrongly across powers of two). The ``*_reference`` functions below are the
same math in PyTorch, used by the reference backend.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.quant_w8a8 import FP8_MAX, round_to_fp8

KV_FP8_DTYPE = torch.float8_e4m3fn
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, KV_FP8_DTYPE)


@triton.jit
def quantize_kv(x, scale):
    """fp32 x -> float8e4nv of x / scale (saturating at 448)."""
    v = tl.minimum(tl.maximum(x / scale, -448.0), 448.0)
    return round_to_fp8(v).to(tl.float8e4nv)


@triton.jit
def store_kv_values(x, scale, dtype, KV_FP8: tl.constexpr):
    """What a pool of element type ``dtype`` stores for the values x."""
    if KV_FP8:
        return quantize_kv(x.to(tl.float32), scale)
    else:
        return x.to(dtype)


@triton.jit
def dequantize_kv(x, scale, dtype, KV_FP8: tl.constexpr):
    """A tile loaded from the pool, in ``dtype`` (the query's) for the dot products."""
    if KV_FP8:
        return (x.to(tl.float32) * scale).to(dtype)
    else:
        return x


def is_fp8_cache(cache: torch.Tensor) -> bool:
    return cache.dtype == KV_FP8_DTYPE


def check_kv_scales(k_scale: float, v_scale: float) -> None:
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        if not isinstance(s, (int, float)) or not s > 0 or s == float("inf"):
            raise ValueError(f"{name} must be a finite positive number, got {s!r}")


def quantize_kv_reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x (any float dtype) -> float8_e4m3fn of x / scale, saturating."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(KV_FP8_DTYPE)


def dequantize_kv_reference(cache: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Pool rows back in ``dtype``: float(cache) * scale for an fp8 pool, else as is."""
    if not is_fp8_cache(cache):
        return cache.to(dtype)
    return (cache.float() * scale).to(dtype)


def store_values_reference(cache: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
    """What ``cache`` stores for x: quantised for an fp8 pool, else x itself."""
    return quantize_kv_reference(x, scale) if is_fp8_cache(cache) else x
