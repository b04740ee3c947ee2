"""Placement: transports chosen from one description, drain-then-stop loses nothing, no orphans."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import ServerArgs
from pipeline.messages import Abort
from pipeline.launch import Pipeline
from pipeline.placement import (ChannelSpec, PipelineSpec, PlacementError, StageSpec, build_stage, serving, single,
                                transport_of)
from tests.pipeline.toy_stages import TOY, TOY_SERVING, Item, toy_spec

REPO = Path(__file__).resolve().parents[2]


def run_and_stop(pipe: Pipeline, count: int) -> tuple[list[Item], bool]:
    """Put ``count`` items, stop at once (most are still in flight), return what came out."""
    results: list[Item] = []
    reader = threading.Thread(target=lambda: results.extend(pipe.exit("results")))
    reader.start()
    for i in range(count):
        pipe.entry("requests").put(Item(key=str(i), value=i))
    drained = pipe.stop(timeout=30.0)
    reader.join(10)
    assert not reader.is_alive(), "the exit channel was not closed by stop()"
    return results, drained


def assert_all_delivered(results: list[Item], count: int, loops: int) -> None:
    assert sorted(int(r.key) for r in results) == list(range(count))
    assert all(r.value == int(r.key) + 10 * (loops + 1) and r.hops == loops for r in results)


def test_spec_errors_name_the_culprit() -> None:
    stage = StageSpec("a", TOY + "Forward")
    with pytest.raises(PlacementError, match="stage 'a' is declared twice"):
        PipelineSpec((stage, stage), ()).validate()
    with pytest.raises(PlacementError, match="channel 'x' names unknown stage 'b'"):
        PipelineSpec((stage,), (ChannelSpec("x", Item, ("b.out",), "a"),)).validate()
    with pytest.raises(PlacementError, match="'a.out' must be 'stage.outbox'|'a' must be 'stage.outbox'"):
        PipelineSpec((stage,), (ChannelSpec("x", Item, ("a",), None),)).validate()
    with pytest.raises(PlacementError, match="not placed"):
        Pipeline(toy_spec(), {"main": ["source"]})
    with pytest.raises(PlacementError, match="placed in both"):
        Pipeline(toy_spec(), {"main": ["source", "front", "worker", "sink"], "engine": ["worker"]})


def test_factory_gets_wiring_and_name_and_must_build_a_stage() -> None:
    stage = build_stage(StageSpec("w", TOY + "AddAndHold", {"amount": 3}), None, {})
    assert stage.name == "w" and stage.amount == 3
    with pytest.raises(PlacementError, match="'bad' returned Abort"):
        build_stage(StageSpec("bad", lambda inbox, outboxes: Abort(rid="x")), None, {})


def test_struct_kwargs_given_as_json_data_are_converted_by_annotation() -> None:
    stage = build_stage(StageSpec("c", TOY + "Configured", {"args": {"port": 31000, "page_size": 16}}), None, {})
    assert isinstance(stage.args, ServerArgs) and stage.args.port == 31000 and stage.args.page_size == 16
    assert stage.name == "c"  # the spec's name wins over the one the class picks


def test_transports_follow_the_placement() -> None:
    spec = toy_spec()
    assert single(spec) == {"main": ["source", "front", "worker", "sink"]}
    assert serving(spec, front_end=("source", "front", "sink")) == TOY_SERVING

    def transports(placement, spec=spec):
        where = {s: p for p, names in placement.items() for s in names}
        return {c.name: transport_of(c, spec, where) for c in spec.channels}

    assert transports(single(spec)) == {"requests": "cross-thread", "front_in": "in-thread", "work": "in-thread",
                                        "done": "in-thread", "results": "cross-thread"}
    assert transports(TOY_SERVING) == {"requests": "cross-thread", "front_in": "cross-process",
                                       "work": "cross-process", "done": "cross-process",
                                       "results": "cross-thread"}
    threaded = toy_spec(sink_thread=True)
    assert transports(single(threaded), threaded)["done"] == "cross-thread"


@pytest.mark.parametrize("sink_thread", [False, True])
def test_single_process_stop_with_messages_in_flight_loses_none(sink_thread: bool) -> None:
    spec = toy_spec(loops=2, sink_thread=sink_thread)
    results, drained = run_and_stop(Pipeline(spec, single(spec)).start(), 500)
    assert drained
    assert_all_delivered(results, 500, loops=2)


def test_two_processes_stop_with_messages_in_flight_loses_none_and_leaves_no_orphan() -> None:
    pipe = Pipeline(toy_spec(loops=2), TOY_SERVING).start()
    child = pipe.children["engine"]
    assert child.is_alive() and child.daemon
    assert pipe.channels["work"].transport == "cross-process"
    results, drained = run_and_stop(pipe, 500)
    assert drained
    assert_all_delivered(results, 500, loops=2)
    assert not child.is_alive() and child.exitcode == 0
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)  # joined and reaped: no orphan, no zombie
    with pytest.raises(Exception):
        pipe.entry("requests").put(Item(key="late", value=0))  # entries are closed after stop


PARENT_SCRIPT = """
import sys, time
sys.path.insert(0, {repo!r})
from pipeline.launch import Pipeline
from tests.pipeline.toy_stages import TOY_SERVING, toy_spec
if __name__ == "__main__":
    pipe = Pipeline(toy_spec(), TOY_SERVING).start()
    print(pipe.children["engine"].pid, flush=True)
    time.sleep(60)
"""


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_child_process_dies_with_a_killed_parent(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(PARENT_SCRIPT.format(repo=str(REPO)))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    try:
        child_pid = int(parent.stdout.readline())
        assert _alive(child_pid)
        parent.send_signal(signal.SIGKILL)  # no atexit, no cleanup: only the kernel's death signal is left
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(child_pid), "the engine process outlived its parent"
    finally:
        parent.kill()


def test_a_dying_child_is_reported_through_on_failure() -> None:
    reports: list[str] = []
    pipe = Pipeline(toy_spec(), TOY_SERVING, on_failure=reports.append).start()
    pipe.children["engine"].kill()
    deadline = time.monotonic() + 10
    while not reports and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reports == [pipe.failure] and "process 'engine' exited with code -9" in reports[0]
    assert not pipe.stop(timeout=1.0)  # nothing can drain through a dead process: stop says so


def test_a_child_spawned_from_a_short_lived_thread_outlives_that_thread_and_slow_steps_drain() -> None:
    """The kernel's parent-death signal follows the spawning thread; the pipeline must not rely on it then.

    The engine's worker also sleeps 10 ms per message: stop() must wait for steps in progress.
    """
    holder: dict[str, Pipeline] = {}
    spec = toy_spec(sleep_s=0.01)
    starter = threading.Thread(target=lambda: holder.setdefault("pipe", Pipeline(spec, TOY_SERVING).start()))
    starter.start()
    starter.join(60)
    time.sleep(0.5)  # the starting thread is gone
    pipe = holder["pipe"]
    assert pipe.children["engine"].is_alive()
    results, drained = run_and_stop(pipe, 50)
    assert drained
    assert_all_delivered(results, 50, loops=2)
