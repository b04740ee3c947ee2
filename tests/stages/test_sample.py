"""SampleStage alone: greedy, seeded draws, penalties from per-request counts, masks, logprobs."""
from __future__ import annotations

import msgspec
import pytest
import torch

from pipeline.config import ServerArgs
from pipeline.harness import StageDriver, wiring
from pipeline.messages import Logits, SampleInbox, SamplingBatch, TokenMask
from stages.sample import SampleStage

V = 64


def _driver(backend: str, device: torch.device) -> StageDriver:
    args = msgspec.structs.replace(ServerArgs(), kernel_backend=backend, device=device.type)
    return StageDriver(SampleStage(args, *wiring(SampleInbox, "schedule", "constrain")))


def _params(n: int, **overrides) -> SamplingBatch:
    values = dict(temperatures=[0.0] * n, top_ps=[1.0] * n, top_ks=[-1] * n, min_ps=[0.0] * n,
                  repetition_penalties=[1.0] * n, frequency_penalties=[0.0] * n, presence_penalties=[0.0] * n,
                  seeds=list(range(n)), steps=[0] * n, need_sample=[True] * n, first_step=[True] * n,
                  return_logprob=[False] * n, top_logprobs_nums=[0] * n, constrained=[False] * n)
    values.update(overrides)
    return SamplingBatch(**values)


def _sample(driver: StageDriver, logits: torch.Tensor, params: SamplingBatch, batch_id: int = 0, rids=None):
    rids = rids or [f"r{i}" for i in range(logits.shape[0])]
    driver.feed(Logits(batch_id=batch_id, rids=rids, logits=logits, sampling=params))
    return driver.step()["schedule"]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_greedy_seeded_and_skipped_rows(backend, device) -> None:
    driver = _driver(backend, device)
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0)).to(device)
    out = _sample(driver, logits, _params(4, need_sample=[True, True, False, True]))[0]
    expected = logits.argmax(-1).tolist()
    assert out.token_ids == [expected[0], expected[1], -1, expected[3]]
    hot = _params(4, temperatures=[1.0] * 4, seeds=[5, 5, 6, 7], steps=[3, 3, 3, 3], top_ks=[10] * 4)
    first = _sample(driver, logits.clone(), hot, 1)[0].token_ids
    alone = _sample(driver, logits[:1].clone(), _params(1, temperatures=[1.0], seeds=[5], steps=[3],
                                                        top_ks=[10]), 2)[0].token_ids
    assert alone[0] == first[0]
    top10 = set(torch.topk(logits[0].cpu(), 10).indices.tolist())
    assert first[0] in top10
    draws = {_sample(driver, logits[:1].clone(), _params(1, temperatures=[1.0], seeds=[s]), 3 + s)[0].token_ids[0]
             for s in range(12)}
    assert len(draws) > 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_penalties_count_generated_tokens_per_request(backend, device) -> None:
    driver = _driver(backend, device)
    logits = torch.zeros(1, V)
    logits[0, 9] = 3.0
    logits[0, 4] = 2.0
    logits = logits.to(device)
    params = dict(frequency_penalties=[2.0])
    assert _sample(driver, logits.clone(), _params(1, **params), 0)[0].token_ids == [9]
    assert _sample(driver, logits.clone(), _params(1, first_step=[False], **params), 1)[0].token_ids == [4]
    # a new request with the same rid starts from zero counts
    assert _sample(driver, logits.clone(), _params(1, first_step=[True], **params), 2)[0].token_ids == [9]


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_constrained_rows_wait_for_their_mask_and_logprobs(backend, device) -> None:
    driver = _driver(backend, device)
    logits = torch.randn(2, V, generator=torch.Generator().manual_seed(1)).to(device)
    params = _params(2, constrained=[False, True], return_logprob=[True, True], top_logprobs_nums=[2, 2])
    assert _sample(driver, logits, params, 7) == []  # waits for the TokenMask of batch 7
    bitmask = torch.zeros(1, V // 32, dtype=torch.int32)
    bitmask[0, 1] = 1 << 3  # only token 35 allowed
    driver.feed(TokenMask(batch_id=7, row_indices=[1], bitmask=bitmask))
    out = driver.step()
    sampled = out["schedule"][0]
    assert sampled.token_ids == [int(logits[0].argmax()), 35]
    assert out["constrain"] == [sampled]
    expected_lp = torch.log_softmax(logits[0].double().cpu(), -1)
    assert abs(sampled.token_logprobs[0] - float(expected_lp.max())) < 1e-5
    assert sampled.top_token_ids[0][0] == sampled.token_ids[0] and len(sampled.top_logprobs[0]) == 2
    assert abs(sampled.token_logprobs[1]) < 1e-5  # the only allowed token has probability 1


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_banned_tokens_are_never_picked(backend, device) -> None:
    driver = _driver(backend, device)
    logits = torch.randn(3, V, generator=torch.Generator().manual_seed(3)).to(device)
    favourite = logits.argmax(dim=-1).tolist()
    # Row 0 bans its argmax and a token in the last (partial) word; row 1 bans nothing; row 2 bans
    # token 31 (the sign bit of word 0) and its argmax.
    banned = [[favourite[0], V - 1], [], [31, favourite[2]]]
    out = _sample(driver, logits, _params(3, banned_token_ids=banned))[0]
    assert out.token_ids[0] not in banned[0]
    assert out.token_ids[1] == favourite[1]
    assert out.token_ids[2] not in banned[2]
    expected = logits.clone()
    expected[0, banned[0]] = float("-inf")
    expected[2, banned[2]] = float("-inf")
    assert out.token_ids == expected.argmax(dim=-1).tolist()
