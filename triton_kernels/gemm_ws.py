"""The advanced Hopper path: a warp-specialised decode linear, in Gluon
(Triton's explicit-layout dialect).

``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias)`` for 16-bit x and weight, M <= 64;
y is x's dtype or float32 (the lm_head's logits). Read gemm.py (the blocked
algorithm) and gemm_decode.py (the weight stream) first: this file does the
same work with Hopper's explicit machinery (TMA copies, mbarriers, async
wgmma, warp specialisation), which Triton otherwise schedules for you.
``gemm.linear`` picks it from gemm_tables.DECODE_WS (``KernelOptions.gemm_ws``
turns it off); its reference is ``gemm.linear_reference``.

The pointer kernel in gemm_decode.py issues its loads and its MMAs from the same
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
so no partial sums are written. BLOCK_N may be two power-of-two slabs of
weight rows (192 = 128 + 64), each with its own TMA box and accumulator, so
that the program count can match the SMs (``split_block_n``). With
``SWAP_AB`` the MMA computes ``W x^T`` (weight rows on wgmma's 64-row side,
8 or 16 tokens on its narrow one), as in gemm_decode.py.

A second kernel, the stream-K form (``launch_linear_ws_split``), runs one
program per SM and gives each an equal run of (tile, K tile) steps, so that a
weight whose tiles fall unevenly into waves of SMs still streams on all of
them to the end; the one tile cut between two neighbouring programs is summed
in fp32 through a small workspace (see the section below).

Two things the measurements taught (H200; perf/notes/gemm.md):
a warp-specialised program reserves registers for all its warps, 256 per
thread unless told otherwise, which caps a 3-stage tile at one program per SM
(``_register_cap`` sizes the cap from the shared memory the tile needs); and
the TMA unit's zero fill of activation rows past M is slow (a 64-row tile at
M = 1 ran 40% slower than at M = 64), so gemm_tables.DECODE_WS keeps plain
tiles for M near 64 and swaps operands (8- and 16-row tiles) below.

Gluon needs Hopper and does not run under TRITON_INTERPRET; gemm.py picks this
kernel only on an sm_90 device with aligned tensors, and the CPU tests cover
the pointer kernels instead.
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

from triton_kernels.runtime import num_sms

__all__ = ["launch_linear_ws", "launch_linear_ws_split", "split_block_n"]

_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16}
_GL_OUT_DTYPES = {**_GL_DTYPES, torch.float32: gl.float32}  # fp32 logits for the lm_head
_SMEM_PER_SM = 227 * 1024      # Hopper: shared memory one SM can give its programs
_REGISTERS_PER_SM = 64 * 1024
_MIN_REGISTERS = 80            # per thread: 56 failed in ptxas for an 8-warp 64x128 tile
# The TMA copies were renamed after triton 3.6 (async_copy_* -> async_load / async_store).
_tma_load = tma.async_load if hasattr(tma, "async_load") else tma.async_copy_global_to_shared
_tma_store = tma.async_store if hasattr(tma, "async_store") else tma.async_copy_shared_to_global


@gluon.jit
def _load_partition(x_desc, w_desc, tail_desc, x_bufs, w_bufs, tail_bufs, ready, empty, first_step,
                    last_step, k_tiles, BLOCK_K: gl.constexpr, TAIL_N: gl.constexpr):
    """Loader warp: fill the ring of stages, one K tile of x and W per stage (and
    of the tail slab of W, when the program's rows are two slabs). The program's
    work is the run of steps [first_step, last_step) in (output tile, K tile)
    order: step s is K tile s % k_tiles of output tile s // k_tiles."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    stage_bytes: gl.constexpr = (x_desc.block_type.nbytes + w_desc.block_type.nbytes
                                 + (TAIL_N > 0) * tail_desc.block_type.nbytes)
    for step in range(first_step, last_step):
        i = step - first_step
        slot = i % STAGES
        # Barriers start in phase 0, so the first pass waits on phase 1 and goes through.
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        bar = ready.index(slot)
        mbarrier.expect(bar, stage_bytes)
        off_n = (step // k_tiles) * (BLOCK_N + TAIL_N)
        off_k = (step % k_tiles) * BLOCK_K
        _tma_load(x_desc, [0, off_k], bar, x_bufs.index(slot))
        _tma_load(w_desc, [off_n, off_k], bar, w_bufs.index(slot))
        if TAIL_N > 0:
            _tma_load(tail_desc, [off_n + BLOCK_N, off_k], bar, tail_bufs.index(slot))


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
def _mma_partition(x_bufs, w_bufs, tail_bufs, ready, empty, k_tiles, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, TAIL_N: gl.constexpr, SWAP_AB: gl.constexpr,
                   num_warps: gl.constexpr):
    """Default warpgroup(s): acc += x_tile @ w_tile^T per stage (with SWAP_AB the
    transpose, w_tile @ x_tile^T), each stage's slot freed one step late. With a
    tail slab (TAIL_N > 0) a second accumulator takes its rows."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    acc = _accumulator(BLOCK_M, BLOCK_N, SWAP_AB, num_warps)
    if TAIL_N > 0:
        tail = _accumulator(BLOCK_M, TAIL_N, SWAP_AB, num_warps)
    else:
        tail = acc  # unused
    for i in range(k_tiles):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        acc = _mma(x_bufs.index(slot), w_bufs.index(slot), acc, SWAP_AB)
        if TAIL_N > 0:
            tail = _mma(x_bufs.index(slot), tail_bufs.index(slot), tail, SWAP_AB)
            # The previous step's two MMAs are done, so its slot is free.
            acc, tail = warpgroup_mma_wait(num_outstanding=2, deps=(acc, tail))
        else:
            # At most one MMA in flight: the previous step's is done, so its slot is free.
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
    if TAIL_N > 0:
        acc, tail = warpgroup_mma_wait(num_outstanding=0, deps=(acc, tail))
    else:
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        tail = acc
    return (acc, tail)  # results go out as a tuple


@gluon.jit
def _pdl_wait():
    """Programmatic dependent launch (triton_kernels/pdl.py): wait for the previous
    kernel's writes, then let the next kernel start launching."""
    gl.inline_asm_elementwise("griddepcontrol.wait; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)
    gl.inline_asm_elementwise("griddepcontrol.launch_dependents; // dummy $0", "=r", [], dtype=gl.int32,
                              is_pure=False, pack=1)


@gluon.jit
def _write_tile(acc, y_smem, y_desc, b_ptr, off_n, N, HAS_BIAS: gl.constexpr, SWAP_AB: gl.constexpr):
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
    y_smem.store(acc.to(y_desc.dtype))
    fence_async_shared()
    _tma_store(y_desc, [0, off_n], y_smem)
    tma.store_wait(pendings=0)


@gluon.jit
def _store_tile(acc, y_desc, b_ptr, off_n, N, HAS_BIAS: gl.constexpr, SWAP_AB: gl.constexpr):
    """_write_tile through a buffer allocated here, after the ring is dead (so the
    two may share shared memory)."""
    y_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    _write_tile(acc, y_smem, y_desc, b_ptr, off_n, N, HAS_BIAS, SWAP_AB)


@gluon.jit
def _linear_ws_kernel(x_desc, w_desc, tail_desc, y_desc, y_tail_desc, b_ptr, N, K,
                      HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, SWAP_AB: gl.constexpr,
                      TAIL_N: gl.constexpr, USE_PDL: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    off_n = gl.program_id(0) * (BLOCK_N + TAIL_N)
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    if TAIL_N > 0:
        tail_bufs = gl.allocate_shared_memory(tail_desc.dtype, [STAGES] + tail_desc.block_type.shape,
                                              tail_desc.layout)
    else:
        tail_bufs = w_bufs  # unused
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    k_tiles = gl.cdiv(K, BLOCK_K)
    first_step = gl.program_id(0) * k_tiles
    if USE_PDL:  # before the first global memory access (the loader's TMA copies)
        _pdl_wait()
    acc, tail = gl.warp_specialize([
        (_mma_partition, (x_bufs, w_bufs, tail_bufs, ready, empty, k_tiles, BLOCK_M, BLOCK_N, TAIL_N,
                          SWAP_AB, num_warps)),
        (_load_partition, (x_desc, w_desc, tail_desc, x_bufs, w_bufs, tail_bufs, ready, empty, first_step,
                           first_step + k_tiles, k_tiles, BLOCK_K, TAIL_N)),
    ], [1], [24])
    _store_tile(acc, y_desc, b_ptr, off_n, N, HAS_BIAS, SWAP_AB)
    if TAIL_N > 0:
        _store_tile(tail, y_tail_desc, b_ptr, off_n + BLOCK_N, N, HAS_BIAS, SWAP_AB)


# ----------------------------------------------------------------------------- stream-K
#
# When the output tiles do not fill the SMs a whole number of times (Llama's
# 28672 gate_up rows are 224 tiles of 128: 1.7 waves on 132 SMs), the last wave
# streams on fewer SMs and the kernel ends later than the bytes need. The
# stream-K kernel below gives each of its (one per SM) programs an equal run of
# (tile, K tile) steps instead. A tile cut between two programs is summed in
# fp32: the program that takes the tile's last K tiles runs them first (they
# open its run), writes the partial sum to a workspace slot and raises a flag;
# the program that takes the first K tiles runs them last (they close its run)
# and by then finds the flag up. It adds the partial, lowers the flag for the
# next launch and stores the tile. Runs are at least one tile long, so a tile
# is cut at most once.


@gluon.jit
def _tile_offsets(acc):
    """Row-major element offsets of a register tile, in the tile's own layout."""
    rows = gl.arange(0, acc.shape[0], layout=gl.SliceLayout(1, acc.type.layout))
    cols = gl.arange(0, acc.shape[1], layout=gl.SliceLayout(0, acc.type.layout))
    return rows[:, None] * acc.shape[1] + cols[None, :]


@gluon.jit
def _publish_partial(acc, part_ptr, flag_ptr):
    """Leave a partial tile in this program's workspace slot and raise its flag."""
    slot = gl.program_id(0)
    gl.store(part_ptr + slot * (acc.shape[0] * acc.shape[1]) + _tile_offsets(acc), acc)
    gl.thread_barrier()  # every thread's stores happen before the release below
    gl.atomic_xchg(flag_ptr + slot, 1, sem="release", scope="gpu")


@gluon.jit
def _collect_partial(acc, part_ptr, flag_ptr):
    """acc + the partial the next program left in its slot; lowers its flag."""
    slot = gl.program_id(0) + 1
    while gl.atomic_cas(flag_ptr + slot, 1, 0, sem="acquire", scope="gpu") != 1:
        pass
    gl.thread_barrier()
    # .cg: read from L2, where the other SM's stores are, not from this SM's L1.
    partial = gl.load(part_ptr + slot * (acc.shape[0] * acc.shape[1]) + _tile_offsets(acc),
                      cache_modifier=".cg")
    return acc + partial


@gluon.jit
def _split_mma_partition(x_bufs, w_bufs, y_smem, ready, empty, y_desc, b_ptr, part_ptr, flag_ptr,
                         first_step, last_step, k_tiles, N, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                         HAS_BIAS: gl.constexpr, SWAP_AB: gl.constexpr, num_warps: gl.constexpr):
    """Default warpgroup of the stream-K kernel: the MMAs of the program's run, and
    at the end of each tile's stretch of it, that stretch's epilogue (a stored
    tile, a published partial or a collected one). The loader meanwhile keeps
    filling the ring with the next tile's K tiles."""
    STAGES: gl.constexpr = x_bufs.type.shape[0]
    acc = _accumulator(BLOCK_M, BLOCK_N, SWAP_AB, num_warps)
    for step in range(first_step, last_step):
        i = step - first_step
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        acc = _mma(x_bufs.index(slot), w_bufs.index(slot), acc, SWAP_AB)
        acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc, ))
        mbarrier.arrive(empty.index((i + STAGES - 1) % STAGES), pred=i > 0)
        k = step % k_tiles
        if (k == k_tiles - 1) | (step == last_step - 1):  # this tile's stretch ends here
            acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            if step - k < first_step:  # the tile's last K tiles: its first ones ran elsewhere
                _publish_partial(acc, part_ptr, flag_ptr)
            else:
                if k < k_tiles - 1:  # the tile's first K tiles: the rest ran in the next program
                    acc = _collect_partial(acc, part_ptr, flag_ptr)
                _write_tile(acc, y_smem, y_desc, b_ptr, (step // k_tiles) * BLOCK_N, N, HAS_BIAS, SWAP_AB)
            acc = _accumulator(BLOCK_M, BLOCK_N, SWAP_AB, num_warps)


@gluon.jit
def _linear_ws_split_kernel(x_desc, w_desc, y_desc, b_ptr, part_ptr, flag_ptr, N, K,
                            HAS_BIAS: gl.constexpr, STAGES: gl.constexpr, SWAP_AB: gl.constexpr,
                            USE_PDL: gl.constexpr, num_warps: gl.constexpr):
    BLOCK_M: gl.constexpr = x_desc.block_type.shape[0]
    BLOCK_K: gl.constexpr = x_desc.block_type.shape[1]
    BLOCK_N: gl.constexpr = w_desc.block_type.shape[0]
    k_tiles = gl.cdiv(K, BLOCK_K)
    total_steps = gl.cdiv(N, BLOCK_N) * k_tiles
    pid = gl.program_id(0)
    num_programs = gl.num_programs(0)
    first_step = pid * total_steps // num_programs
    last_step = (pid + 1) * total_steps // num_programs
    x_bufs = gl.allocate_shared_memory(x_desc.dtype, [STAGES] + x_desc.block_type.shape, x_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [STAGES] + w_desc.block_type.shape, w_desc.layout)
    y_smem = gl.allocate_shared_memory(y_desc.dtype, y_desc.block_type.shape, y_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for s in gl.static_range(STAGES):
        mbarrier.init(ready.index(s), count=1)
        mbarrier.init(empty.index(s), count=1)
    if USE_PDL:
        _pdl_wait()
    gl.warp_specialize([
        (_split_mma_partition, (x_bufs, w_bufs, y_smem, ready, empty, y_desc, b_ptr, part_ptr, flag_ptr,
                                first_step, last_step, k_tiles, N, BLOCK_M, BLOCK_N, HAS_BIAS, SWAP_AB,
                                num_warps)),
        (_load_partition, (x_desc, w_desc, w_desc, x_bufs, w_bufs, w_bufs, ready, empty, first_step,
                           last_step, k_tiles, BLOCK_K, 0)),
    ], [1], [24])


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


def split_block_n(block_n: int) -> tuple[int, int]:
    """A program's weight rows as (head, tail) slabs of power-of-two rows (register
    tensors and TMA boxes want those): 192 -> (128, 64), 128 -> (128, 0). A
    non-power-of-two tile lets the program count match the SMs (Qwen3-8B's
    24576 gate_up rows: 128 programs of 192)."""
    head = 1 << (block_n.bit_length() - 1)
    tail = block_n - head
    if tail & (tail - 1):
        raise ValueError(f"block_n = {block_n} is not a power of two or a sum of two of them")
    return head, tail


def _check_ws(x: torch.Tensor, weight: torch.Tensor, y: torch.Tensor, block_m: int,
              block_n: int, num_warps: int, swap_ab: bool) -> tuple[int, int]:
    """Typed errors for what the kernels cannot take; the tile's (head, tail) slabs."""
    if x.dtype not in _GL_DTYPES or weight.dtype != x.dtype or y.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"x and weight must share one 16-bit dtype and y be that or float32, got "
                         f"{x.dtype}, {weight.dtype}, {y.dtype}")
    if x.shape[0] > block_m:
        raise ValueError(f"M = {x.shape[0]} rows exceed the tile's {block_m}")
    head_n, tail_n = split_block_n(block_n)
    if swap_ab and min(head_n, tail_n or head_n) < 16 * num_warps:
        raise ValueError(f"a swapped tile needs weight slabs of >= {16 * num_warps} rows, "
                         f"got {head_n} + {tail_n}")
    return head_n, tail_n


def launch_linear_ws(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     y: torch.Tensor, block_m: int, block_n: int, block_k: int, stages: int,
                     num_warps: int = 4, pdl: bool = False, swap_ab: bool = False) -> None:
    """Run the warp-specialised kernel: x[M, K] (M <= block_m), weight[N, K] -> y[M, N].
    block_n is a power of two or the sum of two (see split_block_n)."""
    N, K = weight.shape
    head_n, tail_n = _check_ws(x, weight, y, block_m, block_n, num_warps, swap_ab)
    x_desc = _descriptor(x, [block_m, block_k])
    w_desc = _descriptor(weight, [head_n, block_k])
    y_desc = _descriptor(y, [block_m, head_n])
    tail_desc, y_tail_desc = ((_descriptor(weight, [tail_n, block_k]), _descriptor(y, [block_m, tail_n]))
                              if tail_n else (w_desc, y_desc))
    _linear_ws_kernel[(triton.cdiv(N, block_n),)](
        x_desc, w_desc, tail_desc, y_desc, y_tail_desc, bias if bias is not None else y, N, K,
        HAS_BIAS=bias is not None, STAGES=stages, SWAP_AB=swap_ab, TAIL_N=tail_n, USE_PDL=pdl,
        num_warps=num_warps,
        maxnreg=_register_cap(block_m, block_n, block_k, stages, num_warps, y.element_size()),
        **({"launch_pdl": True} if pdl else {}))


# Stream-K workspace, one per device, allocated once at its largest (so that CUDA
# graphs captured earlier keep valid pointers): a partial-sum slot and a flag per
# program. Launches on one device share it, so they must not run concurrently
# on two streams (the engine runs its forward on one).
_SPLIT_TILE_ELEMS = 128 * 64
_split_workspaces: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _split_workspace(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _split_workspaces:
        slots = num_sms(torch.device("cuda", index))
        _split_workspaces[index] = (
            torch.empty(slots * _SPLIT_TILE_ELEMS, dtype=torch.float32, device=device),
            torch.zeros(slots, dtype=torch.int32, device=device))
    return _split_workspaces[index]


def launch_linear_ws_split(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           y: torch.Tensor, block_m: int, block_n: int, block_k: int, stages: int,
                           num_warps: int = 4, pdl: bool = False, swap_ab: bool = False,
                           num_programs: int | None = None) -> None:
    """Run the stream-K warp-specialised kernel (one program per SM, or
    ``num_programs``; never more than there are tiles): x[M, K] (M <= block_m),
    weight[N, K] -> y[M, N]. block_n is a power of two and block_m * block_n at
    most _SPLIT_TILE_ELEMS."""
    N, K = weight.shape
    _, tail_n = _check_ws(x, weight, y, block_m, block_n, num_warps, swap_ab)
    if tail_n or block_m * block_n > _SPLIT_TILE_ELEMS:
        raise ValueError(f"a stream-K tile is a power of two of at most {_SPLIT_TILE_ELEMS} elements, "
                         f"got {block_m} x {block_n}")
    partials, flags = _split_workspace(x.device)  # a slot and a flag per SM
    programs = min(num_programs or flags.numel(), triton.cdiv(N, block_n))
    if programs > flags.numel():
        raise ValueError(f"{programs} stream-K programs exceed the {flags.numel()} SMs")
    _linear_ws_split_kernel[(programs,)](
        _descriptor(x, [block_m, block_k]), _descriptor(weight, [block_n, block_k]),
        _descriptor(y, [block_m, block_n]), bias if bias is not None else y, partials, flags, N, K,
        HAS_BIAS=bias is not None, STAGES=stages, SWAP_AB=swap_ab, USE_PDL=pdl, num_warps=num_warps,
        maxnreg=_register_cap(block_m, block_n, block_k, stages, num_warps, y.element_size()),
        **({"launch_pdl": True} if pdl else {}))
