"""Greedy acceptance and tree rejection sampling.

The statistical tests draw a two-level draft tree over a 5-token vocabulary
(random target and draft tables, one distribution per previous token), run
one verification and, when it emitted a single token, draw the second from
the target directly (as decoding without speculation would). The joint law
of the first two tokens must be the target's ``p0(a) * p1[a](b)``: a
chi-square test over the 25 cells at significance ~3e-5 (seeded, so the
outcome is fixed; a wrong residual or acceptance rule is off by far more).
"""
from __future__ import annotations

import math

import pytest
import torch

from stages.speculative.tree import chain_parents
from stages.speculative.verify import split_slots, target_probs, verify_greedy, verify_tree_sampling

V = 5
NUM_SAMPLES = 12_000


def test_greedy_accepts_the_longest_matching_path():
    # root -> {1: tok 4, 2: tok 2}; 1 -> {3: tok 0}; 2 -> {4: tok 1}
    tokens, parents = [9, 4, 2, 0, 1], [-1, 0, 0, 1, 2]
    logits = torch.full((5, V), -1.0)
    for node, best in enumerate([2, 3, 1, 0, 4]):
        logits[node, best] = 1.0
    verdict = verify_greedy(tokens, parents, logits)
    assert verdict.accepted_nodes == [2, 4] and verdict.tokens == [2, 1, 4]


def test_greedy_rejects_the_first_draft():
    logits = torch.zeros(3, V)
    logits[0, 3] = 1.0
    verdict = verify_greedy([1, 2, 3], chain_parents(3), logits)
    assert verdict.accept_len == 0 and verdict.tokens == [3]


def test_target_probs_filters():
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.15, 0.1, 0.05]]))
    assert torch.allclose(target_probs(logits, 1.0, top_k=2), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]]))
    # top_p=0.7: 0.4 + 0.3 reaches it, the rest is dropped
    assert torch.allclose(target_probs(logits, 1.0, top_p=0.7), torch.tensor([[4 / 7, 3 / 7, 0, 0, 0]]))
    kept = target_probs(logits, 1.0, min_p=0.3)     # >= 0.12
    assert (kept[0] > 0).tolist() == [True, True, True, False, False]
    with pytest.raises(ValueError, match="temperature"):
        target_probs(logits, 0.0)


def _tables(seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    p0 = target_probs(torch.randn(1, V, generator=gen) * 1.5, 0.8, top_k=4)[0]
    p1 = target_probs(torch.randn(V, V, generator=gen) * 1.5, 1.0, top_p=0.9)
    q0 = torch.softmax(torch.randn(V, generator=gen) * 1.5, -1)
    q1 = torch.softmax(torch.randn(V, V, generator=gen) * 1.5, -1)
    return p0, p1, q0, q1


def _draw_children(q: torch.Tensor, k: int, mode: str, gen: torch.Generator) -> list[int]:
    if mode == "deterministic":
        return q.topk(k).indices.tolist()
    return torch.multinomial(q, k, replacement=(mode == "iid"), generator=gen).tolist()


def _one_step(p0, p1, q0, q1, mode: str, gen: torch.Generator) -> tuple[int, int]:
    """Draft 2 children of the root, 2 of the first child; verify; the first 2 tokens."""
    tokens, parents = [0], [-1]
    for x in _draw_children(q0, 2, mode, gen):
        tokens.append(x)
        parents.append(0)
    for y in _draw_children(q1[tokens[1]], 2, mode, gen):
        tokens.append(y)
        parents.append(1)
    target = torch.stack([p0] + [p1[t] for t in tokens[1:]])           # p after each path
    draft = None if mode == "deterministic" else torch.stack([q0, q1[tokens[1]]] + [q0] * 3)
    verdict = verify_tree_sampling(tokens, parents, target, draft, gen,
                                   without_replacement=(mode == "no_replacement"))
    out = verdict.tokens
    if len(out) == 1:
        out = out + [int(torch.multinomial(p1[out[0]], 1, generator=gen))]
    return out[0], out[1]


def _chi2_critical(df: int, z: float = 4.0) -> float:
    """Wilson-Hilferty: the chi-square quantile at the normal quantile z (z=4: p ~ 3e-5)."""
    c = 2.0 / (9.0 * df)
    return df * (1.0 - c + z * math.sqrt(c)) ** 3


@pytest.mark.parametrize("mode", ["iid", "no_replacement", "deterministic"])
def test_tree_sampling_preserves_the_target_distribution(mode):
    p0, p1, q0, q1 = _tables(seed=3)
    gen = torch.Generator().manual_seed(11)
    counts = torch.zeros(V, V)
    for _ in range(NUM_SAMPLES):
        a, b = _one_step(p0, p1, q0, q1, mode, gen)
        counts[a, b] += 1
    expected = (p0[:, None] * p1).double() * NUM_SAMPLES
    cells = expected > 0
    assert counts[~cells].sum() == 0, "a token outside top-k/top-p was emitted"
    chi2 = float(((counts.double()[cells] - expected[cells]) ** 2 / expected[cells]).sum())
    df = int(cells.sum()) - 1
    assert chi2 < _chi2_critical(df), f"chi2 {chi2:.1f} over {df} dof ({mode})"


def test_a_wrong_rule_is_detected():
    """The test has power: accepting every draft (no rejection) fails it by far."""
    p0, p1, q0, q1 = _tables(seed=3)
    gen = torch.Generator().manual_seed(5)
    counts = torch.zeros(V, V)
    n = 3000
    for _ in range(n):
        a = int(torch.multinomial(q0, 1, generator=gen))
        b = int(torch.multinomial(q1[a], 1, generator=gen))
        counts[a, b] += 1
    expected = (p0[:, None] * p1).double() * n
    cells = expected > 0
    chi2 = float(((counts.double()[cells] - expected[cells]) ** 2 / expected[cells]).sum())
    assert chi2 > 10 * _chi2_critical(int(cells.sum()) - 1)


def test_identical_draft_and_target_accepts_everything():
    p = torch.softmax(torch.randn(4, V), -1)
    gen = torch.Generator().manual_seed(0)
    tokens = [0] + [int(torch.multinomial(p[i], 1, generator=gen)) for i in range(3)]
    verdict = verify_tree_sampling(tokens, chain_parents(4), p, p, gen)
    assert verdict.accepted_nodes == [1, 2, 3] and verdict.tokens[:3] == tokens[1:]


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="target must be"):
        verify_tree_sampling([0, 1], [-1, 0], torch.ones(3, V) / V, None, torch.Generator())


def test_split_slots_keeps_the_accepted_path():
    tokens, parents = [9, 4, 2, 0, 1], [-1, 0, 0, 1, 2]
    logits = torch.full((5, V), -1.0)
    for node, best in enumerate([2, 3, 1, 0, 4]):
        logits[node, best] = 1.0
    verdict = verify_greedy(tokens, parents, logits)           # accepts nodes 2, 4
    kept, freed = split_slots([40, 41, 42, 43, 44], verdict)
    assert kept == [40, 42, 44] and freed == [41, 43]
