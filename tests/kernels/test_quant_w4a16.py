"""W4A16 GEMM: the Triton kernel vs its PyTorch reference vs a float64 dequantised matmul.

Shapes are odd on purpose (N and M not multiples of any block, K a multiple of 8
as the packing needs but not of the block); group sizes that do and do not
divide the kernel's K step, and act-order ``g_idx`` (a permuted group map).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import quant_tiles, quant_w4a16 as w4
from triton_kernels.quant_tiles import CUDA_TILES, GEMV_TILE, QuantTile, split_k

SHAPES_CPU = [(1, 40, 64, 32), (5, 33, 136, 8), (37, 97, 96, 64)]      # (M, N, K, group_size)
SHAPES_GPU = [(1, 4096, 4096, 128), (7, 1000, 4096, 128), (300, 1100, 2048, 128), (129, 257, 264, 8)]


def pack_int4_rows(q: torch.Tensor) -> torch.Tensor:
    """[K, N] ints in [0, 15] -> [K // 8, N] int32, row k at nibble k % 8 (the kernel layout)."""
    K, N = q.shape
    q = q.to(torch.int64).view(K // 8, 8, N)
    packed = torch.zeros(K // 8, N, dtype=torch.int64)
    for j in range(8):
        packed |= q[:, j, :] << (4 * j)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)     # wrap to signed int32


def _inputs(M, N, K, group, dtype, act_order, device):
    gen = torch.Generator().manual_seed(M * 131 + N * 7 + K + group)
    G = -(-K // group)
    q = torch.randint(0, 16, (K, N), generator=gen)
    scales = (torch.rand(G, N, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = torch.randint(0, 16, (G, N), generator=gen).to(torch.uint8)
    g_idx = None
    if act_order:
        g_idx = (torch.arange(K) // group)[torch.randperm(K, generator=gen)].to(torch.int32)
    x = torch.randn(M, K, generator=gen).to(dtype)
    bias = torch.randn(N, generator=gen).to(dtype)
    to = dict(device=device)
    return (x.to(**to), pack_int4_rows(q).to(**to), scales.to(**to), zeros.to(**to),
            None if g_idx is None else g_idx.to(**to), bias.to(**to), q)


def test_unpack_inverts_the_packing():
    q = torch.randint(0, 16, (24, 5))
    assert torch.equal(w4.unpack_int4_rows(pack_int4_rows(q)), q.to(torch.int32))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_GPU if ON_GPU else SHAPES_CPU)
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_matches_reference_and_float64(device, dtype, shape, act_order):
    M, N, K, group = shape
    x, qw, s, z, g_idx, bias, q = _inputs(M, N, K, group, dtype, act_order, device)
    y = w4.w4a16_linear(x, qw, s, z, g_idx, group, bias)
    assert y.shape == (M, N) and y.dtype == dtype
    g = g_idx.long().cpu() if g_idx is not None else torch.arange(K) // group
    w64 = (q - z.cpu()[g].long()).double() * s.cpu()[g].double()            # [K, N]
    exact = x.cpu().double() @ w64 + bias.cpu().double()
    assert_close(y, exact, dtype, "w4a16 vs float64")
    assert_close(y, w4.w4a16_linear_reference(x, qw, s, z, g_idx, group, bias), dtype,
                 "w4a16 vs reference")


def test_fp32_output_and_no_bias(device):
    x, qw, s, z, _, _, _ = _inputs(3, 40, 64, 32, torch.float16, False, device)
    y = w4.w4a16_linear(x, qw, s, z, None, 32, None, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    ref = w4.w4a16_linear_reference(x, qw, s, z, None, 32, None, out_dtype=torch.float32)
    assert_close(y, ref, torch.float32 if not ON_GPU else torch.float16, "fp32 out")


def test_bad_shapes_name_the_tensor(device):
    x, qw, s, z, _, _, _ = _inputs(2, 40, 64, 32, torch.float32, False, device)
    with pytest.raises(ValueError, match="qweight rows"):
        w4.w4a16_linear(x[:, :56], qw, s, z, None, 32)
    with pytest.raises(ValueError, match="zeros"):
        w4.w4a16_linear(x, qw, s, z.to(torch.int32), None, 32)
    with pytest.raises(ValueError, match="g_idx"):
        w4.w4a16_linear(x, qw, s, z, torch.zeros(8, dtype=torch.int32, device=device), 32)


@pytest.mark.parametrize("packed_loads", [False, True])
@pytest.mark.parametrize("act_order", [False, True])
def test_w4a16_with_k_split(device, act_order, packed_loads):
    """The decode launch shape: K cut into slices whose fp32 partials the reduce kernel adds (with the bias)."""
    M, N, K, group = (3, 40, 512, 32) if not ON_GPU else (1, 4096, 4096, 128)
    tile = (QuantTile(16, 32, 32, 4, 1, target_programs_per_sm=8, packed_loads=packed_loads) if not ON_GPU
            else QuantTile(16, 64, 128, 4, 4, target_programs_per_sm=2, packed_loads=packed_loads))
    assert split_k(tile, M, N, K, tile.block_k, torch.device(device)) > 1
    x, qw, s, z, g_idx, bias, _ = _inputs(M, N, K, group, torch.float32, act_order, device)
    y = w4.w4a16_linear(x, qw, s, z, g_idx, group, bias, tile=tile)
    assert_close(y, w4.w4a16_linear_reference(x, qw, s, z, g_idx, group, bias), torch.float32,
                 "w4a16 split-K vs reference")


W4A16_CUDA_TILES = {16: CUDA_TILES[16], 64: CUDA_TILES[64], "mid": quant_tiles.W4A16_MID_TILE}


@pytest.mark.parametrize("rows", list(W4A16_CUDA_TILES))
@pytest.mark.parametrize("packed_loads", [False, True])
def test_the_cuda_tiles(device, rows, packed_loads):
    """Each tensor-core tile W4A16 launches on CUDA (up to 16 and 64 rows, then 65-255;
    larger batches dequantise), with and without packed loads, on any device: so the sm90
    compile check (perf/compile_check.py) also compiles the block sizes, warps and stages
    the GPU launches, not only the interpreter's tile."""
    tile = dataclasses.replace(W4A16_CUDA_TILES[rows], packed_loads=packed_loads)
    M, N, K, group = 5, 72, 256, 128
    x, qw, s, z, g_idx, bias, _ = _inputs(M, N, K, group, torch.float16, False, device)
    y = w4.w4a16_linear(x, qw, s, z, g_idx, group, bias, tile=tile)
    assert_close(y, w4.w4a16_linear_reference(x, qw, s, z, g_idx, group, bias), torch.float16,
                 f"w4a16 with the {rows}-row CUDA tile vs reference")


GEMV_TILES_CPU = {"gemv": QuantTile(4, 32, 32, 4, 1, gemv=True),
                  "gemv-split": QuantTile(4, 32, 32, 4, 1, target_programs_per_sm=8, gemv=True),
                  "gemv-cuda": GEMV_TILE}


@pytest.mark.parametrize("name", list(GEMV_TILES_CPU))
@pytest.mark.parametrize("M", [1, 3, 6])
def test_w4a16_gemv_kernel(device, name, M):
    """The CUDA-core kernel of the 1-4 token tile (one program per row, so 6 rows work too),
    against float64 and the reference; K not a multiple of the K step, N not one of the
    column block."""
    tile = GEMV_TILES_CPU[name]
    N, K, group = (40, 264, 32) if tile.block_k == 32 else (72, 384, 128)
    x, qw, s, z, _, bias, q = _inputs(M, N, K, group, torch.bfloat16, False, device)
    y = w4.w4a16_linear(x, qw, s, z, None, group, bias, tile=tile)
    g = torch.arange(K) // group
    w64 = (q - z.cpu()[g].long()).double() * s.cpu()[g].double()
    assert_close(y, x.cpu().double() @ w64 + bias.cpu().double(), torch.bfloat16, "w4a16 gemv vs float64")
    assert_close(y, w4.w4a16_linear_reference(x, qw, s, z, None, group, bias), torch.bfloat16,
                 "w4a16 gemv vs reference")


def test_gemv_tile_refuses_what_it_cannot_serve(device):
    tile = GEMV_TILES_CPU["gemv"]
    x, qw, s, z, g_idx, _, _ = _inputs(2, 40, 64, 32, torch.float32, True, device)
    with pytest.raises(ValueError, match="GEMV tile"):
        w4.w4a16_linear(x, qw, s, z, g_idx, 32, tile=tile)        # act-order g_idx
    x, qw, s, z, _, _, _ = _inputs(2, 40, 64, 16, torch.float32, False, device)
    with pytest.raises(ValueError, match="GEMV tile"):
        w4.w4a16_linear(x, qw, s, z, None, 16, tile=tile)         # groups shorter than the K step


def test_tile_for_takes_the_gemv_tile_only_where_it_serves(monkeypatch):
    monkeypatch.setattr(quant_tiles, "interpreting", lambda: False)   # the CUDA table, not the interpreter's
    cuda = torch.device("cuda")
    assert quant_tiles.tile_for(1, cuda, gemv_ok=True) is GEMV_TILE
    assert quant_tiles.tile_for(4, cuda, gemv_ok=True) is GEMV_TILE
    assert not quant_tiles.tile_for(5, cuda, gemv_ok=True).gemv
    assert not quant_tiles.tile_for(1, cuda, gemv_ok=False).gemv


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("shape", [(40, 264, 32), (72, 384, 128)])
@pytest.mark.parametrize("blocks", [None, w4.DEQUANTIZE_BLOCKS_CUDA], ids=["default", "cuda-blocks"])
def test_dequantize_kernel(device, shape, act_order, blocks):
    """The prefill path's first half (dense [N, K] weight, rounded once to the scales' dtype)
    against the reference dequantisation, with the device's blocks and the CUDA ones; its
    second half is gemm.linear."""
    N, K, group = shape
    _, qw, s, z, g_idx, _, _ = _inputs(1, N, K, group, torch.float16, act_order, device)
    w = w4.dequantize_w4(qw, s, z, g_idx, group, blocks=blocks)
    assert w.shape == (N, K) and w.dtype == torch.float16
    expected = w4.dequantize(qw, s, z, g_idx, group).to(torch.float16).t()
    assert torch.equal(w.cpu(), expected.cpu())


def test_default_tile_by_batch_rows(monkeypatch):
    """The CUDA launch plan: GEMV at 1-4 rows (not with act-order g_idx), the packed tensor-core
    tiles to 64, the tall tile to 255, dequantise-then-GEMM (None) from DEQUANTIZE_MIN_ROWS."""
    monkeypatch.setattr(w4, "interpreting", lambda: False)
    monkeypatch.setattr(quant_tiles, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert w4._default_tile(1, cuda, None, 128) is GEMV_TILE
    assert w4._default_tile(4, cuda, None, 128) is GEMV_TILE
    assert not w4._default_tile(1, cuda, torch.zeros(8, dtype=torch.int32), 128).gemv
    assert w4._default_tile(5, cuda, None, 128) is CUDA_TILES[16] and CUDA_TILES[16].packed_loads
    assert w4._default_tile(64, cuda, None, 128) is CUDA_TILES[64] and CUDA_TILES[64].packed_loads
    assert w4._default_tile(65, cuda, None, 128) is quant_tiles.W4A16_MID_TILE
    assert w4._default_tile(w4.DEQUANTIZE_MIN_ROWS - 1, cuda, None, 128) is quant_tiles.W4A16_MID_TILE
    assert w4._default_tile(w4.DEQUANTIZE_MIN_ROWS, cuda, None, 128) is None
