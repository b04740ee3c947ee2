"""ScheduleStage driven alone through pipeline.harness: batches, chunks, finish, retract, abort, grammar.

A fake "model" answers every ForwardBatch with SampledTokens whose token is
chosen by the test, so every decision of the scheduler is visible.
"""
from __future__ import annotations

import msgspec

from pipeline.config import ServerArgs
from pipeline.harness import StageDriver, wiring
from pipeline.messages import (
    Abort, ErrorOutput, ForwardBatch, GrammarCompile, GrammarReady, GrammarRelease, ModelInfo, SampledTokens,
    SamplingParams, ScheduleInbox, TokenizedRequest, TokenOutputBatch,
)
from stages.schedule import ScheduleStage

EOS = 1


def _stage(num_slots: int = 512, **kwargs) -> StageDriver:
    kwargs.setdefault("disable_overlap_schedule", True)  # one batch at a time (overlap: tests/engine/test_overlap.py)
    args = msgspec.structs.replace(ServerArgs(), **kwargs)
    info = ModelInfo(num_slots=num_slots, num_rows=9, context_len=256, vocab_size=100, eos_token_ids=(EOS,))
    inbox, outboxes = wiring(ScheduleInbox, "forward", "constrain", "detokenize", "stats")
    return StageDriver(ScheduleStage(args, inbox, outboxes, model_info=info))


def _req(rid: str, length: int, parent: str | None = None, first: int = 10, **params) -> TokenizedRequest:
    params.setdefault("max_new_tokens", 4)
    return TokenizedRequest(rid=rid, parent_rid=parent or rid, input_ids=[first + i % 50 for i in range(length)],
                            sampling=SamplingParams(**params))


def _batch(driver: StageDriver) -> ForwardBatch | None:
    """The next ForwardBatch: already emitted by the last step, or from a new step."""
    if not driver.outputs["forward"]:
        driver.step()
    got = driver.take("forward")
    assert len(got) <= 1
    return got[0] if got else None


def _answer(driver: StageDriver, batch: ForwardBatch, token: int = 7) -> list:
    tokens = [token if need else -1 for need in batch.sampling.need_sample]
    driver.feed(SampledTokens(batch_id=batch.batch_id, rids=batch.rids, token_ids=tokens))
    outputs = []
    driver.step()
    for message in driver.take("detokenize"):
        outputs.extend(message.outputs if isinstance(message, TokenOutputBatch) else [message])
    return outputs


def _finals(outputs: list) -> dict[str, str]:
    return {o.rid: o.finish_reason.type for o in outputs if getattr(o, "finish_reason", None)}


def _chunk_shapes(**kwargs) -> list[tuple]:
    """A short request decoding while a 40-token prompt is prefilled in chunks of 16: each step's shape."""
    driver = _stage(chunked_prefill_size=16, **kwargs)
    driver.feed(_req("short", 4, max_new_tokens=10))
    first = _batch(driver)
    assert first.mode == "extend" and first.extend_lens == [4] and first.sampling.need_sample == [True]
    assert first.positions == [0, 1, 2, 3] and len(set(first.out_cache_loc)) == 4 and 0 not in first.out_cache_loc
    driver.feed(_req("long", 40, first=30))
    _answer(driver, first)
    shapes = []
    for _ in range(4):
        batch = _batch(driver)
        shapes.append((batch.mode, batch.rids, batch.extend_lens, batch.sampling.need_sample))
        _answer(driver, batch)
    driver.stage.check_integrity()
    return shapes


def test_mixed_chunk_decodes_ride_along_prefill_chunks() -> None:
    """--enable-mixed-chunk: every chunk carries the decodes, which take their share of the budget."""
    shapes = _chunk_shapes(enable_mixed_chunk=True)
    assert shapes[0] == ("extend", ["long", "short"], [15, 1], [False, True])
    assert shapes[1] == ("extend", ["long", "short"], [15, 1], [False, True])
    assert shapes[2] == ("extend", ["long", "short"], [10, 1], [True, True])
    assert shapes[3][0] == "decode" and shapes[3][2] == [1, 1]


def test_without_mixed_chunk_a_step_is_all_prefill_or_all_decode() -> None:
    """The default (SGLang's): prefill chunks run alone; the decode waits for the prompt's last chunk."""
    shapes = _chunk_shapes()
    assert shapes[:3] == [("extend", ["long"], [16], [False]), ("extend", ["long"], [16], [False]),
                          ("extend", ["long"], [8], [True])]
    assert shapes[3] == ("decode", ["short", "long"], [1, 1], [True, True])


def test_finish_on_eos_stop_ids_length_and_min_new_tokens() -> None:
    driver = _stage()
    driver.feed(_req("eos", 3), _req("ignore", 3, ignore_eos=True, max_new_tokens=2),
                _req("stop", 3, stop_token_ids=[EOS + 1], ignore_eos=True), _req("min", 3, min_new_tokens=2))
    outputs = _answer(driver, _batch(driver), token=EOS)
    assert _finals(outputs) == {"eos": "stop"}
    assert [o.new_token_ids for o in outputs if o.rid == "eos"] == [[EOS]]
    outputs = _answer(driver, _batch(driver), token=EOS)
    assert _finals(outputs) == {"ignore": "length", "min": "stop"}
    outputs = _answer(driver, _batch(driver), token=EOS + 1)
    assert _finals(outputs) == {"stop": "stop"}
    assert not driver.stage.has_work()
    driver.stage.check_integrity()


def test_retraction_when_kv_runs_out_and_resume_refeeds_generated_tokens() -> None:
    driver = _stage(num_slots=33, disable_radix_cache=True)  # 32 usable slots
    driver.feed(_req("a", 8, max_new_tokens=20), _req("b", 8, max_new_tokens=20))
    batch, rows_seen, resumed = _batch(driver), [], None
    for _ in range(60):
        _answer(driver, batch, token=20)
        batch = _batch(driver)
        if batch is None:
            break
        rows_seen.append(len(batch.rids))
        if batch.mode == "extend" and resumed is None:
            resumed = batch
    assert driver.stage.num_retractions >= 1
    assert resumed is not None and resumed.extend_lens[0] > 8  # prompt + generated tokens
    assert resumed.input_ids[8:resumed.extend_lens[0]] == [20] * (resumed.extend_lens[0] - 8)
    assert not driver.stage.has_work()
    driver.stage.check_integrity()
    assert driver.stage.kv.pool.num_free_tokens == 32


def test_abort_waiting_running_and_parent_frees_kv_at_once() -> None:
    driver = _stage(max_running_requests=2)
    kv = driver.stage.kv
    free = kv.pool.num_free_tokens
    driver.feed(_req("p.0", 5, parent="p"), _req("p.1", 5, parent="p"), _req("w", 5))
    batch = _batch(driver)
    assert batch.rids == ["p.0", "w"]  # the sibling waits for the shared prefix; w runs
    _answer(driver, batch)
    in_flight = _batch(driver)
    driver.feed(Abort(rid="w"), Abort(rid="p"))
    driver.step()
    outputs = [o for m in driver.take("detokenize") for o in m.outputs]
    assert _finals(outputs) == {"w": "abort", "p.0": "abort", "p.1": "abort"}
    assert _answer(driver, in_flight) == []  # tokens of aborted requests are dropped
    assert not driver.stage.has_work()
    kv.flush()
    assert kv.pool.num_free_tokens == free
    driver.stage.check_integrity()


def test_grammar_requests_wait_for_ready_and_release_on_finish() -> None:
    driver = _stage()
    driver.feed(_req("g", 3, regex="[ab]+", max_new_tokens=1), _req("bad", 3, regex="(", max_new_tokens=1))
    out = driver.step()
    assert [type(m) for m in out["constrain"]] == [GrammarCompile, GrammarCompile] and not out["forward"]
    driver.feed(GrammarReady(rid="bad", error="unbalanced parenthesis"), GrammarReady(rid="g"))
    out = driver.step()
    errors = [m for m in out["detokenize"] if isinstance(m, ErrorOutput)]
    assert errors and errors[0].rid == "bad" and errors[0].status_code == 400
    batch = out["forward"][0]
    assert batch.sampling.constrained == [True]
    assert batch in out["constrain"] and GrammarRelease(rid="bad") in out["constrain"]
    driver.feed(SampledTokens(batch_id=batch.batch_id, rids=batch.rids, token_ids=[5]))
    assert GrammarRelease(rid="g") in driver.step()["constrain"]


def test_bad_prompts_get_an_error_and_lpm_prefers_cached_prefixes() -> None:
    driver = _stage(schedule_policy="lpm", max_running_requests=1)
    driver.feed(_req("huge", 300), TokenizedRequest(rid="empty", parent_rid="empty", input_ids=[],
                                                    sampling=SamplingParams()))
    errors = driver.step()["detokenize"]
    assert {e.rid for e in errors} == {"huge", "empty"} and all(e.status_code == 400 for e in errors)
    driver.feed(_req("warm", 30, max_new_tokens=1))
    _answer(driver, _batch(driver))
    driver.feed(_req("cold", 5, max_new_tokens=1), _req("hot", 31, max_new_tokens=1))
    batch = _batch(driver)
    assert batch.rids == ["hot"] and batch.prefix_lens == [30]
    assert batch.row_writes and len(batch.row_writes[0].slots) == 30


def test_duplicate_rid_is_rejected_while_the_first_runs() -> None:
    driver = _stage()
    driver.feed(_req("same", 4), _req("same", 6))
    driver.step()
    errors = [m for m in driver.take("detokenize") if isinstance(m, ErrorOutput)]
    assert len(errors) == 1 and "already in use" in errors[0].message
    batch = _batch(driver)
    assert batch.rids == ["same"]


def test_flush_cache_and_engine_stats(monkeypatch) -> None:
    import stages.schedule.stage as stage_module
    from pipeline.messages import EngineStats, FlushCache

    monkeypatch.setattr(stage_module, "STATS_INTERVAL_S", 0.0)
    args = msgspec.structs.replace(ServerArgs(), disable_overlap_schedule=True)
    info = ModelInfo(num_slots=512, num_rows=9, context_len=256, vocab_size=100, eos_token_ids=(EOS,))
    inbox, outboxes = wiring(ScheduleInbox, "forward", "constrain", "detokenize", "stats")
    driver = StageDriver(ScheduleStage(args, inbox, outboxes, model_info=info))
    driver.feed(_req("a", 20, max_new_tokens=1))
    _answer(driver, _batch(driver))
    kv = driver.stage.kv
    assert kv.tree.evictable_size == 20 and kv.tree.protected_size == 0
    driver.feed(FlushCache(request_id="f"))
    driver.step()
    assert kv.tree.total_size == 0 and kv.pool.num_free_tokens == kv.capacity_tokens
    stats = driver.take("stats")
    assert stats and isinstance(stats[-1], EngineStats)
    assert stats[-1].max_total_num_tokens == 511 and stats[-1].num_running_reqs == 0
