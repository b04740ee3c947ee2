"""Each role's schedule stage alone: backpressure on accept, failed and aborted transfers free both pools."""
from __future__ import annotations

import msgspec

from pipeline.config import ServerArgs
from pipeline.harness import StageDriver, wiring
from pipeline.messages import (Abort, KVAccept, KVHandoff, KVRecv, KVTransferDone, ModelInfo, PrefillScheduleInbox,
                               SampledTokens, SamplingParams, TokenizedRequest, TokenOutput, TokenOutputBatch)
from stages.schedule.disagg import PADDING_SLOT, DecodeScheduleStage, PrefillScheduleStage


def _stage(num_slots: int = 16) -> tuple[DecodeScheduleStage, dict]:
    info = ModelInfo(num_slots=num_slots, num_rows=8, context_len=64, vocab_size=100, eos_token_ids=(0,))
    stage = DecodeScheduleStage(ServerArgs(model_path="none", disable_radix_cache=True), None,
                                {"forward": None, "constrain": None, "detokenize": None, "stats": None,
                                 "accept.0": None, "transfer": None}, model_info=info, engine=1, rank=1)
    return stage, stage.outboxes.doors()


def _handoff(rid: str, length: int) -> KVHandoff:
    first = TokenOutput(rid=rid, parent_rid=rid, new_token_ids=[7], prompt_tokens=length, completion_tokens=1)
    return KVHandoff(rid=rid, parent_rid=rid, input_ids=list(range(1, length + 1)),
                     sampling=SamplingParams(max_new_tokens=4), max_new_tokens=4, seed=1, first=first,
                     prefill_engine=0)


def _drain(door) -> list:
    out = []
    while (message := door.channel.get_nowait()) is not None:
        out.append(message)
    return out


def test_decode_accepts_as_room_allows_and_frees_on_failure_and_abort():
    stage, doors = _stage()
    for rid in ("a", "b", "c"):
        stage.handle(_handoff(rid, 10))
    stage.tick()
    receives = [m for m in _drain(doors["transfer"]) if isinstance(m, KVRecv)]
    accepts = [m for m in _drain(doors["accept.0"]) if isinstance(m, KVAccept)]
    assert [m.rid for m in receives] == [m.rid for m in accepts] == ["a"]  # room for one prompt of 10 + reserve
    assert [h.rid for h in stage.accepting] == ["b", "c"]  # queued, not dropped
    stage.handle(KVTransferDone(rid="a", transfer_id=receives[0].transfer_id, direction="recv", ok=False,
                                error="KV transfer 1 timed out after 60.0 s"))
    outputs = [o for batch in _drain(doors["detokenize"]) if isinstance(batch, TokenOutputBatch) for o in batch.outputs]
    assert [(o.rid, o.finish_reason.type) for o in outputs] == [("a", "abort")]
    assert "timed out" in outputs[0].finish_reason.message
    stage.tick()  # "a" gave its pages back: "b" is accepted now
    receives = [m for m in _drain(doors["transfer"]) if isinstance(m, KVRecv)]
    assert [m.rid for m in receives] == ["b"]
    stage.handle(Abort(rid="b", reason="client disconnected"))  # during its transfer
    stage.handle(Abort(rid="c", reason="client disconnected"))  # still queued
    outputs = [o for batch in _drain(doors["detokenize"]) if isinstance(batch, TokenOutputBatch) for o in batch.outputs]
    assert sorted((o.rid, o.finish_reason.type) for o in outputs) == [("b", "abort"), ("c", "abort")]
    assert stage.kv.pool.num_free_tokens < stage.kv.capacity_tokens  # "b"'s pages wait for the wire
    stage.handle(KVTransferDone(rid="b", transfer_id=receives[0].transfer_id, direction="recv", ok=True))
    assert not stage.kv.holders and stage.kv.pool.num_free_tokens == stage.kv.capacity_tokens
    stage.kv.check_integrity()
    assert not _drain(doors["detokenize"])  # exactly one final output each


def test_prefill_hands_off_after_the_first_token_and_answers_every_accept_with_a_send():
    """A handed-off request keeps its pages until its send ended; one aborted before its accept frees them
    at once, and its accept still gets a send (of the padding slot), so the decode engine's receive ends."""
    args = msgspec.structs.replace(ServerArgs(), disable_overlap_schedule=True, disable_radix_cache=True)
    info = ModelInfo(num_slots=64, num_rows=8, context_len=64, vocab_size=100, eos_token_ids=(0,))
    inbox, outboxes = wiring(PrefillScheduleInbox, "forward", "constrain", "detokenize", "stats", "handoff.0",
                             "transfer")
    driver = StageDriver(PrefillScheduleStage(args, inbox, outboxes, model_info=info))
    stage = driver.stage
    for rid in ("a", "b"):
        driver.feed(TokenizedRequest(rid=rid, parent_rid=rid, input_ids=list(range(10, 16)),
                                     sampling=SamplingParams(max_new_tokens=4)))
    driver.step()
    [batch] = driver.take("forward")
    driver.feed(SampledTokens(batch_id=batch.batch_id, rids=batch.rids, token_ids=[7] * len(batch.rids)))
    driver.step()
    handoffs = driver.take("handoff.0")
    assert [(h.rid, h.first.new_token_ids) for h in handoffs] == [("a", [7]), ("b", [7])]
    assert not stage.running_reqs and stage.kv.pool.num_free_tokens < stage.kv.capacity_tokens
    driver.feed(Abort(rid="a", reason="client disconnected"))
    driver.feed(KVAccept(rid="a", transfer_id=3, decode_rank=1, skip=2))
    driver.feed(KVAccept(rid="b", transfer_id=4, decode_rank=1, skip=0))
    driver.step()
    sends = {s.rid: s for s in driver.take("transfer")}
    assert sends["a"].slots == [PADDING_SLOT] * 4 and (sends["a"].transfer_id, sends["a"].peer) == (3, 1)
    assert len(sends["b"].slots) == 6 and PADDING_SLOT not in sends["b"].slots
    driver.feed(KVTransferDone(rid="b", transfer_id=4, direction="send", ok=True, num_bytes=96, seconds=0.01))
    driver.feed(KVTransferDone(rid="a", transfer_id=3, direction="send", ok=True, num_bytes=64, seconds=0.01))
    driver.step()
    assert stage.kv.pool.num_free_tokens == stage.kv.capacity_tokens and not stage.handing
    stage.kv.check_integrity()
    stats = stage._role_stats()
    assert (stats["role"], stats["pd_handoffs"], stats["pd_transfers"], stats["pd_transfer_bytes"]) == \
        ("prefill", 2, 2, 160)
