"""Activations of the MLPs: gated ``y = act(gate) * up`` and plain ``y = gelu(x)``.

The fused gate/up projection writes ``x[M, 2I] = [gate | up]``; these ops read
both halves once and write ``y[M, I]``:

* ``silu_and_mul(x)``: ``silu(gate) * up`` with ``silu(g) = g * sigmoid(g)``
  (Llama, Qwen, Mistral).
* ``gelu_and_mul(x, approximate)``: ``gelu(gate) * up``, exact erf GELU
  (``"none"``) or the tanh approximation (``"tanh"``; Gemma's
  ``gelu_pytorch_tanh``).

* ``gelu(x, approximate)``: ``y[M, N] = gelu(x[M, N])``, ungated (the vision
  towers' MLPs and patch mergers: exact in both mergers, tanh in Qwen3-VL's
  blocks, ``gelu_pytorch_tanh``).

Math in fp32, one rounding at the store. Dtypes bf16/fp16/fp32.
Roofline: memory-bound, ``3*M*I`` elements moved (read 2I, write I per row)
for the gated ops, ``2*M*N`` for ``gelu``; one program handles ``BLOCK``
columns of one row.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.pdl import pdl_args, pdl_wait

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_APPROXIMATIONS = ("none", "tanh")


@triton.jit
def _tanh(x):
    # tanh(x) = sign(x) * (1 - e^(-2|x|)) / (1 + e^(-2|x|)), never overflowing
    # (tl has no tanh shared by triton 3.6 and 3.9).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _gelu(x, TANH: tl.constexpr):
    if TANH:
        inner = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (1.0 + _tanh(inner))
    else:
        return 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))


@triton.jit
def _gelu_kernel(x_ptr, y_ptr, N, stride_xm, stride_ym, TANH: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + cols, _gelu(x, TANH).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_act_kernel(x_ptr, y_ptr, I, stride_xm, stride_ym,
                      ACTIVATION: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    if USE_PDL:
        pdl_wait()
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_xm + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_xm + I + cols, mask=mask, other=0.0).to(tl.float32)
    if ACTIVATION == "silu":
        act = gate / (1.0 + tl.exp(-gate))
    elif ACTIVATION == "gelu":
        act = _gelu(gate, False)
    else:  # gelu_tanh
        act = _gelu(gate, True)
    tl.store(y_ptr + row * stride_ym + cols, (act * up).to(y_ptr.dtype.element_ty), mask=mask)


def _check_gated(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [M, 2I], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; expected bf16, fp16 or fp32")
    if x.shape[0] == 0:
        raise ValueError("x has no rows: empty batch")
    if x.shape[1] == 0 or x.shape[1] % 2:
        raise ValueError(f"x last dim {x.shape[1]} must be even and non-zero ([gate | up])")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim (stride {x.stride(1)})")


def _launch(x: torch.Tensor, activation: str, pdl: bool) -> torch.Tensor:
    M, two_i = x.shape
    inter = two_i // 2
    y = torch.empty((M, inter), dtype=x.dtype, device=x.device)
    block = min(2048, triton.next_power_of_2(inter))
    grid = (M, triton.cdiv(inter, block))
    _gated_act_kernel[grid](x, y, inter, x.stride(0), y.stride(0), ACTIVATION=activation,
                            BLOCK=block, num_warps=max(1, min(8, block // 256)), **pdl_args(x.device, pdl))
    return y


def silu_and_mul(x: torch.Tensor, *, pdl: bool = True) -> torch.Tensor:
    """y[M, I] = silu(x[:, :I]) * x[:, I:]."""
    _check_gated(x)
    return _launch(x, "silu", pdl)


def _check_approximate(approximate: str) -> None:
    if approximate not in _APPROXIMATIONS:
        raise ValueError(f"approximate must be one of {_APPROXIMATIONS}, got {approximate!r}")


def gelu_and_mul(x: torch.Tensor, approximate: str = "none", *, pdl: bool = True) -> torch.Tensor:
    """y[M, I] = gelu(x[:, :I], approximate) * x[:, I:]."""
    _check_gated(x)
    _check_approximate(approximate)
    return _launch(x, "gelu" if approximate == "none" else "gelu_tanh", pdl)


def _check_plain(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"x must be [M, N], got shape {tuple(getattr(x, 'shape', ()))}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"x dtype {x.dtype} not supported; expected bf16, fp16 or fp32")
    if x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"x of shape {tuple(x.shape)} is empty: empty batch")
    if x.stride(1) != 1:
        raise ValueError(f"x must be contiguous in its last dim (stride {x.stride(1)})")


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """y[M, N] = gelu(x[M, N], approximate): exact erf (``"none"``) or the tanh approximation."""
    _check_plain(x)
    _check_approximate(approximate)
    M, N = x.shape
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    block = min(2048, triton.next_power_of_2(N))
    _gelu_kernel[(M, triton.cdiv(N, block))](x, y, N, x.stride(0), y.stride(0), TANH=approximate == "tanh",
                                             BLOCK=block, num_warps=max(1, min(8, block // 256)))
    return y


def gelu_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    _check_plain(x)
    _check_approximate(approximate)
    return torch.nn.functional.gelu(x.float(), approximate=approximate).to(x.dtype)


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    _check_gated(x)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate) * up).to(x.dtype)


def gelu_and_mul_reference(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    _check_gated(x)
    _check_approximate(approximate)
    gate, up = x.float().chunk(2, dim=-1)
    return (torch.nn.functional.gelu(gate, approximate=approximate) * up).to(x.dtype)


def flops_bytes(num_rows: int, intermediate: int, dtype: torch.dtype = torch.bfloat16
                ) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): read [M, 2I], write [M, I]."""
    size = torch.empty((), dtype=dtype).element_size()
    return 6 * num_rows * intermediate, 3 * size * num_rows * intermediate
