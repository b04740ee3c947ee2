"""N-gram drafter: incremental index, longest-suffix lookup, frequency trees, chains."""
from __future__ import annotations

import random

import pytest

from stages.speculative.ngram import NgramIndex, NgramParams
from stages.speculative.tree import check_parents, path_to


def brute_force_continuations(history: list[int], n: int, depth: int) -> list[list[int]]:
    """Every earlier occurrence of the last n tokens, its continuation (most recent first)."""
    suffix = history[-n:]
    found = []
    for start in range(len(history) - n - 1, -1, -1):
        if history[start:start + n] == suffix:
            found.append(history[start + n: start + n + depth])
    return found


def test_chain_follows_the_most_recent_match():
    index = NgramIndex(NgramParams(num_draft_tokens=4, branch_top_k=1), [5, 6, 7, 8, 9, 5, 6])
    tree = index.propose()
    assert tree.tokens == [6, 7, 8, 9] and tree.parents == [-1, 0, 1, 2]


def test_no_match_gives_the_root_alone():
    tree = NgramIndex(NgramParams(num_draft_tokens=5), [1, 2, 3, 4]).propose()
    assert tree.tokens == [4] and tree.parents == [-1]


def test_longest_suffix_wins():
    # "3" alone is followed by 4 once and by 8 twice, but "2 3" only by 4
    history = [2, 3, 4, 0, 3, 8, 0, 3, 8, 1, 2, 3]
    tree = NgramIndex(NgramParams(num_draft_tokens=2, branch_top_k=1), history).propose()
    assert tree.tokens == [3, 4]
    only_unigrams = NgramParams(num_draft_tokens=2, max_match=1, branch_top_k=1)
    assert NgramIndex(only_unigrams, history).propose().tokens == [3, 8]


def test_tree_branches_by_frequency():
    # after "1 2": 3 twice, 7 once; after "1 2 3": 4 and 5
    history = [1, 2, 3, 4, 0, 1, 2, 7, 0, 1, 2, 3, 5, 0, 1, 2]
    tree = NgramIndex(NgramParams(num_draft_tokens=4, max_match=2, branch_top_k=2),
                      history).propose()
    check_parents(tree.parents)
    paths = {tuple(tree.tokens[i] for i in path_to(tree.parents, leaf))
             for leaf in range(len(tree.tokens)) if leaf not in tree.parents}
    # 3 (2/3) first, then the 1/3 candidates by depth: 7 (depth 1) before 3's children
    assert tree.tokens[1] == 3 and 7 in tree.tokens and len(tree.tokens) == 4
    assert (2, 7) in paths


def test_branch_top_k_caps_children():
    history = [9, 1, 9, 2, 9, 3, 9, 4, 9]
    tree = NgramIndex(NgramParams(num_draft_tokens=8, max_match=1, branch_top_k=2),
                      history).propose()
    root_children = [i for i, p in enumerate(tree.parents) if p == 0]
    assert len(root_children) == 2
    assert {tree.tokens[i] for i in root_children} == {4, 3}   # ties: most recent first


def test_incremental_equals_batch_build():
    rng = random.Random(0)
    history = [rng.randrange(4) for _ in range(200)]
    params = NgramParams(num_draft_tokens=6, max_match=3, branch_top_k=3)
    grown = NgramIndex(params, history[:50])
    for t in history[50:]:
        grown.append(t)
        built = NgramIndex(params, grown.tokens)
        assert grown.propose() == built.propose()


@pytest.mark.parametrize("seed", range(5))
def test_every_draft_path_occurred_in_the_history(seed):
    rng = random.Random(seed)
    history = [rng.randrange(3) for _ in range(rng.randrange(20, 80))]
    params = NgramParams(num_draft_tokens=7, max_match=3, branch_top_k=3, max_matches=100)
    index = NgramIndex(params, history)
    tree = index.propose()
    check_parents(tree.parents)
    assert len(tree.tokens) <= params.num_draft_tokens
    n = next(n for n in range(3, 0, -1) if brute_force_continuations(history, n, 6))
    continuations = brute_force_continuations(history, n, 6)
    for node in range(1, len(tree.tokens)):
        path = [tree.tokens[i] for i in path_to(tree.parents, node)][1:]
        assert any(c[:len(path)] == path for c in continuations), (path, continuations)
    # the first draft is the most frequent first continuation token
    firsts = [c[0] for c in continuations if c]
    assert firsts.count(tree.tokens[1]) == max(firsts.count(t) for t in set(firsts))


def test_bad_params_are_refused():
    with pytest.raises(ValueError, match="min_match"):
        NgramParams(min_match=3, max_match=2)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        NgramParams(num_draft_tokens=0)
