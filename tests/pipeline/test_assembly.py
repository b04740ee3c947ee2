"""One assembly: every entry point builds the same stages and channels from ``pipeline/assembly.py``.

The Engine, ``stagewise serve`` (both placements), ``stagewise generate``
(through a recording it writes), ``stagewise replay`` (the recording's
header) and the perf scripts are compared with ``pipeline_spec``; a scan of
the source checks that no other module declares stages or channels.
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import msgspec
import pytest

from pipeline.assembly import CHANNELS, STAGES, ProcessContext, pipeline_spec
from pipeline.config import ServerArgs, resolve
from pipeline.harness import Recording, type_paths
from pipeline.placement import CALLER, FRONT_END_STAGES, MAIN, PLACEMENTS, process_of, single

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "models" / "demo")


def summary(stages, channels) -> tuple[list, list]:
    """What must agree between entry points: stage names and factories, channel ends and types."""
    return ([(s.name, s.factory, s.own_thread) for s in stages],
            [(c.name, tuple(type_paths(c.message_type)), tuple(c.producers), c.consumer) for c in channels])


ASSEMBLY = summary(STAGES, CHANNELS)


@pytest.fixture(scope="module")
def args() -> ServerArgs:
    return resolve(ServerArgs(model_path=DEMO, device="cpu"))


def test_the_declaration_has_eight_stages_each_with_an_inbox(args):
    spec = pipeline_spec(args)
    spec.validate()
    assert [s.name for s in spec.stages] == ["ingest", "tokenize", "multimodal", "forward", "constrain", "sample",
                                             "schedule", "detokenize"]
    assert sorted(c.consumer for c in spec.channels) == sorted(s.name for s in spec.stages)
    assert [c.name for c in spec.channels if c.counters] == ["detokenize"]


def test_the_engine_builds_from_the_assembly(args, tmp_path):
    from pipeline.engine import Engine

    path = tmp_path / "engine.rec"
    with Engine(DEMO, device="cpu", record_path=str(path)) as engine:
        assert summary(engine.spec.stages, engine.spec.channels) == ASSEMBLY
        assert sorted(engine.stages) == sorted(s.name for s in STAGES if s.name != "ingest")
        engine.generate("ROMEO:", {"max_new_tokens": 2})
    recording = Recording(str(path))  # what `stagewise replay` reads
    assert [(c.name, tuple(c.message_types), tuple(c.producers), c.consumer) for c in recording.channels.values()] \
        == ASSEMBLY[1]
    assert {name: r.factory for name, r in recording.stages.items()} == \
        {s.name: s.factory for s in STAGES if s.name != "ingest"}


@pytest.mark.parametrize("placement", sorted(PLACEMENTS))
def test_the_server_builds_from_the_assembly_under_each_placement(args, placement):
    from pipeline.serve import Server

    server = Server(msgspec.structs.replace(args, placement=placement))  # not started
    assert summary(server.spec.stages, server.spec.channels) == ASSEMBLY
    where = process_of(server.pipeline.placement)
    if placement == "serving":
        assert {s for s, p in where.items() if p == MAIN} == set(FRONT_END_STAGES) & set(where)
    else:
        assert set(where.values()) == {MAIN}


def test_the_generate_command_runs_the_engine(monkeypatch):
    """``stagewise generate`` hands its flags to the Engine, which builds from the assembly (above)."""
    import pipeline.engine
    import pipeline.generate

    built = []

    class Recorded(pipeline.engine.Engine):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            built.append(summary(self.spec.stages, self.spec.channels))

    monkeypatch.setattr(pipeline.engine, "Engine", Recorded)
    assert pipeline.generate.main(["--prompt", "ROMEO:", "--max-new-tokens", "2", "--device", "cpu"]) == 0
    assert built == [ASSEMBLY]


def test_the_offline_benchmark_builds_the_engine_stages_from_the_assembly(args):
    sys.path.insert(0, str(REPO / "perf"))
    try:
        import bench_offline
    finally:
        sys.path.remove(str(REPO / "perf"))
    core = bench_offline.Core(args)
    assert [s.name for s in core.stages] == [s.name for s in STAGES if s.name not in bench_offline.PLAYED_STAGES]
    assert core.requests.name == "multimodal" and core.outputs.name == "detokenize"


def test_a_context_rebuilds_from_its_snapshot(args):
    context = ProcessContext(msgspec.structs.replace(args, api_key="sk-secret"))
    context.model_info = None
    snapshot = context.snapshot()
    assert "sk-secret" not in str(snapshot)  # a recording never holds the key
    again = ProcessContext(**snapshot, replay=True)
    assert again.args == args and again.replay
    with pytest.raises(RuntimeError, match="schedule stage needs the model info"):
        again.require_model_info("schedule")


def test_the_caller_can_play_a_stage(args):
    from pipeline.placement import played_by_caller, serving, single, transport_of

    spec = pipeline_spec(args)
    placement = played_by_caller(single(spec), "ingest")
    where = process_of(placement)
    assert where["ingest"] == CALLER
    transports = {c.name: transport_of(c, spec, where) for c in spec.channels}
    assert transports["tokenize"] == "cross-thread" and transports["ingest"] == "cross-thread"
    assert transports["forward"] == "in-thread" and transports["detokenize"] == "in-thread"
    served = process_of(serving(spec))
    assert {c.name for c in spec.channels if transport_of(c, spec, served) == "cross-process"} == \
        {"multimodal", "detokenize"}


def test_no_other_module_declares_stages_or_channels():
    """StageSpec / ChannelSpec / PipelineSpec are built in pipeline/assembly.py only (tests' toy pipelines aside;
    the harness rebuilds one StageSpec from a recording's header, which the assembly wrote)."""
    declaring = []
    for folder in ("pipeline", "stages", "models", "triton_kernels", "perf"):
        for path in (REPO / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Call) and getattr(node.func, "id", None) in (
                        "StageSpec", "ChannelSpec", "PipelineSpec"):
                    declaring.append(str(path.relative_to(REPO)))
    assert set(declaring) == {"pipeline/assembly.py", "pipeline/harness.py"}
    harness = (REPO / "pipeline/harness.py").read_text()
    assert harness.count("StageSpec(") == 1 and "ChannelSpec(" not in harness


def test_tensor_and_data_parallel_extend_the_one_declaration(args):
    spec = pipeline_spec(msgspec.structs.replace(args, tp_size=2, dp_size=2))
    spec.validate()
    engine = ["multimodal", "forward", "constrain", "sample", "schedule"]
    assert [s.name for s in spec.stages] == (
        ["ingest", "tokenize", "router", "detokenize"]
        + [f"{name}@dp0" for name in engine] + ["forward@dp0_rank1"]
        + [f"{name}@dp1" for name in engine] + ["forward@dp1_rank1"])
    from pipeline.placement import serving

    placement = serving(spec)
    assert placement == {MAIN: ["ingest", "tokenize", "router", "detokenize"],
                         "engine_dp0": [f"{name}@dp0" for name in engine], "tp1_dp0": ["forward@dp0_rank1"],
                         "engine_dp1": [f"{name}@dp1" for name in engine], "tp1_dp1": ["forward@dp1_rank1"]}
    channels = {c.name: c for c in spec.channels}
    assert channels["router"].producers == ("tokenize.out", "schedule@dp0.stats", "schedule@dp1.stats")
    assert channels["multimodal@dp1"].producers == ("router.replicas.1",)
    assert channels["schedule@dp1"].producers == ("multimodal@dp1.out", "sample@dp1.schedule",
                                                  "constrain@dp1.schedule")
    assert channels["detokenize"].producers == ("schedule@dp0.detokenize", "schedule@dp1.detokenize", "router.stats",
                                                "tokenize.detokenize", "multimodal@dp0.errors",
                                                "multimodal@dp1.errors")
    stages = {s.name: s for s in spec.stages}
    assert stages["schedule@dp1"].kwargs == {"dp_rank": 1}
    rank0, rank1 = stages["forward@dp1"].kwargs, stages["forward@dp1_rank1"].kwargs
    assert rank0["dp_rank"] == rank1["dp_rank"] == 1 and rank1["tp_rank"] == 1
    assert rank0["dist_init_addr"] == rank1["dist_init_addr"] != stages["forward@dp0"].kwargs["dist_init_addr"]


def test_tensor_parallel_alone_keeps_the_plain_names(args):
    spec = pipeline_spec(msgspec.structs.replace(args, tp_size=3))
    assert [s.name for s in spec.stages] == [s.name for s in STAGES] + ["forward_rank1", "forward_rank2"]
    assert summary((), spec.channels)[1] == ASSEMBLY[1]
    assert single(spec) == {MAIN: [s.name for s in STAGES], "tp1": ["forward_rank1"], "tp2": ["forward_rank2"]}
