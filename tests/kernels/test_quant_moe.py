"""Quantized fused MoE (FP8 per-channel / block, INT8 per-channel, W4A16): the Triton
kernels vs their references (same quantisation: tight), and vs the 16-bit
``fused_moe_reference`` on the weights before quantisation (loose: the rounding
error of 8- or 4-bit weights and 8-bit activations, stated per scheme). The W8A8 kernels
run in each mode: activations quantised in the GEMM, quantised first by ``quantize_rows``
(the CUDA prefill choice) and not at all (weight-only, the CUDA decode choice)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import ON_GPU, assert_close, rel_err
from triton_kernels import moe
from triton_kernels import quant_moe as qm
from triton_kernels.quant_w4a16 import dequantize
from models.quantization import quantize_fp8_blocks, quantize_int4_groups, quantize_per_channel

DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
# (tokens, experts, top_k, hidden, intermediate): odd sizes; I not a multiple of the
# 128-row scale block, so the up half's block scales start mid-way.
CASES_CPU = [(1, 4, 2, 72, 40), (19, 6, 3, 136, 200)]
CASES_GPU = [(1, 128, 8, 2048, 768), (300, 128, 8, 2048, 768), (5, 60, 4, 264, 136)]
# Relative error vs the unquantised experts (random normal data).
QUANT_ERROR = {"fp8": 0.10, "int8": 0.05, "w4a16": 0.15}   # two GEMMs, one outlier of 6 in x
MODES = {"fused": dict(act_quant=True, prequant=False), "prequant": dict(act_quant=True, prequant=True),
         "weight-only": dict(act_quant=False)}


def _inputs(T, E, k, H, I, dtype, device):
    gen = torch.Generator().manual_seed(T * 31 + E * 7 + H + I)
    x = torch.randn(T, H, generator=gen)
    x[0, 0] = 6.0                                                  # an outlier the scales must follow
    w13 = torch.randn(E, 2 * I, H, generator=gen) / H ** 0.5
    w2 = torch.randn(E, H, I, generator=gen) / I ** 0.5
    logits = torch.randn(T, E, generator=gen)
    weights, ids = moe.moe_topk_reference(logits, k, True)
    return x.to(device, dtype), w13, w2, weights.to(device), ids.to(device)


def _exact(x, w13, w2, weights, ids):
    return moe.fused_moe_reference(x.double().cpu(), w13.double(), w2.double(),
                                   weights.cpu(), ids.cpu())


def _block_quant(w, block):
    """[E, N, K] -> fp8 and per-expert block scales; w13's gate and up halves separately."""
    q, s = zip(*(quantize_fp8_blocks(we, block) for we in w))
    return torch.stack(q), torch.stack(s)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("scheme", ["fp8_channel", "int8_channel", "fp8_block"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES_GPU if ON_GPU else CASES_CPU)
def test_w8a8_kernel(device, scheme, dtype, case, mode):
    T, E, k, H, I = case
    x, w13, w2, weights, ids = _inputs(*case, dtype, device)
    if scheme == "fp8_block":
        block = (128, 128) if ON_GPU else (32, 32)
        g13, s_g = _block_quant(w13[:, :I], block)
        u13, s_u = _block_quant(w13[:, I:], block)
        q13, s13 = torch.cat([g13, u13], 1), torch.cat([s_g, s_u], 1)
        q2, s2 = _block_quant(w2, block)
    else:
        block = None
        wdtype = torch.int8 if scheme == "int8_channel" else torch.float8_e4m3fn
        q13, s13 = (torch.stack(t) for t in zip(*(quantize_per_channel(w, wdtype) for w in w13)))
        q2, s2 = (torch.stack(t) for t in zip(*(quantize_per_channel(w, wdtype) for w in w2)))
    args = [t.contiguous().to(device) for t in (q13, s13, q2, s2)]
    y = qm.fused_moe_w8a8(x, args[0], args[1], args[2], args[3], weights, ids, block, **MODES[mode])
    assert y.shape == (T, H) and y.dtype == dtype
    ref = qm.fused_moe_w8a8_reference(x, *args, weights, ids, block, act_quant=MODES[mode]["act_quant"])
    assert_close(y, ref, dtype, f"{scheme} {mode} kernel vs reference")
    assert rel_err(y, _exact(x, w13, w2, weights, ids)) < QUANT_ERROR[scheme.split("_")[0]]


def test_w8a8_default_modes(monkeypatch):
    """Compiled on CUDA: weight-only for few routed rows, x quantised once for many; the
    interpreter and CPU fuse (the references' default); explicit choices win."""
    monkeypatch.setattr(qm, "interpreting", lambda: False)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert qm._modes(qm.WEIGHT_ONLY_MAX_PAIRS, cuda, None, None) == (False, False)
    assert qm._modes(qm.WEIGHT_ONLY_MAX_PAIRS + 1, cuda, None, None) == (True, True)
    assert qm._modes(1, cpu, None, None) == (True, False)
    assert qm._modes(1, cuda, True, False) == (True, False)
    assert qm._modes(1000, cuda, False, True) == (False, False)


def _int4(w, group):
    """[E, N, K] -> kernel tensors (qweight [E, K/8, N], scales [E, G, N], zeros [E, G, N])."""
    q, s, z = zip(*(quantize_int4_groups(we, group) for we in w))
    return torch.stack(q), torch.stack(s), torch.stack(z)


@pytest.mark.parametrize("g_idx", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES_GPU if ON_GPU else CASES_CPU)
def test_w4a16_kernel(device, g_idx, dtype, case):
    T, E, k, H, I = case
    group = 8 if not ON_GPU else 128
    group = group if (H % group == 0 and I % group == 0) else -1
    x, w13, w2, weights, ids = _inputs(*case, dtype, device)
    q13, s13, z13 = _int4(w13.to(dtype), group if group > 0 else H)
    q2, s2, z2 = _int4(w2.to(dtype), group if group > 0 else I)
    gi13 = gi2 = None
    if g_idx:       # act-order: input rows permuted within the groups' assignment
        gen = torch.Generator().manual_seed(5)
        gi13 = torch.stack([(torch.arange(H) // (group if group > 0 else H))[torch.randperm(H, generator=gen)]
                            for _ in range(E)]).int()
        gi2 = torch.stack([(torch.arange(I) // (group if group > 0 else I))[torch.randperm(I, generator=gen)]
                           for _ in range(E)]).int()
    dev = [t.contiguous().to(device) if t is not None else None for t in (q13, s13, z13, q2, s2, z2, gi13, gi2)]
    y = qm.fused_moe_w4a16(x, *dev[:6], weights, ids, group, dev[6], dev[7])
    ref = qm.fused_moe_w4a16_reference(x, *dev[:6], weights, ids, group, dev[6], dev[7])
    assert y.shape == (T, H) and y.dtype == dtype
    assert_close(y, ref, dtype, "w4a16 kernel vs reference")
    if not g_idx:   # g_idx changes which scale a row uses: only then is the dequantised weight w's
        g13, g2 = (group if group > 0 else H), (group if group > 0 else I)
        deq13 = torch.stack([dequantize(q13[e], s13[e], z13[e], None, g13).t() for e in range(E)])
        deq2 = torch.stack([dequantize(q2[e], s2[e], z2[e], None, g2).t() for e in range(E)])
        assert rel_err(y, _exact(x, w13, w2, weights, ids)) < QUANT_ERROR["w4a16"]
        assert rel_err(y, _exact(x, deq13, deq2, weights, ids)) < 1e-2


def test_bad_shapes_are_value_errors():
    x = torch.randn(3, 64)
    ids = torch.zeros(3, 2, dtype=torch.int32)
    ids[:, 1] = 1
    w = torch.ones(3, 2, dtype=torch.float32)
    q13 = torch.zeros(2, 64, 64, dtype=torch.float8_e4m3fn)
    q2 = torch.zeros(2, 64, 32, dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="w13_scale"):
        qm.fused_moe_w8a8(x, q13, torch.ones(2, 63), q2, torch.ones(2, 64), w, ids)
    with pytest.raises(ValueError, match="w2_scale"):
        qm.fused_moe_w8a8(x, q13, torch.ones(2, 2, 2), q2, torch.ones(2, 1, 1), w, ids, (32, 32))
    with pytest.raises(ValueError, match="w13_zeros"):
        qm.fused_moe_w4a16(x, torch.zeros(2, 8, 64, dtype=torch.int32), torch.ones(2, 1, 64),
                           torch.zeros(2, 1, 64, dtype=torch.int32), torch.zeros(2, 4, 64, dtype=torch.int32),
                           torch.ones(2, 1, 64), torch.zeros(2, 1, 64, dtype=torch.uint8), w, ids, -1)
