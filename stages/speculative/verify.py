"""Verification of a draft tree against the target's distributions at its nodes.

The verify forward gives, for every node ``i`` of a request's draft tree
(``stages/speculative/tree.py``; node 0 the root), the target's next-token
logits *after the path root .. i*. Both rules below walk down from the root;
they return the accepted drafts (node ids and tokens) plus one more token
chosen by the target (the "bonus" token), so a step emits 1 .. depth+1 tokens.

Greedy (``verify_greedy``): at the current node take ``argmax`` of the target;
if a child drafted that very token, accept the child and continue from it,
else stop and emit the argmax. The emitted tokens equal what greedy decoding
without speculation would produce.

Sampling (``verify_tree_sampling``, SpecInfer / EAGLE tree rejection
sampling): ``p`` is the target distribution at the current node, after
temperature, top-k, top-p and min-p (``target_probs``). The children of the
node are tried in order. Child ``x`` drafted from proposal ``q``:

* accept with probability ``min(1, p[x] / q[x])``; then move to the child,
  whose own (fresh) target distribution becomes ``p``;
* on reject, ``p <- normalise(max(p - q, 0))`` (the residual) and try the next
  sibling, whose proposal is ``q`` again (children drawn i.i.d.) or ``q``
  with the rejected token removed (drawn without replacement).

When no child is left (or the node is a leaf) the bonus token is drawn from
the current ``p``. Each accept/reject is the single-step speculative sampling
identity ``P(emit y) = min(p(y), q(y)) + P(reject) * residual(y) = p(y)``,
which holds for any proposal, so the emitted sequence has exactly the
target's distribution. Deterministic drafts (top-k choice, n-gram) have a
one-hot proposal: accept with probability ``p[x]``, residual = ``p`` with
``x`` removed (``draft_probs=None``).
"""
from __future__ import annotations

import dataclasses

import torch

from stages.speculative.tree import check_parents


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What one request's verification emits."""

    accepted_nodes: list[int]         # draft node ids on the accepted path (root excluded)
    tokens: list[int]                 # accepted draft tokens, then the bonus token

    @property
    def accept_len(self) -> int:
        """Accepted drafts (SGLang's accept length counts the bonus token too: +1)."""
        return len(self.accepted_nodes)


def _children(parents: list[int]) -> list[list[int]]:
    children: list[list[int]] = [[] for _ in parents]
    for i, p in enumerate(parents[1:], start=1):
        children[p].append(i)
    return children


def verify_greedy(tokens: list[int], parents: list[int], target_logits: torch.Tensor) -> Verdict:
    """Longest root-to-node path whose drafts equal the target's argmax, then the argmax."""
    check_parents(parents)
    _check_rows(target_logits, len(tokens), "target_logits")
    argmax = target_logits.argmax(dim=-1).tolist()
    children = _children(parents)
    node, accepted = 0, []
    while True:
        nxt = next((c for c in children[node] if tokens[c] == argmax[node]), None)
        if nxt is None:
            return Verdict(accepted, [tokens[i] for i in accepted] + [argmax[node]])
        accepted.append(nxt)
        node = nxt


def target_probs(logits: torch.Tensor, temperature: float, top_k: int = -1, top_p: float = 1.0,
                 min_p: float = 0.0) -> torch.Tensor:
    """Rows of ``logits[N, V]`` -> the distributions sampling draws from (fp32).

    Same order as the sample stage: temperature, then top-k (the k largest),
    top-p (the smallest set of largest probabilities reaching top_p), min-p
    (probabilities below ``min_p * max``), renormalised.
    """
    if temperature <= 0:
        raise ValueError("temperature must be > 0 for sampling (use verify_greedy)")
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if 0 < top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[:, -1:]
        probs = torch.where(probs >= kth, probs, 0.0)
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p       # mass of strictly larger tokens
        drop = torch.zeros_like(probs).scatter(-1, order, (before >= top_p * probs.sum(-1, keepdim=True))
                                               .float())
        probs = torch.where(drop > 0, 0.0, probs)
    if min_p > 0:
        probs = torch.where(probs >= min_p * probs.amax(dim=-1, keepdim=True), probs, 0.0)
    return probs / probs.sum(dim=-1, keepdim=True)


def verify_tree_sampling(tokens: list[int], parents: list[int], target: torch.Tensor,
                         draft_probs: torch.Tensor | None, generator: torch.Generator,
                         without_replacement: bool = False) -> Verdict:
    """Tree rejection sampling (module docstring).

    target: [N, V] target distributions at each node (``target_probs``).
    draft_probs: [N, V], the proposal each node's children were drawn from,
    or None for deterministic drafts (one-hot proposals).
    """
    check_parents(parents)
    _check_rows(target, len(tokens), "target")
    if draft_probs is not None:
        _check_rows(draft_probs, len(tokens), "draft_probs")
    children = _children(parents)
    node, accepted = 0, []
    while True:
        p = target[node].double()
        q = None if draft_probs is None else draft_probs[node].double()
        moved = False
        for child in children[node]:
            x = tokens[child]
            q_x = 1.0 if q is None else float(q[x])
            u = float(torch.rand((), generator=generator, dtype=torch.float64))
            if q_x > 0 and u * q_x < float(p[x]):              # u < p[x] / q[x]
                accepted.append(child)
                node, moved = child, True
                break
            p, q = _residual(p, q, x, without_replacement)
        if not moved:
            bonus = int(torch.multinomial(p.float(), 1, generator=generator))
            return Verdict(accepted, [tokens[i] for i in accepted] + [bonus])


def _residual(p: torch.Tensor, q: torch.Tensor | None, x: int, without_replacement: bool
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """After rejecting ``x``: normalise(max(p - q, 0)) and the next sibling's proposal."""
    if q is None:                          # one-hot proposal at x
        residual = p.clone()
        residual[x] = 0.0
    else:
        residual = (p - q).clamp_min(0.0)
        if without_replacement:
            q = q.clone()
            q[x] = 0.0
            q = q / q.sum() if q.sum() > 0 else q
    total = residual.sum()
    if total <= 0:                         # p == q exactly: any child would have been kept
        return p, q
    return residual / total, q


def split_slots(slots: list[int], verdict: Verdict) -> tuple[list[int], list[int]]:
    """The KV slots of one request's tree nodes -> (kept, freed).

    Kept, in sequence order: the root and the accepted drafts (their K/V were
    written at positions ``prefix_len + depth``, which along one path are
    consecutive, so they are exactly the sequence's next entries). Freed: every
    other node's slot. The bonus token has no K/V yet (the next step computes
    it, as the next tree's root).
    """
    kept_nodes = [0] + verdict.accepted_nodes
    kept = [slots[i] for i in kept_nodes]
    chosen = set(kept_nodes)
    return kept, [slot for i, slot in enumerate(slots) if i not in chosen]


def _check_rows(t: torch.Tensor, num_nodes: int, name: str) -> None:
    if t.dim() != 2 or t.shape[0] != num_nodes:
        raise ValueError(f"{name} must be [num_nodes={num_nodes}, V], got {tuple(t.shape)}")
