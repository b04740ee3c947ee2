"""linear: Triton kernels vs F.linear reference and vs float64, every code path."""
from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import gemm, gemm_tables, runtime

# (M, N, K): single token, odd sizes, non-multiples of every block.
SHAPES_CPU = [(1, 40, 72), (3, 33, 64), (37, 50, 96), (70, 24, 40)]
SHAPES_GPU = [(1, 4096, 4096), (7, 1000, 4000), (64, 6144, 4096), (300, 1100, 2048),
              (1024, 4096, 1024), (129, 257, 260), (2, 130, 520)]


def _inputs(M: int, N: int, K: int, dtype: torch.dtype, device: torch.device, bias: bool):
    gen = torch.Generator().manual_seed(M * 7919 + N * 31 + K)
    x = torch.randn(M, K, generator=gen).to(dtype=dtype, device=device)
    w = (torch.randn(N, K, generator=gen) / K ** 0.5).to(dtype=dtype, device=device)
    b = torch.randn(N, generator=gen).to(dtype=dtype, device=device) if bias else None
    return x, w, b


def _float64(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.double().cpu() @ w.double().cpu().t()
    return y + b.double().cpu() if b is not None else y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES_GPU if ON_GPU else SHAPES_CPU)
@pytest.mark.parametrize("bias", [False, True])
def test_linear_matches_reference_and_float64(device, dtype, shape, bias):
    x, w, b = _inputs(*shape, dtype, device, bias)
    y = gemm.linear(x, w, b)
    assert y.dtype == dtype and y.shape == (shape[0], shape[1])
    assert_close(y, _float64(x, w, b), dtype, "linear vs float64")
    assert_close(y, gemm.linear_reference(x, w, b), dtype, "linear vs reference")


@pytest.mark.parametrize("dtype", [d for d in DTYPES if d != torch.float32])
def test_fp32_output_keeps_the_accumulator(device, dtype):
    """out_dtype=float32 (the lm_head's logits): no rounding to the input dtype at the store."""
    M, N, K = (3, 130, 72) if not ON_GPU else (4, 4100, 1024)
    x, w, _ = _inputs(M, N, K, dtype, device, bias=False)
    y = gemm.linear(x, w, out_dtype=torch.float32)
    assert y.dtype == torch.float32
    exact = _float64(x, w, None)
    assert_close(y, exact, torch.float32 if not ON_GPU else dtype, "fp32-out linear vs float64")
    assert_close(gemm.linear_reference(x, w, out_dtype=torch.float32), exact, torch.float32,
                 "fp32-out reference vs float64")


CONFIGS = [
    gemm.GemmConfig("tiled", 32, 32, 32, group_m=2),
    gemm.GemmConfig("tiled", 16, 64, 32, group_m=8),
    gemm.GemmConfig("stream", 16, 32, 32, split_k=3),
    gemm.GemmConfig("stream", 32, 16, 64, split_k=1),
    gemm.GemmConfig("stream", 4, 16, 64, split_k=2, use_dot=False),
    gemm.GemmConfig("tma", 32, 32, 32, group_m=2),
    gemm.GemmConfig("tma", 64, 64, 32, group_m=8),
    gemm.GemmConfig("stream", 16, 32, 32, split_k=2, swap_ab=True),
    gemm.GemmConfig("stream", 16, 16, 32, split_k=2, stagger_k=3),
]
if ON_GPU:  # programmatic dependent launch exists only on the GPU (Hopper)
    CONFIGS += [gemm.GemmConfig("tiled", 64, 64, 32, pdl=True),
                gemm.GemmConfig("stream", 16, 32, 32, split_k=3, pdl=True),
                gemm.GemmConfig("tma", 64, 64, 32, group_m=8, pdl=True),
                gemm.GemmConfig("stream", 16, 64, 128, swap_ab=True, num_stages=3, pdl=True),
                gemm.GemmConfig("stream", 64, 64, 64, swap_ab=True, num_stages=8, pdl=True)]


def _config_id(c: gemm.GemmConfig) -> str:
    return (f"{c.kind}-{c.block_m}x{c.block_n}x{c.block_k}s{c.split_k}{'' if c.use_dot else 'gemv'}"
            f"{'-swap' if c.swap_ab else ''}{f'-stagger{c.stagger_k}' if c.stagger_k else ''}"
            f"{'-pdl' if c.pdl else ''}")


@pytest.mark.parametrize("config", CONFIGS, ids=_config_id)
@pytest.mark.parametrize("dtype", DTYPES)
def test_each_kernel_path(device, dtype, config):
    """Tiled, split-K, swapped-operand, CUDA-core and TMA paths on an aligned shape with ragged tiles."""
    M, N, K = (5, 72, 200) if not ON_GPU else (77, 264, 1000)
    if not config.use_dot:
        M = 3  # the CUDA-core path is for a handful of rows
    x, w, b = _inputs(M, N, K, dtype, device, bias=True)
    y = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    gemm.launch_linear(x, w, b, y, config)
    assert_close(y, _float64(x, w, b), dtype, f"{config} vs float64")


def test_leading_dims_and_strided_input(device):
    dtype = torch.float32
    x, w, _ = _inputs(6, 20, 48, dtype, device, bias=False)
    x3 = x.reshape(2, 3, 48)
    y = gemm.linear(x3, w)
    assert y.shape == (2, 3, 20)
    assert_close(y.reshape(6, 20), _float64(x, w, None), dtype, "3-D x")
    wide = torch.randn(6, 64, dtype=dtype, device=device)
    x_view = wide[:, 8:56]                          # row stride 64, not 48
    assert_close(gemm.linear(x_view, w), _float64(x_view, w, None), dtype, "strided x")


@pytest.mark.skipif(not ON_GPU, reason="TMA alignment fallback matters only on the GPU")
def test_misaligned_rows_fall_back_to_pointer_loads(device):
    """bf16 rows of 260 elements (520 bytes) broke TMA silently (PITFALLS)."""
    x, w, b = _inputs(512, 300, 260, torch.bfloat16, device, bias=True)
    assert not gemm._tma_aligned(x, w)
    assert_close(gemm.linear(x, w, b), _float64(x, w, b), torch.bfloat16, "misaligned")
    x_off = torch.randn(512 * 256 + 1, dtype=torch.bfloat16, device=device)[1:].view(512, 256)
    w2 = torch.randn(384, 256, dtype=torch.bfloat16, device=device) / 16
    assert_close(gemm.linear(x_off, w2), _float64(x_off, w2, None), torch.bfloat16, "offset base")


def test_bad_inputs_raise_value_error(device):
    x = torch.randn(2, 8, device=device)
    w = torch.randn(4, 8, device=device)
    with pytest.raises(ValueError, match="x last dim"):
        gemm.linear(torch.randn(2, 7, device=device), w)
    with pytest.raises(ValueError, match="dtype"):
        gemm.linear(x.half(), w)
    with pytest.raises(ValueError, match="weight"):
        gemm.linear(x, w[0])
    with pytest.raises(ValueError, match="bias"):
        gemm.linear(x, w, torch.randn(5, device=device))
    with pytest.raises(ValueError, match="empty batch"):
        gemm.linear(x[:0], w)
    with pytest.raises(ValueError, match="not supported"):
        gemm.linear(x.double(), w.double())


def _as_cuda_device(monkeypatch, hopper: bool) -> torch.device:
    """Make the config picker see a compiled run on a 132-SM CUDA device (Hopper or not)."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(runtime, "_num_sms", lambda index: 132)
    monkeypatch.setattr(runtime, "_capability_of", lambda index: (9, 0) if hopper else (8, 0))
    return torch.device("cuda", 0)


def test_decode_table_entries_fit_and_are_picked(monkeypatch):
    """Every decode-table entry fits Hopper's shared memory at its M bucket, and
    ``_pick_config`` hands out the tuned entry (swap and PDL flags included) for
    the shapes it was tuned on: the warp-specialised one on Hopper with aligned
    tensors, the pointer kernel's otherwise."""
    from triton_kernels.gemm_ws import _SPLIT_TILE_ELEMS

    smem_limit = 227 * 1024
    entries = [(bm, tile) for (_, _, bm), tile in gemm_tables.DECODE_TUNED.items()]
    entries += [(bm, tile) for (bm, _), tile in gemm_tables.DECODE_TABLE.items()]
    entries += [(rows, tile) for (_, _, rows), tile in gemm_tables.DECODE_WS.items()]
    for bm, tile in entries:
        stage_bytes = (bm + tile.block_n) * tile.block_k * 2
        assert stage_bytes * tile.num_stages + bm * tile.block_n * 2 <= smem_limit, (bm, tile)
        assert tile.split_k >= 1 and tile.num_warps in (4, 8)
        assert not tile.swap_ab or tile.block_n >= 64, "wgmma needs 64 weight rows"
    for (_, _, rows), tile in gemm_tables.DECODE_WS.items():  # plain tiles put 64 tokens on wgmma's long side
        assert rows in gemm_tables.WS_TILE_ROWS and (tile.swap_ab or rows == 64)
        if tile.stream_k:  # one power-of-two slab whose partial sum fits a workspace slot
            assert tile.block_n & (tile.block_n - 1) == 0 and rows * tile.block_n <= _SPLIT_TILE_ELEMS
    for hopper in (False, True):
        cuda = _as_cuda_device(monkeypatch, hopper)
        for (N, K, bm), tuned in gemm_tables.DECODE_TUNED.items():
            for tma_ok, M in itertools.product((False, True), range(bm // 2 + 1 if bm > 16 else 1, bm + 1)):
                config = gemm._pick_config(M, N, K, torch.bfloat16, cuda, tma_ok=tma_ok)
                # the smallest warp-specialised tile holding M with <= 15 zero-filled rows
                rows = next((r for r in (8, 16, 64) if (N, K, r) in gemm_tables.DECODE_WS
                             and 0 <= r - M <= 15), None) if hopper and tma_ok else None
                tile = gemm_tables.DECODE_WS[(N, K, rows)] if rows else tuned
                assert (config.kind, config.block_m) == (("ws", rows) if rows else ("stream", bm))
                picked = (config.block_n, config.block_k, config.num_stages, config.num_warps)
                assert picked == (tile.block_n, tile.block_k, tile.num_stages, tile.num_warps)
                flags = (config.swap_ab, config.pdl, config.stagger_k, config.stream_k)
                assert flags == (tile.swap_ab, tile.pdl, tile.stagger_k, tile.stream_k)
    # Spot checks of that rule on Llama-3.1-8B's gate_up and qkv.
    pick = lambda M, N: gemm._pick_config(M, N, 4096, torch.bfloat16, cuda, tma_ok=True)  # noqa: E731
    assert (pick(4, 28672).kind, pick(4, 28672).block_m) == ("ws", 8)
    assert (pick(12, 28672).kind, pick(12, 28672).block_m) == ("ws", 16)
    assert pick(4, 28672).stream_k and not pick(12, 28672).stream_k
    assert pick(40, 6144).kind == "stream" and pick(57, 6144).block_m == 64
    # float32 logits: aligned tensors the prefill TMA kernel cannot take, the ws kernel can
    logits = gemm._pick_config(64, 151936, 4096, torch.bfloat16, cuda, tma_ok=False, ws_ok=True)
    assert logits.kind == "ws"


def test_options_turn_off_the_warp_specialised_kernel_and_pdl(monkeypatch):
    """``gemm_ws=False`` never picks the Gluon kernel (the stream table's tile instead);
    ``pdl=False`` never launches with PDL; prefill and fallback picks do not change."""
    cuda = _as_cuda_device(monkeypatch, hopper=True)
    shapes = [(N, K) for N, K, _ in gemm_tables.DECODE_WS] + [(N, K) for N, K, _ in gemm_tables.DECODE_TUNED]
    for (N, K), M in itertools.product(shapes, (1, 4, 8, 13, 16, 40, 57, 64, 300, 2048)):
        on = gemm._pick_config(M, N, K, torch.bfloat16, cuda, tma_ok=True)
        no_ws = gemm._pick_config(M, N, K, torch.bfloat16, cuda, tma_ok=True, gemm_ws=False)
        no_pdl = gemm._pick_config(M, N, K, torch.bfloat16, cuda, tma_ok=True, pdl=False)
        assert no_ws.kind != "ws" and not no_ws.stream_k
        if M <= 64:  # the pointer kernel's decode tile, as for tensors TMA cannot take
            assert no_ws == gemm._pick_config(M, N, K, torch.bfloat16, cuda, tma_ok=True, ws_ok=False)
        else:
            assert no_ws == on
        assert not no_pdl.pdl and dataclasses.replace(on, pdl=False) == no_pdl
    assert any(gemm._pick_config(M, N, K, torch.bfloat16, cuda, tma_ok=True).kind == "ws"
               for N, K, M in gemm_tables.DECODE_WS), "the default must still take the ws kernel"


def test_linear_passes_its_switches_to_the_picker(monkeypatch, device):
    """linear(..., gemm_ws=False, pdl=False) hands both switches to _pick_config."""
    seen = []
    real = gemm._pick_config

    def spy(*args, **kwargs):
        seen.append((kwargs["gemm_ws"], kwargs["pdl"]))
        return real(*args, **kwargs)
    monkeypatch.setattr(gemm, "_pick_config", spy)
    x, w, _ = _inputs(3, 40, 64, torch.float32, device, bias=False)
    gemm.linear(x, w)
    gemm.linear(x, w, gemm_ws=False, pdl=False)
    assert seen == [(True, True), (False, False)]


# (block_m, block_n, block_k, num_warps, num_stages, swap_ab) of the warp-specialised kernel.
# block_n 192 = 128 + 64, 96 = 64 + 32 and 48 = 32 + 16: a head and a tail slab.
WS_CONFIGS = [(64, 64, 64, 4, 3, False), (64, 128, 64, 8, 2, False), (16, 64, 64, 4, 4, True),
              (64, 128, 128, 4, 2, True), (8, 128, 256, 4, 3, True), (64, 192, 64, 4, 3, False),
              (64, 96, 64, 8, 2, False), (64, 48, 128, 4, 4, False), (8, 192, 128, 4, 3, True)]


def test_ws_tile_rows_split_into_two_power_of_two_slabs():
    """The warp-specialised kernel's non-power-of-two tiles: a head slab and a tail slab."""
    from triton_kernels.gemm_ws import split_block_n

    assert [split_block_n(n) for n in (64, 192, 96, 48, 320)] == [
        (64, 0), (128, 64), (64, 32), (32, 16), (256, 64)]
    with pytest.raises(ValueError, match="sum of two"):
        split_block_n(112)  # 64 + 48


@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU: the Gluon kernel has no interpreter path")
@pytest.mark.parametrize("config", WS_CONFIGS, ids=lambda c: "x".join(map(str, c[:3])) + ("-swap" if c[5] else ""))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("pdl", [False, True])
def test_warp_specialised_kernel(device, dtype, config, bias, pdl):
    """Ragged N (not a multiple of the tile), K not a multiple of BLOCK_K, M from one
    row to the full tile: the TMA ring, the clipped store and the bias epilogue,
    with an output of x's dtype and a float32 one (the lm_head's logits)."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("needs sm_90 (wgmma)")
    block_m, block_n, block_k, warps, stages, swap = config
    ws = gemm.GemmConfig("ws", block_m, block_n, block_k, num_warps=warps, num_stages=stages,
                         swap_ab=swap, pdl=pdl)
    for M in sorted({1, 5, block_m // 2 + 3, block_m} & set(range(1, block_m + 1))):
        x, w, b = _inputs(M, 264, 1000, dtype, device, bias)
        for out_dtype in (dtype, torch.float32):
            y = torch.full((M, 264), float("nan"), dtype=out_dtype, device=device)
            gemm.launch_linear(x, w, b, y, ws)
            assert_close(y, _float64(x, w, b), out_dtype, f"ws {config} M={M} -> {out_dtype} vs float64")
    other = torch.float16 if dtype == torch.bfloat16 else torch.bfloat16
    with pytest.raises(ValueError, match="16-bit dtype"):
        gemm.launch_linear(x, w, None, torch.empty(M, 264, dtype=other, device=device), ws)
    with pytest.raises(ValueError, match="exceed"):
        gemm.launch_linear(torch.zeros(block_m + 1, 1000, dtype=dtype, device=device), w, None,
                           torch.empty(block_m + 1, 264, dtype=dtype, device=device),
                           gemm.GemmConfig("ws", block_m, block_n, block_k))
    if swap:  # 96 = 64 + 32: the 32-row slab cannot fill wgmma's 64-row side
        with pytest.raises(ValueError, match="slabs of >= 64"):
            gemm.launch_linear(x, w, None, torch.empty(M, 264, dtype=dtype, device=device),
                               gemm.GemmConfig("ws", block_m, 96, block_k, swap_ab=True))


# (block_m, block_n, block_k, num_warps, num_stages, swap_ab) of the stream-K kernel.
WS_SPLIT_CONFIGS = [(8, 128, 256, 4, 3, True), (16, 64, 64, 4, 4, True), (64, 64, 64, 4, 3, False),
                    (64, 128, 64, 8, 2, False)]


@pytest.mark.skipif(not ON_GPU, reason="needs a Hopper GPU: the Gluon kernel has no interpreter path")
@pytest.mark.parametrize("config", WS_SPLIT_CONFIGS,
                         ids=lambda c: "x".join(map(str, c[:3])) + ("-swap" if c[5] else ""))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bias", [False, True])
def test_stream_k_kernel(device, dtype, config, bias):
    """The stream-K kernel at program counts that cut tiles at different K steps
    (and at none), ragged N and K, one row to the full tile, both output dtypes;
    repeated launches and a CUDA-graph replay find the cut tiles' flags lowered
    again (a stale flag would add an old partial)."""
    if torch.cuda.get_device_capability(device)[0] != 9:
        pytest.skip("needs sm_90 (wgmma)")
    from triton_kernels.gemm_ws import launch_linear_ws_split

    block_m, block_n, block_k, warps, stages, swap = config
    N, K = 1000, 1000  # 8..16 tiles of 64..128 rows, 4..16 K tiles
    for M in sorted({1, 5, block_m} & set(range(1, block_m + 1))):
        x, w, b = _inputs(M, N, K, dtype, device, bias)
        expected = _float64(x, w, b)
        for programs, out_dtype in itertools.product((1, 3, 5, 7, 1000), (dtype, torch.float32)):
            for attempt in range(2):
                y = torch.full((M, N), float("nan"), dtype=out_dtype, device=device)
                launch_linear_ws_split(x, w, b, y, block_m, block_n, block_k, stages, warps,
                                       swap_ab=swap, num_programs=programs)
                assert_close(y, expected, out_dtype,
                             f"stream-K {config} M={M} programs={programs} try {attempt} -> {out_dtype}")
    y = torch.empty(M, N, dtype=dtype, device=device)
    ws = gemm.GemmConfig("ws", block_m, block_n, block_k, num_warps=warps, num_stages=stages,
                         swap_ab=swap, pdl=True, stream_k=True)
    gemm.launch_linear(x, w, b, y, ws)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gemm.launch_linear(x, w, b, y, ws)
    for _ in range(3):
        y.fill_(float("nan"))
        graph.replay()
        assert_close(y, expected, dtype, f"stream-K {config} graph replay")
    with pytest.raises(ValueError, match="power of two"):
        launch_linear_ws_split(x, w, b, y, block_m, 192, block_k, stages, warps, swap_ab=swap)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    w_big = torch.zeros(block_n * (sms + 1), K, dtype=dtype, device=device)
    with pytest.raises(ValueError, match="exceed"):  # a workspace slot per SM, no more
        launch_linear_ws_split(x, w_big, None, torch.empty(M, w_big.shape[0], dtype=dtype, device=device),
                               block_m, block_n, block_k, stages, warps, swap_ab=swap, num_programs=sms + 1)


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("M", [40, 57, 64])
def test_tuned_shape_takes_the_warp_specialised_kernel(device, M):
    """linear() on a DECODE_WS shape runs the Gluon kernel (on Hopper, with few
    zero-filled rows) and matches float64; a misaligned copy of x falls back to
    the pointer kernel."""
    (N, K, _), = [key for key in gemm_tables.DECODE_WS if key[2] == 64][:1]
    x, w, _ = _inputs(M, N, K, torch.bfloat16, device, bias=False)
    config = gemm._pick_config(M, N, K, torch.bfloat16, device, tma_ok=True)
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    assert config.kind == ("ws" if hopper and 64 - M <= gemm_tables.WS_MAX_PAD_ROWS else "stream")
    assert_close(gemm.linear(x, w), _float64(x, w, None), torch.bfloat16, "tuned shape vs float64")
    x_off = torch.empty(M * K + 1, dtype=torch.bfloat16, device=device)[1:].view(M, K)
    x_off.copy_(x)
    assert not gemm._tma_aligned(x_off)
    assert_close(gemm.linear(x_off, w), _float64(x, w, None), torch.bfloat16, "misaligned x")


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA")
@pytest.mark.parametrize("M", [1, 3, 8, 13])
def test_stream_k_table_entries_at_full_size(device, M):
    """linear() on the stream-K table shapes (Llama-3.1-8B's down and gate_up, real
    sizes: cut tiles on every SM boundary) matches float64, bias included."""
    hopper = torch.cuda.get_device_capability(device)[0] == 9
    shapes = {(N, K) for (N, K, rows), tile in gemm_tables.DECODE_WS.items() if tile.stream_k and M <= rows}
    assert shapes, "no stream-K entry holds this M"
    for N, K in sorted(shapes):
        x, w, b = _inputs(M, N, K, torch.bfloat16, device, bias=True)
        config = gemm._pick_config(M, N, K, torch.bfloat16, device, tma_ok=True)
        assert config.stream_k == hopper  # the smallest tile holding M is a stream-K one
        assert_close(gemm.linear(x, w, b), _float64(x, w, b), torch.bfloat16, f"N={N} K={K} M={M}")
