"""add_interpolated_pos_embed (Qwen3-VL's resampled position table) vs its reference and float64."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import pos_embed

# (patches, width, table rows); odd widths and a table smaller than the patch count
SHAPES = [(1, 32, 4), (37, 100, 9), (96, 72, 36)] + ([(3 * 1024, 1152, 2304)] if ON_GPU else [])


def _inputs(n: int, d: int, p: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(n * 7 + d)
    x = torch.randn(n, d, generator=gen).to(dtype=dtype, device=device)
    table = torch.randn(p, d, generator=gen).to(dtype=dtype, device=device)
    indices = torch.randint(0, p, (n, 4), generator=gen).to(device)
    weights = torch.rand(n, 4, generator=gen)
    return x, table, indices, (weights / weights.sum(1, keepdim=True)).to(device)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n,d,p", SHAPES)
def test_add_interpolated_pos_embed(device, dtype, n, d, p):
    x, table, indices, weights = _inputs(n, d, p, dtype, device)
    y = pos_embed.add_interpolated_pos_embed(x, table, indices, weights)
    taps = table.double().cpu()[indices.cpu()]                                   # [N, 4, D]
    expected = x.double().cpu() + (taps * weights.double().cpu()[..., None]).sum(1)
    assert_close(y, expected, dtype, "vs float64")
    assert_close(y, pos_embed.add_interpolated_pos_embed_reference(x, table, indices, weights), dtype,
                 "vs reference")


def test_int32_indices_and_out_of_range_rows_read_zero(device):
    x, table, indices, weights = _inputs(6, 40, 5, torch.float32, device)
    indices = indices.to(torch.int32)
    indices[0, 1] = 99                                       # out of range: that tap adds nothing
    y = pos_embed.add_interpolated_pos_embed(x, table, indices, weights)
    ref = pos_embed.add_interpolated_pos_embed_reference(x, table, indices, weights)
    assert_close(y, ref, torch.float32, "vs reference")
    only_valid = x[0] + sum(weights[0, k] * table[int(indices[0, k])] for k in (0, 2, 3))
    assert_close(y[0], only_valid, torch.float32, "row 0 without its out-of-range tap")


def test_bad_inputs(device):
    x, table, indices, weights = _inputs(4, 16, 5, torch.float32, device)
    with pytest.raises(ValueError, match="indices"):
        pos_embed.add_interpolated_pos_embed(x, table, indices[:3], weights)
    with pytest.raises(ValueError, match="float32"):
        pos_embed.add_interpolated_pos_embed(x, table, indices, weights.double())
    with pytest.raises(ValueError, match="table shape"):
        pos_embed.add_interpolated_pos_embed(x, table[:, :8], indices, weights)
    with pytest.raises(ValueError, match="share one"):
        pos_embed.add_interpolated_pos_embed(x, table.half(), indices, weights)
    with pytest.raises(ValueError, match="empty batch"):
        pos_embed.add_interpolated_pos_embed(x[:0], table, indices[:0], weights[:0])
