"""Dense linear layer: ``y[M, N] = x[M, K] @ weight[N, K]^T (+ bias[N])``.

Shapes. The weight keeps the Hugging Face layout ``[out_features,
in_features]``, so a checkpoint tensor is used as stored. ``x`` may carry
leading dims (``[*, K]``); they are flattened to ``M`` rows and restored on
the output.

Dtypes. bf16, fp16 or fp32 (x, weight and bias share one); products accumulate
in fp32, the bias is added in fp32, and one rounding happens at the store
(``out_dtype=torch.float32`` skips it: the lm_head's logits). fp32 inputs use
exact ("ieee") products, not tf32.

Roofline (H100/H200: about 3.3-4.8 TB/s, about 800 TFLOP/s bf16). Bytes moved
``2*(M*K + N*K + M*N)`` (bf16), work ``2*M*N*K`` FLOPs, so a linear does about
M FLOPs per weight byte. Prefill (M >= 256) is compute-bound: the aim is the
tensor cores' peak. Decode (M <= 64) is a weight stream: the aim is
``N*K*2 bytes / bandwidth`` (see gemm_decode.py).

The blocked algorithm (as in Triton's matmul tutorial): each program owns one
``[BLOCK_M, BLOCK_N]`` tile of y and walks K::

    acc = zeros(BLOCK_M, BLOCK_N)                      # fp32
    for k in range(0, K, BLOCK_K):
        acc += x[m:m+BLOCK_M, k:k+BLOCK_K] @ weight[n:n+BLOCK_N, k:k+BLOCK_K]^T
    y[m:m+BLOCK_M, n:n+BLOCK_N] = acc (+ bias)

Files. This one: ``_linear_kernel`` (that algorithm with pointer loads: any
shape, dtype and stride), ``_linear_tma_kernel`` (prefill on Hopper: a
persistent grid loading tiles through TMA tensor descriptors), the launcher
``linear``, the PyTorch ``linear_reference`` and ``flops_bytes``. Decode
kernels: gemm_decode.py (the weight stream: split-K, swapped operands) and
gemm_ws.py (the advanced Hopper path: a warp-specialised Gluon kernel).
Tile tables: gemm_tables.py. Measurements and what was tried: perf/notes/gemm.md.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.gemm_decode import decode_config, launch_stream
from triton_kernels.gemm_tables import MIN_WAVE_EFFICIENCY, PREFILL_TILES, GemmConfig, PrefillTile
from triton_kernels.pdl import pdl_args, pdl_wait
from triton_kernels.runtime import dot_precision, ensure_tma_allocator, interpreting, num_sms

__all__ = ["GemmConfig", "compile_prefill_tiles", "flops_bytes", "launch_linear", "linear",
           "linear_reference"]
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _grouped_tile(tile_id, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """Tile id -> (pid_m, pid_n), walking GROUP_M row-tiles down a column of tiles
    before moving right: programs running at the same time then share weight
    tiles (and x tiles) in L2, instead of each reading its own."""
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = tile_id // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (tile_id % group_size_m)
    pid_n = (tile_id % num_pid_in_group) // group_size_m
    return pid_m, pid_n


# M (tokens in the batch) is not specialised: one compiled variant per tile config.
@triton.jit(do_not_specialize=["M"])
def _linear_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, INPUT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    pid_m, pid_n = _grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # rows of x and y      [BLOCK_M]
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # rows of w, cols of y [BLOCK_N]
    offs_k = tl.arange(0, BLOCK_K)                     # the K step's columns [BLOCK_K]
    # Pointers to the first K tile of x [BLOCK_M, BLOCK_K] and of w [BLOCK_N, BLOCK_K]
    # (int64 row offsets: M * stride can pass 2**31 at long prefills).
    x_ptrs = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + offs_k[None, :] * stride_wk
    mask_m = offs_m < M
    mask_n = offs_n < N
    if USE_PDL:  # before the first load: the previous kernel may still write x
        pdl_wait()
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        # Masked loads: rows past M or N and columns past K read as 0 and add nothing.
        mask_k = offs_k < K - k * BLOCK_K
        x = tl.load(x_ptrs, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=mask_n[:, None] & mask_k[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=INPUT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk  # next K tile
        w_ptrs += BLOCK_K * stride_wk
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    y_ptrs = y_ptr + offs_m.to(tl.int64)[:, None] * stride_ym + offs_n[None, :] * stride_yn
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _operand_descriptors(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """TMA descriptors of x [M, K] and weight [N, K] (unit last stride), one tile each.
    They clip at the tensor edge: out-of-range loads read zeros."""
    x_desc = tl.make_tensor_descriptor(x_ptr, shape=[M, K], strides=[stride_xm, 1],
                                       block_shape=[BLOCK_M, BLOCK_K])
    w_desc = tl.make_tensor_descriptor(w_ptr, shape=[N, K], strides=[stride_wn, 1],
                                       block_shape=[BLOCK_N, BLOCK_K])
    return x_desc, w_desc


@triton.jit(do_not_specialize=["M"])
def _linear_tma_kernel(
    x_ptr, w_ptr, b_ptr, y_ptr, M, N, K, stride_xm, stride_wn, stride_ym,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False,
):
    """The same algorithm, persistent: NUM_SMS programs walk the output tiles in
    grouped order, and TMA (tensor descriptors) moves the tiles. Descriptors need
    16-byte aligned bases and row strides: the launcher checks (_tma_aligned)."""
    if USE_PDL:  # before the descriptors: they are written to global scratch
        pdl_wait()
    # Descriptors clip at the tensor edge: out-of-range loads read zeros and
    # out-of-range stores are dropped, so no masks are needed.
    x_desc, w_desc = _operand_descriptors(x_ptr, w_ptr, M, N, K, stride_xm, stride_wn, BLOCK_M, BLOCK_N, BLOCK_K)
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


def _prefill_config(M: int, N: int, sms: int) -> GemmConfig:
    """The first PREFILL_TILES entry whose tiles fill the last wave of SMs well."""
    def wave_efficiency(tile: PrefillTile) -> float:  # busy share of the SM slots over all waves
        num_tiles = triton.cdiv(M, tile.block_m) * triton.cdiv(N, tile.block_n)
        return num_tiles / (triton.cdiv(num_tiles, sms) * sms)

    best = next((t for t in PREFILL_TILES if wave_efficiency(t) >= MIN_WAVE_EFFICIENCY),
                max(PREFILL_TILES, key=wave_efficiency))
    return GemmConfig("tma", best.block_m, best.block_n, best.block_k, group_m=best.group_m,
                      num_warps=best.num_warps, num_stages=best.num_stages)


def _pick_config(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, tma_ok: bool,
                 ws_ok: bool | None = None, gemm_ws: bool = True, pdl: bool = True) -> GemmConfig:
    """The explicit config table (no autotuning). ``tma_ok``: the tensors suit the
    prefill TMA kernel; ``ws_ok`` (default: the same) the warp-specialised decode
    kernel; ``gemm_ws``/``pdl``: the KernelOptions switches."""
    if interpreting() or device.type != "cuda":  # few, large tiles: the interpreter is slow
        return GemmConfig("tiled", 32, 32, 32)
    if dtype == torch.float32:  # exact fp32 products: no tensor-core shapes to chase
        if tma_ok and M > 64:
            return GemmConfig("tma", 64, 64, 32, group_m=8, num_warps=4, num_stages=3)
        return GemmConfig("tiled", 16 if M <= 16 else 64, 64, 32, num_warps=4, num_stages=3)
    if M <= 64:
        return decode_config(M, N, K, device, tma_ok if ws_ok is None else ws_ok, gemm_ws, pdl)
    if tma_ok:
        return _prefill_config(M, N, num_sms(device))
    return GemmConfig("tiled", 128, 128, 64, num_warps=8, num_stages=3)


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
           out_dtype: torch.dtype | None = None, *, gemm_ws: bool = True,
           pdl: bool = True) -> torch.Tensor:
    """y[*, N] = x[*, K] @ weight[N, K]^T (+ bias), stored as ``out_dtype`` (default x's).

    ``gemm_ws=False`` keeps decode off the warp-specialised kernel and ``pdl=False``
    launches without PDL (``KernelOptions``; ``load_ops`` binds both).
    """
    _check_linear(x, weight, bias)
    x2d = x.reshape(-1, x.shape[-1])
    M, K = x2d.shape
    N = weight.shape[0]
    y = torch.empty((M, N), dtype=out_dtype or x.dtype, device=x.device)
    aligned = _tma_aligned(x2d, weight, y) and (bias is None or bias.stride(0) == 1)
    # The prefill TMA kernel's epilogue tile is sized for the input dtype, so a wider
    # output takes the pointer path there; the warp-specialised decode kernel takes both.
    config = _pick_config(M, N, K, x.dtype, x.device, aligned and y.dtype == x.dtype, ws_ok=aligned,
                          gemm_ws=gemm_ws, pdl=pdl)
    launch_linear(x2d, weight, bias, y, config)
    return y.reshape(*x.shape[:-1], N)


def launch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  y: torch.Tensor, config: GemmConfig) -> None:
    """Run one config on 2-D x[M,K] into y[M,N] (benchmarks call this to sweep configs)."""
    M, K = x.shape
    N = weight.shape[0]
    pdl = pdl_args(x.device) if config.pdl else {}
    if config.kind == "stream":
        launch_stream(x, weight, bias, y, config, pdl)
        return
    if config.kind == "ws":
        from triton_kernels.gemm_ws import launch_linear_ws, launch_linear_ws_split  # Gluon: Hopper only

        launch = launch_linear_ws_split if config.stream_k else launch_linear_ws
        launch(x, weight, bias, y, config.block_m, config.block_n, config.block_k,
               config.num_stages, config.num_warps, pdl=bool(pdl), swap_ab=config.swap_ab)
        return
    precision = dot_precision(x.dtype)
    bias_arg = bias if bias is not None else y
    if config.kind == "tma":
        ensure_tma_allocator(x.device)
        # Always one program per SM (programs past the last tile find no work): NUM_SMS is a
        # constexpr, and a grid sized by the tile count would compile a variant per count.
        programs = num_sms(x.device)
        _linear_tma_kernel[(programs,)](
            x, weight, bias_arg, y, M, N, K, x.stride(0), weight.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
            BLOCK_K=config.block_k, GROUP_M=config.group_m, NUM_SMS=programs,
            INPUT_PRECISION=precision, num_warps=config.num_warps, num_stages=config.num_stages, **pdl)
        return
    if config.kind != "tiled":
        raise ValueError(f"unknown gemm config kind {config.kind!r}")
    grid = (triton.cdiv(M, config.block_m) * triton.cdiv(N, config.block_n),)
    _linear_kernel[grid](
        x, weight, bias_arg, y, M, N, K,
        x.stride(0), x.stride(1), weight.stride(0), weight.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=config.block_m, BLOCK_N=config.block_n,
        BLOCK_K=config.block_k, GROUP_M=config.group_m, INPUT_PRECISION=precision,
        num_warps=config.num_warps, num_stages=config.num_stages, **pdl)


def compile_prefill_tiles(weight: torch.Tensor) -> None:
    """Compile every prefill tile config for this weight once, up front. Which tile a
    batch gets depends on its token count, so without this a server compiles a tile
    (seconds) the first time a batch of an unusual size arrives."""
    if weight.device.type != "cuda" or interpreting() or weight.dtype == torch.float32:
        return
    N, K = weight.shape
    for tile in PREFILL_TILES:
        x = torch.zeros((tile.block_m, K), dtype=weight.dtype, device=weight.device)
        y = torch.empty((tile.block_m, N), dtype=weight.dtype, device=weight.device)
        if _tma_aligned(x, weight, y):
            launch_linear(x, weight, None, y, GemmConfig(
                "tma", tile.block_m, tile.block_n, tile.block_k, group_m=tile.group_m,
                num_warps=tile.num_warps, num_stages=tile.num_stages))


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
