"""Chain-draft verification in the sample stage: each emitted token follows the target distribution."""
from __future__ import annotations

import msgspec
import pytest
import torch

from pipeline.config import ServerArgs
from pipeline.harness import StageDriver, wiring
from pipeline.messages import Logits, SampleInbox, SamplingBatch
from stages.sample import SampleStage
from stages.speculative import chain_verify

V = 12


def _driver() -> StageDriver:
    args = msgspec.structs.replace(ServerArgs(), kernel_backend="reference", device="cpu")
    return StageDriver(SampleStage(args, *wiring(SampleInbox, "schedule", "constrain")))


def _params(n: int, drafts: list[list[int]], temperature: float) -> SamplingBatch:
    return SamplingBatch(temperatures=[temperature] * n, top_ps=[1.0] * n, top_ks=[-1] * n, min_ps=[0.0] * n,
                         repetition_penalties=[1.0] * n, frequency_penalties=[0.0] * n,
                         presence_penalties=[0.0] * n, seeds=list(range(n)), steps=[3] * n, need_sample=[True] * n,
                         first_step=[False] * n, return_logprob=[False] * n, top_logprobs_nums=[0] * n,
                         constrained=[False] * n, draft_ids=drafts)


def _chi2(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    keep = expected > 5
    return float((((counts - expected) ** 2)[keep] / expected[keep]).sum())


def test_emitted_tokens_follow_the_target_distribution() -> None:
    """n rows share the same logits at each of 3 positions and draft [a, b]: the first emitted
    token ~ p0, draft a is accepted with probability p0(a), and after it the next token ~ p1.
    Chi-square over the bins with >5 expected counts; 11 degrees of freedom at most, critical
    value 31.3 at p = 0.001."""
    n = 3000
    gen = torch.Generator().manual_seed(0)
    position_logits = torch.randn(3, V, generator=gen) * 1.5
    a, b = int(position_logits[0].argmax()), int(position_logits[1].argmax())
    logits = position_logits[2].expand(n, V).contiguous()  # each row's last position
    draft_logits = position_logits[:2].repeat(n, 1)  # per row: positions 0 and 1
    driver = _driver()
    driver.feed(Logits(batch_id=0, rids=[f"r{i}" for i in range(n)], logits=logits,
                       sampling=_params(n, [[a, b]] * n, 1.0), draft_logits=draft_logits))
    out = driver.step()["schedule"][0]
    runs = out.spec_token_ids
    assert all(1 <= len(run) <= 3 and run[0] == out.token_ids[i] for i, run in enumerate(runs))
    probs = torch.softmax(position_logits, dim=-1)
    first = torch.bincount(torch.tensor([run[0] for run in runs]), minlength=V).float()
    assert _chi2(first, probs[0]) < 31.3
    after_a = [run[1] for run in runs if run[0] == a]
    assert abs(len(after_a) / n - float(probs[0, a])) < 4 * (float(probs[0, a]) / n) ** 0.5 + 1e-3
    second = torch.bincount(torch.tensor(after_a), minlength=V).float()
    assert _chi2(second, probs[1]) < 31.3


def test_greedy_accepts_the_matching_prefix_and_plain_rows_pass() -> None:
    gen = torch.Generator().manual_seed(1)
    draft_logits = torch.randn(3, V, generator=gen)  # row 0: two drafts; row 2: one draft
    logits = torch.randn(3, V, generator=gen)
    best = draft_logits.argmax(dim=-1).tolist()
    wrong = (best[1] + 1) % V
    drafts = [[best[0], wrong], [], [best[2]]]
    driver = _driver()
    driver.feed(Logits(batch_id=0, rids=["x", "y", "z"], logits=logits, sampling=_params(3, drafts, 0.0),
                       draft_logits=draft_logits))
    out = driver.step()["schedule"][0]
    last = logits.argmax(dim=-1).tolist()
    assert out.spec_token_ids == [[best[0], best[1]], [], [best[2], last[2]]]
    assert out.token_ids == [best[0], last[1], best[2]]


def test_expansion_keeps_steps_and_moves_mask_rows() -> None:
    params = _params(2, [[5, 6], []], 0.7)
    rids, logits, expanded, _, expansion = chain_verify.expand(
        ["p", "q"], torch.zeros(2, V), torch.ones(2, V), params, None)
    assert rids == ["p", "p", "p", "q"]
    assert expanded.steps == [3, 4, 5, 3]  # the RNG step of the output index each position produces
    assert logits[:, 0].tolist() == [1.0, 1.0, 0.0, 0.0]
    assert expansion.last(0) == 2 and expansion.last(1) == 3
    assert chain_verify.accept([5, 9, 1, 4], expansion) == [[5, 9], [4]]


def _tree_params(n: int, drafts: list[list[int]], parents: list[list[int]], temperature: float) -> SamplingBatch:
    return msgspec.structs.replace(_params(n, drafts, temperature), draft_parents=parents)


def test_tree_emitted_tokens_follow_the_target_distribution() -> None:
    """A tree per row: root -> {a -> c, b}, each node with logits of its own. The first token
    ~ p_root (a and b taken with p_root(a), p_root(b)); after a the next token ~ p_a (c
    accepted with p_a(c), then ~ p_c); after b ~ p_b. Chi-square as above (critical value
    31.3 at p = 0.001), and the reported accepted nodes match the emitted tokens."""
    n = 4000
    gen = torch.Generator().manual_seed(3)
    node_logits = torch.randn(4, V, generator=gen) * 1.2  # nodes: 0 root, 1 a, 2 b, 3 c
    order = node_logits[0].argsort(descending=True).tolist()
    a, b = order[0], order[1]
    c = int(node_logits[1].argmax())
    drafts, parents = [a, b, c], [-1, 0, 0, 1]
    logits = node_logits[3].expand(n, V).contiguous()      # each row's last node (c)
    draft_logits = node_logits[:3].repeat(n, 1)             # nodes 0, 1, 2 of each row
    driver = _driver()
    driver.feed(Logits(batch_id=0, rids=[f"r{i}" for i in range(n)], logits=logits,
                       sampling=_tree_params(n, [drafts] * n, [parents] * n, 1.0), draft_logits=draft_logits))
    out = driver.step()["schedule"][0]
    runs, paths = out.spec_token_ids, out.spec_accepted_nodes
    for run, path in zip(runs, paths):
        assert run[:-1] == [drafts[node - 1] for node in path] and path in ([], [1], [2], [1, 3])
    probs = torch.softmax(node_logits, dim=-1)
    first = torch.bincount(torch.tensor([run[0] for run in runs]), minlength=V).float()
    assert _chi2(first, probs[0]) < 31.3
    for token, node in ((a, 1), (b, 2)):
        after = [run[1] for run in runs if run[0] == token]
        share = float(probs[0, token])
        assert abs(len(after) / n - share) < 4 * (share / n) ** 0.5 + 1e-3
        assert _chi2(torch.bincount(torch.tensor(after), minlength=V).float(), probs[node]) < 31.3
    after_c = [run[2] for run in runs if run[:2] == [a, c]]
    assert _chi2(torch.bincount(torch.tensor(after_c), minlength=V).float(), probs[3]) < 31.3


def test_tree_greedy_takes_the_argmax_path() -> None:
    """Greedy walks the target's argmax through the tree: row 0's argmax path leaves the first
    branch for the second child; row 1 is a chain beside it; the RNG steps go by depth."""
    gen = torch.Generator().manual_seed(4)
    node_logits = torch.randn(5, V, generator=gen)
    best = node_logits.argmax(dim=-1).tolist()
    # row 0 nodes: 0 root, 1 (wrong token, child of 0), 2 (best[0], child of 0), 3 (best[2], child of 2),
    # 4 (wrong, child of 1); node 3 is a leaf, so the bonus token is node 3's argmax
    drafts0 = [(best[0] + 1) % V, best[0], best[2], best[0]]
    parents0 = [-1, 0, 0, 2, 1]
    logits = torch.stack([node_logits[4], node_logits[0]])
    draft_logits = torch.cat([node_logits[:4], node_logits[:0]])
    params = _tree_params(2, [drafts0, []], [parents0, []], 0.0)
    driver = _driver()
    driver.feed(Logits(batch_id=0, rids=["x", "y"], logits=logits, sampling=params, draft_logits=draft_logits))
    out = driver.step()["schedule"][0]
    assert out.spec_token_ids[0] == [best[0], best[2], int(node_logits[3].argmax())]
    assert out.spec_accepted_nodes[0] == [2, 3]
    _, _, expanded, _, _ = chain_verify.expand(["x", "y"], logits, draft_logits, params, None)
    assert expanded.steps == [3, 4, 4, 5, 5, 3]


def test_tree_parents_must_fit_the_drafts() -> None:
    params = _tree_params(1, [[1, 2]], [[-1, 0]], 0.0)
    with pytest.raises(ValueError, match="tree parents"):
        chain_verify.expand(["x"], torch.zeros(1, V), torch.zeros(2, V), params, None)
