"""scatter_rows (vision embeddings into a VL prompt's pad rows, deepstack adds) vs its reference."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import scatter

# (rows of dst, rows written, width)
SHAPES = [(5, 1, 16), (40, 17, 100), (64, 64, 72)] + ([(5000, 999, 3584)] if ON_GPU else [])


def _inputs(total: int, n: int, width: int, dtype: torch.dtype, device: torch.device):
    gen = torch.Generator().manual_seed(total + n + width)
    dst = torch.randn(total, width, generator=gen).to(dtype=dtype, device=device)
    rows = torch.randperm(total, generator=gen)[:n].to(device)
    src = torch.randn(n, width, generator=gen).to(dtype=dtype, device=device)
    return dst, rows, src


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("total,n,width", SHAPES)
@pytest.mark.parametrize("accumulate", [False, True])
def test_scatter_rows(device, dtype, total, n, width, accumulate):
    dst, rows, src = _inputs(total, n, width, dtype, device)
    expected = dst.double().cpu()
    if accumulate:
        expected[rows.cpu()] += src.double().cpu()
    else:
        expected[rows.cpu()] = src.double().cpu()
    ref = dst.clone()
    scatter.scatter_rows(dst, rows, src, accumulate)
    scatter.scatter_rows_reference(ref, rows, src, accumulate)
    assert_close(dst, expected, dtype, "vs float64")
    assert torch.equal(dst, ref), "differs from the reference"
    untouched = torch.ones(total, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert torch.equal(dst.cpu()[untouched], expected[untouched].to(dtype)), "other rows changed"


def test_int32_rows_and_another_src_dtype(device):
    dst, rows, src = _inputs(12, 5, 24, torch.float16, device)
    ref = dst.clone()
    scatter.scatter_rows(dst, rows.to(torch.int32), src.float())
    scatter.scatter_rows_reference(ref, rows, src.float())
    assert torch.equal(dst, ref)


def test_bad_inputs(device):
    dst, rows, src = _inputs(8, 3, 16, torch.float32, device)
    with pytest.raises(ValueError, match="len\\(rows\\)"):
        scatter.scatter_rows(dst, rows[:2], src)
    with pytest.raises(ValueError, match="int32/int64"):
        scatter.scatter_rows(dst, rows.float(), src)
    with pytest.raises(ValueError, match="2-D"):
        scatter.scatter_rows(dst[0], rows, src)
