"""extend_attention / decode_attention vs the PyTorch reference and float64.

Batches are ragged on purpose: lengths that are not block multiples, a zero
prefix, a single new token, head dims that need padding (80, 96), GQA and MQA,
sliding windows and logit soft-capping. The pool's slots are shuffled so that
every cached key is really read through req_to_token; extend's new tokens come
from k/v (views of one fused projection, as in the model; their pool slots hold
NaN), with 16-byte aligned rows (tensor descriptors on the GPU) and unaligned
ones (pointer loads).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import attention
from triton_kernels.attention.extend import ExtendConfig, launch_extend_attention


@dataclasses.dataclass
class PagedBatch:
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    req_to_token: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: list[int]


def _paged_batch(seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, seed: int) -> PagedBatch:
    """A pool with shuffled slots (slot 0 unused) and rows in reverse request order."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = sum(seq_lens) + 7
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_slots - 1, generator=gen) + 1
    num_rows, row_len = len(seq_lens) + 2, max(seq_lens) + 5
    req_to_token = torch.zeros(num_rows, row_len, dtype=torch.int32)
    req_pool_indices = torch.arange(len(seq_lens) - 1, -1, -1) + 1
    used = 0
    for b, seq_len in enumerate(seq_lens):
        req_to_token[req_pool_indices[b], :seq_len] = slots[used:used + seq_len].int()
        used += seq_len
    return PagedBatch(k_cache.to(device, dtype), v_cache.to(device, dtype),
                      req_to_token.to(device), req_pool_indices.to(device), seq_lens)


@dataclasses.dataclass
class ExtendBatch:
    q: torch.Tensor          # [T, Hq, D]
    k: torch.Tensor          # [T, Hk, D], the new tokens' keys
    v: torch.Tensor
    pool: PagedBatch         # prefixes in the pool; the new tokens' slots hold NaN
    args: tuple              # req_to_token .. logit_cap, as the kernel takes them


def _extend_batch(prefix_lens: list[int], extend_lens: list[int], num_q_heads: int,
                  num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                  window: int = -1, cap: float = 0.0, row_pad: int = 0) -> ExtendBatch:
    """q, k, v as views of one fused [T, (Hq + 2 Hk) * D + row_pad] projection, as the
    model makes them (row_pad=1 gives rows that are not 16-byte aligned). The pool's
    slots of the new tokens are NaN: the kernel must take those keys from k/v."""
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = _paged_batch(seq_lens, num_kv_heads, head_dim, dtype, device, seed=sum(seq_lens))
    for b, (prefix_len, seq_len) in enumerate(zip(prefix_lens, seq_lens)):
        new_slots = pool.req_to_token[pool.req_pool_indices[b], prefix_len:seq_len].long()
        pool.k_cache[new_slots] = float("nan")
        pool.v_cache[new_slots] = float("nan")
    num_tokens = sum(extend_lens)
    q_size, kv_size = num_q_heads * head_dim, num_kv_heads * head_dim
    gen = torch.Generator().manual_seed(1)
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size + row_pad, generator=gen).to(device, dtype)
    q = qkv[:, :q_size].unflatten(1, (num_q_heads, head_dim))
    k = qkv[:, q_size:q_size + kv_size].unflatten(1, (num_kv_heads, head_dim))
    v = qkv[:, q_size + kv_size:q_size + 2 * kv_size].unflatten(1, (num_kv_heads, head_dim))
    start_loc = torch.tensor([0] + extend_lens[:-1], device=device).cumsum(0)
    args = (pool.req_to_token, pool.req_pool_indices, torch.tensor(prefix_lens, device=device),
            torch.tensor(extend_lens, device=device, dtype=torch.int32), start_loc,
            max(extend_lens), head_dim ** -0.5, window, cap)
    return ExtendBatch(q, k, v, pool, args)


# (prefix_lens, extend_lens, Hq, Hk, head_dim, sliding_window, logit_cap, row_pad)
EXTEND_CASES = [
    ([0, 20, 11], [37, 5, 1], 4, 2, 80, -1, 0.0, 0),  # prefill + extend + 1-token row, GQA
    ([0], [1], 4, 1, 64, -1, 0.0, 0),                 # a single token, MQA
    ([70, 33], [3, 40], 2, 1, 64, -1, 0.0, 0),        # prefix hits: full prefix blocks + a tail
    ([9, 0], [30, 45], 2, 2, 96, 13, 30.0, 1),        # window + soft cap, MHA, unaligned rows
] + ([
    ([0, 129, 500], [300, 77, 1], 8, 2, 128, -1, 0.0, 0),
    ([0, 129, 500], [300, 77, 1], 8, 2, 128, -1, 0.0, 1),  # pointer fallback (rows of 1537)
    ([64, 0], [200, 333], 4, 2, 256, -1, 0.0, 0),
    ([0, 1000], [1000, 100], 8, 1, 128, 256, 50.0, 0),
    ([300, 0, 7], [700, 1000, 129], 32, 8, 128, -1, 0.0, 0),  # Llama-3.1-8B heads
    ([5, 0], [260, 130], 4, 2, 80, 100, 0.0, 0),
] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", EXTEND_CASES)
def test_extend_attention(device, dtype, case):
    prefix_lens, extend_lens, num_q_heads, num_kv_heads, head_dim, window, cap, row_pad = case
    batch = _extend_batch(prefix_lens, extend_lens, num_q_heads, num_kv_heads, head_dim, dtype,
                          device, window, cap, row_pad)
    pool, args = batch.pool, batch.args
    out = attention.extend_attention(batch.q, batch.k, batch.v, pool.k_cache, pool.v_cache, *args)
    ref = attention.extend_attention_reference(batch.q, batch.k, batch.v, pool.k_cache,
                                               pool.v_cache, *args)
    f64 = attention.extend_attention_reference(batch.q.double(), batch.k.double(),
                                               batch.v.double(), pool.k_cache.double(),
                                               pool.v_cache.double(), *args)
    assert_close(out, ref, dtype, "extend vs reference")
    assert_close(out, f64, dtype, "extend vs float64")


# Tile configs that take other code paths than the default table: k/v descriptors built
# per program on the device (the fallback when heads are not packed in a row), paired
# query blocks, pointers only.
_BLOCK = 64 if ON_GPU else 32
PATH_CONFIGS = {
    "device-kv": ExtendConfig(_BLOCK, 2 * _BLOCK, 4, 2, kv_desc_on_host=False),
    "host-kv-pair": ExtendConfig(2 * _BLOCK, _BLOCK, 4, 2, pair_blocks=True),
    "device-kv-pair": ExtendConfig(_BLOCK, _BLOCK, 4, 2, kv_desc_on_host=False, pair_blocks=True),
    "pointers-pair": ExtendConfig(2 * _BLOCK, _BLOCK, 4, 2, tma=False, pair_blocks=True),
}


@pytest.mark.parametrize("name", PATH_CONFIGS)
def test_extend_code_paths(device, name):
    config = PATH_CONFIGS[name]
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    batch = _extend_batch([0, 45, 3], [150, 97, 1], 4, 2, 64, dtype, device)
    pool, args = batch.pool, batch.args
    out = launch_extend_attention(batch.q, batch.k, batch.v, pool.k_cache, pool.v_cache, *args,
                                  config=config)
    f64 = attention.extend_attention_reference(batch.q.double(), batch.k.double(),
                                               batch.v.double(), pool.k_cache.double(),
                                               pool.v_cache.double(), *args)
    assert_close(out, f64, dtype, f"extend {config} vs float64")


@pytest.mark.parametrize("name", ["default", "host-kv-pair", "device-kv"])
def test_extend_keeps_requests_apart(device, name):
    """Request 1's new k/v are NaN: request 0, whose last key block overlaps request 1's
    rows in k/v, must still come out right."""
    dtype = torch.bfloat16 if ON_GPU else torch.float16
    batch = _extend_batch([0, 4], [37, 20], 4, 2, 128, dtype, device)  # D=128: the table entry
    batch.k[37:] = float("nan")
    batch.v[37:] = float("inf")
    pool, args = batch.pool, batch.args
    tensors = (batch.q, batch.k, batch.v, pool.k_cache, pool.v_cache)
    out = launch_extend_attention(*tensors, *args, config=PATH_CONFIGS.get(name))
    f64 = attention.extend_attention_reference(*(t.double() for t in tensors), *args)
    assert_close(out[:37], f64[:37], dtype, f"extend {name}: request 0 next to a NaN request")


def test_extend_rejects_bad_new_kv(device):
    batch = _extend_batch([3], [4], 2, 1, 64, torch.float32, device)
    pool, args = batch.pool, batch.args
    with pytest.raises(ValueError, match=r"k must be \[T, Hk, D\]"):
        attention.extend_attention(batch.q, batch.k[:3], batch.v, pool.k_cache, pool.v_cache,
                                   *args)
    with pytest.raises(ValueError, match=r"v must be \[T, Hk, D\]"):
        attention.extend_attention(batch.q, batch.k, batch.v.repeat(1, 2, 1), pool.k_cache,
                                   pool.v_cache, *args)
    with pytest.raises(ValueError, match="k dtype"):
        attention.extend_attention(batch.q, batch.k.half(), batch.v, pool.k_cache, pool.v_cache,
                                   *args)
    with pytest.raises(ValueError, match=r"k must be \[T, Hk, D\]"):
        attention.extend_attention_reference(batch.q, batch.k[:, :, :32], batch.v, pool.k_cache,
                                             pool.v_cache, *args)


# (seq_lens, Hq, Hk, head_dim, sliding_window, logit_cap, num_kv_splits)
DECODE_CASES = [
    ([1, 37, 70], 4, 2, 80, -1, 0.0, None),
    ([65], 8, 1, 64, -1, 0.0, 3),                     # MQA, group 8, splits
    ([50, 9], 2, 2, 96, 20, 30.0, 2),                 # window + cap, MHA
] + ([
    ([1, 4097, 300, 1025], 32, 8, 128, -1, 0.0, None),
    ([3000, 17], 16, 8, 256, -1, 0.0, 7),
    ([8192], 28, 4, 128, 1024, 0.0, 64),
] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", DECODE_CASES)
def test_decode_attention(device, dtype, case):
    seq_lens, num_q_heads, num_kv_heads, head_dim, window, cap, splits = case
    pool = _paged_batch(seq_lens, num_kv_heads, head_dim, dtype, device, seed=len(seq_lens))
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen).to(device, dtype)
    args = (pool.req_to_token, pool.req_pool_indices, torch.tensor(seq_lens, device=device),
            head_dim ** -0.5, window, cap, splits)
    out = attention.decode_attention(q, pool.k_cache, pool.v_cache, *args)
    ref = attention.decode_attention_reference(q, pool.k_cache, pool.v_cache, *args)
    f64 = attention.decode_attention_reference(q.double(), pool.k_cache.double(),
                                               pool.v_cache.double(), *args)
    assert_close(out, ref, dtype, "decode vs reference")
    assert_close(out, f64, dtype, "decode vs float64")


def test_decode_matches_last_row_of_extend(device):
    """Decoding token n equals the last row of extending the same n tokens."""
    pool = _paged_batch([40], 2, 64, torch.float32, device, seed=5)
    q = torch.randn(40, 4, 64, generator=torch.Generator().manual_seed(3)).to(device)
    zero, n = torch.tensor([0], device=device), torch.tensor([40], device=device)
    slots = pool.req_to_token[pool.req_pool_indices[0], :40].long()
    ext = attention.extend_attention(q, pool.k_cache[slots], pool.v_cache[slots], pool.k_cache,
                                     pool.v_cache, pool.req_to_token, pool.req_pool_indices,
                                     zero, n, zero, 40, 0.125)
    dec = attention.decode_attention(q[-1:], pool.k_cache, pool.v_cache, pool.req_to_token,
                                     pool.req_pool_indices, n, 0.125, num_kv_splits=2)
    assert_close(dec[0], ext[-1], torch.float32, "decode vs extend last row")


def test_empty_batch_and_bad_inputs_raise(device):
    pool = _paged_batch([4], 1, 64, torch.float32, device, seed=0)
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    q = torch.zeros(0, 2, 64, device=device)
    with pytest.raises(ValueError, match="empty batch"):
        attention.decode_attention(q, pool.k_cache, pool.v_cache, pool.req_to_token, empty,
                                   empty, 0.1)
    with pytest.raises(ValueError, match="empty batch"):
        new_kv = torch.zeros(0, 1, 64, device=device)
        attention.extend_attention(q, new_kv, new_kv, pool.k_cache, pool.v_cache,
                                   pool.req_to_token, empty, empty, empty, empty, 1, 0.1)
    one = torch.ones(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="share"):
        attention.decode_attention(torch.zeros(1, 2, 64, device=device, dtype=torch.float16),
                                   pool.k_cache, pool.v_cache, pool.req_to_token, one, one, 0.1)
    with pytest.raises(ValueError, match="multiple"):
        pool2 = _paged_batch([4], 2, 64, torch.float32, device, seed=0)
        attention.decode_attention(torch.zeros(1, 3, 64, device=device), pool2.k_cache,
                                   pool2.v_cache, pool2.req_to_token, one, one, 0.1)
    with pytest.raises(ValueError, match="req_to_token"):
        attention.decode_attention(torch.zeros(1, 2, 64, device=device), pool.k_cache,
                                   pool.v_cache, pool.req_to_token.long(), one, one, 0.1)
