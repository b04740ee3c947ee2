"""Draft trees: the layout a verify forward needs, and top-k pruning of candidates.

A draft tree of one request has ``N`` nodes in topological order. Node 0 is
the ROOT: the last token the target already emitted, whose KV is not in the
pool yet (the verify forward computes it together with the drafts, as SGLang
counts it in ``speculative_num_draft_tokens``). Every other node ``i`` holds a
drafted token and ``parents[i] < i``. A chain is the tree with
``parents = [-1, 0, 1, 2, ...]``.

From ``parents`` alone (``build_tree_layout``, SGLang's ``build_tree`` names):

=====================  ==============  =============================================
field                  shape / dtype   meaning
=====================  ==============  =============================================
``depth``              [N] i64         0 for the root, parent's + 1 otherwise
``positions``          [N] i64         ``prefix_len + depth`` (rotary positions)
``tree_mask``          [N, N] bool     ``tree_mask[i, j]``: j is i or an ancestor
``retrieve_index``     [P, D+1] i64    one row per leaf: the node ids root .. leaf,
                                       padded with -1 (P leaves, D = max depth)
``next_token``         [N] i64         first child of each node (-1: a leaf)
``next_sibling``       [N] i64         next child of the same parent (-1: last)
=====================  ==============  =============================================

A draft token attends to the request's whole KV prefix and, among the
drafts, to ``tree_mask``'s row (``triton_kernels/tree_attention.py``). After
verification, the accepted path is a root-to-node walk; ``next_token`` /
``next_sibling`` let the walk visit children without a search.

``prune_tree`` keeps the ``num_draft_tokens - 1`` best candidates by cumulative
draft score (log-probability of the path; never increases along a path, so
the best set is closed under taking parents), and ``expand_top_k`` is one
EAGLE drafting step: each of the k frontier nodes proposes its k best tokens,
and the k best of those k*k become the next frontier.
"""
from __future__ import annotations

import dataclasses

import torch

DEFAULT_NUM_DRAFT_TOKENS = 8  # root + 7 drafts when neither --speculative-num-steps nor -num-draft-tokens is given


def tree_steps(num_steps: int, num_draft_tokens: int) -> int:
    """Drafting steps (the deepest a draft can be): --speculative-num-steps, else
    --speculative-num-draft-tokens - 1."""
    return num_steps or (num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS) - 1


def num_draft_slots(num_steps: int, num_draft_tokens: int, topk: int) -> int:
    """Drafts per row and step (the root not counted). A chain: the steps, at most
    num_draft_tokens - 1; a tree: num_draft_tokens - 1, at most the candidates its steps
    produce (topk + (steps - 1) topk^2)."""
    drafts = (num_draft_tokens or DEFAULT_NUM_DRAFT_TOKENS) - 1
    if topk > 1:
        return min(drafts, topk + (tree_steps(num_steps, num_draft_tokens) - 1) * topk * topk)
    if num_steps > 0:
        return min(num_steps, num_draft_tokens - 1) if num_draft_tokens > 0 else num_steps
    return drafts


@dataclasses.dataclass(frozen=True)
class DraftTree:
    """A proposal: node 0 is the root (the last emitted token), ``parents[0] == -1``."""

    tokens: list[int]
    parents: list[int]

    @property
    def num_drafts(self) -> int:
        return len(self.tokens) - 1


@dataclasses.dataclass(frozen=True)
class TreeLayout:
    """What the verify forward and the acceptance walk read (see the module table)."""

    depth: torch.Tensor
    positions: torch.Tensor
    tree_mask: torch.Tensor
    retrieve_index: torch.Tensor
    next_token: torch.Tensor
    next_sibling: torch.Tensor

    @property
    def num_nodes(self) -> int:
        return int(self.depth.shape[0])


def check_parents(parents: list[int]) -> None:
    """Node 0 is the root (-1); every other parent precedes its child."""
    if not parents or parents[0] != -1:
        raise ValueError(f"parents[0] must be -1 (the root), got {parents[:1]}")
    for i, p in enumerate(parents[1:], start=1):
        if not 0 <= p < i:
            raise ValueError(f"parents[{i}] = {p}: a parent must be an earlier node (0..{i - 1})")


def build_tree_layout(parents: list[int], prefix_len: int = 0) -> TreeLayout:
    """Depths, positions, ancestor mask, leaf paths and child/sibling links of one tree."""
    check_parents(parents)
    n = len(parents)
    depth = [0] * n
    mask = torch.zeros(n, n, dtype=torch.bool)
    next_token, next_sibling = [-1] * n, [-1] * n
    last_child = [-1] * n
    for i in range(n):
        mask[i, i] = True
        p = parents[i]
        if p < 0:
            continue
        depth[i] = depth[p] + 1
        mask[i] |= mask[p]
        if last_child[p] < 0:
            next_token[p] = i
        else:
            next_sibling[last_child[p]] = i
        last_child[p] = i
    leaves = [i for i in range(n) if next_token[i] < 0]
    max_depth = max(depth)
    retrieve = torch.full((len(leaves), max_depth + 1), -1, dtype=torch.int64)
    for row, leaf in enumerate(leaves):
        path = path_to(parents, leaf)
        retrieve[row, :len(path)] = torch.tensor(path)
    depth_t = torch.tensor(depth, dtype=torch.int64)
    return TreeLayout(depth=depth_t, positions=depth_t + prefix_len, tree_mask=mask,
                      retrieve_index=retrieve, next_token=torch.tensor(next_token),
                      next_sibling=torch.tensor(next_sibling))


def path_to(parents: list[int], node: int) -> list[int]:
    """Node ids from the root down to ``node``."""
    path = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def chain_parents(num_nodes: int) -> list[int]:
    """A chain: root, then each draft the child of the one before."""
    return [-1] + list(range(num_nodes - 1))


def prune_tree(tokens: list[int], parents: list[int], scores: list[float],
               num_draft_tokens: int) -> tuple[list[int], list[int], list[int]]:
    """Keep the root and the best ``num_draft_tokens - 1`` candidates by cumulative score.

    Candidates are visited best first (ties: shallower, then earlier); one is
    kept only if its parent was kept, so the result is a tree even when scores
    tie or increase along a path. Returns (tokens, parents, kept candidate ids),
    renumbered in topological order (kept ids ascending, so parents precede).
    """
    check_parents(parents)
    if num_draft_tokens < 1:
        raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    order = sorted(range(1, len(parents)), key=lambda i: (-scores[i], depth[i], i))
    kept = {0}
    for i in order:
        if len(kept) == num_draft_tokens:
            break
        if parents[i] in kept:
            kept.add(i)
    ids = sorted(kept)
    new_id = {old: new for new, old in enumerate(ids)}
    new_parents = [-1] + [new_id[parents[i]] for i in ids[1:]]
    return [tokens[i] for i in ids], new_parents, ids


@dataclasses.dataclass
class CandidateTree:
    """Candidates grown by ``expand_top_k`` (root first), with cumulative log-probs."""

    tokens: list[int]
    parents: list[int]
    scores: list[float]
    frontier: list[int]             # node ids the next step expands

    @classmethod
    def rooted_at(cls, root_token: int) -> "CandidateTree":
        return cls(tokens=[root_token], parents=[-1], scores=[0.0], frontier=[0])


def expand_top_k(tree: CandidateTree, logprobs: torch.Tensor, top_k: int) -> CandidateTree:
    """One drafting step: ``logprobs[len(frontier), V]`` are the drafter's next-token
    log-probs at each frontier node. Each frontier node adds its ``top_k`` best
    tokens as candidates; the ``top_k`` best new candidates by cumulative score
    (parent's + own) become the next frontier (EAGLE-2's dynamic tree)."""
    if logprobs.dim() != 2 or logprobs.shape[0] != len(tree.frontier):
        raise ValueError(f"logprobs must be [{len(tree.frontier)}, V], got {tuple(logprobs.shape)}")
    best, best_ids = logprobs.float().topk(min(top_k, logprobs.shape[1]), dim=-1)
    new_nodes: list[int] = []
    for row, parent in enumerate(tree.frontier):
        for lp, token in zip(best[row].tolist(), best_ids[row].tolist()):
            tree.tokens.append(int(token))
            tree.parents.append(parent)
            tree.scores.append(tree.scores[parent] + lp)
            new_nodes.append(len(tree.tokens) - 1)
    new_nodes.sort(key=lambda i: (-tree.scores[i], i))
    tree.frontier = new_nodes[:top_k]
    return tree
