"""Verifying chain drafts in the sample stage: one sampled row per position, then the longest match.

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

Rows without drafts (grammar-constrained rows, penalties, logprobs: the
schedule stage does not let them draft) pass through as one row each.
"""
from __future__ import annotations

import dataclasses

import msgspec
import torch

from pipeline.messages import SamplingBatch, TokenMask

# Per-row fields of SamplingBatch that the expansion repeats for each position of a row.
_REPEATED = ("temperatures", "top_ps", "top_ks", "min_ps", "repetition_penalties", "frequency_penalties",
             "presence_penalties", "seeds", "need_sample", "return_logprob", "top_logprobs_nums",
             "constrained")


@dataclasses.dataclass(frozen=True)
class Expansion:
    """Where each original row's positions sit in the expanded batch."""

    starts: list[int]  # first expanded row of each original row
    drafts: list[list[int]]  # each original row's drafts ([] for a plain row)

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
    expansion = Expansion(starts, drafts)
    every = torch.cat([logits, draft_logits]) if draft_logits is not None else logits
    index = torch.tensor(order, dtype=torch.int64, device=logits.device)
    return rows_rids, every.index_select(0, index), _expanded_params(params, expansion), \
        _expanded_mask(mask, expansion), expansion


def _expanded_params(params: SamplingBatch, expansion: Expansion) -> SamplingBatch:
    counts = [len(ids) + 1 for ids in expansion.drafts]

    def repeat(values: list) -> list:
        return [v for v, n in zip(values, counts) for _ in range(n)]

    changes = {name: repeat(getattr(params, name)) for name in _REPEATED}
    changes["steps"] = [step + j for step, n in zip(params.steps, counts) for j in range(n)]
    changes["first_step"] = [first and j == 0 for first, n in zip(params.first_step, counts) for j in range(n)]
    changes["banned_token_ids"] = repeat(params.banned_token_ids) if params.banned_token_ids else []
    changes["logit_biases"] = repeat(params.logit_biases) if params.logit_biases else []
    return msgspec.structs.replace(params, **changes, prompt_logprob_ids=[], prompt_top_logprobs_nums=[],
                                   token_ids_logprobs=[], draft_ids=[])


def _expanded_mask(mask: TokenMask | None, expansion: Expansion) -> TokenMask | None:
    """A grammar mask's rows moved to their expanded places (constrained rows never draft)."""
    if mask is None or not mask.row_indices:
        return mask
    return msgspec.structs.replace(mask, row_indices=[expansion.last(r) for r in mask.row_indices])


def accept(token_ids: list[int], expansion: Expansion) -> list[list[int]]:
    """Per original row, the tokens it emits: accepted drafts, then the first sampled token
    that differs from its draft (or the token after the last draft)."""
    emitted = []
    for start, ids in zip(expansion.starts, expansion.drafts):
        sampled = token_ids[start:start + len(ids) + 1]
        num_accepted = 0
        while num_accepted < len(ids) and sampled[num_accepted] == ids[num_accepted]:
            num_accepted += 1
        emitted.append(sampled[:num_accepted + 1])
    return emitted


def compact(values: list, expansion: Expansion) -> list:
    """A per-expanded-row list back to one entry per original row (its last position)."""
    return [values[expansion.last(b)] for b in range(len(expansion.drafts))] if values else values
