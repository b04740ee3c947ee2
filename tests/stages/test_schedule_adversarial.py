"""ScheduleStage alone under adversarial message orders, through pipeline.harness.

A fake model answers each ForwardBatch; the test also keeps its own copy of
the forward stage's ``req_to_token`` table, applying every batch's row writes
and new-token slots, and checks before each step that each request of the
batch would read exactly its own KV slots. Orders covered: Abort before its
request, Abort twice, Abort of an unknown rid, FlushCache while requests run,
SampledTokens for a request aborted while its batch was in flight, and a
randomized mix of all of them over a small pool (retraction and eviction).
Every request must end with exactly one final output, and the KV bookkeeping
must add up when the stage is idle.
"""
from __future__ import annotations

import random

import msgspec
import pytest

from pipeline.config import ServerArgs
from pipeline.harness import StageDriver, wiring
from pipeline.messages import (
    Abort, ErrorOutput, FlushCache, ForwardBatch, ModelInfo, SampledTokens, SamplingParams, ScheduleInbox,
    TokenizedRequest, TokenOutputBatch,
)
from stages.schedule import ScheduleStage

EOS = 1
VOCAB = 100


def _stage(num_slots: int, num_rows: int = 9, **kwargs) -> StageDriver:
    kwargs.setdefault("disable_overlap_schedule", True)  # one batch at a time (overlap: tests/engine/test_overlap.py)
    args = msgspec.structs.replace(ServerArgs(), **kwargs)
    info = ModelInfo(num_slots=num_slots, num_rows=num_rows, context_len=256, vocab_size=VOCAB,
                     eos_token_ids=(EOS,))
    inbox, outboxes = wiring(ScheduleInbox, "forward", "constrain", "detokenize", "stats")
    return StageDriver(ScheduleStage(args, inbox, outboxes, model_info=info))


def _req(rid: str, ids: list[int], parent: str | None = None, index: int = 0, **params) -> TokenizedRequest:
    params.setdefault("max_new_tokens", 4)
    return TokenizedRequest(rid=rid, parent_rid=parent or rid, index=index, input_ids=ids,
                            sampling=SamplingParams(**params))


class Harness:
    """Drives the stage with a fake model and checks every batch against a req_to_token copy."""

    def __init__(self, driver: StageDriver, seed: int = 0) -> None:
        self.driver = driver
        self.stage: ScheduleStage = driver.stage
        self.rng = random.Random(seed)
        self.req_to_token: dict[int, dict[int, int]] = {}
        self.finals: dict[str, list] = {}
        self.errors: dict[str, ErrorOutput] = {}
        self.tokens: dict[str, list[int]] = {}
        self.pending: ForwardBatch | None = None

    def collect(self) -> None:
        for message in self.driver.take("detokenize"):
            if isinstance(message, ErrorOutput):
                self.errors[message.rid] = message
                continue
            for out in message.outputs if isinstance(message, TokenOutputBatch) else []:
                self.tokens.setdefault(out.rid, []).extend(out.new_token_ids)
                if out.finish_reason is not None:
                    self.finals.setdefault(out.rid, []).append(out)

    def step(self) -> None:
        """One stage step; a batch it emits is checked and held until ``answer``."""
        self.driver.step()
        self.collect()
        batches = self.driver.take("forward")
        assert len(batches) <= 1 and (not batches or self.pending is None)
        if batches:
            self.pending = batches[0]
            self._check_batch(batches[0])

    def answer(self, token: int | None = None) -> None:
        batch, self.pending = self.pending, None
        tokens = [(token if token is not None else self.rng.randrange(2, VOCAB)) if need else -1
                  for need in batch.sampling.need_sample]
        self.driver.feed(SampledTokens(batch_id=batch.batch_id, rids=batch.rids, token_ids=tokens))

    def run(self, max_steps: int = 2000) -> None:
        for _ in range(max_steps):
            if self.pending is not None:
                self.answer()
            self.step()
            if self.pending is None and not self.stage.has_work():
                return
        raise AssertionError("the schedule stage did not go idle")

    def _check_batch(self, batch: ForwardBatch) -> None:
        written: dict[tuple[int, int], int] = {}
        for write in batch.row_writes:
            row = self.req_to_token.setdefault(write.row, {})
            for offset, slot in enumerate(write.slots):
                key = (write.row, write.start + offset)
                # Writes of one batch are applied in parallel on a GPU: they must not disagree.
                assert written.setdefault(key, slot) == slot, f"conflicting row writes at {key}"
                row[write.start + offset] = slot
        loc = 0
        by_rid = {r.rid: r for r in self.stage.running_reqs}
        for b, rid in enumerate(batch.rids):
            row = self.req_to_token.setdefault(batch.req_pool_indices[b], {})
            for pos in range(batch.prefix_lens[b], batch.seq_lens[b]):
                row[pos] = batch.out_cache_loc[loc]
                loc += 1
            req = by_rid[rid]
            seen = [row.get(pos) for pos in range(batch.seq_lens[b])]
            assert seen == req.slots[:batch.seq_lens[b]], f"{rid} would read KV slots that are not its own"
        assert loc == len(batch.out_cache_loc)

    def assert_idle_and_clean(self, free_before: int) -> None:
        stage = self.stage
        stage.check_integrity()
        kv = stage.kv
        assert kv.tree.protected_size == 0 and not kv.holders
        assert kv.pool.num_free_tokens + kv.tree.evictable_size == free_before
        assert not stage.live_rids and not stage.waiting and not stage.running_reqs
        for rid, finals in self.finals.items():
            assert len(finals) == 1, f"{rid} ended {len(finals)} times"


def _free(driver: StageDriver) -> int:
    kv = driver.stage.kv
    return kv.pool.num_free_tokens + kv.tree.evictable_size


def test_abort_before_request_duplicate_and_unknown_aborts() -> None:
    harness = Harness(_stage(256))
    free_before = _free(harness.driver)
    harness.driver.feed(Abort(rid="early"), Abort(rid="nobody"), _req("early", [5, 6, 7], max_new_tokens=3),
                        _req("twice", [5, 6, 8], max_new_tokens=50))
    harness.step()
    harness.answer()
    harness.step()
    harness.driver.feed(Abort(rid="twice"), Abort(rid="twice"), Abort(rid="twice.0"))
    harness.run()
    assert harness.finals["early"][0].finish_reason.type == "length"
    assert len(harness.tokens["early"]) == 3
    assert harness.finals["twice"][0].finish_reason.type == "abort"
    assert set(harness.finals) == {"early", "twice"}
    harness.assert_idle_and_clean(free_before)


def test_sampled_tokens_for_a_request_aborted_in_flight_are_dropped() -> None:
    harness = Harness(_stage(256))
    free_before = _free(harness.driver)
    harness.driver.feed(_req("a", [5, 6, 7], max_new_tokens=20), _req("b", [5, 6, 9], max_new_tokens=6))
    harness.step()
    harness.answer()
    harness.step()  # both decoding: the batch is in flight
    assert set(harness.pending.rids) == {"a", "b"}
    harness.driver.feed(Abort(rid="a"))
    harness.answer(token=7)  # arrives after the Abort, with a token for "a"
    harness.run()
    assert harness.tokens["a"] == [harness.tokens["a"][0]]  # only the token before the abort
    assert harness.finals["a"][0].finish_reason.type == "abort"
    assert len(harness.tokens["b"]) == 6
    harness.assert_idle_and_clean(free_before)


def test_flush_cache_while_requests_run() -> None:
    harness = Harness(_stage(128, chunked_prefill_size=8), seed=3)
    free_before = _free(harness.driver)
    shared = list(range(10, 40))
    harness.driver.feed(*[_req(f"r{i}", shared + [50 + i], max_new_tokens=8) for i in range(4)])
    for _ in range(6):
        harness.step()
        harness.driver.feed(FlushCache(request_id="f"))
        if harness.pending is not None:
            harness.answer()
    harness.run()
    assert set(harness.finals) == {f"r{i}" for i in range(4)}
    assert all(len(harness.tokens[f"r{i}"]) == 8 for i in range(4))
    harness.assert_idle_and_clean(free_before)


def test_a_decode_is_not_failed_while_a_prefilling_request_holds_the_pool() -> None:
    """A decode that fits the pool alone must retract a chunked prefill, not end with 'KV cache full'."""
    harness = Harness(_stage(64, chunked_prefill_size=8))
    free_before = _free(harness.driver)
    harness.driver.feed(_req("decode", list(range(10, 18)), max_new_tokens=40))
    harness.step()
    harness.answer()
    harness.step()
    harness.driver.feed(_req("prefill", list(range(20, 70)), max_new_tokens=4))
    harness.run()
    assert harness.finals["decode"][0].finish_reason.message is None
    assert len(harness.tokens["decode"]) == 40 and len(harness.tokens["prefill"]) == 4
    harness.assert_idle_and_clean(free_before)


def test_two_long_prompts_on_a_pool_that_holds_one_at_a_time_both_finish() -> None:
    """Chunked prefills of two prompts that cannot both be resident: neither fails."""
    harness = Harness(_stage(64, chunked_prefill_size=8))
    free_before = _free(harness.driver)
    harness.driver.feed(_req("x", list(range(10, 50)), max_new_tokens=2),
                        _req("y", list(range(50, 90)), max_new_tokens=2))
    harness.run()
    for rid in ("x", "y"):
        assert harness.finals[rid][0].finish_reason.message is None, harness.finals[rid]
        assert len(harness.tokens[rid]) == 2
    harness.assert_idle_and_clean(free_before)


@pytest.mark.parametrize("page_size,num_slots", [(1, 96), (4, 128), (16, 192)])
def test_randomized_message_orders(page_size: int, num_slots: int) -> None:
    rng = random.Random(page_size)
    harness = Harness(_stage(num_slots, page_size=page_size, chunked_prefill_size=8, schedule_policy="lpm"),
                      seed=page_size)
    free_before = _free(harness.driver)
    capacity = harness.stage.kv.capacity_tokens
    prefixes = [[rng.randrange(2, VOCAB) for _ in range(rng.randrange(8, 30))] for _ in range(3)]
    submitted: list[str] = []
    for step in range(400):
        roll = rng.random()
        if roll < 0.12 and len(submitted) < 40:
            rid = f"q{len(submitted)}"
            ids = rng.choice(prefixes) + [rng.randrange(2, VOCAB) for _ in range(rng.randrange(1, 12))]
            n = rng.choice([1, 1, 1, 2])
            max_new = min(rng.randrange(0, 30), capacity - len(ids) - page_size)
            for i in range(n):
                harness.driver.feed(_req(rid if n == 1 else f"{rid}.{i}", ids, parent=rid, index=i,
                                         max_new_tokens=max_new, ignore_eos=rng.random() < 0.5))
            submitted.append(rid)
        elif roll < 0.18 and submitted:
            harness.driver.feed(Abort(rid=rng.choice(submitted + ["ghost", submitted[-1] + ".1"])))
        elif roll < 0.20:
            harness.driver.feed(FlushCache(request_id=f"f{step}"))
        if harness.pending is not None and rng.random() < 0.8:
            harness.answer()
        harness.step()
    harness.run()
    ended = set(harness.finals) | set(harness.errors)
    expected = set()
    for rid in submitted:
        expected |= {r for r in harness.tokens if r == rid or r.startswith(rid + ".")} or {rid}
    assert expected <= ended, sorted(expected - ended)
    for rid, finals in harness.finals.items():
        assert finals[0].finish_reason.message != "KV cache full", rid
    assert harness.stage.num_retractions > 0
    harness.assert_idle_and_clean(free_before)


def test_rid_reused_while_the_aborted_one_is_still_in_flight() -> None:
    harness = Harness(_stage(256))
    free_before = _free(harness.driver)
    harness.driver.feed(_req("a", [5, 6, 7], max_new_tokens=20))
    harness.step()
    harness.answer()
    harness.step()  # "a" decoding, its batch in flight
    harness.driver.feed(Abort(rid="a"), _req("a", [8, 9, 10, 11], max_new_tokens=3))
    harness.answer(token=7)  # the late token of the first "a"
    harness.run()
    finals = [o.finish_reason.type for o in harness.finals["a"]]
    assert finals == ["abort", "length"]
    assert len(harness.tokens["a"]) == 1 + 3  # one before the abort, three of the new request
    harness.stage.check_integrity()
    assert _free(harness.driver) == free_before and not harness.stage.live_rids
