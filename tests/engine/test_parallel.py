"""Tensor and data parallelism on CPU (gloo): the same greedy tokens, replicas used, a dead rank noticed.

Every architecture family (dense Llama and Qwen3, Qwen2-MoE with a shared
expert, Qwen3-MoE) runs at ``--tp-size 2`` (and ``--ep-size 2`` for MoE)
through the Engine and through ``stagewise serve``, against ``--tp-size 1``
and transformers. ``--dp-size 2`` runs two engine replicas behind one
router.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable

import aiohttp
import pytest

from pipeline.engine import Engine, GenerateError
from tests.engine.common import tiny_checkpoints
from tests.models.tiny import hf_greedy, load_hf, prompts
from tests.server.conftest import running_server

ARCHITECTURES = ["llama3.1", "qwen3", "qwen2_moe", "qwen3_moe"]
MOE = {"qwen2_moe", "qwen3_moe"}
VOCAB = 1024
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    return tiny_checkpoints(tmp_path_factory, "parallel", VOCAB)


PROMPTS = prompts(VOCAB, [5, 11, 17], seed=3)


def engine_greedy(model_dir: Path, **flags) -> list[list[int]]:
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    with Engine(str(model_dir), device="cpu", **flags) as engine:
        results = engine.generate(input_ids=PROMPTS, sampling_params=[params] * len(PROMPTS))
    return [r["output_ids"] for r in results]


def transformers_greedy(model_dir: Path) -> list[list[int]]:
    model = load_hf(model_dir)
    return [hf_greedy(model, prompt, NEW_TOKENS) for prompt in PROMPTS]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tensor_parallel_engine_matches_one_rank_and_transformers(checkpoint, architecture):
    model_dir = checkpoint(architecture)
    expected = transformers_greedy(model_dir)
    assert engine_greedy(model_dir) == expected
    assert engine_greedy(model_dir, tp_size=2) == expected
    if architecture in MOE:
        assert engine_greedy(model_dir, tp_size=2, ep_size=2) == expected


async def _generate_all(url: str) -> list[list[int]]:
    async with aiohttp.ClientSession() as session:
        async def one(prompt: list[int]) -> list[int]:
            body = {"input_ids": prompt, "sampling_params": {"max_new_tokens": NEW_TOKENS, "temperature": 0,
                                                             "ignore_eos": True}}
            async with session.post(url + "/generate", json=body) as response:
                assert response.status == 200, await response.text()
                return (await response.json())["output_ids"]

        return list(await asyncio.gather(*(one(p) for p in PROMPTS)))


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_tensor_parallel_server_matches_transformers(checkpoint, architecture, tmp_path):
    model_dir = checkpoint(architecture)
    flags = ["--tp-size", "2", "--placement", "serving"]
    if architecture in MOE:
        flags += ["--ep-size", "2"]
    with running_server(model_dir, tmp_path / "server.log", *flags) as server:
        served = asyncio.run(_generate_all(server.url))
    assert served == transformers_greedy(model_dir)


def _stage_counters(engine: Engine, stage: str, timeout_s: float = 5.0) -> float:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        counters = engine.stage_counters.get(stage)
        if counters and counters["messages_in"] > 0:
            return counters["messages_in"]
        time.sleep(0.1)
    return 0.0


def test_data_parallel_engine_uses_both_replicas(checkpoint):
    model_dir = checkpoint("llama3.1")
    expected = transformers_greedy(model_dir)
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    with Engine(str(model_dir), device="cpu", dp_size=2, load_balance_method="round_robin") as engine:
        results = engine.generate(input_ids=PROMPTS * 2, sampling_params=[params] * (2 * len(PROMPTS)))
        assert [r["output_ids"] for r in results] == expected * 2
        assert _stage_counters(engine, "schedule@dp0") > 0 and _stage_counters(engine, "schedule@dp1") > 0


def _cached_tokens(model_dir: Path, method: str) -> list[int]:
    shared = prompts(VOCAB, [48], seed=7)[0]
    tails = prompts(VOCAB, [3, 4, 5, 6], seed=8)
    params = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
    with Engine(str(model_dir), device="cpu", dp_size=2, load_balance_method=method) as engine:
        return [engine.generate(input_ids=shared + tail, sampling_params=params)["meta_info"]["cached_tokens"]
                for tail in tails]


def test_cache_aware_routing_keeps_a_shared_prefix_on_one_replica(checkpoint):
    model_dir = checkpoint("llama3.1")
    cache_aware = _cached_tokens(model_dir, "cache_aware")
    assert cache_aware[0] == 0 and all(cached >= 48 for cached in cache_aware[1:]), cache_aware
    round_robin = _cached_tokens(model_dir, "round_robin")
    assert round_robin[1] == 0, round_robin  # the second request went to the other replica's empty cache


def test_data_parallel_server_reports_each_replica(checkpoint, tmp_path):
    model_dir = checkpoint("llama3.1")
    with running_server(model_dir, tmp_path / "server.log", "--dp-size", "2", "--load-balance-method",
                        "shortest_queue") as server:
        assert asyncio.run(_generate_all(server.url)) == transformers_greedy(model_dir)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            metrics = urllib.request.urlopen(server.url + "/metrics", timeout=5).read().decode()
            ranks = set(re.findall(r'dp_rank="(\d+)"', metrics))
            if ranks == {"0", "1"}:
                break
            time.sleep(0.3)
        assert ranks == {"0", "1"}
        info = json.loads(urllib.request.urlopen(server.url + "/get_server_info", timeout=5).read())
        assert [s["dp_rank"] for s in info["engine_stats_per_dp_rank"]] == [0, 1]


def _stream_events(url: str, prompt: list[int], max_new_tokens: int, after_events: int, then) -> list[bytes]:
    """A streamed /generate's data lines; ``then()`` runs once ``after_events`` lines have arrived."""
    async def stream() -> list[bytes]:
        body = {"input_ids": prompt, "stream": True,
                "sampling_params": {"max_new_tokens": max_new_tokens, "ignore_eos": True}}
        events: list[bytes] = []
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/generate", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data:"):
                        events.append(line.strip())
                        if len(events) == after_events:
                            then()
        return events

    return asyncio.run(asyncio.wait_for(stream(), 60))


def _child_pids(log_text: str) -> dict[str, int]:
    return {name: int(pid) for name, pid in re.findall(r"process (\S+) started \(pid (\d+)\)", log_text)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_killing_a_rank_ends_the_request_with_an_error_and_leaves_no_process(checkpoint, tmp_path):
    model_dir = checkpoint("llama3.1")
    with running_server(model_dir, tmp_path / "server.log", "--tp-size", "2") as server:
        children = _child_pids(server.log_text())
        assert "tp1" in children, server.log_text()

        killed_at: list[float] = []

        def kill_rank() -> None:
            os.kill(children["tp1"], signal.SIGKILL)
            killed_at.append(time.monotonic())

        events = _stream_events(server.url, PROMPTS[0], 4000, after_events=2, then=kill_rank)
        seconds_after_kill = time.monotonic() - killed_at[0]
        assert seconds_after_kill < 10
        assert any(b"error" in event for event in events[2:]), events[-3:]
        try:  # unhealthy until the server has stopped
            status = urllib.request.urlopen(server.url + "/health", timeout=5).status
        except urllib.error.HTTPError as error:
            status = error.code
        except OSError:
            status = None  # already stopped
        assert status in (503, None)
        assert server.process.wait(60) is not None  # the server notices the dead rank and stops
    for pid in children.values():
        deadline = time.monotonic() + 10
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(pid), f"process {pid} outlived the server"


def test_a_dead_rank_fails_engine_requests(checkpoint):
    model_dir = checkpoint("llama3.1")
    with Engine(str(model_dir), device="cpu", tp_size=2) as engine:
        engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 2})
        engine.pipeline.children["tp1"].kill()
        with pytest.raises(GenerateError):
            engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": 200, "ignore_eos": True})


def test_sigterm_drains_every_rank_and_replica(checkpoint, tmp_path):
    """--tp-size 2 --dp-size 2 under the serving placement: four engine processes; SIGTERM finishes the
    running request, exits 0, and leaves none of them."""
    model_dir = checkpoint("llama3.1")
    flags = ["--tp-size", "2", "--dp-size", "2", "--placement", "serving"]
    with running_server(model_dir, tmp_path / "server.log", *flags) as server:
        children = _child_pids(server.log_text())
        assert {"engine_dp0", "engine_dp1", "tp1_dp0", "tp1_dp1"} <= set(children), children

        events = _stream_events(server.url, PROMPTS[1], 24, after_events=1,
                                then=lambda: server.process.send_signal(signal.SIGTERM))
        assert events[-1] == b"data: [DONE]"
        assert json.loads(events[-2][5:])["meta_info"]["completion_tokens"] == 24
        assert server.process.wait(60) == 0
    for pid in children.values():
        assert not _alive(pid), f"process {pid} outlived the server"
