"""Programmatic dependent launch: where it applies, and a PDL chain inside a CUDA graph."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import ON_GPU, assert_close
from triton_kernels import activation, gemm, norm, pdl, runtime


def test_pdl_applies_only_on_hopper_compiled_and_enabled(monkeypatch):
    """Launch keywords only for a compiled run on a CUDA device of compute capability >= 9
    with PDL enabled; everything else gets a plain launch."""
    cuda0 = torch.device("cuda", 0)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(runtime, "_capability_of", lambda index: (9, 0))
    assert pdl.pdl_args(cuda0) == {"USE_PDL": True, "launch_pdl": True}
    assert pdl.pdl_args(torch.device("cpu")) == {}
    assert pdl.pdl_args(cuda0, enabled=False) == {}  # KernelOptions(pdl=False)
    monkeypatch.setattr(runtime, "_capability_of", lambda index: (8, 0))  # pre-Hopper
    assert pdl.pdl_args(cuda0) == {}
    monkeypatch.setattr(runtime, "_capability_of", lambda index: (9, 0))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert pdl.pdl_args(cuda0) == {}


def test_hopper_check_reads_the_shared_capability_lookup(monkeypatch):
    """gemm's sm_90-only kernels (wgmma, the Gluon one) use the same cached lookup as PDL."""
    cuda0 = torch.device("cuda", 0)
    for capability, hopper in (((9, 0), True), ((8, 0), False), ((10, 0), False)):
        monkeypatch.setattr(runtime, "_capability_of", lambda index, c=capability: c)
        assert runtime.is_hopper(cuda0) is hopper
    assert runtime.is_hopper(torch.device("cpu")) is False


@pytest.mark.skipif(not ON_GPU, reason="needs CUDA: PDL is a launch attribute of the GPU")
def test_pdl_chain_in_a_cuda_graph_matches_eager_references():
    """norm -> gemm -> gated activation -> gemm, each launched with PDL where the GPU has it,
    captured and replayed in a CUDA graph: every kernel must see its predecessor's output."""
    torch.manual_seed(0)
    dtype, device = torch.bfloat16, torch.device("cuda")
    hidden, inter, rows = 1024, 2816, 4
    x = torch.randn(rows, hidden, dtype=dtype, device=device)
    residual = torch.randn(rows, hidden, dtype=dtype, device=device)
    norm_w = torch.rand(hidden, dtype=dtype, device=device) + 0.5
    w_up = torch.randn(2 * inter, hidden, dtype=dtype, device=device) / hidden ** 0.5
    w_down = torch.randn(hidden, inter, dtype=dtype, device=device) / inter ** 0.5

    def chain(res: torch.Tensor) -> torch.Tensor:
        h = norm.fused_add_rms_norm(x, res, norm_w, 1e-6)
        return gemm.linear(activation.silu_and_mul(gemm.linear(h, w_up)), w_down)

    expect_res = residual.clone()
    expect = chain(expect_res)
    graph_res = residual.clone()
    chain(graph_res.clone())  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = chain(graph_res)
    for _ in range(3):  # each replay adds x to the residual again: reset it first
        graph_res.copy_(residual)
        graph.replay()
        torch.cuda.synchronize()
        assert_close(out, expect, dtype, "PDL chain replayed from a CUDA graph")
        assert torch.equal(graph_res, expect_res), "residual update lost"
