"""Dense linear layer: ``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N])``.

The weight keeps the Hugging Face layout ``[out_features, in_features]``, so a
checkpoint tensor is used as stored. ``x`` may carry leading dims
(``[*, K]``); they are flattened to ``M`` rows and restored on the output.
Dtypes: bf16, fp16, fp32 (x, weight and bias share one dtype); products
accumulate in fp32, the bias is added in fp32, and one rounding happens at the
store. fp32 inputs use exact ("ieee") products, not tf32.

Roofline (H100, about 3 TB/s copy bandwidth, about 800 TFLOP/s bf16). Bytes
moved ``2*(M*K + N*K + M*N)`` (bf16), work ``2*M*N*K`` FLOPs. Decode shapes
(M <= 64) do at most 64 FLOPs per weight byte, far under the ~260 the chip
needs to be compute-bound: they are a *weight stream*, and the time to beat is
``N*K*2 bytes / bandwidth``. Prefill shapes (M >= 256) are compute-bound.

Three kernels, chosen per shape by ``_pick_config`` (an explicit table, no
autotuning; under ``TRITON_INTERPRET`` a small cheap config):

* ``_linear_stream_kernel`` -- pointer loads, one program per
  ``[BLOCK_M, BLOCK_N]`` output tile and K slice. For decode the tile is thin
  in M and narrow in N so that hundreds of programs stream disjoint weight
  rows at once; when N alone gives too few programs, K is split (``SPLIT_K``)
  and each slice writes fp32 partial sums that ``_splitk_reduce_kernel`` adds
  up (deterministic, no atomics). With ``SWAP_AB`` the MMA computes
  ``W x^T``: Hopper's wgmma needs 64 rows on one side, which 1-16 tokens
  cannot fill but weight rows can (the layout cuBLAS picks for these shapes).
  The same kernel is the fallback for prefill shapes that tensor descriptors
  cannot take.
* ``_linear_tma_kernel`` -- prefill: a persistent grid (one program per SM
  walking output tiles in grouped order for L2 reuse) that loads tiles with
  Hopper tensor descriptors (TMA). TMA needs 16-byte aligned base pointers
  and row strides; a misaligned descriptor can give silently wrong results,
  so the launcher checks and falls back to pointer loads.
* ``triton_kernels/gemm_ws.py`` -- decode on Hopper: the same weight stream,
  warp-specialised (a loader warp keeps a TMA ring full while a warpgroup runs
  the wgmma), written in Gluon. It ties or beats the pointer kernel by 1-3% on
  the shapes in ``_DECODE_WS`` and needs TMA-aligned tensors. Its stream-K
  form (one program per SM, each an equal run of (tile, K tile) steps) serves
  shapes whose tiles fall unevenly into waves of SMs.

Decode launches use programmatic dependent launch (PDL, triton_kernels/pdl.py):
the next kernel's programs start while this one's last programs still stream,
so the gap between two kernels (launch, ramp-up, tail) partly overlaps; in the
benchmark's back-to-back replay it is worth 0.5-1 us per call (3-7% on a
12-16 us projection). One table entry runs without it (see _DECODE_TUNED).

Measured and not kept (H200, perf/sweep_gemm_decode.py; data in
perf/results/gemm-decode-sweep-*.json): stream-K (every program an equal run
of BLOCK_N x BLOCK_K units, cut tiles summed by their last-arriving program)
came within 1% of the stream kernel on Llama's gate_up at M <= 16 and ran
3-22% slower on the other decode shapes (a one-loop variant: 17-66% slower);
thin-M TMA tiles lost to pointer loads at M <= 16; an L2 prefetch of the
first weight bytes before the PDL wait slowed the stream; wide tiles
(128/256) with split-K at M = 64 were 5-15% slower (more partial traffic than
the activation re-reads they save), and 3-20% slower again when the tile's
last-arriving K slice summed the partials in place of the reduce kernel; L2
eviction hints on the weight loads and L1 cache modifiers (.ca/.cg) on the
activation loads changed nothing; giving every program an equal share of N
(tiles with masked spare rows, so that N splits evenly over the SMs) and
staggered K starts in the warp-specialised kernel were within 1%; clusters
(``num_ctas`` 2 or 4) slowed both Triton kernels; swapped warp-specialised
tiles of 192-320 weight rows (one program per SM) for Llama's gate_up were
not among the six best at M = 1 and 4 and 7-24% slower than the table's
tile at M = 16; plain 64-row tiles whose TMA box fetches only x's live
rows (the rest of each slot zeroed once, which removes the zero-fill cost)
with up to three weight slabs (224 = 128 + 64 + 32 rows: 128 programs for
Llama's gate_up) tied or lost to the table at M = 1..16 (at best 0.4% ahead)
and won 1-2.5% at M = 40, outside the benchmark (commit c22d5fd,
gemm-decode-sweep-wslive); triton 3.6's automatic warp
specialisation (``tl.range(warp_specialize=True)`` over a TMA stream) ran
5-45% slower and gave NaNs in one config (hence the hand-written Gluon one).
Triton 3.6 has no TMA multicast (its Gluon lowering stops at "NYI: Support
multicast"), which is how cuBLAS (4-CTA clusters, warp-specialised) keeps
M = 64 projections within 2% of their M = 1 time.
"""
from __future__ import annotations

import dataclasses
import functools
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from triton_kernels.pdl import device_capability, pdl_args, pdl_wait

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


# M is not specialised, so one compiled variant serves every decode batch size.
@triton.jit(do_not_specialize=["M"])
def _linear_stream_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, part_ptr,
    M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    SWAP_AB: tl.constexpr = False, STAGGER_K: tl.constexpr = 0, USE_PDL: tl.constexpr = False,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    # Weight rows past N wrap around (modulo) so weight loads need no N mask;
    # their results are dropped by the masked store. Activation rows past M
    # are masked instead: at decode M is often 1..4 inside a 16-row tile, and
    # wrapped rows would make the tile re-read one row 16 times (measured
    # 10-35% slower at M == 1 than at M == 4 on the same weights).
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = cols < N
    offs_n = cols % N
    offs_k = tl.arange(0, BLOCK_K)
    # This program's K slice, in whole BLOCK_K tiles.
    k_tiles = tl.cdiv(K, BLOCK_K)
    tiles_per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_tile_begin = pid_k * tiles_per_split
    k_tile_end = tl.minimum(k_tile_begin + tiles_per_split, k_tiles)
    k_begin = k_tile_begin * BLOCK_K
    x_rows = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm
    w_rows = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn
    x_ptrs = x_rows + (k_begin + offs_k)[None, :] * stride_xk
    w_ptrs = w_rows + (k_begin + offs_k)[None, :] * stride_wk
    if USE_PDL:
        pdl_wait()
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_k = tl.maximum(k_tile_end - k_tile_begin, 1)
    shift = (pid_n * STAGGER_K) % num_k
    for k_tile in range(k_tile_begin, k_tile_end):
        if STAGGER_K > 0:  # neighbouring programs start at different K offsets
            k_tile = k_tile_begin + (k_tile - k_tile_begin + shift) % num_k
            x_ptrs = x_rows + (k_tile * BLOCK_K + offs_k)[None, :] * stride_xk
            w_ptrs = w_rows + (k_tile * BLOCK_K + offs_k)[None, :] * stride_wk
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_m[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_mask = (k_tile * BLOCK_K + offs_k) < K
            x = tl.load(x_ptrs, mask=mask_m[:, None] & k_mask[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0)
        if SWAP_AB:  # y^T = W x^T: weight rows on the MMA's long side, tokens on its short one
            acc = tl.dot(w, tl.trans(x), acc, input_precision=INPUT_PRECISION)
        elif USE_DOT:
            acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        else:  # GEMV-style: products on the CUDA cores, for M of 1..4 rows
            acc += tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    if SWAP_AB:
        acc = tl.trans(acc)
    rows = offs_m
    out_mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_ym + cols[None, :] * stride_yn
        tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=out_mask)
    else:
        part_ptrs = part_ptr + (pid_k * M + rows.to(tl.int64))[:, None] * N + cols[None, :]
        tl.store(part_ptrs, acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(part_ptr, b_ptr, y_ptr, M, N, stride_ym, stride_yn,
                          HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr = False):
    """y[m, n] = sum_s part[s, m, n] (+ bias[n]), partials in fp32."""
    if USE_PDL:
        pdl_wait()
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(part_ptr + split * M * N + offs, mask=mask, other=0.0)
    rows = offs // N
    cols = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows * stride_ym + cols * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile id -> (pid_m, pid_n), GROUP_M row-tiles at a time so that
    neighbouring programs share weight tiles in L2 (tutorial 03)."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# M (tokens in the batch) is not specialised: one variant per tile config whatever
# the batch, so no compile happens mid-serving when M turns out a multiple of 16.
@triton.jit(do_not_specialize=["M"])
def _linear_tma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    if USE_PDL:  # before the descriptors: they are written to global scratch
        pdl_wait()
    # Descriptors clip at the tensor edge: out-of-range loads read zeros and
    # out-of-range stores are dropped, so no masks are needed.
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    y_desc = tl.make_tensor_descriptor(y_ptr, shape=[M, N], strides=[stride_ym, 1],
                                       block_shape=[BLOCK_M, BLOCK_N])
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    num_tiles = num_pid_m * num_pid_n
    for tile_id in tl.range(tl.program_id(0), num_tiles, NUM_SMS, flatten=True):
        pid_m, pid_n = _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M)
        offs_m = pid_m * BLOCK_M
        offs_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k_tile in range(k_tiles):
            x = x_desc.load([offs_m, k_tile * BLOCK_K])
            w = w_desc.load([offs_n, k_tile * BLOCK_K])
            acc = tl.dot(x, w.T, acc, input_precision=INPUT_PRECISION)
        if HAS_BIAS:
            cols = offs_n + tl.arange(0, BLOCK_N)
            acc += tl.load(b_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
        y_desc.store([offs_m, offs_n], acc.to(y_ptr.dtype.element_ty))


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One launch recipe. ``kind`` is "stream" (pointer kernel, optional
    split-K; ``use_dot=False`` multiplies on the CUDA cores, for 1-4 rows),
    "tma" (persistent tensor-descriptor kernel) or "ws" (warp-specialised
    Gluon kernel, gemm_ws.py; no split-K or stagger). ``pdl`` launches it with
    programmatic dependent launch (Hopper; see triton_kernels/pdl.py).
    ``swap_ab``: the MMA computes ``W x^T`` so that the
    weight rows, not the few tokens, fill its 64-row side (Hopper's wgmma).
    ``stagger_k``: rotate each program's K loop by ``pid_n * stagger_k`` tiles.
    ``stream_k`` (kind "ws"): one program per SM, each an equal run of (tile,
    K tile) steps; a tile cut between two programs is summed in fp32
    (gemm_ws.launch_linear_ws_split)."""

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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _is_hopper(device: torch.device) -> bool:
    """wgmma and the Gluon warp-specialised kernel are sm_90 only."""
    return device_capability(device)[0] == 9


def _num_sms_of(device: torch.device) -> int:
    if device.type != "cuda":
        return 4
    return _num_sms(device.index if device.index is not None else torch.cuda.current_device())


class _Tile(NamedTuple):
    """One decode-table entry (block_m is M rounded up to 16/32/64)."""

    block_n: int
    block_k: int
    split_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False
    pdl: bool = True
    stagger_k: int = 0
    stream_k: bool = False


# Decode tables (16-bit dtypes), from perf/sweep_gemm_decode.py on an H200
# (perf/results/gemm-decode-sweep*-nvidia-h200.json). Narrow BLOCK_N gives
# hundreds of programs, each streaming a disjoint slab of weight rows with
# several K tiles in flight (num_stages). At M <= 16 most shapes stream best
# with swapped operands (W x^T: weight rows fill wgmma's 64-row side, the few
# tokens its narrow side; 1-3% over the plain tile in the swap-pdl sweep).
#
# _DECODE_TUNED: the projections of Llama-3.1-8B and Qwen3-8B, keyed by
# (N, K, M bucket); each entry is the config whose worst time over M = 1, 4,
# 16 (or 64) was lowest relative to cuBLAS. Which tile streams best depends on
# how the program count falls into waves of SMs (programs per SM follow from
# the pipeline's shared memory), so neighbouring shapes can disagree (Qwen3's
# 384 gate_up tiles of 64 rows run in one wave at 3 programs per SM, 3
# stages; Llama's 448 want 4 stages). PDL helps every entry but qkv at M = 64,
# whose 96 programs with 10-stage pipelines ran 2-3% faster without it.
# ``stagger_k``: program n starts its K loop at tile (n * stagger_k) mod k_tiles,
# so that the programs in flight read different column ranges; 3% for qkv at
# M <= 16, nothing for the wider shapes, 5-15% slower at M = 64.
_DECODE_TUNED: dict[tuple[int, int, int], _Tile] = {
    (6144, 4096, 16): _Tile(64, 128, 1, 4, 6, stagger_k=13),  # qkv (32 + 2 * 8 heads of 128)
    (6144, 4096, 64): _Tile(64, 64, 1, 4, 10, pdl=False),
    (4096, 4096, 16): _Tile(64, 128, 2, 4, 4, swap_ab=True),  # o
    (4096, 4096, 64): _Tile(32, 128, 1, 8, 6),
    (28672, 4096, 16): _Tile(64, 128, 1, 4, 4, swap_ab=True),  # Llama-3.1-8B gate_up
    (28672, 4096, 64): _Tile(128, 128, 1, 8, 4),
    (4096, 14336, 16): _Tile(128, 128, 4, 4, 4, swap_ab=True),  # Llama-3.1-8B down
    (4096, 14336, 64): _Tile(128, 128, 4, 4, 4),
    (128256, 4096, 16): _Tile(64, 128, 1, 4, 3, swap_ab=True),  # Llama-3.1-8B lm_head
    (128256, 4096, 64): _Tile(128, 128, 1, 8, 4),
    (24576, 4096, 16): _Tile(64, 128, 1, 4, 3, swap_ab=True),  # Qwen3-8B gate_up
    (24576, 4096, 64): _Tile(64, 64, 1, 4, 4),                # 384 programs, 3 per SM
    (4096, 12288, 16): _Tile(128, 128, 4, 4, 4, swap_ab=True),  # Qwen3-8B down
    (4096, 12288, 64): _Tile(128, 128, 4, 4, 4),
    (151936, 4096, 16): _Tile(64, 128, 1, 4, 3, swap_ab=True),  # Qwen3-8B lm_head
    (151936, 4096, 64): _Tile(128, 128, 1, 8, 4),
}
# _DECODE_WS: the shapes where the warp-specialised Gluon kernel
# (triton_kernels/gemm_ws.py: a loader warp feeding a TMA ring, the wgmma
# warpgroup never waiting on a load it issued) streams faster than the
# pointer kernel: 1-3% in perf/results/gemm-decode-sweep-ws*-nvidia-h200.json.
# It needs a Hopper GPU and TMA-aligned tensors; without them the entries above
# apply. Keyed by (N, K, token rows of the tile): plain tiles hold 64 token
# rows (wgmma's long side), swapped ones 8 or 16 (the weight rows take the long
# side); a batch takes the smallest tile that holds it. Elsewhere the kernel
# ties or loses. Tiles of 96 and 192 weight rows are two slabs (64 + 32,
# 128 + 64; gemm_ws.split_block_n) sized so that the programs fill the SMs
# about once: qkv's 64 programs of 96 rows and Qwen3 gate_up's 128 of 192 ran
# 5% and 2% faster than the power-of-two tiles at M = 64
# (perf/results/gemm-decode-sweep-wstail-nvidia-h200.json).
# The tile's token rows past M are zero-filled by the TMA unit, and that costs:
# with 64-row tiles, M = 33 ran 25% slower than M = 64 and M = 1 40%
# (perf/results/gemm-decode-table-ms-nvidia-h200.json). So a tile is used only
# within _WS_MAX_PAD_ROWS of full (64-row tiles from M = 49 on).
# ``stream_k`` entries run gemm_ws's stream-K kernel. Llama's gate_up is 224
# tiles of 128 rows, 1.7 waves on 132 SMs, so its second wave streams on 92
# SMs; equal runs of 64-row K steps on every SM made it 2-3% faster than that
# plain tile at M = 1..8, and Llama's down 2-3% faster than the split-K
# pointer kernel at M <= 16 (perf/results/gemm-decode-sweep-wssk-nvidia-h200.json).
# At M = 16 gate_up's plain tile stayed 1% ahead, and on shapes whose tiles
# already fill the SMs evenly the plain kernels won.
_WS_MAX_PAD_ROWS = 15
# STAGEWISE_GEMM_WS=0 turns the warp-specialised entries off (for A/B measurements).
_WS_ENABLED = os.environ.get("STAGEWISE_GEMM_WS", "1") != "0"
_WS_TILE_ROWS = (8, 16, 64)
_DECODE_WS: dict[tuple[int, int, int], _Tile] = {
    (6144, 4096, 8): _Tile(64, 128, 1, 4, 6, swap_ab=True),              # qkv
    (6144, 4096, 64): _Tile(96, 64, 1, 4, 10),
    (4096, 4096, 64): _Tile(64, 128, 1, 4, 6),                           # o
    (28672, 4096, 8): _Tile(64, 256, 1, 4, 6, swap_ab=True, stream_k=True),  # Llama-3.1-8B gate_up
    (28672, 4096, 16): _Tile(128, 128, 1, 4, 3, swap_ab=True, pdl=False),
    (28672, 4096, 64): _Tile(128, 64, 1, 4, 4, pdl=False),
    (24576, 4096, 64): _Tile(192, 128, 1, 4, 3),                         # Qwen3-8B gate_up
    (151936, 4096, 64): _Tile(128, 128, 1, 4, 4),                        # Qwen3-8B lm_head
    (4096, 14336, 8): _Tile(64, 256, 1, 4, 6, swap_ab=True, stream_k=True),  # Llama-3.1-8B down
    (4096, 14336, 16): _Tile(64, 256, 1, 4, 5, swap_ab=True, stream_k=True),
}


def _ws_config(M: int, N: int, K: int) -> GemmConfig | None:
    """The warp-specialised entry for this batch: the smallest listed tile that
    holds M rows with at most _WS_MAX_PAD_ROWS zero-filled ones (None if none)."""
    for rows in _WS_TILE_ROWS:
        tile = _DECODE_WS.get((N, K, rows))
        if tile is not None and 0 <= rows - M <= _WS_MAX_PAD_ROWS:
            return GemmConfig("ws", rows, tile.block_n, tile.block_k, num_warps=tile.num_warps,
                              num_stages=tile.num_stages, swap_ab=tile.swap_ab, pdl=tile.pdl,
                              stream_k=tile.stream_k)
    return None


# _DECODE_TABLE: every other shape, by (M bucket, shape class). "deep" when
# K >= 2N (an MLP down projection: few output tiles, long rows, so K is split
# 4 ways to give every SM work), else by N: "narrow" <= 4096, "mid" <= 8192,
# "wide" above.
_DECODE_TABLE: dict[tuple[int, str], _Tile] = {
    (16, "deep"): _Tile(128, 128, 4, 4, 4, swap_ab=True),
    (16, "narrow"): _Tile(64, 128, 1, 4, 4, swap_ab=True),
    (16, "mid"): _Tile(32, 128, 1, 4, 6),
    (16, "wide"): _Tile(64, 128, 1, 4, 3, swap_ab=True),
    (32, "deep"): _Tile(128, 128, 4, 4, 4),
    (32, "narrow"): _Tile(32, 256, 1, 4, 4),
    (32, "mid"): _Tile(64, 128, 1, 8, 5),
    (32, "wide"): _Tile(128, 128, 1, 8, 4),
    (64, "deep"): _Tile(128, 128, 4, 4, 4),
    (64, "narrow"): _Tile(32, 256, 1, 4, 4),
    (64, "mid"): _Tile(64, 128, 1, 8, 5),
    (64, "wide"): _Tile(128, 128, 1, 8, 4),
}


def _decode_shape_class(N: int, K: int) -> str:
    if K >= 2 * N:
        return "deep"
    return "narrow" if N <= 4096 else "mid" if N <= 8192 else "wide"


# Prefill tiles (16-bit dtypes, TMA), in order of preference:
# (block_m, block_n, block_k, group_m, num_warps, num_stages). The first whose
# tile count fills the last wave of SMs well (>= _MIN_WAVE_EFFICIENCY) wins;
# a 128x256 tile is fastest per FLOP, smaller tiles trade that for full waves.
_PREFILL_TILES: tuple[tuple[int, int, int, int, int, int], ...] = (
    (128, 256, 64, 8, 8, 3),
    (128, 128, 64, 8, 4, 4),
    (64, 128, 64, 8, 4, 4),
)
_MIN_WAVE_EFFICIENCY = 0.8


def _decode_split_k(num_n_tiles: int, k_tiles: int, num_sms: int) -> int:
    """Split K only when N alone leaves most SMs idle (e.g. tensor-parallel
    shards): the smallest split giving one program per SM, >= 8 K tiles each."""
    split_k = 1
    if num_n_tiles * 2 >= num_sms:
        return split_k
    while num_n_tiles * split_k < num_sms and k_tiles // (split_k * 2) >= 8 and split_k < 16:
        split_k *= 2
    return split_k


def _wave_efficiency(num_tiles: int, num_sms: int) -> float:
    """Busy fraction of SM slots over all waves (1.0 = the last wave is full)."""
    return num_tiles / (triton.cdiv(num_tiles, num_sms) * num_sms)


def _prefill_config(M: int, N: int, num_sms: int) -> GemmConfig:
    best, best_eff = _PREFILL_TILES[0], -1.0
    for tile in _PREFILL_TILES:
        eff = _wave_efficiency(triton.cdiv(M, tile[0]) * triton.cdiv(N, tile[1]), num_sms)
        if eff >= _MIN_WAVE_EFFICIENCY:
            best = tile
            break
        if eff > best_eff:
            best, best_eff = tile, eff
    bm, bn, bk, group_m, warps, stages = best
    return GemmConfig("tma", bm, bn, bk, group_m=group_m, num_warps=warps, num_stages=stages)


def _pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device,
                 tma_ok: bool, ws_ok: bool | None = None) -> GemmConfig:
    """The explicit config table: per M bucket, N, dtype and device. ``tma_ok``:
    the tensors suit the prefill TMA kernel; ``ws_ok`` (default: the same) the
    warp-specialised decode kernel."""
    if _interpreting() or device.type != "cuda":
        return GemmConfig("stream", block_m=32, block_n=32, block_k=32)
    if dtype == torch.float32:  # exact fp32 products: no tensor-core shapes to chase
        if tma_ok and M > 64:
            return GemmConfig("tma", 64, 64, 32, group_m=8, num_warps=4, num_stages=3)
        return GemmConfig("stream", 16 if M <= 16 else 64, 64, 32, num_warps=4, num_stages=3)
    num_sms = _num_sms_of(device)
    if M <= 64:
        bm = 16 if M <= 16 else 32 if M <= 32 else 64
        ws_ok = tma_ok if ws_ok is None else ws_ok
        ws = _ws_config(M, N, K) if _WS_ENABLED and ws_ok and _is_hopper(device) else None
        if ws is not None:
            return ws
        tile = _DECODE_TUNED.get((N, K, bm)) or _DECODE_TABLE[(bm, _decode_shape_class(N, K))]
        split_k = tile.split_k
        if split_k == 1:
            split_k = _decode_split_k(triton.cdiv(N, tile.block_n), triton.cdiv(K, tile.block_k), num_sms)
        return GemmConfig("stream", bm, tile.block_n, tile.block_k, split_k=split_k,
                          num_warps=tile.num_warps, num_stages=tile.num_stages,
                          swap_ab=tile.swap_ab, pdl=tile.pdl, stagger_k=tile.stagger_k)
    if tma_ok:
        return _prefill_config(M, N, num_sms)
    return GemmConfig("stream", 128, 128, 64, num_warps=8, num_stages=3)


def _tma_aligned(*tensors: torch.Tensor) -> bool:
    """TMA needs 16-byte aligned bases and row strides and a unit last stride."""
    for t in tensors:
        if t.stride(-1) != 1 or t.data_ptr() % 16 or (t.stride(0) * t.element_size()) % 16:
            return False
    return True


# ----------------------------------------------------------------------------- launcher


def _check_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError("x must be a tensor of shape [*, K]")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [N, K], got shape {tuple(getattr(weight, 'shape', ()))}")
    if weight.dtype not in _DTYPES:
        raise ValueError(f"weight dtype {weight.dtype} not supported; expected bf16, fp16 or fp32")
    if x.dtype != weight.dtype:
        raise ValueError(f"x dtype {x.dtype} differs from weight dtype {weight.dtype}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x last dim {x.shape[-1]} != weight in_features {weight.shape[1]}")
    if x.device != weight.device:
        raise ValueError(f"x is on {x.device} but weight is on {weight.device}")
    if x.numel() == 0:
        raise ValueError(f"x has no rows (shape {tuple(x.shape)}): empty batch")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight has an empty dimension: {tuple(weight.shape)}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias shape {tuple(bias.shape)} != ({weight.shape[0]},)")
        if bias.dtype != weight.dtype or bias.device != weight.device:
            raise ValueError(f"bias must be {weight.dtype} on {weight.device}")


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """y[*, N] = x[*, K] @ weight[N, K]^T (+ bias), stored as ``out_dtype`` (default x's).

    ``out_dtype=torch.float32`` lets the lm_head hand fp32 logits to sampling
    without a separate cast kernel (the accumulator is fp32 anyway).
    """
    _check_linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    aligned = _tma_aligned(x2d, weight, y) and (bias is None or bias.stride(0) == 1)
    # The prefill TMA kernel's epilogue tile is sized for the input dtype, so a wider
    # output takes the pointer path there; the warp-specialised decode kernel takes both.
    config = _pick_config(M, N, K, x.dtype, x.device, aligned and y.dtype == x.dtype, ws_ok=aligned)
    launch_linear(x2d, weight, bias, y, config)
    return y.reshape(*x.shape[:-1], N)


def _set_tma_allocator(device: torch.device) -> None:
    """Tensor descriptors built on the device need a small global scratch."""
    def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)
    triton.set_allocator(alloc)


def launch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  y: torch.Tensor, config: GemmConfig) -> None:
    """Run one config on 2-D x[M,K] into y[M,N] (benchmarks call this to sweep configs)."""
    M, K = x.shape
    N = weight.shape[0]
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    bias_arg = bias if bias is not None else y
    pdl = pdl_args(x.device) if config.pdl else {}
    if config.kind == "tma":
        _set_tma_allocator(x.device)
        # Always one program per SM (programs past the last tile find no work): NUM_SMS is a
        # constexpr, and a grid sized by the tile count would compile a variant per count.
        num_programs = _num_sms_of(x.device)
        _linear_tma_kernel[(num_programs,)](
            x, weight, bias_arg, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, GROUP_M=config.group_m, NUM_SMS=num_programs,
            INPUT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
        return
    if config.kind == "ws":
        from triton_kernels.gemm_ws import launch_linear_ws, launch_linear_ws_split

        launch = launch_linear_ws_split if config.stream_k else launch_linear_ws
        launch(x, weight, bias, y, config.block_m, config.block_n, config.block_k,
               config.num_stages, config.num_warps, pdl=bool(pdl), swap_ab=config.swap_ab)
        return
    split_k = max(1, min(config.split_k, triton.cdiv(K, config.block_k)))
    part = (torch.empty((split_k, M, N), dtype=torch.float32, device=x.device)
            if split_k > 1 else y)
    grid = (triton.cdiv(N, config.block_n), triton.cdiv(M, config.block_m), split_k)
    _linear_stream_kernel[grid](
        x, weight, bias_arg, y, part, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split_k, EVEN_K=K % config.block_k == 0,
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        USE_DOT=config.use_dot, INPUT_PRECISION=precision, SWAP_AB=config.swap_ab and config.use_dot,
        STAGGER_K=config.stagger_k,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
    if split_k > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(M * N, block),)](
            part, bias_arg, y, M, N, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, SPLIT_K=split_k, BLOCK=block, **pdl)


def compile_prefill_tiles(weight: torch.Tensor) -> None:
    """Compile every prefill tile config for this weight once, up front. Which tile a
    batch gets depends on its token count, so without this a server compiles a tile
    (seconds) the first time a batch of an unusual size arrives."""
    if weight.device.type != "cuda" or _interpreting() or weight.dtype == torch.float32:
        return
    N, K = weight.shape
    for bm, bn, bk, group_m, warps, stages in _PREFILL_TILES:
        x = torch.zeros((bm, K), dtype=weight.dtype, device=weight.device)
        y = torch.empty((bm, N), dtype=weight.dtype, device=weight.device)
        if _tma_aligned(x, weight, y):
            launch_linear(x, weight, None, y, GemmConfig("tma", bm, bn, bk, group_m=group_m,
                                                         num_warps=warps, num_stages=stages))


def linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Plain PyTorch (``F.linear``: fp32 accumulation, one rounding at the end)."""
    _check_linear(x, weight, bias)
    if out_dtype is None or out_dtype == x.dtype:
        return torch.nn.functional.linear(x, weight, bias)
    y = torch.nn.functional.linear(x.float(), weight.float(), None if bias is None else bias.float())
    return y.to(out_dtype)


def flops_bytes(M: int, N: int, K: int, dtype: torch.dtype = torch.bfloat16,
                has_bias: bool = False) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved) of one linear."""
    size = torch.empty((), dtype=dtype).element_size()
    num_bytes = size * (M * K + N * K + M * N + (N if has_bias else 0))
    return 2 * M * N * K, num_bytes
