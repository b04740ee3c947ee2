"""FP8 (e4m3) KV pool: quantise on store, dequantise in the attention kernels.

Each kernel against its reference on the same FP8 pool (the quantised bytes
must be identical; attention outputs within the dtype's tolerance), and
against the unquantised math within FP8's own error (3 mantissa bits). Odd
sizes: head dims that need padding, GQA/MQA, ragged batches, scales != 1.
"""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import ON_GPU, assert_close, rel_err
from triton_kernels import attention, kv_cache, qkv_prep
from triton_kernels.kv_fp8 import KV_FP8_DTYPE, dequantize_kv_reference, quantize_kv_reference
from triton_kernels.rotary import build_cos_sin_cache

FP8 = KV_FP8_DTYPE
Q_DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
FP8_REL = 0.06  # e4m3 keeps 3 mantissa bits: ~2-3% per element, less after the softmax average


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _fp8_pool(seq_lens, num_kv_heads, head_dim, scales, device, seed=0):
    """An FP8 pool with shuffled slots (slot 0 unused) and its float originals."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(seq_lens) + 5
    k = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_slots - 1, generator=gen) + 1
    req_to_token = torch.zeros(len(seq_lens) + 1, max(seq_lens) + 3, dtype=torch.int32)
    rows = torch.arange(len(seq_lens), 0, -1)
    used = 0
    for b, n in enumerate(seq_lens):
        req_to_token[rows[b], :n] = slots[used:used + n].int()
        used += n
    k8, v8 = quantize_kv_reference(k, scales[0]), quantize_kv_reference(v, scales[1])
    return (k8.to(device), v8.to(device), k.to(device), v.to(device), req_to_token.to(device),
            rows.to(device))


@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.2, 3.0)])
@pytest.mark.parametrize("dtype", Q_DTYPES)
def test_store_kv_quantises_like_the_reference(device, dtype, scales):
    gen = torch.Generator().manual_seed(3)
    T, H, D, S = 13, 3, 40, 37
    k = (torch.randn(T, H, D, generator=gen) * 20).to(device, dtype)
    v = (torch.randn(T, H, D, generator=gen) * 500).to(device, dtype)  # some saturate at 448*s
    slots = (torch.randperm(S - 1, generator=gen)[:T] + 1).to(device)
    pools = [torch.zeros(S, H, D, dtype=FP8, device=device) for _ in range(4)]
    kv_cache.store_kv(pools[0], pools[1], k, v, slots, *scales)
    kv_cache.store_kv_reference(pools[2], pools[3], k, v, slots, *scales)
    assert torch.equal(_bytes(pools[0]), _bytes(pools[2])), "k bytes differ from the reference"
    assert torch.equal(_bytes(pools[1]), _bytes(pools[3])), "v bytes differ from the reference"
    back = dequantize_kv_reference(pools[0][slots], scales[0], torch.float32)
    assert rel_err(back, k.float()) < FP8_REL, "k round trip through e4m3"
    assert torch.isfinite(pools[1].float()).all(), "saturation, not inf/NaN"
    assert pools[1].float().abs().max() == 448.0, "values beyond the range saturate at 448"
    untouched = torch.ones(S, dtype=torch.bool, device=device)
    untouched[slots] = False
    assert not _bytes(pools[0][untouched]).any(), "only the given slots are written"


def test_store_rounds_ties_and_powers_of_two(device):
    """Values at and around rounding boundaries (incl. carries into the next binade)."""
    vals = torch.tensor([124.8, 120.0, 119.9, 1.0625, 1.1875, 0.0019, -3.3, 447.9, 460.0,
                         0.015625, 0.0156, 2.0 ** -9, 3 * 2.0 ** -10, 240.0, 248.0, -0.0], device=device)
    k = vals.view(-1, 1, 1).expand(-1, 1, 16).contiguous()
    slots = torch.arange(1, k.shape[0] + 1, device=device)
    out = [torch.zeros(k.shape[0] + 1, 1, 16, dtype=FP8, device=device) for _ in range(2)]
    kv_cache.store_kv(out[0], out[1], k, k.clone(), slots)
    want = vals.cpu().clamp(-448, 448).to(FP8)
    assert torch.equal(out[0][1:, 0, 0].cpu().float(), want.float())  # -0.0 may store as +0.0


@pytest.mark.parametrize("dtype", Q_DTYPES)
@pytest.mark.parametrize("case", [(3, 8, 8, 128, 64), (5, 6, 3, 80, 80)])
def test_qk_norm_rope_store_into_fp8(device, dtype, case):
    T, Hq, Hk, D, rotary_dim = case
    gen = torch.Generator().manual_seed(5)
    cache = build_cos_sin_cache(rotary_dim, 512, 10000.0, None, torch.float32, device)
    positions = torch.randint(0, 500, (T,), generator=gen).to(device)
    slots = (torch.randperm(2 * T, generator=gen)[:T] + 1).to(device)
    norm = [(1 + 0.1 * torch.randn(D, generator=gen)).to(device, dtype) for _ in range(2)]
    qkv0 = (torch.randn(T, (Hq + 2 * Hk) * D, generator=gen) * 2).to(device, dtype)
    results = []
    for fn in (qkv_prep.qk_norm_rope_store, qkv_prep.qk_norm_rope_store_reference):
        qkv = qkv0.clone()
        q, k, v = qkv.split([Hq * D, Hk * D, Hk * D], dim=1)
        q, k, v = q.view(T, Hq, D), k.view(T, Hk, D), v.view(T, Hk, D)
        kc = torch.zeros(2 * T + 1, Hk, D, dtype=FP8, device=device)
        vc = torch.zeros_like(kc)
        fn(q, k, v, positions, cache, True, kc, vc, slots, *norm, 1e-6, k_scale=0.5, v_scale=2.0)
        results.append((qkv, kc, vc, k))
    (qkv, kc, vc, k), (qkv_r, kc_r, vc_r, _) = results
    assert_close(qkv, qkv_r, dtype, "rotated q/k in place")
    # rope's contraction order may move k by an ulp across an e4m3 rounding boundary: at
    # most one e4m3 step apart (2**-3 relative); most bytes equal; v is copied, so exact.
    assert (kc.float() - kc_r.float()).abs().le(kc_r.float().abs() / 8 + 2.0 ** -9).all()
    assert (_bytes(kc) == _bytes(kc_r)).float().mean() > 0.95
    assert torch.equal(_bytes(vc), _bytes(vc_r))
    assert rel_err(dequantize_kv_reference(kc[slots], 0.5, torch.float32), k.float()) < FP8_REL


@pytest.mark.parametrize("dtype", Q_DTYPES)
@pytest.mark.parametrize("case", [([37, 5, 70], 4, 2, 80), ([1, 129], 4, 1, 64)])
def test_decode_attention_reads_fp8(device, dtype, case):
    seq_lens, Hq, Hk, D = case
    scales = (0.5, 2.0)
    k8, v8, k, v, req_to_token, rows = _fp8_pool(seq_lens, Hk, D, scales, device)
    gen = torch.Generator().manual_seed(9)
    q = torch.randn(len(seq_lens), Hq, D, generator=gen).to(device, dtype)
    lens = torch.tensor(seq_lens, dtype=torch.int32, device=device)
    args = (req_to_token, rows, lens, D ** -0.5)
    out = attention.decode_attention(q, k8, v8, *args, k_scale=scales[0], v_scale=scales[1])
    ref = attention.decode_attention_reference(q, k8, v8, *args, k_scale=scales[0], v_scale=scales[1])
    unquantised = attention.decode_attention_reference(q.float(), k, v, *args)
    assert_close(out, ref, dtype, "decode on the FP8 pool vs its reference")
    assert rel_err(out, unquantised) < FP8_REL, "decode on the FP8 pool vs the unquantised pool"
    wrong_scale = attention.decode_attention(q, k8, v8, *args, k_scale=scales[0], v_scale=1.0)
    assert rel_err(wrong_scale, ref) > 0.3, "the v scale must be applied"


@pytest.mark.parametrize("dtype", Q_DTYPES)
@pytest.mark.parametrize("case", [([0, 20, 11], [37, 5, 1], 4, 2, 80), ([70, 33], [3, 40], 2, 1, 64)])
def test_extend_attention_reads_fp8_prefix(device, dtype, case):
    prefix_lens, extend_lens, Hq, Hk, D = case
    scales = (2.0, 0.25)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    k8, v8, k_all, v_all, req_to_token, rows = _fp8_pool(seq_lens, Hk, D, scales, device, seed=4)
    gen = torch.Generator().manual_seed(2)
    T = sum(extend_lens)
    q = torch.randn(T, Hq, D, generator=gen).to(device, dtype)
    new_k = torch.randn(T, Hk, D, generator=gen).to(device, dtype)
    new_v = torch.randn(T, Hk, D, generator=gen).to(device, dtype)
    k_full, v_full = k_all.clone(), v_all.clone()  # the unquantised pool, new tokens included
    start = 0
    for b, (p, e) in enumerate(zip(prefix_lens, extend_lens)):
        new_slots = req_to_token[rows[b], p:p + e].long()
        k_full[new_slots], v_full[new_slots] = new_k[start:start + e].float(), new_v[start:start + e].float()
        start += e
    starts = torch.tensor([0] + extend_lens[:-1], device=device).cumsum(0)
    meta = (req_to_token, rows, torch.tensor(prefix_lens, device=device),
            torch.tensor(extend_lens, dtype=torch.int32, device=device), starts, max(extend_lens),
            D ** -0.5)
    out = attention.extend_attention(q, new_k, new_v, k8, v8, *meta, k_scale=scales[0],
                                     v_scale=scales[1])
    ref = attention.extend_attention_reference(q, new_k, new_v, k8, v8, *meta, k_scale=scales[0],
                                               v_scale=scales[1])
    unquantised = attention.extend_attention_reference(q.float(), new_k.float(), new_v.float(),
                                                       k_full, v_full, *meta)
    assert_close(out, ref, dtype, "extend on the FP8 pool vs its reference")
    assert rel_err(out, unquantised) < FP8_REL, "extend vs the unquantised pool"


def test_fp8_pool_rejects_bad_scales_and_dtypes(device):
    q = torch.randn(1, 2, 16, device=device)
    pool = torch.zeros(4, 1, 16, dtype=FP8, device=device)
    rtt = torch.tensor([[1, 2]], dtype=torch.int32, device=device)
    idx = torch.tensor([0], device=device)
    lens = torch.tensor([2], dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="k_scale"):
        attention.decode_attention(q, pool, pool, rtt, idx, lens, 0.25, k_scale=0.0)
    with pytest.raises(ValueError, match="v_scale"):
        kv_cache.store_kv(pool, pool.clone(), q[:, :1], q[:, :1], idx + 1, v_scale=float("nan"))
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        attention.decode_attention(q, pool.to(torch.float16), pool.to(torch.float16), rtt, idx,
                                   lens, 0.25)
    with pytest.raises(ValueError, match="must agree"):
        kv_cache.store_kv(pool, pool.float(), q[:, :1], q[:, :1], idx + 1)
