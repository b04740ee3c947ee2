"""Tiles of the quantized GEMMs (quant_w8a8.py, quant_w4a16.py), and their split-K epilogue.

A quantized weight is a stream of bytes like a 16-bit one, only shorter, so a
decode step (M <= 16 tokens) is bound by how fast every SM pulls weight rows,
exactly as in ``gemm_decode.py``. One output tile per program leaves most SMs
idle when N is small (``o_proj``: 4096 columns / 64 = 64 programs on 132
SMs), so at decode the K axis is split as well: each program multiplies one
K slice (whole ``block_k`` tiles) and writes fp32 partial sums, and
``gemm_decode._splitk_reduce_kernel`` adds the slices (deterministic, no
atomics) and the bias. ``QuantTile`` is the data of one choice; ``tile_for``
picks it by M from the table below, and the launchers take an explicit tile
so ``perf/bench_kernels.py`` can time alternatives.
"""
from __future__ import annotations

import dataclasses

import torch
import triton

from triton_kernels.gemm_decode import _splitk_reduce_kernel
from triton_kernels.runtime import interpreting, num_sms


@dataclasses.dataclass(frozen=True)
class QuantTile:
    """One launch shape: output tile, K step, warps, pipeline stages, how many programs per
    SM to aim for by splitting K (0: no split), and (W4A16) whether packed words are loaded
    once each. The fp8-block kernel steps K by the scale block instead, and the 8-bit
    channel kernel by at least 128 on CUDA."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    target_programs_per_sm: int = 0
    packed_loads: bool = False    # W4A16: load each packed int32 once and unpack in registers
    act_quant: bool = True        # W8A8: quantise the activations (False: weight-only products)
    prequant: bool = False        # W8A8: quantise them once, in a kernel of their own, before the GEMM
    gemv: bool = False            # products on the CUDA cores for up to block_m rows (no tl.dot)
    tma: bool = False             # W8A8 prequant: the persistent TMA kernel where the tensors allow


INTERPRETER_TILE = QuantTile(32, 32, 32, 4, 1)
# Decode (M <= 16): thin tiles, split K up to ~2 programs per SM, 8-bit weights multiplied
# as 16-bit. Prefill: big MMA tiles, x quantised once before the GEMM (quant_w8a8.py's
# module doc says why); above 64 rows the persistent TMA kernel (8-bit K steps of 128 bytes).
# W4A16 loads each packed word once (without, every word is loaded for each of its 8 rows:
# 124 KiB of shared memory and ~23 instructions per weight at 16 rows, per the sm90 SASS),
# takes GEMV_TILE at 1-4 rows, W4A16_MID_TILE at 65-255 and dequantises from 256 (quant_w4a16.py).
CUDA_TILES = {
    16: QuantTile(16, 64, 128, 4, 4, target_programs_per_sm=2, packed_loads=True, act_quant=False),
    64: QuantTile(64, 64, 64, 4, 3, packed_loads=True, prequant=True),
    None: QuantTile(128, 128, 128, 8, 4, prequant=True, tma=True),
}
# Block-scaled FP8 above 64 rows: the TMA kernel keeps two fp32 tiles (each K step's products
# and the sum), so half the columns of CUDA_TILES[None] (sm90 SASS: 128 x 128 took 241
# registers and spilled with a bias; 128 x 64 takes 133).
FP8_BLOCK_TMA_TILE = QuantTile(128, 64, 128, 8, 4, prequant=True, tma=True)
# W4A16 at 1-4 tokens: the dequantised weight never leaves registers (quant_w4a16.py says why).
GEMV_TILE = QuantTile(4, 64, 128, 4, 4, target_programs_per_sm=2, gemv=True)
# W4A16 at 65-255 tokens (batched decode): one tall tile unpacks each weight for up to 128 rows.
W4A16_MID_TILE = QuantTile(128, 64, 64, 8, 3, packed_loads=True)


def tile_for(M: int, device: torch.device, gemv_ok: bool = False, block_scales: bool = False) -> QuantTile:
    """The table's tile for M rows on ``device`` (the interpreter's small one off CUDA);
    ``gemv_ok``: the caller has a CUDA-core kernel (``GEMV_TILE``) for up to 4 rows;
    ``block_scales``: block-scaled FP8, whose prefill tile is ``FP8_BLOCK_TMA_TILE``."""
    if interpreting() or device.type != "cuda":
        return INTERPRETER_TILE
    if gemv_ok and M <= GEMV_TILE.block_m:
        return GEMV_TILE
    for rows, tile in CUDA_TILES.items():
        if rows is not None and M <= rows:
            return tile
    return FP8_BLOCK_TMA_TILE if block_scales else CUDA_TILES[None]


def split_k(tile: QuantTile, M: int, N: int, K: int, block_k: int, device: torch.device) -> int:
    """How many K slices: enough that tiles x slices reach the tile's program target, each
    slice keeping >= 4 K steps; 1 when the tile asks for no split."""
    if tile.target_programs_per_sm <= 0:
        return 1
    sms = num_sms(device) if device.type == "cuda" else 4
    tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n)
    k_steps = triton.cdiv(K, block_k)
    split = 1
    while tiles * split < tile.target_programs_per_sm * sms and k_steps // (2 * split) >= 4 and split < 16:
        split *= 2
    return split


def partials(split: int, M: int, N: int, y: torch.Tensor) -> torch.Tensor:
    """The fp32 [split, M, N] partial-sum buffer (y itself, unused, when not split)."""
    return torch.empty((split, M, N), dtype=torch.float32, device=y.device) if split > 1 else y


def reduce_partials(part: torch.Tensor, bias: torch.Tensor | None, y: torch.Tensor) -> None:
    """y = sum of the K slices (+ bias), rounded once to y's dtype."""
    split, M, N = part.shape
    block = 1024
    _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
        part, bias if bias is not None else y, y, M, N, y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block)
