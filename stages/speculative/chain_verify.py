"""Verifying drafts in the sample stage: one sampled row per node, then the longest matching path.

A row that drafted ``d`` tokens after its last token ``t`` has ``d + 1``
logits rows: position ``j`` (after ``t`` and drafts ``0..j-1``) predicts
draft ``j``, the last one the token after every draft. ``expand`` turns such
a batch into one with a plain row per position, each with the request's own
sampling parameters and the RNG step of the output token it would produce
(``steps + j``), so the ordinary sampler (temperature, top-k, top-p, min-p,
the seeded Gumbel-max draw) samples every position. ``accept`` then keeps
draft ``j`` while the token sampled at position ``j`` equals it, and emits the
accepted drafts plus the first token that differs (or the one after the
last draft).

Why this is exact. A chain's drafts are single proposals (a point mass
``q``), and for a point mass speculative rejection sampling -- accept ``x``
with probability ``min(1, p(x) / q(x)) = p(x)``, else draw from the residual
``norm(max(p - q, 0))``, which is ``p`` without ``x`` -- is the same as
drawing ``y ~ p`` and accepting when ``y == x`` (then ``y`` is the next
token either way). Every emitted token is therefore a draw from the target
distribution at its position. More than that: the draw at output index
``k`` uses the seed and step the non-speculative sampler uses for index
``k``, on the same logits, so a seeded request (and every greedy one) emits
exactly the tokens it would emit without speculation, up to the float
differences between a multi-token and a one-token forward.

Trees (``SamplingBatch.draft_parents``, EAGLE with ``--speculative-eagle-topk``
> 1). Node ``i`` of a row's tree has its own logits row (after the path root
.. i) and is sampled with the RNG step of its depth (``steps + depth(i)``).
``accept`` walks down from the root: at the current node it takes the token
sampled there, ``y``; if a child drafted ``y`` the walk moves to it, else
``y`` is the last token emitted. This is tree rejection sampling with
deterministic (one-hot) drafts, siblings tried in turn
(``stages/speculative/verify.py``): child ``x_1`` is accepted with probability
``p(x_1)``, else ``x_2`` from the residual ``p`` without ``x_1``, with
probability ``p(x_2) / (1 - p(x_1))``, and so on, so the walk enters the child
drafted ``x`` with probability ``p(x)`` and stops with ``y`` drawn from ``p``
restricted to the undrafted tokens -- the same law as one draw ``y ~ p`` and
a lookup among the children. Every emitted token is a draw from the target at
its position, and greedy rows emit the argmax path: the longest root-to-node
path whose tokens equal the target's argmax. A chain is the tree whose node
``i`` is the child of ``i - 1``.

Rows without drafts (grammar-constrained rows, penalties, logprobs: the
schedule stage does not let them draft) pass through as one row each.
"""
from __future__ import annotations

import dataclasses

import msgspec
import torch

from pipeline.messages import SamplingBatch, TokenMask
from stages.speculative.tree import chain_parents, check_parents

# Per-row fields of SamplingBatch that the expansion repeats for each position of a row.
_REPEATED = ("temperatures", "top_ps", "top_ks", "min_ps", "repetition_penalties", "frequency_penalties",
             "presence_penalties", "seeds", "need_sample", "return_logprob", "top_logprobs_nums",
             "constrained")


@dataclasses.dataclass(frozen=True)
class Expansion:
    """Where each original row's positions sit in the expanded batch."""

    starts: list[int]  # first expanded row of each original row
    drafts: list[list[int]]  # each original row's drafts ([] for a plain row)
    parents: list[list[int]]  # each row's node parents (root -1 first; a chain when not a tree)

    def last(self, row: int) -> int:
        """The expanded row of ``row``'s last position (the only one of a plain row)."""
        return self.starts[row] + len(self.drafts[row])


def expand(rids: list[str], logits: torch.Tensor, draft_logits: torch.Tensor, params: SamplingBatch,
           mask: TokenMask | None) -> tuple[list[str], torch.Tensor, SamplingBatch, TokenMask | None, Expansion]:
    """One logits row per verified position: (rids, logits, params, mask, expansion)."""
    drafts = params.draft_ids
    starts, order, rows_rids = [], [], []
    draft_at = 0
    num_rows = logits.shape[0]
    for b, ids in enumerate(drafts):
        starts.append(len(order))
        order.extend(num_rows + draft_at + j for j in range(len(ids)))  # rows of draft_logits
        order.append(b)
        draft_at += len(ids)
        rows_rids.extend([rids[b]] * (len(ids) + 1))
    expansion = Expansion(starts, drafts, [_parents(params, b, len(ids)) for b, ids in enumerate(drafts)])
    every = torch.cat([logits, draft_logits]) if draft_logits is not None else logits
    index = torch.tensor(order, dtype=torch.int64, device=logits.device)
    return rows_rids, every.index_select(0, index), _expanded_params(params, expansion), \
        _expanded_mask(mask, expansion), expansion


def _parents(params: SamplingBatch, row: int, num_drafts: int) -> list[int]:
    """Row ``row``'s node parents: its tree's, or a chain's."""
    parents = params.draft_parents[row] if params.draft_parents else []
    if not parents:
        return chain_parents(num_drafts + 1)
    if len(parents) != num_drafts + 1:
        raise ValueError(f"row {row}: {len(parents)} tree parents for {num_drafts} drafts (want drafts + 1)")
    check_parents(parents)
    return list(parents)


def _depths(parents: list[int]) -> list[int]:
    depth = [0] * len(parents)
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
    return depth


def _expanded_params(params: SamplingBatch, expansion: Expansion) -> SamplingBatch:
    counts = [len(ids) + 1 for ids in expansion.drafts]

    def repeat(values: list) -> list:
        return [v for v, n in zip(values, counts) for _ in range(n)]

    changes = {name: repeat(getattr(params, name)) for name in _REPEATED}
    depths = [_depths(parents) for parents in expansion.parents]
    changes["steps"] = [step + d for step, row in zip(params.steps, depths) for d in row]
    changes["first_step"] = [first and d == 0 for first, row in zip(params.first_step, depths) for d in row]
    changes["banned_token_ids"] = repeat(params.banned_token_ids) if params.banned_token_ids else []
    changes["logit_biases"] = repeat(params.logit_biases) if params.logit_biases else []
    return msgspec.structs.replace(params, **changes, prompt_logprob_ids=[], prompt_top_logprobs_nums=[],
                                   token_ids_logprobs=[], draft_ids=[], draft_parents=[])


def _expanded_mask(mask: TokenMask | None, expansion: Expansion) -> TokenMask | None:
    """A grammar mask's rows moved to their expanded places (constrained rows never draft)."""
    if mask is None or not mask.row_indices:
        return mask
    return msgspec.structs.replace(mask, row_indices=[expansion.last(r) for r in mask.row_indices])


def accept(token_ids: list[int], expansion: Expansion) -> list[list[int]]:
    """Per original row, the tokens it emits: accepted drafts, then the first sampled token
    that no child of the last accepted node drafted (or the one after a leaf)."""
    return accept_paths(token_ids, expansion)[0]


def accept_paths(token_ids: list[int], expansion: Expansion) -> tuple[list[list[int]], list[list[int]]]:
    """(tokens each original row emits, the node ids of its accepted drafts, root excluded)."""
    emitted, paths = [], []
    for start, ids, parents in zip(expansion.starts, expansion.drafts, expansion.parents):
        sampled = token_ids[start:start + len(ids) + 1]
        children: list[list[int]] = [[] for _ in parents]
        for node, parent in enumerate(parents[1:], start=1):
            children[parent].append(node)
        node, path = 0, []
        while True:
            nxt = next((c for c in children[node] if ids[c - 1] == sampled[node]), None)
            if nxt is None:
                break
            path.append(nxt)
            node = nxt
        emitted.append([ids[c - 1] for c in path] + [sampled[node]])
        paths.append(path)
    return emitted, paths


def compact(values: list, expansion: Expansion) -> list:
    """A per-expanded-row list back to one entry per original row (its last position)."""
    return [values[expansion.last(b)] for b in range(len(expansion.drafts))] if values else values
