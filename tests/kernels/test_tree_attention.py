"""tree_attention vs its PyTorch reference, float64, and extend attention on chains.

Ragged batches: prefixes of 0, odd and block-crossing lengths; trees of 1 to
40 nodes (past one 32-row block) with random parents; GQA, MQA and MHA; head
dims 64, 80 (padded), 128. Pool slots are shuffled so that every prefix key
is read through req_to_token; the pool slots of the tree nodes hold NaN (the
kernel must take their keys from k/v, as in a verify step).
"""
from __future__ import annotations

import random

import pytest
import torch

from stages.speculative.tree import build_tree_layout, chain_parents
from tests.kernels.util import DTYPES, assert_close
from triton_kernels import tree_attention as ta
from triton_kernels.attention import extend_attention_reference


def _batch(prefix_lens, parents_list, num_q_heads, num_kv_heads, head_dim, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tree_lens = [len(p) for p in parents_list]
    total = sum(prefix_lens) + sum(tree_lens)
    num_slots = total + 5
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    slots = torch.randperm(num_slots - 1, generator=gen) + 1
    req_to_token = torch.zeros(len(prefix_lens) + 2, max(p + n for p, n in zip(prefix_lens, tree_lens)) + 3,
                               dtype=torch.int32)
    req_pool_indices = torch.arange(len(prefix_lens), 0, -1)
    used = 0
    for b, (p, n) in enumerate(zip(prefix_lens, tree_lens)):
        req_to_token[req_pool_indices[b], :p + n] = slots[used:used + p + n].int()
        k_cache[slots[used + p:used + p + n]] = float("nan")      # the nodes' slots: not read
        v_cache[slots[used + p:used + p + n]] = float("nan")
        used += p + n
    T = sum(tree_lens)
    q = torch.randn(T, num_q_heads, head_dim, generator=gen)
    k = torch.randn(T, num_kv_heads, head_dim, generator=gen)
    v = torch.randn(T, num_kv_heads, head_dim, generator=gen)
    masks = [build_tree_layout(p).tree_mask.flatten() for p in parents_list]
    starts = [0]
    mask_starts = [0]
    for n in tree_lens[:-1]:
        starts.append(starts[-1] + n)
        mask_starts.append(mask_starts[-1] + n * n)

    def put(t):
        return t.to(device, dtype)

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return (put(q), put(k), put(v), put(k_cache), put(v_cache), req_to_token.to(device),
            req_pool_indices.to(device, torch.int32), i32(prefix_lens), i32(tree_lens), i32(starts),
            torch.cat(masks).to(device), i32(mask_starts), max(tree_lens), head_dim ** -0.5)


def _random_parents(n: int, rng: random.Random) -> list[int]:
    return [-1] + [rng.randrange(i) for i in range(1, n)]


CASES = [  # prefix_lens, tree sizes, Hq, Hk, D
    ([0], [1], 4, 4, 64),
    ([37], [8], 4, 2, 80),
    ([65, 0, 3], [5, 16, 1], 8, 2, 64),
    ([130, 17], [40, 7], 4, 1, 128),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, dtype, device):
    prefix_lens, sizes, hq, hk, d = case
    rng = random.Random(sum(sizes))
    parents = [_random_parents(n, rng) for n in sizes]
    args = _batch(prefix_lens, parents, hq, hk, d, dtype, device)
    out = ta.tree_attention(*args)
    ref = ta.reference(*args)
    assert_close(out, ref, dtype, f"tree_attention {case}")
    args64 = tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                   for a in args)
    assert_close(ref.double(), ta.reference(*args64), dtype, "reference vs float64")


def test_chain_mask_is_extend_attention(device):
    prefix_lens, sizes = [9, 0], [6, 4]
    args = _batch(prefix_lens, [chain_parents(n) for n in sizes], 4, 2, 64, torch.float32, device)
    q, k, v, k_cache, v_cache, req_to_token, rows, prefix, lens, starts, *_ = args
    out = ta.tree_attention(*args)
    extend = extend_attention_reference(q, k, v, k_cache, v_cache, req_to_token, rows, prefix,
                                        lens, starts, max(sizes), 64 ** -0.5)
    assert_close(out, extend, torch.float32, "chain tree vs extend")


def test_rows_without_a_mask_attend_causally(device):
    """mask_start_loc -1: a row stores no mask and attends causally (a prefill chunk beside trees);
    the tree row between two such rows still reads its own mask, which is all the mask holds."""
    rng = random.Random(3)
    prefix_lens, sizes = [9, 4, 0], [6, 5, 12]
    parents = [chain_parents(6), _random_parents(5, rng), chain_parents(12)]
    args = list(_batch(prefix_lens, parents, 4, 2, 64, torch.float32, device))
    full = ta.tree_attention(*args)
    args[10] = build_tree_layout(parents[1]).tree_mask.flatten().to(device)      # the tree's mask alone
    args[11] = torch.tensor([-1, 0, -1], dtype=torch.int32, device=device)
    for op in (ta.tree_attention, ta.reference):
        assert_close(op(*args), full, torch.float32, f"{op.__name__} causal rows")


def test_siblings_do_not_see_each_other(device):
    """Node 2's output must not change when node 1 (its sibling) changes."""
    args = list(_batch([5], [[-1, 0, 0]], 2, 2, 64, torch.float32, device))
    before = ta.tree_attention(*args)
    args[1] = args[1].clone()
    args[2] = args[2].clone()
    args[1][1] += 3.0
    args[2][1] += 3.0
    after = ta.tree_attention(*args)
    assert torch.equal(before[2], after[2]) and torch.equal(before[0], after[0])
    assert not torch.allclose(before[1], after[1])


def test_bad_mask_is_refused(device):
    args = list(_batch([2], [[-1, 0]], 2, 2, 64, torch.float32, device))
    args[10] = args[10].view(2, 2)
    with pytest.raises(ValueError, match="tree_mask"):
        ta.tree_attention(*args)


@pytest.mark.parametrize("window", [1, 4, 11])
def test_sliding_window_chain_is_extend_attention(window, device):
    """With a sliding window, a chain over the prefix is windowed extend attention (positions
    prefix_len + depth), in the kernel and in its reference."""
    prefix_lens, sizes = [9, 0, 21], [6, 4, 3]
    args = _batch(prefix_lens, [chain_parents(n) for n in sizes], 4, 2, 64, torch.float32, device)
    q, k, v, k_cache, v_cache, req_to_token, rows, prefix, lens, starts, *_ = args
    positions = torch.cat([torch.arange(p, p + n) for p, n in zip(prefix_lens, sizes)]).to(device)
    extend = extend_attention_reference(q, k, v, k_cache, v_cache, req_to_token, rows, prefix,
                                        lens, starts, max(sizes), 64 ** -0.5, sliding_window=window)
    for fn in (ta.tree_attention, ta.reference):
        out = fn(*args, positions=positions, sliding_window=window)
        assert_close(out, extend, torch.float32, f"windowed chain tree vs extend ({fn.__name__})")
    assert not torch.allclose(ta.reference(*args), extend)  # the window changed something


def test_sliding_window_tree_uses_node_positions(device):
    """A branch's node at depth 1 keeps its parent in view even when a sibling subtree is
    deeper: visibility goes by position (prefix_len + depth), not node index."""
    parents = [-1, 0, 1, 2, 0]           # node 4: depth 1, node index 4
    prefix_len, window = 6, 3
    args = _batch([prefix_len], [parents], 2, 2, 64, torch.float32, device)
    depth = build_tree_layout(parents).depth
    positions = (depth + prefix_len).to(device)
    out = ta.tree_attention(*args, positions=positions, sliding_window=window)
    assert_close(out, ta.reference(*args, positions=positions, sliding_window=window), torch.float32,
                 "windowed tree vs reference")
    # node 4 (position 7) sees prefix key 5, the root (node 0, position 6) and itself
    q, k, v, k_cache, v_cache, req_to_token, rows, *_ = args
    slots = req_to_token[int(rows[0]), :prefix_len].long()
    keys = torch.cat([k_cache[slots[5:]], k[0:1], k[4:5]])
    values = torch.cat([v_cache[slots[5:]], v[0:1], v[4:5]])
    scores = torch.einsum("hd,khd->hk", q[4], keys) * 64 ** -0.5
    expected = torch.einsum("hk,khd->hd", torch.softmax(scores, -1), values)
    assert_close(out[4], expected, torch.float32, "node 4 by hand")


def test_sliding_window_needs_positions(device):
    args = _batch([2], [[-1, 0]], 2, 2, 64, torch.float32, device)
    with pytest.raises(ValueError, match="positions"):
        ta.tree_attention(*args, sliding_window=4)
