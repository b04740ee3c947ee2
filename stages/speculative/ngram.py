"""N-gram drafting: propose the tokens that followed the current suffix earlier.

No draft model. Each request keeps its own token history (prompt, then every
generated token) and an index from n-grams to the positions that followed
them::

    index[n][(t_{i-n+1}, ..., t_i)] -> [i + 1, ...]     (ascending, most recent last)

for every n in ``[min_match, max_match]``. Appending a token adds one entry
per n (O(max_match - min_match + 1) per token, no rescan of the history).

``propose`` looks up the longest n whose last n tokens occurred before (the
occurrence that ends at the current end has no continuation and is skipped),
takes the continuations of up to ``max_matches`` most recent occurrences, and
merges them into a trie of continuations (each node counts how many
occurrences pass through it). Pruned to ``num_draft_tokens - 1`` nodes by
frequency (``stages/speculative/tree.prune_tree`` with log(count / total) as
the cumulative score, so the most common continuations win) with at most
``branch_top_k`` children per node, it becomes a draft tree whose root is the
last token. With ``branch_top_k = 1`` the tree is a chain of the most frequent
continuation. No match: a tree of the root alone.

Similar in spirit to SGLang's NGRAM (a trie shared by requests) and vLLM's
ngram proposer (the longest matching suffix, then its continuation).
"""
from __future__ import annotations

import dataclasses
import math

from stages.speculative.tree import DraftTree, prune_tree


@dataclasses.dataclass(frozen=True)
class NgramParams:
    """Drafting knobs (SGLang: --speculative-num-draft-tokens and the n-gram window)."""

    num_draft_tokens: int = 8         # nodes in the tree, the root included
    min_match: int = 1                # shortest suffix worth a lookup
    max_match: int = 4                # longest suffix indexed
    branch_top_k: int = 4             # children kept per node (1: a chain)
    max_matches: int = 16             # most recent occurrences merged into the trie

    def __post_init__(self) -> None:
        if self.num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {self.num_draft_tokens}")
        if not 1 <= self.min_match <= self.max_match:
            raise ValueError(f"need 1 <= min_match <= max_match, got {self.min_match}, {self.max_match}")
        if self.branch_top_k < 1 or self.max_matches < 1:
            raise ValueError("branch_top_k and max_matches must be >= 1")


class NgramIndex:
    """One request's token history and its n-gram -> continuation-position index."""

    def __init__(self, params: NgramParams, tokens: list[int] | None = None) -> None:
        self.params = params
        self.tokens: list[int] = []
        self._index: dict[int, dict[tuple[int, ...], list[int]]] = {
            n: {} for n in range(params.min_match, params.max_match + 1)}
        self.extend(tokens or [])

    def __len__(self) -> int:
        return len(self.tokens)

    def append(self, token: int) -> None:
        """Add one token: each n-gram ending at it now points at the next position."""
        self.tokens.append(int(token))
        end = len(self.tokens)
        for n, table in self._index.items():
            if end >= n:
                table.setdefault(tuple(self.tokens[end - n:]), []).append(end)

    def extend(self, tokens: list[int]) -> None:
        for token in tokens:
            self.append(token)

    def match_positions(self) -> list[int]:
        """Continuation positions of the longest suffix seen before, most recent first."""
        end = len(self.tokens)
        for n in range(min(self.params.max_match, end), self.params.min_match - 1, -1):
            found = self._index[n].get(tuple(self.tokens[end - n:]), [])
            recent = found[-(self.params.max_matches + 1):]   # the last may be `end` itself
            earlier = [pos for pos in reversed(recent) if pos < end]
            if earlier:
                return earlier[: self.params.max_matches]
        return []

    def propose(self) -> DraftTree:
        """A draft tree rooted at the last token (just the root when nothing matches)."""
        if not self.tokens:
            raise ValueError("cannot draft for an empty history")
        depth = self.params.num_draft_tokens - 1
        root = DraftTree([self.tokens[-1]], [-1])
        positions = self.match_positions()
        if depth == 0 or not positions:
            return root
        tokens, parents, counts = _continuation_trie(self.tokens, positions, depth,
                                                     self.params.branch_top_k)
        total = len(positions)
        scores = [0.0] + [math.log(c / total) for c in counts[1:]]
        tokens[0] = self.tokens[-1]
        kept_tokens, kept_parents, _ = prune_tree(tokens, parents, scores,
                                                  self.params.num_draft_tokens)
        return DraftTree(kept_tokens, kept_parents)


def _continuation_trie(history: list[int], positions: list[int], depth: int, top_k: int
                       ) -> tuple[list[int], list[int], list[int]]:
    """Merge ``history[p : p + depth]`` for each p into a trie (node 0 the root).

    Returns tokens, parents, counts (occurrences through each node); children
    beyond the ``top_k`` most frequent of a node are dropped with their subtrees.
    """
    children: list[dict[int, int]] = [{}]
    tokens, parents, counts = [-1], [-1], [len(positions)]
    for start in positions:
        node = 0
        for token in history[start: start + depth]:
            child = children[node].get(token)
            if child is None:
                child = len(tokens)
                children[node][token] = child
                children.append({})
                tokens.append(token)
                parents.append(node)
                counts.append(0)
            counts[child] += 1
            node = child
    keep = _top_k_children(children, counts, top_k)
    ids = sorted(keep)
    new_id = {old: new for new, old in enumerate(ids)}
    return ([tokens[i] for i in ids], [-1] + [new_id[parents[i]] for i in ids[1:]],
            [counts[i] for i in ids])


def _top_k_children(children: list[dict[int, int]], counts: list[int], top_k: int) -> set[int]:
    """Nodes reachable from the root through each node's top_k most frequent children
    (ties: the child created first, i.e. from the most recent occurrence)."""
    keep, stack = {0}, [0]
    while stack:
        node = stack.pop()
        best = sorted(children[node].values(), key=lambda c: (-counts[c], c))[:top_k]
        keep.update(best)
        stack.extend(best)
    return keep
