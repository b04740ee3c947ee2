"""Row normalisations: RMSNorm (the decoders, Qwen2.5-VL's vision tower) and LayerNorm
(Qwen3-VL's vision tower).

RMSNorm, ``y = weight * (x / sqrt(mean(x^2) + eps))``: three ops, all matching Hugging Face ``LlamaRMSNorm`` / ``Qwen3RMSNorm``
rounding exactly: the row is upcast to fp32, normalised, cast back to the
input dtype, and only then multiplied by the weight (a product rounded once
to the output dtype).

* ``rms_norm(x[M, H], weight[H], eps) -> y[M, H]``
* ``fused_add_rms_norm(x[M, H], residual[M, H], weight[H], eps) -> y[M, H]``:
  ``residual += x`` in place (rounded to the residual dtype, as HF's
  ``residual + hidden_states``), then ``y = rms_norm(residual)``. One read of
  x and residual, one write of residual and y, instead of two kernels.
* ``head_rms_norm(x[T, heads, D], weight[D], eps) -> y[T, heads, D]``: Qwen3's
  per-head q/k norm; ``x`` may be a strided view into a fused qkv output.

LayerNorm, ``y = (x - mean(x)) / sqrt(var(x) + eps) * weight + bias`` (biased
variance), matching ``torch.nn.functional.layer_norm``: the row is upcast to
fp32, and weight and bias are applied in fp32 before the one rounding.

* ``layer_norm(x[M, H], weight[H], bias[H], eps) -> y[M, H]``
* ``fused_add_layer_norm(x[M, H], residual[M, H], weight[H], bias[H], eps) ->
  y[M, H]``: ``residual += x`` in place (rounded to the residual dtype), then
  ``y = layer_norm(residual)``; the vision blocks' ``hidden + attn(...)``
  folded into the next norm, as ``fused_add_rms_norm`` does for the decoders.

Roofline: memory-bound. ``rms_norm`` moves ``2*M*H`` elements (read + write),
``fused_add_rms_norm`` ``4*M*H``; at H=4096 bf16 and M=4096 that is 64 MiB /
128 MiB, i.e. ~22 / ~45 us at 3 TB/s. One program normalises one row (or
one token's block of heads) with the whole row in registers.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.pdl import pdl_args, pdl_wait

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _load_row(x_ptr, res_ptr, row, cols, mask, stride_xm, stride_rm, HAS_RESIDUAL: tl.constexpr):
    """Row ``row`` of x; with a residual, ``residual += x`` first (rounded to the residual's dtype,
    like HF's 16-bit add, and stored back) and that sum is the row."""
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_rm + cols, mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(res_ptr.dtype.element_ty)
        tl.store(res_ptr + row * stride_rm + cols, x, mask=mask)
    return x


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, y_ptr, H, stride_xm, stride_rm, stride_ym, eps,
                     HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr = False):
    if USE_PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    xf = _load_row(x_ptr, res_ptr, row, cols, mask, stride_xm, stride_rm, HAS_RESIDUAL).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, axis=0) / H + eps)
    normed = (xf * rstd).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _head_rms_norm_kernel(x_ptr, w_ptr, y_ptr, num_heads, D, stride_xt, stride_xh,
                          stride_yt, stride_yh, eps,
                          BLOCK_HEADS: tl.constexpr, BLOCK_D: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < D)
    x = tl.load(x_ptr + token * stride_xt + heads[:, None] * stride_xh + dims[None, :],
                mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / D + eps)
    normed = (x * rstd[:, None]).to(y_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + dims, mask=dims < D, other=0.0).to(tl.float32)
    y = (normed * w[None, :]).to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + token * stride_yt + heads[:, None] * stride_yh + dims[None, :], y, mask=mask)


@triton.jit
def _layer_norm_kernel(x_ptr, res_ptr, w_ptr, b_ptr, y_ptr, H, stride_xm, stride_rm, stride_ym, eps,
                       HAS_RESIDUAL: tl.constexpr, BLOCK_H: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    xf = _load_row(x_ptr, res_ptr, row, cols, mask, stride_xm, stride_rm, HAS_RESIDUAL).to(tl.float32)
    mean = tl.sum(xf, axis=0) / H
    centred = tl.where(mask, xf - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(centred * centred, axis=0) / H + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, (centred * rstd * w + b).to(y_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------- checks


def _check_rows(name: str, t: torch.Tensor, weight: torch.Tensor, ndim: int) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(getattr(t, 'shape', ()))}")
    if t.dtype not in _DTYPES:
        raise ValueError(f"{name} dtype {t.dtype} not supported; expected bf16, fp16 or fp32")
    if t.shape[0] == 0:
        raise ValueError(f"{name} has no rows (shape {tuple(t.shape)}): empty batch")
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dim (stride {t.stride(-1)})")
    if weight.dim() != 1 or weight.shape[0] != t.shape[-1]:
        raise ValueError(f"weight shape {tuple(weight.shape)} != ({t.shape[-1]},) of {name}")
    if weight.device != t.device:
        raise ValueError(f"weight is on {weight.device} but {name} is on {t.device}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} not supported")


def _warps_for(num_elements: int) -> int:
    return max(1, min(16, num_elements // 512))


# ----------------------------------------------------------------------------- launchers


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = True) -> torch.Tensor:
    """y[M, H] = weight * rmsnorm(x) (HF rounding). ``pdl``: see triton_kernels/pdl.py."""
    _check_rows("x", x, weight, 2)
    M, H = x.shape
    y = torch.empty((M, H), dtype=x.dtype, device=x.device)
    block_h = triton.next_power_of_2(H)
    _rms_norm_kernel[(M,)](x, x, weight, y, H, x.stride(0), 0, y.stride(0), eps,
                           HAS_RESIDUAL=False, BLOCK_H=block_h, num_warps=_warps_for(block_h),
                           **pdl_args(x.device, pdl))
    return y


def fused_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                       eps: float, *, pdl: bool = True) -> torch.Tensor:
    """residual += x (in place); return weight * rmsnorm(residual)."""
    _check_fused_add(x, residual, weight)
    M, H = x.shape
    y = torch.empty((M, H), dtype=x.dtype, device=x.device)
    block_h = triton.next_power_of_2(H)
    _rms_norm_kernel[(M,)](x, residual, weight, y, H, x.stride(0), residual.stride(0),
                           y.stride(0), eps, HAS_RESIDUAL=True, BLOCK_H=block_h,
                           num_warps=_warps_for(block_h), **pdl_args(x.device, pdl))
    return y


def _check_fused_add(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor) -> None:
    _check_rows("x", x, weight, 2)
    _check_rows("residual", residual, weight, 2)
    if residual.shape != x.shape:
        raise ValueError(f"residual shape {tuple(residual.shape)} != x shape {tuple(x.shape)}")
    if residual.dtype != x.dtype:
        raise ValueError(f"residual dtype {residual.dtype} != x dtype {x.dtype}")


def head_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y[T, heads, D] = weight * rmsnorm over D of each head (Qwen3 q/k norm)."""
    _check_rows("x", x, weight, 3)
    T, num_heads, D = x.shape
    y = torch.empty((T, num_heads, D), dtype=x.dtype, device=x.device)
    block_d = triton.next_power_of_2(D)
    block_heads = min(triton.next_power_of_2(num_heads), max(1, 2048 // block_d))
    grid = (T, triton.cdiv(num_heads, block_heads))
    _head_rms_norm_kernel[grid](x, weight, y, num_heads, D, x.stride(0), x.stride(1),
                                y.stride(0), y.stride(1), eps, BLOCK_HEADS=block_heads,
                                BLOCK_D=block_d, num_warps=_warps_for(block_heads * block_d))
    return y


def _check_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      residual: torch.Tensor | None = None) -> None:
    _check_rows("x", x, weight, 2)
    if not isinstance(bias, torch.Tensor) or bias.shape != weight.shape:
        raise ValueError(f"bias shape {tuple(getattr(bias, 'shape', ()))} != weight shape {tuple(weight.shape)}")
    if bias.device != x.device or bias.dtype not in _DTYPES:
        raise ValueError(f"bias must be bf16, fp16 or fp32 on {x.device}, got {bias.dtype} on {bias.device}")
    if residual is not None:
        _check_fused_add(x, residual, weight)


def _launch_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                       bias: torch.Tensor, eps: float) -> torch.Tensor:
    M, H = x.shape
    y = torch.empty((M, H), dtype=x.dtype, device=x.device)
    block_h = triton.next_power_of_2(H)
    res = x if residual is None else residual
    _layer_norm_kernel[(M,)](x, res, weight, bias, y, H, x.stride(0), res.stride(0), y.stride(0), eps,
                             HAS_RESIDUAL=residual is not None, BLOCK_H=block_h,
                             num_warps=_warps_for(block_h))
    return y


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """y[M, H] = layer_norm(x) * weight + bias (torch's rounding: one, at the store)."""
    _check_layer_norm(x, weight, bias)
    return _launch_layer_norm(x, None, weight, bias, eps)


def fused_add_layer_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor, eps: float) -> torch.Tensor:
    """residual += x (in place); return layer_norm(residual) * weight + bias."""
    _check_layer_norm(x, weight, bias, residual)
    return _launch_layer_norm(x, residual, weight, bias, eps)


# ----------------------------------------------------------------------------- references


def _hf_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm.forward, verbatim math."""
    hidden = x.to(torch.float32)
    variance = hidden.pow(2).mean(-1, keepdim=True)
    hidden = hidden * torch.rsqrt(variance + eps)
    return (weight.to(torch.float32) * hidden.to(x.dtype).to(torch.float32)).to(x.dtype)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_rows("x", x, weight, 2)
    return _hf_rms_norm(x, weight, eps)


def fused_add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                 eps: float) -> torch.Tensor:
    _check_fused_add(x, residual, weight)
    residual.copy_((residual.float() + x.float()).to(residual.dtype))
    return _hf_rms_norm(residual, weight, eps)


def head_rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_rows("x", x, weight, 3)
    return _hf_rms_norm(x, weight, eps)


def layer_norm_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                         eps: float) -> torch.Tensor:
    _check_layer_norm(x, weight, bias)
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def fused_add_layer_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                   bias: torch.Tensor, eps: float) -> torch.Tensor:
    _check_layer_norm(x, weight, bias, residual)
    residual.copy_((residual.float() + x.float()).to(residual.dtype))
    return torch.nn.functional.layer_norm(residual, (x.shape[-1],), weight, bias, eps)


def flops_bytes(num_rows: int, hidden: int, dtype: torch.dtype = torch.bfloat16,
                fused_add: bool = False) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): read x (+ residual), write y (+ residual)."""
    size = torch.empty((), dtype=dtype).element_size()
    passes = 4 if fused_add else 2
    return 4 * num_rows * hidden, size * (passes * num_rows * hidden + hidden)
