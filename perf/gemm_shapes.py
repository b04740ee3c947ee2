"""What perf/bench_kernels.py and perf/sweep_gemm_decode.py share: the model
shapes, the cold-L2 timing helpers and the decode gemm candidate grid.

Shapes come from Llama-3.1-8B-Instruct and Qwen3-8B (config.json values copied
in ``MODELS``; bench_kernels.py checks them against the bundled configs).
Timing: ``median_us`` replays a call from a CUDA graph (no host overhead);
``rotating`` hands out enough input copies that no call finds its inputs in L2.
``candidate_configs`` is the grid the decode sweeps time (the data behind
triton_kernels/gemm_tables.py; the history of each grid is in perf/notes/gemm.md).
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Callable

import torch

from triton_kernels import KernelOptions

# config.json fields that set the kernel shapes (bf16 checkpoints).
MODELS: dict[str, dict[str, int]] = {
    "Llama-3.1-8B-Instruct": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                  num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "Qwen3-8B": dict(hidden_size=4096, intermediate_size=12288, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, vocab_size=151936),
}
DTYPE = torch.bfloat16


@dataclasses.dataclass
class Ctx:
    """What case builders need: device facts and run options (``options``: the
    KernelOptions our launchers are bound with, as the server binds them)."""

    device: torch.device
    l2_bytes: int
    quick: bool
    options: KernelOptions = KernelOptions()


def rotating(ctx: Ctx, make_inputs: Callable[[], tuple], set_bytes: int) -> Callable[[], tuple]:
    """Return a function that hands out input sets round-robin: enough copies
    that consecutive calls never find their inputs in L2, and at least three,
    so that a time does not hang on where one allocation landed in DRAM (with
    a single copy, one gemm config measured 53.6 to 55.9 us from process to
    process on an H200 while each process repeated its own time within 0.2%)."""
    num_sets = max(3, min(8, -(-2 * ctx.l2_bytes // max(set_bytes, 1))))
    sets = [make_inputs() for _ in range(num_sets)]
    counter = [0]

    def next_set() -> tuple:
        counter[0] += 1
        return sets[counter[0] % num_sets]
    return next_set


def gemm_shapes() -> list[tuple[str, int, int]]:
    """(name, N, K) of every projection, Llama first; Qwen3 adds its MLP and lm_head."""
    shapes = []
    for model, d in MODELS.items():
        tag = "llama" if model.startswith("Llama") else "qwen3"
        q_kv = (d["num_attention_heads"] + 2 * d["num_key_value_heads"]) * d["head_dim"]
        rows = [("qkv", q_kv, d["hidden_size"]), ("o", d["hidden_size"], d["num_attention_heads"] * d["head_dim"]),
                ("gate_up", 2 * d["intermediate_size"], d["hidden_size"]),
                ("down", d["hidden_size"], d["intermediate_size"]),
                ("lm_head", d["vocab_size"], d["hidden_size"])]
        for name, N, K in rows:
            if (N, K) not in [(n, k) for _, n, k in shapes]:
                shapes.append((f"{tag}.{name}", N, K))
    return shapes


def median_us(fn: Callable[[], object], quick: bool) -> float:
    """Median time of one call, replayed from a CUDA graph (no host overhead)."""
    import triton.testing

    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=10 if quick else 20, return_mode="median")


# Shared memory a Hopper block may use (227 KB), for the "grid" candidates.
_SMEM_BYTES = 227 * 1024


def candidate_configs(M: int, kinds: set[str], N: int | None = None) -> list:
    """``stream``: tensor-core tiles around the current table, GEMV tiles for tiny
    M, split-K; ``grid``: every stream tile of a wide grid that fits; ``tma``:
    tensor-descriptor tiles; ``swap``: tiles whose MMA computes W x^T
    (weight rows on wgmma's 64-row side); ``swaptop``: the few best of those;
    ``deep``: 8..13-stage pipelines; ``ws``: the warp-specialised kernel, as many
    stages as shared memory holds at 1..4 programs per SM; ``ws8``: its swapped
    tiles with 8 token columns (M <= 8); ``wstail``: its tiles of two
    power-of-two slabs of weight rows (48, 96, 192, 320); ``wswide``: swapped
    tiles of 192, 256 and 320 weight rows, one program per SM (M <= 16);
    ``wssk``: its stream-K form (gemm_ws.launch_linear_ws_split)."""
    from triton_kernels.gemm_tables import GemmConfig

    bm = max(16, 1 << (M - 1).bit_length())
    configs = []
    if "stream" in kinds:
        dot_tiles = [  # (block_n, block_k, num_warps, num_stages)
            (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 4), (32, 256, 4, 5), (32, 128, 4, 6),
            (32, 512, 4, 3), (32, 256, 8, 4), (64, 128, 4, 4), (64, 256, 4, 3), (64, 128, 8, 5),
            (64, 256, 8, 4), (128, 128, 8, 4), (32, 128, 4, 8), (64, 64, 4, 8), (64, 128, 4, 6),
            (128, 64, 4, 6), (128, 64, 8, 6), (128, 128, 4, 4), (256, 64, 8, 4), (64, 256, 4, 2),
        ]
        configs += [GemmConfig("stream", bm, bn, bk, num_warps=w, num_stages=s) for bn, bk, w, s in dot_tiles]
        configs += [GemmConfig("stream", bm, bn, bk, split_k=sk, num_warps=4, num_stages=4)
                    for bn, bk, sk in ((32, 256, 2), (64, 128, 2), (64, 256, 2), (128, 128, 4))]
        if M <= 4:
            gm = 1 << (M - 1).bit_length()
            gemv_tiles = [(8, 512, 4, 3), (16, 256, 4, 4), (16, 512, 4, 3), (32, 256, 4, 3),
                          (32, 128, 4, 4), (16, 256, 8, 4), (32, 256, 8, 4), (64, 128, 8, 3)]
            configs += [GemmConfig("stream", gm, bn, bk, num_warps=w, num_stages=s, use_dot=False)
                        for bn, bk, w, s in gemv_tiles]
    if "grid" in kinds:  # every stream tile whose pipeline fits in shared memory
        for bn, bk, warps, stages, split_k in itertools.product(
                (32, 64, 128, 256), (64, 128, 256), (4, 8), (2, 3, 4, 6), (1, 2)):
            if (bm + bn) * bk * 2 * stages <= _SMEM_BYTES and bn * bk <= 256 * 128:
                configs.append(GemmConfig("stream", bm, bn, bk, split_k=split_k,
                                          num_warps=warps, num_stages=stages))
    if "swap" in kinds or "deep" in kinds:  # swapped MMA operands; deep pipelines
        for bn, bk, warps, stages in itertools.product((32, 64, 128, 256), (64, 128, 256), (4, 8),
                                                       (3, 4, 6, 8, 10, 12, 13)):
            if (bm + bn) * bk * 2 * stages > _SMEM_BYTES or bn * bk > 256 * 128:
                continue
            if "swap" in kinds and bn >= 64:
                configs.append(GemmConfig("stream", bm, bn, bk, num_warps=warps, num_stages=stages,
                                          swap_ab=True))
            if "deep" in kinds and stages >= 8 and warps == 4:
                configs.append(GemmConfig("stream", bm, bn, bk, num_warps=warps, num_stages=stages))
    if "swaptop" in kinds:  # the swapped tiles that led the "swap" sweep, a few with split-K
        for bn, bk, warps, stages, split_k in ((64, 128, 4, 3, 1), (64, 128, 4, 4, 1), (64, 64, 4, 3, 1),
                                               (128, 128, 4, 4, 1), (64, 128, 4, 4, 2),
                                               (128, 128, 4, 4, 4)):
            if bm <= 16 or split_k == 1:
                configs.append(GemmConfig("stream", bm, bn, bk, split_k=split_k, num_warps=warps,
                                          num_stages=stages if bm <= 16 else 4, swap_ab=True))
    if "ws" in kinds:  # the warp-specialised Gluon kernel (triton_kernels/gemm_ws.py)
        for bn, bk, per_sm, warps, swap in itertools.product((64, 128, 256), (64, 128, 256), (1, 2, 3, 4),
                                                             (4, 8), (False, True)):
            tile_m = bm if swap else 64  # wgmma needs 64 rows on its long side
            stages = min(16, (_SMEM_BYTES // per_sm - tile_m * bn * 2 - 1024) // ((tile_m + bn) * bk * 2))
            if stages >= 2 and (warps == 4 or bn >= 128) and not (swap and bn > 128):
                configs.append(GemmConfig("ws", tile_m, bn, bk, num_warps=warps, num_stages=stages,
                                          swap_ab=swap))
    if "ws8" in kinds and M <= 8:  # swapped warp-specialised tiles with 8 token columns
        for bn, bk, per_sm in itertools.product((64, 128), (64, 128, 256), (1, 2, 3, 4)):
            stages = min(16, (_SMEM_BYTES // per_sm - 8 * bn * 2 - 1024) // ((8 + bn) * bk * 2))
            if stages >= 2:
                configs.append(GemmConfig("ws", 8, bn, bk, num_warps=4, num_stages=stages, swap_ab=True))
    if "wstail" in kinds:  # warp-specialised tiles of two slabs (gemm_ws.split_block_n), so that
        # the program count can match the SMs: 48 = 32 + 16 rows ... 320 = 256 + 64
        for bn, bk, per_sm, warps, swap in itertools.product((48, 96, 192, 320), (64, 128, 256), (1, 2, 3),
                                                             (4, 8), (False, True)):
            if swap and (M > 16 or bn != 192 or warps != 4):  # the tail slab needs wgmma's 64 rows
                continue
            if not swap and M <= 48:  # zero-filling most of a 64-row tile is slow (see gemm.py)
                continue
            tile_m = (8 if M <= 8 else 16) if swap else 64
            stages = min(16, (_SMEM_BYTES // per_sm - tile_m * bn * 2 - 1024) // ((tile_m + bn) * bk * 2))
            if stages >= 2 and (warps == 4 or bn >= 96):
                configs.append(GemmConfig("ws", tile_m, bn, bk, num_warps=warps, num_stages=stages,
                                          swap_ab=swap))
    if "wswide" in kinds and M <= 16:  # swapped warp-specialised tiles of 192..320 weight rows
        for bn, bk, tile_m in itertools.product((192, 256, 320), (64, 128, 256), (8, 16)):
            stages = min(16, (_SMEM_BYTES - tile_m * bn * 2 - 1024) // ((tile_m + bn) * bk * 2))
            if stages >= 2 and tile_m >= M:
                configs.append(GemmConfig("ws", tile_m, bn, bk, num_warps=4, num_stages=stages, swap_ab=True))
    if "wssk" in kinds:  # the stream-K warp-specialised kernel: one program per SM
        from triton_kernels.gemm_ws import _SPLIT_TILE_ELEMS

        for bn, bk, per_sm, swap in itertools.product((64, 128), (64, 128, 256), (1, 2), (True, False)):
            tile_m = (8 if M <= 8 else 16) if swap else 64
            if (not swap and M <= 48) or (swap and M > 16) or tile_m * bn > _SPLIT_TILE_ELEMS:
                continue
            stages = min(16, (_SMEM_BYTES // per_sm - tile_m * bn * 2 - 1024) // ((tile_m + bn) * bk * 2))
            if stages >= 2:
                configs.append(GemmConfig("ws", tile_m, bn, bk, num_warps=4, num_stages=stages,
                                          swap_ab=swap, stream_k=True))
    if "tma" in kinds:  # the persistent tensor-descriptor kernel with a thin M tile
        tma_tiles = [  # (block_n, block_k, num_warps, num_stages)
            (32, 256, 4, 6), (64, 128, 4, 6), (64, 256, 4, 4), (128, 128, 4, 4), (128, 64, 4, 6),
            (256, 64, 8, 4),
        ]
        configs += [GemmConfig("tma", bm, bn, bk, group_m=1, num_warps=w, num_stages=s)
                    for bn, bk, w, s in tma_tiles]
    return configs
