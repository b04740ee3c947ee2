"""FP8 / INT8 W8A8 GEMMs with fused dynamic activation quantisation: the Triton kernels
vs their PyTorch references (same quantisation, so tight), and vs the unquantised
float64 matmul (loose: the 8-bit rounding error itself, stated per scheme). Each kernel
also runs with x quantised first by ``quantize_rows`` (the prefill tiles' choice on CUDA)
and weight-only (``act_quant=False``, the decode tiles' choice)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import ON_GPU, assert_close, rel_err
from triton_kernels import quant_w8a8 as q8
from triton_kernels.quant_tiles import CUDA_TILES, FP8_BLOCK_TMA_TILE, GEMV_TILE, QuantTile, split_k

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
SHAPES_CPU = [(1, 40, 72), (5, 33, 160), (37, 97, 96)]                     # (M, N, K)
SHAPES_GPU = [(1, 4096, 4096), (7, 1000, 4096), (300, 1100, 2048), (1024, 4096, 4096), (129, 257, 264)]
# Relative error of 8-bit quantisation of both operands vs the exact product
# (random normal data): fp8 e4m3 has a 3-bit mantissa (~4% per value, averaging
# down over K), int8 with per-row scales ~1%.
QUANT_ERROR = {torch.float8_e4m3fn: 0.06, torch.int8: 0.02}
# How x meets the 8-bit weight: quantised in the GEMM, quantised first by its own kernel
# (same values), or not at all (weight-only: 16-bit products).
MODES = {"fused": dict(act_quant=True, prequant=False), "prequant": dict(act_quant=True, prequant=True),
         "weight-only": dict(act_quant=False)}


def _act_quant(mode: str) -> bool:
    return MODES[mode]["act_quant"]


def _quantize_weight_per_channel(w: torch.Tensor, dtype: torch.dtype):
    qmax = q8.INT8_MAX if dtype == torch.int8 else q8.FP8_MAX
    scale = w.abs().amax(dim=1).clamp_min(1e-10) / qmax
    v = w / scale[:, None]
    wq = torch.round(v).clamp(-128, 127).to(torch.int8) if dtype == torch.int8 else v.to(dtype)
    return wq, scale.float()


def _quantize_weight_blocks(w: torch.Tensor, bn: int, bk: int):
    N, K = w.shape
    gn, gk = -(-N // bn), -(-K // bk)
    padded = torch.nn.functional.pad(w, (0, gk * bk - K, 0, gn * bn - N))
    blocks = padded.view(gn, bn, gk, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-10) / q8.FP8_MAX          # [gn, gk]
    wq = (blocks / scale[:, None, :, None]).view(gn * bn, gk * bk)[:N, :K]
    return wq.to(torch.float8_e4m3fn), scale.float()


def _inputs(M, N, K, dtype, device):
    gen = torch.Generator().manual_seed(M * 17 + N * 3 + K)
    x = torch.randn(M, K, generator=gen)
    x[0, 0] = 8.0                                     # an outlier: the scales must follow it
    w = torch.randn(N, K, generator=gen) / K ** 0.5
    bias = torch.randn(N, generator=gen)
    return x.to(dtype).to(device), w, bias.to(dtype).to(device)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_GPU if ON_GPU else SHAPES_CPU)
def test_channel_kernel(device, wdtype, dtype, shape, mode):
    M, N, K = shape
    x, w, bias = _inputs(M, N, K, dtype, device)
    wq, ws = _quantize_weight_per_channel(w, wdtype)
    wq, ws = wq.to(device), ws.to(device)
    y = q8.w8a8_linear(x, wq, ws, bias, **MODES[mode])
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, q8.w8a8_linear_reference(x, wq, ws, bias, act_quant=_act_quant(mode)), dtype,
                 f"{wdtype} kernel vs reference")
    exact = x.cpu().double() @ w.double().t() + bias.cpu().double()
    assert rel_err(y, exact) < QUANT_ERROR[wdtype]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_GPU if ON_GPU else SHAPES_CPU)
@pytest.mark.parametrize("block", [(128, 128), (16, 32)] if not ON_GPU else [(128, 128)])
def test_block_kernel(device, dtype, shape, block, mode):
    M, N, K = shape
    x, w, bias = _inputs(M, N, K, dtype, device)
    wq, ws = _quantize_weight_blocks(w, *block)
    wq, ws = wq.to(device), ws.to(device)
    y = q8.fp8_block_linear(x, wq, ws, block, bias, **MODES[mode])
    assert y.shape == (M, N) and y.dtype == dtype
    assert_close(y, q8.fp8_block_linear_reference(x, wq, ws, block, bias, act_quant=_act_quant(mode)), dtype,
                 "fp8 block kernel vs reference")
    exact = x.cpu().double() @ w.double().t() + bias.cpu().double()
    assert rel_err(y, exact) < QUANT_ERROR[torch.float8_e4m3fn]


def test_zero_rows_and_fp32_output(device):
    """An all-zero token gets a finite scale and a zero output (plus bias)."""
    x, w, bias = _inputs(3, 40, 64, torch.float16, device)
    x[1] = 0
    wq, ws = _quantize_weight_per_channel(w, torch.int8)
    y = q8.w8a8_linear(x, wq.to(device), ws.to(device), bias, out_dtype=torch.float32)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    assert torch.allclose(y[1], bias.float())


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("group", [None, 32])
def test_quantize_rows_kernel(device, dtype, group):
    """The prequant kernel gives the reference's values and scales exactly (odd K: a short last group)."""
    x, _, _ = _inputs(5, 8, 200, torch.float16, device)
    x[3] = 0                                            # an all-zero row: the floor scale, zero values
    xq, xs = q8.quantize_rows(x, dtype, group)
    ref_q, ref_s = q8.quantize_rows_reference(x, dtype, group)
    assert xq.dtype == dtype and xs.shape == ref_s.shape == (5, -(-200 // (group or 200)))
    assert torch.equal(xs.cpu(), ref_s.cpu())
    assert torch.equal(xq.float().cpu(), ref_q.cpu())


def test_int8_rounding_is_half_up():
    xq, xs = q8.quantize_rows_reference(torch.tensor([[127.0, 0.5, -0.5, 1.5]]), torch.int8)
    assert xs.item() == 1.0 and xq.tolist() == [[127.0, 1.0, 0.0, 2.0]]


def test_bad_inputs_name_the_tensor(device):
    x, w, _ = _inputs(2, 40, 64, torch.float32, device)
    wq, ws = _quantize_weight_per_channel(w, torch.int8)
    with pytest.raises(ValueError, match="weight_scale"):
        q8.w8a8_linear(x, wq.to(device), ws[:5].to(device))
    with pytest.raises(ValueError, match="weight must be"):
        q8.w8a8_linear(x, w.to(device), ws.to(device))
    wb, sb = _quantize_weight_blocks(w, 16, 32)
    with pytest.raises(ValueError, match="weight_scale"):
        q8.fp8_block_linear(x, wb.to(device), sb.to(device), (32, 32))


SPLIT_TILE = QuantTile(16, 32, 32, 4, 1, target_programs_per_sm=8)   # forces K slices at these sizes


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8])
def test_channel_kernel_with_k_split(device, wdtype, mode):
    """The decode launch shape: K cut into slices whose fp32 partials the reduce kernel adds (with the bias)."""
    M, N, K = (3, 40, 512) if not ON_GPU else (1, 4096, 4096)
    tile = SPLIT_TILE if not ON_GPU else QuantTile(16, 64, 128, 4, 4, target_programs_per_sm=2)
    assert split_k(tile, M, N, K, 32 if not ON_GPU else 128, torch.device(device)) > 1
    x, w, bias = _inputs(M, N, K, torch.float32, device)
    wq, ws = (t.to(device) for t in _quantize_weight_per_channel(w, wdtype))
    y = q8.w8a8_linear(x, wq, ws, bias, tile=tile, **MODES[mode])
    assert_close(y, q8.w8a8_linear_reference(x, wq, ws, bias, act_quant=_act_quant(mode)), torch.float32,
                 f"{wdtype} split-K vs reference")


@pytest.mark.parametrize("mode", MODES)
def test_block_kernel_with_k_split(device, mode):
    M, N, K = (3, 40, 512) if not ON_GPU else (1, 4096, 4096)
    block = (16, 32) if not ON_GPU else (128, 128)
    tile = SPLIT_TILE if not ON_GPU else QuantTile(16, 64, 128, 4, 4, target_programs_per_sm=2)
    assert split_k(tile, M, N, K, block[1], torch.device(device)) > 1
    x, w, bias = _inputs(M, N, K, torch.float32, device)
    wq, ws = (t.to(device) for t in _quantize_weight_blocks(w, *block))
    y = q8.fp8_block_linear(x, wq, ws, block, bias, tile=tile, **MODES[mode])
    assert_close(y, q8.fp8_block_linear_reference(x, wq, ws, block, bias, act_quant=_act_quant(mode)), torch.float32,
                 "fp8 block split-K vs reference")


@pytest.mark.parametrize("rows", list(CUDA_TILES))
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8])
def test_the_cuda_tiles(device, rows, wdtype):
    """Each tile of quant_tiles.CUDA_TILES with its own modes (weight-only decode, quantise-first
    prefill), on any device: so the sm90 compile check (perf/compile_check.py) also compiles
    the block sizes, warps and stages the GPU launches, not only the interpreter's tile."""
    tile = CUDA_TILES[rows]
    M, N, K = 5, 72, 256
    x, w, bias = _inputs(M, N, K, torch.float16, device)
    wq, ws = (t.to(device) for t in _quantize_weight_per_channel(w, wdtype))
    y = q8.w8a8_linear(x, wq, ws, bias, tile=tile)
    assert_close(y, q8.w8a8_linear_reference(x, wq, ws, bias, act_quant=tile.act_quant), torch.float16,
                 f"{wdtype} kernel with the {rows}-row CUDA tile vs reference")
    if wdtype == torch.float8_e4m3fn:
        bq, bs = (t.to(device) for t in _quantize_weight_blocks(w, 128, 128))
        y = q8.fp8_block_linear(x, bq, bs, (128, 128), bias, tile=tile)
        assert_close(y, q8.fp8_block_linear_reference(x, bq, bs, (128, 128), bias, act_quant=tile.act_quant),
                     torch.float16, f"fp8 block kernel with the {rows}-row CUDA tile vs reference")


GEMV_TILES = {"gemv": QuantTile(4, 32, 32, 4, 1, gemv=True),
              "gemv-split": QuantTile(4, 32, 32, 4, 1, target_programs_per_sm=8, gemv=True),
              "gemv-cuda": GEMV_TILE}


@pytest.mark.parametrize("name", list(GEMV_TILES))
@pytest.mark.parametrize("M", [1, 3, 6])
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8])
def test_gemv_kernel_channel_scales(device, name, M, wdtype):
    """The CUDA-core weight-only kernel of the 1-4 token tile (6 rows: beyond it, still served),
    K not a multiple of its step, N not one of its column block."""
    tile = GEMV_TILES[name]
    N, K = (40, 200) if tile.block_k == 32 else (72, 392)
    x, w, bias = _inputs(M, N, K, torch.float16, device)
    wq, ws = (t.to(device) for t in _quantize_weight_per_channel(w, wdtype))
    y = q8.w8a8_linear(x, wq, ws, bias, tile=tile)
    assert_close(y, q8.w8a8_linear_reference(x, wq, ws, bias, act_quant=False), torch.float16,
                 f"{wdtype} gemv vs reference")


@pytest.mark.parametrize("name", list(GEMV_TILES))
@pytest.mark.parametrize("M", [1, 3])
def test_gemv_kernel_block_scales(device, name, M):
    N, K, block = 72, 400, (32, 32) if GEMV_TILES[name].block_k == 32 else (128, 128)
    x, w, bias = _inputs(M, N, K, torch.float16, device)
    wq, ws = (t.to(device) for t in _quantize_weight_blocks(w, *block))
    y = q8.fp8_block_linear(x, wq, ws, block, bias, tile=GEMV_TILES[name])
    assert_close(y, q8.fp8_block_linear_reference(x, wq, ws, block, bias, act_quant=False), torch.float16,
                 "fp8 block gemv vs reference")


def test_gemv_tile_refuses_activation_quantisation(device):
    x, w, bias = _inputs(2, 40, 64, torch.float32, device)
    wq, ws = (t.to(device) for t in _quantize_weight_per_channel(w, torch.float8_e4m3fn))
    with pytest.raises(ValueError, match="GEMV tile"):
        q8.w8a8_linear(x, wq, ws, bias, tile=GEMV_TILES["gemv"], act_quant=True)


TMA_TILES = {"tma": QuantTile(32, 32, 32, 4, 1, prequant=True, tma=True),
             "tma-cuda": CUDA_TILES[None], "tma-cuda-block": FP8_BLOCK_TMA_TILE}


@pytest.mark.parametrize("name", list(TMA_TILES))
@pytest.mark.parametrize("wdtype", [torch.float8_e4m3fn, torch.int8])
@pytest.mark.parametrize("shape", [(37, 97, 96), (70, 40, 208)])
def test_tma_kernel_channel_scales(device, name, wdtype, shape):
    """The persistent TMA prefill kernel (x quantised first): ragged M and N tiles, K not a
    multiple of the K step (the descriptor's zero fill), more tiles than programs."""
    M, N, K = shape
    x, w, bias = _inputs(M, N, K, torch.float16, device)
    wq, ws = (t.to(device) for t in _quantize_weight_per_channel(w, wdtype))
    assert q8._tma_ok(TMA_TILES[name], x, wq)
    y = q8.w8a8_linear(x, wq, ws, bias, tile=TMA_TILES[name])
    assert_close(y, q8.w8a8_linear_reference(x, wq, ws, bias), torch.float16, f"{wdtype} TMA kernel vs reference")


@pytest.mark.parametrize("name", list(TMA_TILES))
@pytest.mark.parametrize("block", [(32, 32), (128, 128)])
def test_tma_kernel_block_scales(device, name, block):
    M, N, K = 70, 200, 400
    x, w, bias = _inputs(M, N, K, torch.float16, device)
    wq, ws = (t.to(device) for t in _quantize_weight_blocks(w, *block))
    y = q8.fp8_block_linear(x, wq, ws, block, bias, tile=TMA_TILES[name])
    assert_close(y, q8.fp8_block_linear_reference(x, wq, ws, block, bias), torch.float16,
                 "fp8 block TMA kernel vs reference")


def test_tma_tile_falls_back_on_unaligned_rows(device):
    """A row stride TMA cannot take (K = 100 bytes of fp8) runs the pointer kernel instead."""
    M, N, K = 20, 40, 100
    x, w, bias = _inputs(M, N, K, torch.float16, device)
    wq, ws = (t.to(device) for t in _quantize_weight_per_channel(w, torch.float8_e4m3fn))
    assert not q8._tma_ok(TMA_TILES["tma"], x, wq)
    y = q8.w8a8_linear(x, wq, ws, bias, tile=TMA_TILES["tma"])
    assert_close(y, q8.w8a8_linear_reference(x, wq, ws, bias), torch.float16, "fallback vs reference")


def test_block_scales_take_their_own_prefill_tile(monkeypatch):
    """quant_tiles' table: above 64 rows block-scaled FP8 gets FP8_BLOCK_TMA_TILE, the rest the
    8-bit prefill tile; below, both share the decode tiles."""
    from triton_kernels import quant_tiles
    monkeypatch.setattr(quant_tiles, "interpreting", lambda: False)
    cuda = torch.device("cuda")
    assert quant_tiles.tile_for(65, cuda, block_scales=True) is FP8_BLOCK_TMA_TILE
    assert quant_tiles.tile_for(65, cuda) is CUDA_TILES[None]
    assert quant_tiles.tile_for(16, cuda, block_scales=True) is CUDA_TILES[16]
