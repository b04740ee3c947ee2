"""Warp-specialised decode linear for Hopper, in Gluon (Triton's explicit-layout dialect).

``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias)`` for 16-bit x and weight, M <= 64;
y is x's dtype or float32 (the lm_head's logits).

The pointer kernel in gemm.py issues its loads and its MMAs from the same
warps: a warp waiting on an MMA cannot issue the next load, so the weight
stream stalls a little every K step. Here the two jobs live in different warps
of one program (warp specialisation, the structure cuBLAS uses for these
shapes):

* a *loader* warp walks K and, for each stage of a ring of ``STAGES`` shared
  memory slots, waits until the slot is free, then starts two TMA copies (the
  activation tile and the weight tile) that arrive on the slot's ``ready``
  barrier;
* the default warpgroup waits on ``ready``, issues the wgmma asynchronously,
  and once the MMA of the previous step has finished marks that step's slot
  free (its ``empty`` barrier). After the last step it adds the bias and
  stores the tile with a TMA store (rows past M and columns past N are clipped
  by the descriptor).

Each program owns one ``[BLOCK_M, BLOCK_N]`` output tile and the whole K range,
so no partial sums are written. With ``SWAP_AB`` the MMA computes ``W x^T``
(weight rows on wgmma's 64-row side, 8 or 16 tokens on its narrow one), as in
gemm.py.

Two things the measurements taught (H200, perf/results/gemm-decode-*ws*):
a warp-specialised program reserves registers for all its warps, 256 per
thread unless told otherwise, which caps a 3-stage tile at one program per SM
(``_register_cap`` sizes the cap from the shared memory the tile needs); and
the TMA unit's zero fill of activation rows past M is slow (a 64-row tile at
M = 1 ran 40% slower than at M = 64), so gemm.py keeps plain tiles for M near
64 and swaps operands (8- and 16-row tiles) below.

Gluon needs Hopper and does not run under TRITON_INTERPRET; gemm.py picks this
kernel only on an sm_90 device with aligned tensors, and the CPU tests cover
the pointer kernel instead.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from triton_kernels.gemm import linear_reference as reference  # the same math as gemm.linear

__all__ = ["launch_linear_ws", "reference"]

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
_GL_OUT_DTYPES = {**_GL_DTYPES, torch.float32: gl.float32}  # fp32 logits for the lm_head
_SMEM_PER_SM = 227 * 1024      # Hopper: shared memory one SM can give its programs
_REGISTERS_PER_SM = 64 * 1024
_MIN_REGISTERS = 80            # per thread: 56 failed in ptxas for an 8-warp 64x128 tile
# The TMA copies were renamed after triton 3.6 (async_copy_* -> async_load / async_store).
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global


@gluon.jit
def _load_partition(x_desc, w0_desc, w1_desc, w2_desc, x_bufs, w0_bufs, w1_bufs, w2_bufs, ready, empty,
                    off_n, k_tiles, N1: gl.constexpr, N2: gl.constexpr):
    """Loader warp: fill the ring of stages, one K tile of x and of each weight
    slab per stage. x's box may hold fewer rows than the slot (its live rows);
    the rest of the slot stays zero."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    X_ROWS: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    N0: gl.constexpr = w0_desc.block_type.shape[0]
    stage_bytes: gl.constexpr = (x_desc.block_type.nbytes + w0_desc.block_type.nbytes
                                 + (N1 > 0) * w1_desc.block_type.nbytes + (N2 > 0) * w2_desc.block_type.nbytes)
    for i in range(k_tiles):
        slot = i % STAGES
        # Barriers start in phase 0, so the first pass waits on phase 1 and goes through.
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, stage_bytes)
        if X_ROWS < x_bufs.type.shape[1]:
            _tma_load(x_desc, [0, i * BLOCK_K], bar, x_bufs.index(slot).slice(0, X_ROWS))
        else:
            _tma_load(x_desc, [0, i * BLOCK_K], bar, x_bufs.index(slot))
        _tma_load(w0_desc, [off_n, i * BLOCK_K], bar, w0_bufs.index(slot))
        if N1 > 0:
            _tma_load(w1_desc, [off_n + N0, i * BLOCK_K], bar, w1_bufs.index(slot))
        if N2 > 0:
            _tma_load(w2_desc, [off_n + N0 + N1, i * BLOCK_K], bar, w2_bufs.index(slot))


@gluon.jit
def _accumulator(BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, SWAP_AB: gl.constexpr,
                 num_warps: gl.constexpr):
    """A zeroed fp32 accumulator for BLOCK_N weight rows, in wgmma's register layout."""
    if SWAP_AB:  # weight rows on wgmma's 64-row side, the few tokens on its narrow side
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_M, 16])
        acc = gl.zeros((BLOCK_N, BLOCK_M), dtype=gl.float32, layout=layout)
    else:  # one warpgroup per 64 token rows; a second one (8 warps) takes half the columns
        layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, num_warps // 4], instr_shape=[16, BLOCK_N // (num_warps // 4), 16])
        acc = gl.zeros((BLOCK_M, BLOCK_N), dtype=gl.float32, layout=layout)
    return acc


@gluon.jit
def _mma(x_buf, w_buf, acc, SWAP_AB: gl.constexpr):
    """Start acc += x_buf @ w_buf^T (with SWAP_AB its transpose) on the tensor cores."""
    if SWAP_AB:
        acc = warpgroup_mma(w_buf, x_buf.permute((1, 0)), acc, is_async=True)
    else:
        acc = warpgroup_mma(x_buf, w_buf.permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit
def _mma_partition(x_bufs, w0_bufs, w1_bufs, w2_bufs, ready, empty, k_tiles, N0: gl.constexpr,
                   N1: gl.constexpr, N2: gl.constexpr, SWAP_AB: gl.constexpr, num_warps: gl.constexpr):
    """Default warpgroup(s): per stage, acc_j += x_tile @ w_tile_j^T for each weight
    slab j (with SWAP_AB the transpose, w_tile_j @ x_tile^T), each stage's slot
    freed one step late. Slabs 1 and 2 are absent when N1 / N2 are 0."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    BLOCK_M: gl.constexpr = x_bufs.type.shape[1]
    acc0 = _accumulator(BLOCK_M, N0, SWAP_AB, num_warps)
    acc1 = acc0  # placeholders for absent slabs
    acc2 = acc0
    if N1 > 0:
        acc1 = _accumulator(BLOCK_M, N1, SWAP_AB, num_warps)
    if N2 > 0:
        acc2 = _accumulator(BLOCK_M, N2, SWAP_AB, num_warps)
    for i in range(k_tiles):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        x_buf = x_bufs.index(slot)
        acc0 = _mma(x_buf, w0_bufs.index(slot), acc0, SWAP_AB)
        # Wait until only this step's MMAs may still run: the previous step's slot is free.
        if N2 > 0:
            acc1 = _mma(x_buf, w1_bufs.index(slot), acc1, SWAP_AB)
            acc2 = _mma(x_buf, w2_bufs.index(slot), acc2, SWAP_AB)
            acc0, acc1, acc2 = warpgroup_mma_wait(num_outstanding=3, deps=(acc0, acc1, acc2))
        elif N1 > 0:
            acc1 = _mma(x_buf, w1_bufs.index(slot), acc1, SWAP_AB)
            acc0, acc1 = warpgroup_mma_wait(num_outstanding=2, deps=(acc0, acc1))
        else:
            acc0 = warpgroup_mma_wait(num_outstanding=1, deps=(acc0, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
    if N2 > 0:
        acc0, acc1, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1, acc2))
    elif N1 > 0:
        acc0, acc1 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, acc1))
        acc2 = acc0
    else:
        acc0 = warpgroup_mma_wait(num_outstanding=0, deps=(acc0, ))
        acc1 = acc0
        acc2 = acc0
    return (acc0, acc1, acc2)  # results go out as a tuple (absent slabs: unused)


@gluon.jit
def _pdl_wait():
    """Programmatic dependent launch (triton_kernels/pdl.py): wait for the previous
    kernel's writes, then let the next kernel start launching."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _store_tile(acc, y_desc, b_ptr, off_n, N, HAS_BIAS: gl.constexpr, SWAP_AB: gl.constexpr):
    """Epilogue: add the bias, then write the tile through shared memory with a TMA
    store (the descriptor clips rows past M and columns past N). The store is
    waited for here: the shared buffer may be handed to the next tile's epilogue."""
    if SWAP_AB:
        if HAS_BIAS:
            cols = off_n + gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, acc.type.layout))
            acc = acc + gl.load(b_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[:, None]
        acc = gl.permute(acc, [1, 0])
    elif HAS_BIAS:
        cols = off_n + gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
        acc = acc + gl.load(b_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)[None, :]
    y_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    y_smem.store(acc.to(y_desc.dtype))
    fence_async_shared()
    _tma_store(y_desc, [0, off_n], y_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _linear_ws_kernel(x_desc, w0_desc, w1_desc, w2_desc, y0_desc, y1_desc, y2_desc, b_ptr, N, K,
                      BLOCK_M: gl.constexpr, N1: gl.constexpr, N2: gl.constexpr,
                      HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, SWAP_AB: gl.constexpr,
                      USE_PDL: gl.constexpr, num_warps: gl.constexpr):
    X_ROWS: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    N0: gl.constexpr = w0_desc.block_type.shape[0]
    off_n = gl.program_id(0) * (N0 + N1 + N2)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES, BLOCK_M, BLOCK_K], x_desc.layout)
    w0_bufs = gl.allocate_shared_memory(w0_desc.dtype, [STAGES] + w0_desc.block_type.shape, w0_desc.layout)
    w1_bufs = w0_bufs  # unused unless N1 > 0
    w2_bufs = w0_bufs  # unused unless N2 > 0
    if N1 > 0:
        w1_bufs = gl.allocate_shared_memory(w1_desc.dtype, [STAGES] + w1_desc.block_type.shape, w1_desc.layout)
    if N2 > 0:
        w2_bufs = gl.allocate_shared_memory(w2_desc.dtype, [STAGES] + w2_desc.block_type.shape, w2_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    if X_ROWS < BLOCK_M:  # the TMA box brings x's live rows only: zero the others once
        zero_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [num_warps, 1], [1, 0])
        zeros = gl.zeros([BLOCK_M, BLOCK_K], x_desc.dtype, zero_layout)
        for s in gl.static_range(STAGES):
            x_bufs.index(s).store(zeros)
        fence_async_shared()  # these writes before the TMA unit's
        gl.thread_barrier()
    k_tiles = gl.cdiv(K, BLOCK_K)
    if USE_PDL:  # before the first global memory access (the loader's TMA copies)
        _pdl_wait()
    acc0, acc1, acc2 = gl.warp_specialize([
        (_mma_partition, (x_bufs, w0_bufs, w1_bufs, w2_bufs, ready, empty, k_tiles, N0, N1, N2,
                          SWAP_AB, num_warps)),
        (_load_partition, (x_desc, w0_desc, w1_desc, w2_desc, x_bufs, w0_bufs, w1_bufs, w2_bufs, ready,
                           empty, off_n, k_tiles, N1, N2)),
    ], [1], [24])
    _store_tile(acc0, y0_desc, b_ptr, off_n, N, HAS_BIAS, SWAP_AB)
    if N1 > 0:
        _store_tile(acc1, y1_desc, b_ptr, off_n + N0, N, HAS_BIAS, SWAP_AB)
    if N2 > 0:
        _store_tile(acc2, y2_desc, b_ptr, off_n + N0 + N1, N, HAS_BIAS, SWAP_AB)


def _descriptor(t: torch.Tensor, block_shape: list[int]) -> TensorDescriptor:
    layout = gl.NVMMASharedLayout.get_default_for(block_shape, _GL_OUT_DTYPES[t.dtype])
    return TensorDescriptor.from_tensor(t, block_shape, layout)


def _register_cap(block_m: int, block_n: int, block_k: int, stages: int, num_warps: int,
                  out_bytes: int = 2) -> int:
    """Registers per thread that let as many programs share an SM as its shared
    memory holds. A warp-specialised kernel otherwise reserves 256 per thread for
    its default warps plus a warpgroup for the loader: the whole register file,
    so one program per SM whatever the tile. Never below _MIN_REGISTERS (ptxas
    cannot fit the accumulator and the pipeline's addresses in fewer)."""
    smem_bytes = stages * (block_m + block_n) * block_k * 2 + block_m * block_n * out_bytes + 1024
    threads = (num_warps + 4) * 32
    programs = max(1, min(4, _SMEM_PER_SM // smem_bytes, _REGISTERS_PER_SM // (threads * _MIN_REGISTERS)))
    return min(256, _REGISTERS_PER_SM // (programs * threads) // 8 * 8)


def split_block_n(block_n: int) -> tuple[int, int, int]:
    """A program's weight rows as up to three slabs of power-of-two rows (register
    tensors and TMA boxes want those), largest first, 0 for an absent slab:
    192 -> (128, 64, 0), 224 -> (128, 64, 32). A tile of any such size lets the
    program count match the SMs (Qwen3-8B's 24576 gate_up rows: 128 programs of 192)."""
    slabs = [1 << bit for bit in range(block_n.bit_length() - 1, -1, -1) if block_n >> bit & 1]
    if not 1 <= len(slabs) <= 3:
        raise ValueError(f"block_n = {block_n} is not a sum of at most three powers of two")
    return tuple(slabs + [0] * (3 - len(slabs)))


def live_rows(M: int, block_m: int, block_k: int, element_size: int, swap_ab: bool) -> int:
    """Rows of x the TMA box fetches per stage. Zero-filling the rows past M is
    slow in the TMA unit (a 64-row box at M = 1 ran 40% slower than at M = 64),
    so a plain 64-row tile fetches the power of two >= M (at least 8) and keeps
    the rest of its slots zero. Only for 128-byte K tiles, whose rows a slice of
    the slot holds contiguously; swapped tiles (8 or 16 rows) fetch them all."""
    if swap_ab or block_k * element_size != 128:
        return block_m
    return min(block_m, max(8, 1 << (M - 1).bit_length()))


def launch_linear_ws(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     y: torch.Tensor, block_m: int, block_n: int, block_k: int, stages: int,
                     num_warps: int = 4, pdl: bool = False, swap_ab: bool = False) -> None:
    """Run the warp-specialised kernel: x[M, K] (M <= block_m), weight[N, K] -> y[M, N].
    block_n is a sum of at most three powers of two (see split_block_n); swapped
    tiles need slabs of at least 64 rows (wgmma's long side)."""
    M, K = x.shape
    N = weight.shape[0]
    if x.dtype not in _GL_DTYPES or weight.dtype != x.dtype or y.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"x and weight must share one 16-bit dtype and y be that or float32, got "
                         f"{x.dtype}, {weight.dtype}, {y.dtype}")
    if M > block_m:
        raise ValueError(f"M = {M} rows exceed the tile's {block_m}")
    slabs = split_block_n(block_n)
    if swap_ab and min(n for n in slabs if n) < 16 * num_warps:
        raise ValueError(f"a swapped tile needs weight slabs of >= {16 * num_warps} rows, got {slabs}")
    x_desc = _descriptor(x, [live_rows(M, block_m, block_k, x.element_size(), swap_ab), block_k])
    w_descs = [_descriptor(weight, [n, block_k]) for n in slabs if n]
    y_descs = [_descriptor(y, [block_m, n]) for n in slabs if n]
    w_descs += w_descs[:1] * (3 - len(w_descs))  # absent slabs: placeholders, unused
    y_descs += y_descs[:1] * (3 - len(y_descs))
    _linear_ws_kernel[(triton.cdiv(N, block_n),)](
        x_desc, *w_descs, *y_descs, bias if bias is not None else y, N, K,
        BLOCK_M=block_m, N1=slabs[1], N2=slabs[2], HAS_BIAS=bias is not None, STAGES=stages,
        SWAP_AB=swap_ab, USE_PDL=pdl, num_warps=num_warps,
        maxnreg=_register_cap(block_m, block_n, block_k, stages, num_warps, y.element_size()),
        **({"launch_pdl": True} if pdl else {}))
