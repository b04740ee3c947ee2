"""qk_norm_rope_store (one kernel) vs the unfused references (same dtype, and fp32)."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import qkv_prep
from triton_kernels.rotary import build_cos_sin_cache

# (T, Hq, Hk, D, rotary_dim): one token, odd head counts, D=80 (padded block), partial rotary.
CASES = [(1, 4, 2, 64, 64), (5, 6, 3, 80, 80), (3, 8, 8, 128, 64)] if not ON_GPU else \
        [(1, 32, 8, 128, 128), (77, 32, 8, 128, 128), (9, 40, 8, 80, 80), (300, 16, 4, 256, 128),
         (qkv_prep.PREFILL_TOKENS + 7, 40, 8, 128, 128)]  # prefill head blocks, a ragged last one


def _inputs(T, Hq, Hk, D, rotary_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(T, (Hq + 2 * Hk) * D, generator=gen).to(dtype=dtype, device=device) * 2
    q = qkv[:, : Hq * D].view(T, Hq, D)
    k = qkv[:, Hq * D: (Hq + Hk) * D].view(T, Hk, D)
    v = qkv[:, (Hq + Hk) * D:].view(T, Hk, D)
    positions = torch.randint(0, 500, (T,), generator=gen).to(device)
    cache = build_cos_sin_cache(rotary_dim, 512, 10000.0, None, torch.float32, device)
    num_slots = 2 * T + 3
    k_cache = torch.zeros(num_slots, Hk, D, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    slots = (torch.randperm(num_slots - 1, generator=gen)[:T] + 1).to(device)
    q_norm = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype=dtype, device=device)
    k_norm = (1 + 0.1 * torch.randn(D, generator=gen)).to(dtype=dtype, device=device)
    return qkv, (q, k, v, positions, cache), (k_cache, v_cache, slots), (q_norm, k_norm)


def _run(fn, T, Hq, Hk, D, rotary_dim, dtype, device, is_neox, norm):
    qkv, (q, k, v, pos, cache), (kc, vc, slots), (qn, kn) = _inputs(T, Hq, Hk, D, rotary_dim, dtype, device)
    weights = (qn, kn) if norm else (None, None)
    fn(q, k, v, pos, cache, is_neox, kc, vc, slots, *weights, 1e-6)
    return qkv, kc, vc


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("is_neox,norm", [(True, True), (True, False), (False, True)])
def test_matches_unfused_reference_and_float64(device, dtype, case, is_neox, norm):
    out = _run(qkv_prep.qk_norm_rope_store, *case, dtype, device, is_neox, norm)
    ref = _run(qkv_prep.qk_norm_rope_store_reference, *case, dtype, device, is_neox, norm)
    fp32 = _run(qkv_prep.qk_norm_rope_store_reference, *case, torch.float32, "cpu", is_neox, norm)
    for name, got, want, exact in zip(("qkv", "k_cache", "v_cache"), out, ref, fp32):
        assert_close(got, want, dtype, f"{name} vs unfused reference")
        assert_close(got, exact, dtype, f"{name} vs the fp32 math on unrounded inputs")
    T, Hq, Hk, D, _ = case
    qkv, k_cache, v_cache = out
    k_rows = qkv[:, Hq * D: (Hq + Hk) * D].view(T, Hk, D)
    v_rows = qkv[:, (Hq + Hk) * D:].view(T, Hk, D)
    assert torch.equal(v_rows, ref[0][:, (Hq + Hk) * D:].view(T, Hk, D)), "v must not change"
    _, _, (_, _, slots), _ = _inputs(*case, dtype, device)
    assert torch.equal(k_cache[slots], k_rows), "the pool holds the rotated k"
    assert torch.equal(v_cache[slots], v_rows), "the pool holds v"


def test_rejects_bad_input(device):
    _, (q, k, v, pos, cache), (kc, vc, slots), (qn, kn) = _inputs(2, 4, 2, 64, 64, torch.float32, device)
    with pytest.raises(ValueError, match="together"):
        qkv_prep.qk_norm_rope_store(q, k, v, pos, cache, True, kc, vc, slots, qn, None)
    with pytest.raises(ValueError, match="q_norm_weight must be"):
        qkv_prep.qk_norm_rope_store(q, k, v, pos, cache, True, kc, vc, slots, qn[:10], kn)
    with pytest.raises(ValueError, match="slots shape"):
        qkv_prep.qk_norm_rope_store(q, k, v, pos, cache, True, kc, vc, slots[:1])
