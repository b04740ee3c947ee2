"""build_draft_tree (Triton, under the interpreter on CPU) and its reference vs the host oracle.

The oracle is ``stages/speculative/tree.prune_tree`` + ``build_tree_layout`` run per row on
lists. Candidates are grown like EAGLE's expansion (k per frontier node, the k best become
the next frontier) with scores on a coarse grid, so exact ties -- between siblings, between
depths, and a child equal to its parent (a log-probability of 0) -- are common. Rows take
different draft counts; masks are written both compactly (stride n) and into padded blocks
(stride ``tokens``, a verify graph's layout), and every entry outside the trees' blocks must
stay untouched.
"""
from __future__ import annotations

import random

import pytest
import torch

from stages.speculative.tree import build_tree_layout, prune_tree
from triton_kernels import draft_tree as dt

UNTOUCHED = 7  # sentinel in the mask and input tensors


def _candidates(topk: int, steps: int, rng: random.Random) -> tuple[list[int], list[int], list[float]]:
    """One row's EAGLE candidates: tokens, parents (node ids, 0 the root), cumulative scores."""
    tokens, parents, scores = [], [], []
    frontier = [(0, 0.0)]  # (node id, score)
    for step in range(steps):
        children = []
        for node, score in frontier:
            for _ in range(topk):
                tokens.append(rng.randrange(1000))
                parents.append(node)
                scores.append(score - rng.choice([0.0, 0.5, 0.5, 1.0, 1.5, 2.0]))
                children.append((len(tokens), scores[-1]))
        frontier = sorted(children, key=lambda c: (-c[1], c[0]))[:topk]
    return tokens, parents, scores


def _oracle(tokens, parents, scores, num_drafts):
    kept_tokens, kept_parents, _ = prune_tree([-5] + tokens, [-1] + parents, [0.0] + scores, num_drafts + 1)
    return kept_tokens[1:], kept_parents, build_tree_layout(kept_parents)


@pytest.mark.parametrize("build", [dt.build_draft_tree, dt.build_draft_tree_reference], ids=["triton", "reference"])
@pytest.mark.parametrize("topk,steps", [(2, 3), (3, 3), (4, 2), (4, 4), (1, 5)])
@pytest.mark.parametrize("padded", [False, True], ids=["compact", "graph-blocks"])
def test_matches_prune_tree_and_layout(build, topk, steps, padded, device) -> None:
    rng = random.Random(topk * 100 + steps * 10 + padded)
    num_rows = 5
    rows = [_candidates(topk, steps, rng) for _ in range(num_rows)]
    num_cands = len(rows[0][0])
    max_drafts = min(num_cands, 9)
    num_drafts = [max_drafts, 1, rng.randint(1, max_drafts), max(max_drafts - 1, 1), max_drafts]
    sizes = [d + 1 for d in num_drafts]
    tokens_per_row = max_drafts + 3                      # room after each row, like a padded verify row
    row_start = [s * tokens_per_row + 1 for s in range(num_rows)]
    root_pos = [10 * s + 3 for s in range(num_rows)]
    if padded:
        stride = [max_drafts + 2] * num_rows
        mask_start = [s * stride[0] ** 2 for s in range(num_rows)]
    else:
        stride = sizes
        mask_start = [sum(n * n for n in sizes[:s]) + 2 * s for s in range(num_rows)]   # gaps between blocks
    total = num_rows * tokens_per_row + 2
    input_ids = torch.full((total,), UNTOUCHED, dtype=torch.int64)
    positions = torch.full((total,), UNTOUCHED, dtype=torch.int64)
    for s in range(num_rows):
        input_ids[row_start[s]] = 999
        positions[row_start[s]] = root_pos[s]
    mask = torch.full((mask_start[-1] + stride[-1] * sizes[-1] + 3,), UNTOUCHED, dtype=torch.uint8)

    def i64(values):
        return torch.tensor(values, dtype=torch.int64, device=device)

    ids_d, pos_d, mask_d = input_ids.to(device), positions.to(device), mask.to(device)
    out_tokens, out_parents = build(
        i64([r[0] for r in rows]), i64([r[1] for r in rows]),
        torch.tensor([r[2] for r in rows], dtype=torch.float32, device=device), i64(num_drafts),
        ids_d, pos_d, i64(row_start), mask_d, i64(mask_start), i64(stride), max_drafts, steps)
    expect_ids, expect_pos, expect_mask = input_ids.clone(), positions.clone(), mask.clone()
    for s, (tokens, parents, scores) in enumerate(rows):
        drafts, tree_parents, layout = _oracle(tokens, parents, scores, num_drafts[s])
        n = sizes[s]
        assert out_tokens[s].tolist() == drafts + [-1] * (max_drafts - len(drafts)), s
        assert out_parents[s].tolist() == tree_parents + [-1] * (max_drafts + 1 - n), s
        expect_ids[row_start[s] + 1:row_start[s] + n] = torch.tensor(drafts)
        expect_pos[row_start[s]:row_start[s] + n] = layout.depth + root_pos[s]
        for i in range(n):
            at = mask_start[s] + i * stride[s]
            expect_mask[at:at + n] = layout.tree_mask[i].to(torch.uint8)
    assert torch.equal(ids_d.cpu(), expect_ids)
    assert torch.equal(pos_d.cpu(), expect_pos)
    assert torch.equal(mask_d.cpu(), expect_mask)


def test_chain_candidates_give_the_causal_mask(device) -> None:
    """topk 1 over 4 steps: the tree is the chain, its mask the lower triangle."""
    tokens = torch.tensor([[11, 12, 13, 14]], device=device)
    parents = torch.tensor([[0, 1, 2, 3]], device=device)
    scores = torch.tensor([[-0.1, -0.2, -0.3, -0.4]], device=device)
    ids = torch.zeros(5, dtype=torch.int64, device=device)
    pos = torch.tensor([8, 0, 0, 0, 0], device=device)
    mask = torch.zeros(25, dtype=torch.bool, device=device)
    one = torch.tensor([0], device=device)
    out_tokens, out_parents = dt.build_draft_tree(tokens, parents, scores, torch.tensor([4], device=device), ids,
                                                  pos, one, mask, one, torch.tensor([5], device=device), 4, 4)
    assert out_tokens.tolist() == [[11, 12, 13, 14]] and out_parents.tolist() == [[-1, 0, 1, 2, 3]]
    assert ids.tolist() == [0, 11, 12, 13, 14] and pos.tolist() == [8, 9, 10, 11, 12]
    assert torch.equal(mask.view(5, 5).cpu(), torch.ones(5, 5, dtype=torch.bool).tril())


def test_bad_shapes_are_refused(device) -> None:
    t = torch.zeros(2, 4, dtype=torch.int64, device=device)
    v = torch.zeros(2, dtype=torch.int64, device=device)
    ids = torch.zeros(10, dtype=torch.int64, device=device)
    mask = torch.zeros(50, dtype=torch.bool, device=device)
    with pytest.raises(ValueError, match="max_drafts"):
        dt.build_draft_tree(t, t, t.float(), v, ids, ids.clone(), v, mask, v, v, 5, 2)
    with pytest.raises(ValueError, match="num_drafts"):
        dt.build_draft_tree(t, t, t.float(), v[:1], ids, ids.clone(), v, mask, v, v, 3, 2)
    with pytest.raises(ValueError, match="input_ids"):
        dt.build_draft_tree(t, t, t.float(), v, ids.int(), ids.clone(), v, mask, v, v, 3, 2)
