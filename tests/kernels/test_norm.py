"""rms_norm, fused_add_rms_norm, head_rms_norm vs HF-rounding reference and float64."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import norm

EPS = 1e-6
ROWS_HIDDEN = [(1, 64), (5, 100), (33, 96)] + ([(1, 4096), (257, 5120), (4096, 4096)] if ON_GPU else [])


def _randn(*shape: int, dtype: torch.dtype, device: torch.device, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=gen).to(dtype=dtype, device=device)


def _float64_norm(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x64 = x.double().cpu()
    return weight.double().cpu() * x64 / torch.sqrt(x64.pow(2).mean(-1, keepdim=True) + EPS)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", ROWS_HIDDEN)
def test_rms_norm(device, dtype, rows, hidden):
    x = _randn(rows, hidden, dtype=dtype, device=device, seed=rows + hidden)
    w = 1 + 0.1 * _randn(hidden, dtype=dtype, device=device, seed=1)
    y = norm.rms_norm(x, w, EPS)
    assert_close(y, _float64_norm(x, w), dtype, "rms_norm vs float64")
    assert_close(y, norm.rms_norm_reference(x, w, EPS), dtype, "rms_norm vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", ROWS_HIDDEN)
def test_fused_add_rms_norm(device, dtype, rows, hidden):
    x = _randn(rows, hidden, dtype=dtype, device=device, seed=rows)
    residual = _randn(rows, hidden, dtype=dtype, device=device, seed=hidden)
    w = 1 + 0.1 * _randn(hidden, dtype=dtype, device=device, seed=2)
    expected_residual = x.double().cpu() + residual.double().cpu()
    residual_ref = residual.clone()
    y = norm.fused_add_rms_norm(x, residual, w, EPS)
    y_ref = norm.fused_add_rms_norm_reference(x, residual_ref, w, EPS)
    assert_close(residual, expected_residual, dtype, "residual += x")
    assert torch.equal(residual, residual_ref), "residual differs from the reference's rounding"
    assert_close(y, _float64_norm(expected_residual, w.double()), dtype, "fused vs float64")
    assert_close(y, y_ref, dtype, "fused vs reference")


def test_rms_norm_matches_hf_module_bitwise_on_half(device):
    """The HF rounding order: normalise in fp32, cast, then multiply by the weight."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    hidden = 96
    module = LlamaRMSNorm(hidden, eps=EPS).to(device=device, dtype=torch.float16)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * _randn(hidden, dtype=torch.float16, device=device, seed=3))
    x = _randn(7, hidden, dtype=torch.float16, device=device, seed=4)
    with torch.no_grad():
        hf = module(x)
    assert torch.equal(norm.rms_norm_reference(x, module.weight.detach(), EPS), hf)
    assert_close(norm.rms_norm(x, module.weight.detach(), EPS), hf, torch.float16, "vs HF")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,heads,head_dim", [(1, 3, 64), (6, 5, 128)] + ([(300, 40, 128)] if ON_GPU else []))
def test_head_rms_norm_on_strided_view(device, dtype, tokens, heads, head_dim):
    """q is a view into a fused qkv row (stride > heads*head_dim)."""
    qkv = _randn(tokens, (heads + 2) * head_dim, dtype=dtype, device=device, seed=tokens)
    q = qkv[:, : heads * head_dim].view(tokens, heads, head_dim)
    w = 1 + 0.1 * _randn(head_dim, dtype=dtype, device=device, seed=5)
    y = norm.head_rms_norm(q, w, EPS)
    assert y.shape == (tokens, heads, head_dim)
    assert_close(y, _float64_norm(q, w), dtype, "head_rms_norm vs float64")
    assert_close(y, norm.head_rms_norm_reference(q, w, EPS), dtype, "head_rms_norm vs reference")


def test_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w = torch.ones(8, device=device)
    with pytest.raises(ValueError, match="weight shape"):
        norm.rms_norm(x, torch.ones(7, device=device), EPS)
    with pytest.raises(ValueError, match="empty batch"):
        norm.rms_norm(x[:0], w, EPS)
    with pytest.raises(ValueError, match="residual shape"):
        norm.fused_add_rms_norm(x, torch.randn(3, 8, device=device), w, EPS)
    with pytest.raises(ValueError, match="3-D"):
        norm.head_rms_norm(x, w, EPS)
    with pytest.raises(ValueError, match="dtype"):
        norm.rms_norm(x.to(torch.int32), w, EPS)


# ----------------------------------------------------------------------------- layer_norm

LN_ROWS_HIDDEN = [(1, 64), (5, 100), (33, 1176 // 3)] + ([(4096, 1152), (9, 4608)] if ON_GPU else [])


def _float64_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    x64 = x.double().cpu()
    centred = x64 - x64.mean(-1, keepdim=True)
    normed = centred / torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + EPS)
    return normed * weight.double().cpu() + bias.double().cpu()


def _ln_params(hidden: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (1 + 0.1 * _randn(hidden, dtype=dtype, device=device, seed=6),
            0.1 * _randn(hidden, dtype=dtype, device=device, seed=7))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", LN_ROWS_HIDDEN)
def test_layer_norm(device, dtype, rows, hidden):
    x = 2 + _randn(rows, hidden, dtype=dtype, device=device, seed=rows * 3 + hidden)   # a non-zero mean
    w, b = _ln_params(hidden, dtype, device)
    y = norm.layer_norm(x, w, b, EPS)
    assert_close(y, _float64_layer_norm(x, w, b), dtype, "layer_norm vs float64")
    assert_close(y, norm.layer_norm_reference(x, w, b, EPS), dtype, "layer_norm vs reference")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", LN_ROWS_HIDDEN)
def test_fused_add_layer_norm(device, dtype, rows, hidden):
    x = _randn(rows, hidden, dtype=dtype, device=device, seed=rows + 11)
    residual = _randn(rows, hidden, dtype=dtype, device=device, seed=hidden + 13)
    w, b = _ln_params(hidden, dtype, device)
    expected_residual = x.double().cpu() + residual.double().cpu()
    residual_ref = residual.clone()
    y = norm.fused_add_layer_norm(x, residual, w, b, EPS)
    y_ref = norm.fused_add_layer_norm_reference(x, residual_ref, w, b, EPS)
    assert_close(residual, expected_residual, dtype, "residual += x")
    assert torch.equal(residual, residual_ref), "residual differs from the reference's rounding"
    assert_close(y, _float64_layer_norm(expected_residual, w, b), dtype, "fused vs float64")
    assert_close(y, y_ref, dtype, "fused vs reference")


def test_layer_norm_strided_rows_and_hf_module(device):
    """Rows of a wider tensor (stride > H), and equality with torch's LayerNorm module."""
    wide = _randn(7, 160, dtype=torch.float32, device=device, seed=8)
    x = wide[:, :96]
    module = torch.nn.LayerNorm(96, eps=EPS).to(device)
    with torch.no_grad():
        module.weight.copy_(1 + 0.1 * _randn(96, dtype=torch.float32, device=device, seed=9))
        module.bias.copy_(0.1 * _randn(96, dtype=torch.float32, device=device, seed=10))
        expected = module(x)
    y = norm.layer_norm(x, module.weight.detach(), module.bias.detach(), EPS)
    assert_close(y, expected, torch.float32, "layer_norm vs nn.LayerNorm")


def test_layer_norm_bad_inputs(device):
    x = torch.randn(4, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(ValueError, match="bias shape"):
        norm.layer_norm(x, w, torch.zeros(7, device=device), EPS)
    with pytest.raises(ValueError, match="weight shape"):
        norm.layer_norm(x, torch.ones(9, device=device), b, EPS)
    with pytest.raises(ValueError, match="empty batch"):
        norm.layer_norm(x[:0], w, b, EPS)
    with pytest.raises(ValueError, match="residual shape"):
        norm.fused_add_layer_norm(x, torch.randn(3, 8, device=device), w, b, EPS)
