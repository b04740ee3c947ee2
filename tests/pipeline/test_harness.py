"""The harness: drive one stage, record a two-process run, replay a stage (same and changed)."""
from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from pipeline.harness import Recording, drive, replay, wiring
from pipeline.harness import main as harness_main
from pipeline.launch import Pipeline
from pipeline.placement import StageSpec, build_stage
from tests.pipeline.toy_stages import TOY, TOY_SERVING, AddAndHold, Item, toy_spec

REPO = Path(__file__).resolve().parents[2]
NUM_ITEMS = 30


def test_drive_feeds_steps_and_collects_per_outbox() -> None:
    stage = AddAndHold("worker", *wiring(Item, "out", "again"), amount=1, hold_steps=0, loops=1)
    driver = drive(stage, Item(key="a", value=0), Item(key="b", value=5, hops=1))
    first = driver.step()
    assert first == {"out": [Item(key="b", value=6, hops=1)], "again": [Item(key="a", value=1, hops=1)]}
    driver.feed(*first["again"])
    assert driver.run_until_idle()["out"] == [Item(key="a", value=2, hops=1)]
    assert driver.take("out") == [Item(key="b", value=6, hops=1), Item(key="a", value=2, hops=1)]
    assert driver.outputs["out"] == []


def test_drive_creates_channels_left_as_none() -> None:
    stage = build_stage(StageSpec("fwd", TOY + "Forward"), None, {"out": None})
    assert drive(stage, Item(key="a", value=1)).run_until_idle() == {"out": [Item(key="a", value=1)]}


@pytest.fixture(scope="module")
def recording(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A recorded two-process run of the toy pipeline (worker in the engine process)."""
    path = tmp_path_factory.mktemp("rec") / "run.rec"
    pipe = Pipeline(toy_spec(loops=1), TOY_SERVING, record_path=str(path)).start()
    results: list[Item] = []
    reader = threading.Thread(target=lambda: results.extend(pipe.exit("results")))
    reader.start()
    for i in range(NUM_ITEMS):
        pipe.entry("requests").put(Item(key=str(i), value=i))
    assert pipe.stop(timeout=30.0)
    reader.join(10)
    assert len(results) == NUM_ITEMS
    return path


def test_recording_holds_every_channel_and_how_to_build_each_stage(recording: Path) -> None:
    rec = Recording(str(recording))
    assert set(rec.channels) == {"requests", "front_in", "work", "done", "results"}
    assert rec.stages["worker"].process == "engine" and rec.stages["worker"].factory == TOY + "AddAndHold"
    per_channel = {}
    for traffic in rec.traffic:
        per_channel.setdefault((traffic.channel, traffic.direction), 0)
        per_channel[(traffic.channel, traffic.direction)] += 1
    # entries show up as what their consumer took, exits as what their producer emitted
    assert per_channel[("requests", "in")] == NUM_ITEMS
    assert per_channel[("results", "out")] == NUM_ITEMS
    assert per_channel[("work", "out")] == per_channel[("work", "in")] == 2 * NUM_ITEMS  # one loop each
    assert per_channel[("front_in", "out")] == 2 * NUM_ITEMS  # source's first pass + worker's loop


def test_replay_of_an_unchanged_stage_matches(recording: Path) -> None:
    assert replay(str(recording), "worker") is None
    assert replay(str(recording), "front") is None


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.harness", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120)


def test_replay_cli_exit_codes_and_first_difference(recording: Path, capsys: pytest.CaptureFixture) -> None:
    assert harness_main(["replay", str(recording), "--stage", "worker"]) == 0
    assert "matches" in capsys.readouterr().out
    assert harness_main(["replay", str(recording), "--stage", "nope"]) == 2
    assert "no stage 'nope'" in capsys.readouterr().err
    changed = run_cli("replay", str(recording), "--stage", "worker", "--factory", TOY + "BrokenAddAndHold")
    assert changed.returncode == 1, changed.stdout + changed.stderr
    # key "7" is the first item the bug touches; its first pass loops back through front_in
    assert "channel 'front_in' message 7 field $.value: recorded 17, replayed 18" in changed.stdout
