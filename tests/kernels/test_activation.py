"""silu_and_mul, gelu_and_mul vs reference and float64."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import activation

SHAPES = [(1, 64), (3, 100), (17, 2 * 300)] + ([(1024, 2 * 14336), (5, 2 * 12288)] if ON_GPU else [])


def _x(rows: int, width: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    gen = torch.Generator().manual_seed(rows * 101 + width)
    return (3 * torch.randn(rows, width, generator=gen)).to(dtype=dtype, device=device)


def _gelu64(g: torch.Tensor, approximate: str) -> torch.Tensor:
    if approximate == "tanh":
        return 0.5 * g * (1 + torch.tanh((2 / torch.pi) ** 0.5 * (g + 0.044715 * g ** 3)))
    return 0.5 * g * (1 + torch.erf(g / 2 ** 0.5))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_silu_and_mul(device, dtype, shape):
    x = _x(*shape, dtype, device)
    y = activation.silu_and_mul(x)
    gate, up = x.double().cpu().chunk(2, dim=-1)
    assert_close(y, gate * torch.sigmoid(gate) * up, dtype, "silu_and_mul vs float64")
    assert_close(y, activation.silu_and_mul_reference(x), dtype, "silu_and_mul vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_and_mul(device, dtype, shape, approximate):
    x = _x(*shape, dtype, device)
    y = activation.gelu_and_mul(x, approximate)
    gate, up = x.double().cpu().chunk(2, dim=-1)
    assert_close(y, _gelu64(gate, approximate) * up, dtype, "gelu_and_mul vs float64")
    assert_close(y, activation.gelu_and_mul_reference(x, approximate), dtype, "vs reference")


def test_bad_inputs(device):
    with pytest.raises(ValueError, match="even"):
        activation.silu_and_mul(torch.randn(2, 7, device=device))
    with pytest.raises(ValueError, match="empty batch"):
        activation.silu_and_mul(torch.randn(0, 8, device=device))
    with pytest.raises(ValueError, match="approximate"):
        activation.gelu_and_mul(torch.randn(2, 8, device=device), "erf")
    with pytest.raises(ValueError, match=r"\[M, 2I\]"):
        activation.silu_and_mul(torch.randn(8, device=device))


PLAIN_SHAPES = [(1, 64), (3, 100), (17, 1000)] + ([(4096, 4304), (1024, 5120)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", PLAIN_SHAPES)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu(device, dtype, shape, approximate):
    x = _x(*shape, dtype, device)
    y = activation.gelu(x, approximate)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, _gelu64(x.double().cpu(), approximate), dtype, "gelu vs float64")
    assert_close(y, activation.gelu_reference(x, approximate), dtype, "gelu vs reference")


def test_gelu_strided_rows_and_erf_differs_from_tanh(device):
    """Rows of a wider tensor; and the two forms really differ (the flag is honoured)."""
    x = _x(5, 300, torch.float32, device)[:, :130]
    exact, tanh = activation.gelu(x, "none"), activation.gelu(x, "tanh")
    assert_close(exact, torch.nn.functional.gelu(x), torch.float32, "strided gelu")
    assert (exact - tanh).abs().max().item() > 1e-5


def test_gelu_bad_inputs(device):
    with pytest.raises(ValueError, match="empty batch"):
        activation.gelu(torch.randn(0, 8, device=device))
    with pytest.raises(ValueError, match="approximate"):
        activation.gelu(torch.randn(2, 8, device=device), "erf")
    with pytest.raises(ValueError, match=r"\[M, N\]"):
        activation.gelu(torch.randn(8, device=device))
