"""The op tables of triton_kernels/__init__.py: KernelOps, SamplingOps and IndexOps,
each bound once to a backend and to KernelOptions."""
from __future__ import annotations

import dataclasses
import functools
import importlib

import pytest
import torch

from triton_kernels import (
    INDEX_OPS, OP_FAMILIES, SAMPLING_OPS, IndexOps, KernelOps, KernelOptions, SamplingOps,
    load_index_ops, load_ops, load_sampling_ops,
)
from triton_kernels import gemm, indexing, runtime, sampling

LOADERS = [(load_ops, KernelOps, OP_FAMILIES), (load_sampling_ops, SamplingOps, SAMPLING_OPS),
           (load_index_ops, IndexOps, INDEX_OPS)]
# The launchers that launch with programmatic dependent launch (they take ``pdl``).
PDL_OPS = {"linear", "rms_norm", "fused_add_rms_norm", "silu_and_mul", "gelu_and_mul",
           "qk_norm_rope_store", "decode_attention"}


def _unwrap(fn):
    return fn.func if isinstance(fn, functools.partial) else fn


@pytest.mark.parametrize("load, table, families", LOADERS, ids=lambda v: getattr(v, "__name__", ""))
def test_each_table_binds_every_op_of_its_backend(load, table, families):
    """Every field is the family's launcher (triton) or its ``_reference`` twin."""
    fields = [f.name for f in dataclasses.fields(table) if f.name != "backend"]
    assert sorted(fields) == sorted(families)
    for backend, suffix in (("triton", ""), ("reference", "_reference")):
        ops = load(backend)
        assert isinstance(ops, table) and ops.backend == backend
        for op in fields:
            module = importlib.import_module(f"triton_kernels.{families[op]}")
            assert _unwrap(getattr(ops, op)) is getattr(module, op + suffix), (backend, op)
    with pytest.raises(ValueError, match="unknown kernel backend"):
        load("cuda")
    with pytest.raises(TypeError, match="KernelOptions"):
        load("triton", {"pdl": False})


def test_sampling_and_index_tables_name_the_stage_launchers():
    """The exact launchers the sample and forward stages call."""
    ops = load_sampling_ops("triton")
    assert (ops.sample, ops.greedy, ops.apply_penalties) == (
        sampling.sample, sampling.greedy, sampling.apply_penalties)
    assert load_sampling_ops("reference").compute_logprobs is sampling.compute_logprobs_reference
    assert load_index_ops("triton").write_req_to_token is indexing.write_req_to_token
    assert load_index_ops("reference").write_req_to_token is indexing.write_req_to_token_reference


@pytest.mark.parametrize("options", [KernelOptions(), KernelOptions(gemm_ws=False),
                                     KernelOptions(pdl=False), KernelOptions(False, False)])
def test_options_are_bound_as_launcher_keywords(options):
    """Each Triton launcher that takes ``gemm_ws`` or ``pdl`` gets the option's value;
    the others, and every reference, are the plain functions."""
    ops = load_ops("triton", options)
    for op in OP_FAMILIES:
        fn = getattr(ops, op)
        expected = {"pdl": options.pdl} if op in PDL_OPS else {}
        if op == "linear":
            expected["gemm_ws"] = options.gemm_ws
        assert (fn.keywords if isinstance(fn, functools.partial) else {}) == expected, op
    reference = load_ops("reference", options)
    assert not any(isinstance(getattr(reference, op), functools.partial) for op in OP_FAMILIES)


def test_options_are_frozen_and_default_on():
    options = KernelOptions()
    assert (options.gemm_ws, options.pdl) == (True, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.pdl = False


def test_disabled_ws_never_takes_the_ws_path(monkeypatch, device):
    """load_ops(..., KernelOptions(gemm_ws=False)).linear never picks the Gluon kernel
    (nor a PDL launch with pdl=False), while the default options do, on DECODE_WS
    shapes. The bound linear runs on CPU tensors; its picker is asked the same
    question for a (simulated) Hopper device with aligned tensors, and the config
    that device would get is recorded."""
    from triton_kernels.gemm_tables import DECODE_WS

    real_pick = gemm._pick_config
    picked = []

    def pick_as_hopper(N: int, K: int):
        """A picker that records what a Hopper device would get for weight [N, K]."""
        def pick(M, N_cpu, K_cpu, dtype, device, tma_ok, ws_ok=None, gemm_ws=True, pdl=True):
            with monkeypatch.context() as hopper:
                hopper.setenv("TRITON_INTERPRET", "0")
                hopper.setattr(runtime, "_capability_of", lambda index: (9, 0))
                hopper.setattr(runtime, "_num_sms", lambda index: 132)
                picked.append(real_pick(M, N, K, torch.bfloat16, torch.device("cuda", 0), tma_ok=True,
                                        gemm_ws=gemm_ws, pdl=pdl))
            return real_pick(M, N_cpu, K_cpu, dtype, device, tma_ok, ws_ok, gemm_ws, pdl)  # what runs here
        return pick

    shapes = sorted({(N, K, M) for N, K, rows in DECODE_WS for M in (rows - 3, rows)})
    for options in (KernelOptions(), KernelOptions(gemm_ws=False), KernelOptions(gemm_ws=False, pdl=False)):
        linear = load_ops("triton", options).linear
        picked.clear()
        for N, K, M in shapes:  # small fp32 tensors; the picker sees the real (N, K)
            monkeypatch.setattr(gemm, "_pick_config", pick_as_hopper(N, K))
            x, w = torch.randn(M, 16, device=device), torch.randn(8, 16, device=device)
            torch.testing.assert_close(linear(x, w), x @ w.T, rtol=1e-4, atol=1e-4)
        assert len(picked) == len(shapes)
        assert any(c.kind == "ws" for c in picked) is options.gemm_ws, options
        if not options.pdl:
            assert not any(c.pdl for c in picked)
