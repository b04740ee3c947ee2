"""Shared helpers of the kernel tests: dtypes per device, tolerances, errors.

On CPU the kernels run under the Triton interpreter, where bf16 arithmetic is
wrong by construction (PITFALLS), so bf16 joins the dtype list only on CUDA.
"""
from __future__ import annotations

import torch

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_available() else [])
ON_GPU = torch.cuda.is_available()


def tolerance(dtype: torch.dtype) -> float:
    """Relative-error budget: fp32 1e-4, fp16/bf16 1e-2."""
    return 1e-4 if dtype == torch.float32 else 1e-2


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (NaN propagates and fails any bound)."""
    out64, ref64 = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30)).item()


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    err = rel_err(out, ref)
    assert err <= tolerance(dtype), f"{what}: relative error {err:.3e} > {tolerance(dtype):.0e} ({dtype})"
