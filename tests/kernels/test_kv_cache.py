"""store_kv: scatter into the paged pool, vs reference; untouched slots stay."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU
from triton_kernels import kv_cache

CASES = [(1, 1, 64, 8), (5, 2, 128, 16), (7, 3, 96, 40)] + ([(4096, 8, 128, 10000), (3, 8, 256, 64)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_store_kv(device, dtype, case):
    tokens, heads, head_dim, num_slots = case
    gen = torch.Generator().manual_seed(tokens * 3 + head_dim)
    # k and v are views into a fused qkv row (q part first).
    qkv = torch.randn(tokens, (2 + 2 * heads) * head_dim, generator=gen).to(dtype=dtype, device=device)
    k = qkv[:, 2 * head_dim: (2 + heads) * head_dim].view(tokens, heads, head_dim)
    v = qkv[:, (2 + heads) * head_dim:].view(tokens, heads, head_dim)
    slots = (torch.randperm(num_slots - 1, generator=gen)[:tokens] + 1).to(device)  # slot 0 = padding
    k_cache = torch.randn(num_slots, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    v_cache = torch.randn(num_slots, heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    kv_cache.store_kv(k_cache, v_cache, k, v, slots)
    kv_cache.store_kv_reference(k_ref, v_ref, k, v, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), "pool differs from reference"
    assert torch.equal(k_cache[slots], k) and torch.equal(v_cache[slots], v), "written rows"
    # float64 check of the same scatter, built independently of both.
    expect = k_ref.double().cpu().clone()
    expect[slots.cpu()] = k.double().cpu()
    assert torch.equal(k_cache.double().cpu(), expect)


def test_bad_inputs(device):
    cache = torch.zeros(8, 2, 16, device=device)
    k = torch.randn(3, 2, 16, device=device)
    slots = torch.tensor([1, 2, 3], device=device)
    with pytest.raises(ValueError, match="slots"):
        kv_cache.store_kv(cache, cache.clone(), k, k, slots[:2])
    with pytest.raises(ValueError, match="heads/head_dim"):
        kv_cache.store_kv(cache, cache.clone(), torch.randn(3, 1, 16, device=device),
                          torch.randn(3, 1, 16, device=device), slots)
    with pytest.raises(ValueError, match="dtype"):
        kv_cache.store_kv(cache, cache.clone(), k.half(), k.half(), slots)
    with pytest.raises(ValueError, match="empty batch"):
        kv_cache.store_kv(cache, cache.clone(), k[:0], k[:0], slots[:0])
