"""ConstrainStage through the harness: GrammarCompile/Ready, one TokenMask per batch, advancing.

The sample stage is played by the test: it applies each TokenMask to random
logits with the PyTorch reference, samples, and sends SampledTokens back.
"""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest
import torch

from pipeline.config import ServerArgs
from pipeline.harness import drive, wiring
from pipeline.messages import (ConstrainInbox, FlushCache, ForwardBatch, GrammarCompile, GrammarReady, GrammarRelease, ModelInfo,
                               SampledTokens, SamplingBatch, TokenMask)
from stages.constrain.bitmask import apply_token_bitmask_reference, bitmask_words, unpack_bitmask
from stages.constrain.stage import ConstrainStage
from tests.stages.test_constrain import EXTRA_MODEL_IDS, tiny_tokenizer  # noqa: F401 (fixture)

SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 1, "maximum": 9},
                                           "tag": {"enum": ["a", "b"]}}, "required": ["n", "tag"]}


def model_info(vocab_size: int, eos_token_ids: tuple[int, ...]) -> ModelInfo:
    return ModelInfo(num_slots=64, num_rows=9, context_len=256, vocab_size=vocab_size, eos_token_ids=eos_token_ids)


@pytest.fixture
def stage(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    vocab_size = len(tiny_tokenizer) + EXTRA_MODEL_IDS
    inbox, outboxes = wiring(ConstrainInbox, "sample", "schedule")
    constrain = ConstrainStage(ServerArgs(), inbox, outboxes, tokenizer=tiny_tokenizer,
                               model_info=model_info(vocab_size, (tiny_tokenizer.eos_token_id, im_end)))
    yield constrain
    constrain.close()


def sampling_batch(constrained: list[bool], need_sample: list[bool] | None = None) -> SamplingBatch:
    n = len(constrained)
    return SamplingBatch(temperatures=[1.0] * n, top_ps=[1.0] * n, top_ks=[-1] * n, min_ps=[0.0] * n,
                         repetition_penalties=[1.0] * n, frequency_penalties=[0.0] * n,
                         presence_penalties=[0.0] * n, seeds=[0] * n, steps=[0] * n,
                         need_sample=need_sample or [True] * n, first_step=[False] * n,
                         return_logprob=[False] * n, top_logprobs_nums=[0] * n, constrained=constrained)


def forward_batch(batch_id: int, rids: list[str], constrained: list[bool],
                  need_sample: list[bool] | None = None) -> ForwardBatch:
    n = len(rids)
    return ForwardBatch(batch_id=batch_id, mode="decode", rids=rids, input_ids=[0] * n, positions=[0] * n,
                        out_cache_loc=list(range(n)), req_pool_indices=list(range(n)), prefix_lens=[0] * n,
                        extend_lens=[1] * n, seq_lens=[1] * n, sampling=sampling_batch(constrained, need_sample))


def wait_ready(driver, count: int, timeout_s: float = 30.0) -> dict[str, GrammarReady]:
    ready: dict[str, GrammarReady] = {}
    deadline = time.monotonic() + timeout_s
    while len(ready) < count:
        assert time.monotonic() < deadline, f"only {sorted(ready)} ready"
        for message in driver.step()["schedule"]:
            ready[message.rid] = message
        time.sleep(0.001)
    return ready


def test_compile_replies_ready_or_error(stage):
    driver = drive(stage, GrammarCompile(rid="ok", kind="json_schema", spec=json.dumps(SCHEMA)),
                   GrammarCompile(rid="bad", kind="regex", spec="([0-9]"),
                   GrammarCompile(rid="badschema", kind="json_schema", spec='{"type": "nope"}'))
    ready = wait_ready(driver, 3)
    assert ready["ok"].error is None
    assert "invalid regex" in ready["bad"].error
    assert "Unsupported type: nope" in ready["badschema"].error
    assert set(stage.states) == {"ok"}
    again = drive(stage, GrammarCompile(rid="ok2", kind="json_schema", spec=json.dumps(SCHEMA))).step()
    assert again["schedule"] == [GrammarReady(rid="ok2")]  # cache hit: same step


def test_flush_cache_forgets_compiled_grammars(stage):
    """A cache hit replies in the same step; after FlushCache the same grammar compiles again."""
    driver = drive(stage, GrammarCompile(rid="a", kind="json_schema", spec=json.dumps(SCHEMA)))
    wait_ready(driver, 1)
    hit = drive(stage, GrammarCompile(rid="b", kind="json_schema", spec=json.dumps(SCHEMA))).step()
    assert hit["schedule"] == [GrammarReady(rid="b")]
    assert drive(stage, FlushCache(request_id="f")).step() == {"schedule": [], "sample": []}
    assert stage.compiler.num_bytes == 0 and "a" in stage.states  # live requests keep their grammars
    driver = drive(stage, GrammarCompile(rid="c", kind="json_schema", spec=json.dumps(SCHEMA)))
    assert driver.step()["schedule"] == []  # compiled again, not a same-step cache hit
    assert wait_ready(driver, 1)["c"].error is None


def test_one_mask_per_batch_only_constrained_rows(stage):
    driver = drive(stage, GrammarCompile(rid="c", kind="choices", spec=json.dumps(["yes", "no"])))
    wait_ready(driver, 1)
    driver.feed(forward_batch(7, ["u0", "c", "u2"], [False, True, False]))
    masks = driver.step()["sample"]
    assert len(masks) == 1 and masks[0].batch_id == 7 and masks[0].row_indices == [1]
    assert masks[0].bitmask.shape == (1, bitmask_words(stage.vocab_size))
    allowed = unpack_bitmask(masks[0].bitmask, stage.vocab_size)[0]
    assert not allowed[stage.vocab.tokenizer_size:].any(), "padding ids beyond the tokenizer are never allowed"
    assert not allowed[list(stage.vocab.stop_token_ids)].any(), "EOS before the grammar accepts"
    driver.feed(SampledTokens(batch_id=7, rids=["u0", "c", "u2"], token_ids=[5, int(allowed.nonzero()[0]), 6]))
    driver.feed(forward_batch(8, ["u0", "c"], [False, True], need_sample=[True, False]))
    driver.feed(forward_batch(9, ["u0"], [False]))
    masks = driver.step()["sample"]
    assert [(m.batch_id, m.row_indices, m.bitmask) for m in masks] == [(8, [], None), (9, [], None)]


def test_batch_waits_for_previous_token(stage):
    """With one batch in flight, the mask of step N+1 is built only after step N's token arrived."""
    driver = drive(stage, GrammarCompile(rid="r", kind="regex", spec="ab"))
    wait_ready(driver, 1)
    a_id, b_id = stage.vocab.token_bytes[b"a"][0], stage.vocab.token_bytes[b"b"][0]
    driver.feed(forward_batch(1, ["r"], [True]), forward_batch(2, ["r"], [True]))
    first = driver.step()["sample"]
    assert [m.batch_id for m in first] == [1] and not stage.has_work()
    assert unpack_bitmask(first[0].bitmask, stage.vocab_size)[0].nonzero().flatten().tolist() == [a_id]
    driver.feed(SampledTokens(batch_id=1, rids=["r"], token_ids=[a_id]))
    second = driver.step()["sample"]
    assert [m.batch_id for m in second] == [2]
    assert unpack_bitmask(second[0].bitmask, stage.vocab_size)[0].nonzero().flatten().tolist() == [b_id]


def test_release_drops_state_and_pending_reply(stage):
    driver = drive(stage, GrammarCompile(rid="r", kind="regex", spec="[a-z]{2}"))
    wait_ready(driver, 1)
    driver.take("schedule")
    driver.feed(GrammarRelease(rid="r"), GrammarCompile(rid="late", kind="regex", spec="[a-z]{3,40}z"),
                GrammarRelease(rid="late"))
    driver.step()
    deadline = time.monotonic() + 10
    while stage.busy and time.monotonic() < deadline:
        driver.step()
    assert stage.states == {} and driver.take("schedule") == []


def test_inline_compiles_without_threads(tiny_tokenizer):
    inbox, outboxes = wiring(ConstrainInbox, "sample", "schedule")
    constrain = ConstrainStage(ServerArgs(), inbox, outboxes, tokenizer=tiny_tokenizer,
                               model_info=model_info(len(tiny_tokenizer), (tiny_tokenizer.eos_token_id,)),
                               max_workers=0)
    out = drive(constrain, GrammarCompile(rid="x", kind="regex", spec="x+"),
                GrammarCompile(rid="y", kind="regex", spec="(")).step()
    assert out["schedule"][0] == GrammarReady(rid="x") and "invalid regex" in out["schedule"][1].error


def test_generations_through_the_stage(stage):
    """Mixed batches of constrained and unconstrained rows, sampled with the masks until EOS."""
    specs = {"j0": ("json_schema", json.dumps(SCHEMA)), "j1": ("json_schema", json.dumps(SCHEMA)),
             "re": ("regex", r"[0-9]{2}-[a-c]{2}"), "ch": ("choices", json.dumps(["Romeo", "Juliet"]))}
    driver = drive(stage, *[GrammarCompile(rid=rid, kind=k, spec=s) for rid, (k, s) in specs.items()])
    wait_ready(driver, len(specs))
    id_to_bytes = {i: data for data, ids in stage.vocab.token_bytes.items() for i in ids}
    outputs = {rid: b"" for rid in specs}
    live = list(specs)
    rng = torch.Generator().manual_seed(0)
    for batch_id in range(200):
        if not live:
            break
        rids = ["free"] + live
        driver.feed(forward_batch(batch_id, rids, [False] + [True] * len(live)))
        (mask,) = driver.step()["sample"]
        assert mask.batch_id == batch_id and mask.row_indices == list(range(1, len(rids)))
        logits = torch.randn(len(rids), stage.vocab_size, generator=rng)
        masked = apply_token_bitmask_reference(logits, mask.bitmask, mask.row_indices)
        assert torch.equal(masked[0], logits[0])
        masked[1:, list(stage.vocab.stop_token_ids)] += 30.0  # end as soon as the grammar accepts
        token_ids = torch.multinomial(torch.softmax(masked, -1), 1, generator=rng).flatten().tolist()
        driver.feed(SampledTokens(batch_id=batch_id, rids=rids, token_ids=token_ids))
        for rid, token_id in zip(rids[1:], token_ids[1:]):
            if token_id in stage.vocab.stop_token_ids:
                live.remove(rid)
                driver.feed(GrammarRelease(rid=rid))
            else:
                outputs[rid] += id_to_bytes[token_id]
    assert not live, f"{live} did not finish"
    driver.step()
    assert stage.states == {} and stage.awaiting == {}
    for rid in ("j0", "j1"):
        jsonschema.validate(json.loads(outputs[rid]), SCHEMA)
    assert re.fullmatch(r"[0-9]{2}-[a-c]{2}", outputs["re"].decode())
    assert outputs["ch"].decode() in ("Romeo", "Juliet")


def test_unknown_message_is_a_type_error(stage):
    with pytest.raises(TypeError, match="unexpected TokenMask"):
        stage.handle(TokenMask(batch_id=0, row_indices=[], bitmask=None))
