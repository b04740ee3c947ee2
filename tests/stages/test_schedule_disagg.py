"""The decode role's schedule stage alone: backpressure on accept, failed and aborted transfers free the pool."""
from __future__ import annotations

from pipeline.config import ServerArgs
from pipeline.messages import (Abort, KVAccept, KVHandoff, KVRecv, KVTransferDone, ModelInfo, SamplingParams,
                               TokenOutput, TokenOutputBatch)
from stages.schedule.disagg import DecodeScheduleStage


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
