"""Tile tables of the linear layer (data only): which launch recipe each shape gets.

``GemmConfig`` is one launch recipe; ``gemm._pick_config`` builds it from the
tables below (decode: ``gemm_decode.decode_config``). Every entry names its
fields. The numbers come from sweeps on an H200 with bf16 weights
(perf/sweep_gemm_decode.py, perf/bench_kernels.py --sweep-gemm); how each
table was measured, and what was tried and dropped, is in perf/notes/gemm.md.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One launch recipe. ``kind``:

    * "tiled"  -- gemm.py's pointer kernel (the tutorial one): any shape, dtype, stride;
    * "tma"    -- gemm.py's persistent tensor-descriptor kernel (prefill, aligned tensors);
    * "stream" -- gemm_decode.py's weight-stream kernel (decode): ``split_k`` K slices
      summed by a reduce kernel, ``use_dot=False`` multiplies on the CUDA cores (1-4
      rows), ``swap_ab`` computes ``W x^T`` so that weight rows fill wgmma's 64-row
      side, ``stagger_k`` rotates each program's K loop by ``pid_n * stagger_k`` tiles;
    * "ws"     -- gemm_ws.py's warp-specialised Gluon kernel (decode on Hopper);
      ``stream_k``: its stream-K form, one program per SM.

    ``pdl`` launches it with programmatic dependent launch (triton_kernels/pdl.py).
    """

    kind: str
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    use_dot: bool = True
    pdl: bool = False
    swap_ab: bool = False
    stagger_k: int = 0
    stream_k: bool = False


class DecodeTile(NamedTuple):
    """A decode-table entry; block_m comes from the key (M rounded up to the tile's rows)."""

    block_n: int
    block_k: int
    num_stages: int
    num_warps: int = 4
    split_k: int = 1
    swap_ab: bool = False
    pdl: bool = True
    stagger_k: int = 0
    stream_k: bool = False


class PrefillTile(NamedTuple):
    """A prefill (TMA kernel) tile."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


# Stream-kernel tiles for the projections of Llama-3.1-8B and Qwen3-8B, keyed by
# (N, K, M bucket of 16 or 64 rows). Each is the config whose worst time over
# M = 1, 4, 16 (or 64) was lowest relative to cuBLAS.
DECODE_TUNED: dict[tuple[int, int, int], DecodeTile] = {
    (6144, 4096, 16): DecodeTile(block_n=64, block_k=128, num_stages=6, stagger_k=13),  # qkv
    (6144, 4096, 64): DecodeTile(block_n=64, block_k=64, num_stages=10, pdl=False),
    (4096, 4096, 16): DecodeTile(block_n=64, block_k=128, num_stages=4, split_k=2, swap_ab=True),  # o
    (4096, 4096, 64): DecodeTile(block_n=32, block_k=128, num_stages=6, num_warps=8),
    (28672, 4096, 16): DecodeTile(block_n=64, block_k=128, num_stages=4, swap_ab=True),  # Llama gate_up
    (28672, 4096, 64): DecodeTile(block_n=128, block_k=128, num_stages=4, num_warps=8),
    (4096, 14336, 16): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4, swap_ab=True),  # Llama down
    (4096, 14336, 64): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4),
    (128256, 4096, 16): DecodeTile(block_n=64, block_k=128, num_stages=3, swap_ab=True),  # Llama lm_head
    (128256, 4096, 64): DecodeTile(block_n=128, block_k=128, num_stages=4, num_warps=8),
    (24576, 4096, 16): DecodeTile(block_n=64, block_k=128, num_stages=3, swap_ab=True),  # Qwen3 gate_up
    (24576, 4096, 64): DecodeTile(block_n=64, block_k=64, num_stages=4),  # 384 programs, 3 per SM
    (4096, 12288, 16): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4, swap_ab=True),  # Qwen3 down
    (4096, 12288, 64): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4),
    (151936, 4096, 16): DecodeTile(block_n=64, block_k=128, num_stages=3, swap_ab=True),  # Qwen3 lm_head
    (151936, 4096, 64): DecodeTile(block_n=128, block_k=128, num_stages=4, num_warps=8),
}

# Stream-kernel tiles for every other shape, keyed by (M bucket, shape class):
# "deep" when K >= 2N (an MLP down projection: few output tiles, long rows, K
# split 4 ways), else by N: "narrow" <= 4096, "mid" <= 8192, "wide" above.
DECODE_TABLE: dict[tuple[int, str], DecodeTile] = {
    (16, "deep"): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4, swap_ab=True),
    (16, "narrow"): DecodeTile(block_n=64, block_k=128, num_stages=4, swap_ab=True),
    (16, "mid"): DecodeTile(block_n=32, block_k=128, num_stages=6),
    (16, "wide"): DecodeTile(block_n=64, block_k=128, num_stages=3, swap_ab=True),
    (32, "deep"): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4),
    (32, "narrow"): DecodeTile(block_n=32, block_k=256, num_stages=4),
    (32, "mid"): DecodeTile(block_n=64, block_k=128, num_stages=5, num_warps=8),
    (32, "wide"): DecodeTile(block_n=128, block_k=128, num_stages=4, num_warps=8),
    (64, "deep"): DecodeTile(block_n=128, block_k=128, num_stages=4, split_k=4),
    (64, "narrow"): DecodeTile(block_n=32, block_k=256, num_stages=4),
    (64, "mid"): DecodeTile(block_n=64, block_k=128, num_stages=5, num_warps=8),
    (64, "wide"): DecodeTile(block_n=128, block_k=128, num_stages=4, num_warps=8),
}

# The shapes where the warp-specialised kernel (gemm_ws.py) beats the stream
# kernel, keyed by (N, K, token rows of the tile): plain tiles hold 64 token rows
# (wgmma's long side), swapped ones 8 or 16. A batch takes the smallest tile that
# holds it with at most WS_MAX_PAD_ROWS rows past M (the TMA unit's zero fill of
# those rows is slow). Tiles of 96 and 192 weight rows are two slabs
# (gemm_ws.split_block_n), sized so that the programs fill the SMs about once.
WS_TILE_ROWS = (8, 16, 64)
WS_MAX_PAD_ROWS = 15
DECODE_WS: dict[tuple[int, int, int], DecodeTile] = {
    (6144, 4096, 8): DecodeTile(block_n=64, block_k=128, num_stages=6, swap_ab=True),  # qkv
    (6144, 4096, 64): DecodeTile(block_n=96, block_k=64, num_stages=10),
    (4096, 4096, 64): DecodeTile(block_n=64, block_k=128, num_stages=6),  # o
    (28672, 4096, 8): DecodeTile(block_n=64, block_k=256, num_stages=6, swap_ab=True, stream_k=True),  # Llama gate_up
    (28672, 4096, 16): DecodeTile(block_n=128, block_k=128, num_stages=3, swap_ab=True, pdl=False),
    (28672, 4096, 64): DecodeTile(block_n=128, block_k=64, num_stages=4, pdl=False),
    (24576, 4096, 64): DecodeTile(block_n=192, block_k=128, num_stages=3),  # Qwen3 gate_up
    (151936, 4096, 64): DecodeTile(block_n=128, block_k=128, num_stages=4),  # Qwen3 lm_head
    (4096, 14336, 8): DecodeTile(block_n=64, block_k=256, num_stages=6, swap_ab=True, stream_k=True),  # Llama down
    (4096, 14336, 16): DecodeTile(block_n=64, block_k=256, num_stages=5, swap_ab=True, stream_k=True),
}

# Prefill tiles, in order of preference: the first whose tile count fills the
# last wave of SMs to at least MIN_WAVE_EFFICIENCY wins (128x256 is fastest per
# FLOP; smaller tiles trade that for full waves); else the best-filling one.
PREFILL_TILES: tuple[PrefillTile, ...] = (
    PrefillTile(block_m=128, block_n=256, block_k=64, group_m=8, num_warps=8, num_stages=3),
    PrefillTile(block_m=128, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4),
    PrefillTile(block_m=64, block_n=128, block_k=64, group_m=8, num_warps=4, num_stages=4),
)
MIN_WAVE_EFFICIENCY = 0.8
