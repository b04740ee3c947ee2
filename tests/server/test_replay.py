"""Record a live run, replay each stage alone: ``stagewise replay`` reproduces what every stage emitted.

Two recordings, both with several concurrent requests, a constrained
request and an abort:

* ``stagewise serve --placement serving --record-path``: the front-end and
  the engine process append to one file; all eight stages replay.
* ``Engine(record_path=...)``, what ``stagewise generate --record-path``
  runs: the Engine plays the ingest stage itself, so the recording holds the
  seven other stages, and each replays. The ``generate`` command line is
  recorded and replayed too.
"""
from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from pathlib import Path

import aiohttp
import pytest

from pipeline.assembly import STAGES
from pipeline.harness import Recording, replay
from tests.server.conftest import REPO, running_server

ALL_STAGES = [spec.name for spec in STAGES]
ENGINE_STAGES = [name for name in ALL_STAGES if name != "ingest"]
PROMPTS = ["ROMEO:", "JULIET: O Romeo,", "First Citizen:", "To be, or not"]


async def _complete(session: aiohttp.ClientSession, url: str, body: dict) -> dict:
    async with session.post(url + "/v1/completions", json=body) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def _stream_then_leave(session: aiohttp.ClientSession, url: str) -> int:
    """Read one chunk of a long stream, then hang up: the server aborts the request."""
    body = {"model": "m", "prompt": "KING:", "max_tokens": 400, "stream": True, "ignore_eos": True}
    chunks = 0
    async with session.post(url + "/v1/completions", json=body) as response:
        async for line in response.content:
            if line.startswith(b"data:"):
                chunks += 1
                break
    return chunks


async def _workload(url: str) -> list:
    async with aiohttp.ClientSession() as session:
        plain = [_complete(session, url, {"model": "m", "prompt": p, "max_tokens": 6 + i, "temperature": 0.7,
                                          "seed": i, "ignore_eos": True}) for i, p in enumerate(PROMPTS)]
        constrained = _complete(session, url, {"model": "m", "prompt": "Yes or no?", "max_tokens": 8,
                                               "regex": "(yes|no)"})
        return await asyncio.gather(*plain, constrained, _stream_then_leave(session, url))


@pytest.fixture(scope="module")
def serve_recording(model_dir, tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("replay")
    path = logs / "serve.rec"
    with running_server(model_dir, logs / "serve.log", "--placement", "serving", "--record-path", str(path)) as server:
        results = asyncio.run(_workload(server.url))
        assert results[4]["choices"][0]["text"] in ("yes", "no")
        assert results[5] == 1
        assert server.stop() == 0
    return path


@pytest.fixture(scope="module")
def engine_recording(model_dir, tmp_path_factory) -> Path:
    from pipeline.engine import Engine

    path = tmp_path_factory.mktemp("replay") / "engine.rec"
    with Engine(str(model_dir), record_path=str(path)) as engine:
        rids = [engine.submit(p, {"max_new_tokens": 6 + i, "temperature": 0.7, "seed": i, "ignore_eos": True})
                for i, p in enumerate(PROMPTS)]
        constrained = engine.submit("Yes or no?", {"max_new_tokens": 8, "regex": "(yes|no)"})
        doomed = engine.submit("KING:", {"max_new_tokens": 400, "ignore_eos": True}, stream=True)
        first = next(iter(engine.stream(doomed)))  # leaving the stream early aborts the request
        assert first.finish_reason is None
        results = [engine.wait(rid) for rid in rids]
        assert engine.wait(constrained)[0]["text"] in ("yes", "no")
        assert [len(r[0]["output_ids"]) for r in results] == [6, 7, 8, 9]
    return path


def _traffic(recording: Recording, stage: str) -> tuple[int, int]:
    taken = sum(1 for t in recording.traffic if t.stage == stage and t.direction == "in")
    emitted = sum(1 for t in recording.traffic if t.stage == stage and t.direction == "out")
    return taken, emitted


def test_a_serve_recording_holds_all_eight_stages_with_traffic(serve_recording):
    recording = Recording(str(serve_recording))
    assert sorted(recording.stages) == sorted(ALL_STAGES)
    assert {recording.stages[name].process for name in ALL_STAGES} == {"main", "engine"}
    for name in ALL_STAGES:
        taken, emitted = _traffic(recording, name)
        assert taken > 0 and emitted > 0, name


@pytest.mark.parametrize("stage", ALL_STAGES)
def test_each_stage_of_a_serve_recording_replays(serve_recording, stage):
    assert replay(str(serve_recording), stage) is None


def test_an_engine_recording_holds_the_seven_engine_stages(engine_recording):
    recording = Recording(str(engine_recording))
    assert sorted(recording.stages) == sorted(ENGINE_STAGES)
    for name in ENGINE_STAGES:
        taken, emitted = _traffic(recording, name)
        assert taken > 0 and emitted > 0, name


@pytest.mark.parametrize("stage", ENGINE_STAGES)
def test_each_stage_of_an_engine_recording_replays(engine_recording, stage):
    assert replay(str(engine_recording), stage) is None


def test_a_replay_notices_a_changed_stage(engine_recording):
    """A schedule stage built with another --random-seed seeds the unseeded requests differently: caught."""
    difference = replay(str(engine_recording), "schedule", factory="tests.server.test_replay:reseeded_schedule")
    assert difference is not None and difference.channel == "forward" and "seed" in difference.field


def reseeded_schedule(context, inbox, outboxes):
    """The recorded schedule stage, but with --random-seed changed (a deliberate difference)."""
    import msgspec

    from pipeline.assembly import ProcessContext, build_schedule

    args = msgspec.structs.replace(context.args, random_seed=context.args.random_seed + 1)
    return build_schedule(ProcessContext(args, context.server_info, context.model_info, replay=True), inbox, outboxes)


def test_the_generate_command_records_and_each_stage_replays(model_dir, tmp_path):
    path = tmp_path / "generate.rec"
    command = [sys.executable, "-m", "pipeline.cli", "generate", "--model-path", str(model_dir), "--prompt", "ROMEO:",
               "--max-new-tokens", "5", "--temperature", "0", "--record-path", str(path), "--json"]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["output_ids"]) <= 5
    for stage in ENGINE_STAGES:
        replayed = subprocess.run([sys.executable, "-m", "pipeline.cli", "replay", str(path), "--stage", stage],
                                  cwd=REPO, capture_output=True, text=True, timeout=300)
        assert replayed.returncode == 0, (stage, replayed.stdout, replayed.stderr)
        assert "replay matches the recording" in replayed.stdout
