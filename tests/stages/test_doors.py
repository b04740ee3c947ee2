"""Every stage's typed doors: the inbox union, the doors out the assembly wires, and the type check on put.

The assembly wires channels by door name, so each stage's ``Outboxes`` record
must declare exactly the doors below, all required. A door refuses any message
outside its declared union with a TypeError (a stage emitting the wrong
message fails in its own test, not three stages later).
"""
from __future__ import annotations

import typing

import msgspec
import pytest

from pipeline import messages as m
from pipeline.config import ServerArgs
from pipeline.harness import wiring
from pipeline.stage import Stage
from stages.constrain.stage import ConstrainStage
from stages.detokenize import DetokenizeStage
from stages.forward import ForwardStage
from stages.ingest import IngestStage
from stages.multimodal import MultimodalStage
from stages.sample import SampleStage
from stages.router import RouterStage
from stages.schedule import ScheduleStage
from stages.tokenize import TokenizeStage
from tests.pipeline.sample_messages import every_message

# stage class -> (inbox union, {door: message types}) as the assembly wires them
DOORS: dict[type[Stage], tuple[typing.Any, dict[str, set[type]]]] = {
    IngestStage: (m.IngestInbox, {"out": {m.GenerateRequest, m.Abort, m.FlushCache}}),
    TokenizeStage: (m.TokenizeInbox, {"out": {m.TokenizedRequest, m.Abort, m.FlushCache},
                                      "errors": {m.ErrorOutput}, "detokenize": {m.TokenizedRequest}}),
    MultimodalStage: (m.MultimodalInbox, {"out": {m.TokenizedRequest, m.Abort, m.FlushCache}, "errors": {m.ErrorOutput}}),
    ScheduleStage: (m.ScheduleInbox, {"forward": {m.ForwardBatch},
                                      "constrain": {m.GrammarCompile, m.GrammarRelease, m.ForwardBatch,
                                                    m.FlushCache},
                                      "detokenize": {m.TokenOutputBatch, m.ErrorOutput}, "stats": {m.EngineStats}}),
    ForwardStage: (m.ForwardInbox, {"sample": {m.Logits}}),
    ConstrainStage: (m.ConstrainInbox, {"schedule": {m.GrammarReady}, "sample": {m.TokenMask}}),
    SampleStage: (m.SampleInbox, {"schedule": {m.SampledTokens}, "constrain": {m.SampledTokens}}),
    RouterStage: (m.PDRouterInbox, {"replicas": {m.TokenizedRequest, m.Abort, m.FlushCache},
                                    "stats": {m.EngineStats}, "decoders": {m.Abort, m.FlushCache, m.EngineDown},
                                    "peers": {m.EngineDown}, "errors": {m.ErrorOutput}}),
    DetokenizeStage: (m.DetokenizeInbox, {"out": {m.TextOutput, m.ErrorOutput, m.EngineStats, m.ProcessCounters},
                                          "abort": {m.Abort}}),
}
STAGES = list(DOORS)


def _members(union: typing.Any) -> set[type]:
    return set(typing.get_args(union)) or {union}


@pytest.mark.parametrize("stage_class", STAGES, ids=lambda c: c.__name__)
def test_outboxes_record_declares_exactly_the_wired_doors(stage_class):
    inbox, doors = DOORS[stage_class]
    assert stage_class.Inbox == inbox
    declared = stage_class.Outboxes.declared()
    assert {name: _members(message_type) for name, (message_type, _, _) in declared.items()} == doors
    assert all(required or family for _, required, family in declared.values()), "every door is wired"


@pytest.mark.parametrize("stage_class", STAGES, ids=lambda c: c.__name__)
def test_a_door_refuses_any_other_message_type(stage_class):
    _, doors = DOORS[stage_class]
    declared = stage_class.Outboxes.declared()
    names = [door for name in doors for door in ([f"{name}.0", f"{name}.1"] if declared[name][2] else [name])]
    outboxes = stage_class.Outboxes.wire(dict.fromkeys(names))
    for name, door in outboxes.doors().items():
        for message in every_message():
            if type(message) in doors[name.partition(".")[0]]:
                door.put(message)
                assert door.channel.drain(1) == [message]
            else:
                with pytest.raises(TypeError, match=name):
                    door.put(message)
        assert len(door.channel) == 0


class _Tokenizer:
    bos_token_id = 0
    all_special_ids = [0]

    def __len__(self) -> int:
        return 100


def _cheap_stages() -> list[Stage]:
    """The stages that build without a model (forward and constrain are covered by the record test)."""
    args = ServerArgs(model_path="/nonexistent")
    info = m.ModelInfo(num_slots=64, num_rows=9, context_len=256, vocab_size=100, eos_token_ids=(1,))
    server_info = m.ServerInfo(torch_version="", triton_version="", device_name="cpu")

    def wired(stage_class: type[Stage]) -> tuple:
        return wiring(stage_class.Inbox, *stage_class.Outboxes.declared())

    return [IngestStage(args, *wired(IngestStage), tokenizer=_Tokenizer(), server_info=server_info),
            TokenizeStage(args, *wired(TokenizeStage), tokenizer=_Tokenizer(), vocab_size=100, num_workers=0),
            MultimodalStage(args, *wired(MultimodalStage)),
            ScheduleStage(args, *wired(ScheduleStage), model_info=info),
            SampleStage(msgspec.structs.replace(args, device="cpu", kernel_backend="reference"), *wired(SampleStage)),
            DetokenizeStage(args, *wired(DetokenizeStage), tokenizer=_Tokenizer())]


def test_a_stage_putting_a_wrong_message_names_itself_and_the_door():
    wrong = m.FlushCache(request_id="x")
    for stage in _cheap_stages():
        for name, door in stage.doors.items():
            if isinstance(wrong, tuple(DOORS[type(stage)][1][name])):
                continue
            with pytest.raises(TypeError, match=f"stage {stage.name!r} put a FlushCache on its outbox {name!r}"):
                door.put(wrong)
        assert stage.counters.messages_out == 0
        stage.close()


def test_multimodal_passes_text_requests_through_its_out_door():
    stage = MultimodalStage(ServerArgs(), *wiring(m.MultimodalInbox, "out", "errors"))
    request = m.TokenizedRequest(rid="r", parent_rid="r", input_ids=[1, 2], sampling=m.SamplingParams())
    for message in (request, m.Abort(rid="r"), m.FlushCache(request_id="f")):
        stage.inbox.put(message)
    stage.step()
    assert stage.outboxes.out.channel.drain(10) == [request, m.Abort(rid="r"), m.FlushCache(request_id="f")]
    assert stage.counters.messages_out == 3
