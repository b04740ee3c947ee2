"""Draft tree layout (mask, positions, retrieve indices, links) and top-k pruning."""
from __future__ import annotations

import math
import random

import pytest
import torch

from stages.speculative.tree import (
    CandidateTree, build_tree_layout, chain_parents, expand_top_k, path_to, prune_tree,
)

#        0
#      /   \
#     1     2
#    / \     \
#   3   4     5
#   |
#   6
PARENTS = [-1, 0, 0, 1, 1, 2, 3]


def test_layout_of_a_small_tree():
    layout = build_tree_layout(PARENTS, prefix_len=7)
    assert layout.depth.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert layout.positions.tolist() == [7, 8, 8, 9, 9, 9, 10]
    ancestors = {0: {0}, 1: {0, 1}, 2: {0, 2}, 3: {0, 1, 3}, 4: {0, 1, 4}, 5: {0, 2, 5},
                 6: {0, 1, 3, 6}}
    for i, row in enumerate(layout.tree_mask.tolist()):
        assert {j for j, v in enumerate(row) if v} == ancestors[i]
    assert layout.retrieve_index.tolist() == [[0, 1, 4, -1], [0, 2, 5, -1], [0, 1, 3, 6]]
    assert layout.next_token.tolist() == [1, 3, 5, 6, -1, -1, -1]
    assert layout.next_sibling.tolist() == [-1, 2, -1, 4, -1, -1, -1]


def test_chain_layout_is_causal():
    layout = build_tree_layout(chain_parents(5))
    assert torch.equal(layout.tree_mask, torch.ones(5, 5, dtype=torch.bool).tril())
    assert layout.retrieve_index.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("seed", range(4))
def test_random_tree_mask_matches_paths(seed):
    rng = random.Random(seed)
    parents = [-1] + [rng.randrange(i) for i in range(1, 20)]
    layout = build_tree_layout(parents)
    for i in range(20):
        assert set(torch.nonzero(layout.tree_mask[i]).flatten().tolist()) == set(path_to(parents, i))
    # children walked through next_token / next_sibling are exactly the nodes with that parent
    for node in range(20):
        child, seen = int(layout.next_token[node]), []
        while child >= 0:
            seen.append(child)
            child = int(layout.next_sibling[child])
        assert seen == [i for i, p in enumerate(parents) if p == node]


def test_bad_parents_are_refused():
    with pytest.raises(ValueError, match="parents\\[0\\]"):
        build_tree_layout([0, 0])
    with pytest.raises(ValueError, match="parents\\[2\\] = 2"):
        build_tree_layout([-1, 0, 2])


def test_prune_keeps_best_scores_and_stays_a_tree():
    tokens = [100, 11, 12, 13, 14, 15, 16]
    scores = [0.0, -0.1, -2.0, -0.3, -0.5, -2.5, -0.4]
    kept_tokens, kept_parents, ids = prune_tree(tokens, PARENTS, scores, num_draft_tokens=5)
    assert ids == [0, 1, 3, 4, 6]
    assert kept_tokens == [100, 11, 13, 14, 16]
    assert kept_parents == [-1, 0, 1, 1, 2]


def test_prune_never_keeps_an_orphan():
    # node 3 scores best but its parent 1 is worst: the budget skips 3 until 1 is kept
    scores = [0.0, -5.0, -0.1, 0.5, -6.0, -0.2, -7.0]
    _, parents, ids = prune_tree(list(range(7)), PARENTS, scores, num_draft_tokens=4)
    assert ids == [0, 1, 2, 5]
    assert parents == [-1, 0, 0, 2]


def test_expand_top_k_builds_the_eagle_tree():
    tree = CandidateTree.rooted_at(7)
    step1 = torch.log(torch.tensor([[0.5, 0.3, 0.1, 0.1]]))
    tree = expand_top_k(tree, step1, top_k=2)
    assert tree.tokens == [7, 0, 1] and tree.frontier == [1, 2]
    step2 = torch.log(torch.tensor([[0.1, 0.1, 0.2, 0.6], [0.9, 0.05, 0.03, 0.02]]))
    tree = expand_top_k(tree, step2, top_k=2)
    # candidates: 0->3 (.30), 0->2 (.10), 1->0 (.27), 1->1 (.015)
    assert tree.tokens[3:] == [3, 2, 0, 1] and tree.parents[3:] == [1, 1, 2, 2]
    assert tree.frontier == [3, 5]
    assert math.isclose(tree.scores[5], math.log(0.3 * 0.9), rel_tol=1e-6)
    tokens, parents, _ = prune_tree(tree.tokens, tree.parents, tree.scores, num_draft_tokens=4)
    assert tokens == [7, 0, 1, 3] and parents == [-1, 0, 0, 1]
