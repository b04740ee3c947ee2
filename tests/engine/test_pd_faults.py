"""Faults under prefill/decode disaggregation, with the engines in their own processes (gloo on CPU).

* A KV transfer that times out ends its request with an abort naming the
  timeout; both pools go back to idle and the engines keep serving.
* A client abort at any point of a request's way (prefill, handoff queue,
  transfer, decode) ends it with finish reason abort; both pools go back
  to idle and the engines keep serving with unchanged output. (That the
  final output comes exactly once is checked stage by stage in
  tests/stages/test_schedule_disagg.py.)
* An engine killed under load while its role has another engine
  (1 prefill + 2 decode, 2 prefill + 1 decode): every request ends with a
  result or a clear error naming the dead engine, the survivors' pools go
  back to idle, and new requests are served by the survivors (output equal
  to before). The last engine of a role killed: every waiting request ends
  with an error instead of hanging, and new ones are refused.

"Idle" is read from each engine's EngineStats (radix cache off, so a pool
with nothing running holds no tokens).
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from pipeline.engine import Engine, GenerateError
from pipeline.messages import EngineStats
from tests.models.tiny import prompts, save_tiny
from tests.server.tiny_model import save_tiny_tokenizer

VOCAB = 1024
PD = {"pd_prefill": 1, "pd_decode": 1, "disable_radix_cache": True}
PROMPTS = prompts(VOCAB, [5, 11, 17], seed=3)
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    directory = save_tiny("llama3.1", tmp_path_factory.mktemp("llama"))
    save_tiny_tokenizer(directory, VOCAB)
    return directory


def idle_stats(engine: Engine, since_s: float, timeout_s: float = 20.0) -> dict[str, EngineStats]:
    """Each role's snapshot once it is taken after ``since_s`` and shows nothing held or in flight."""
    deadline = time.monotonic() + timeout_s
    stats: dict[str, EngineStats] = {}
    while time.monotonic() < deadline:
        stats = {s.role: s for s in engine.stats_by_engine.values() if s.time_s > since_s}
        if set(stats) == {"prefill", "decode"} and not any(
                s.pd_queue_reqs or s.pd_transfer_reqs or s.num_running_reqs or s.num_queue_reqs or s.token_usage
                for s in stats.values()):
            return stats
        time.sleep(0.1)
    raise AssertionError(f"the engines did not go back to idle: {stats}")


def test_transfer_timeout_ends_the_request_and_frees_both_pools(model_dir):
    with Engine(str(model_dir), device="cpu", disaggregation_transfer_timeout_s=1e-6, **PD) as engine:
        results = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        for result in results:  # the receive cannot end within a microsecond: it times out
            assert result["finish_reason"]["type"] == "abort"
            assert "timed out" in result["finish_reason"]["message"]
            assert result["output_ids"] == []
        one_token = engine.generate(input_ids=PROMPTS[0], sampling_params=dict(GREEDY, max_new_tokens=1))
        assert one_token["finish_reason"]["type"] == "length"  # finished on the prefill engine: no transfer
        stats = idle_stats(engine, time.time())
    assert stats["decode"].pd_transfer_failures == stats["decode"].pd_transfers == len(PROMPTS)
    assert stats["prefill"].pd_transfers == len(PROMPTS)  # each send ended one way or the other
    assert stats["decode"].pd_handoffs == 0 and stats["decode"].num_generated_tokens == 0


@pytest.mark.parametrize("chunked", [False, True])
def test_client_abort_anywhere_ends_once_and_frees_both_pools(model_dir, chunked):
    """``chunked``: prompts of many chunks, handed off early (their KV sent in segments while they
    prefill), so aborts also land between the segments and before the first output."""
    long = dict(GREEDY, max_new_tokens=400)
    batch = prompts(VOCAB, [200, 150, 90], seed=5) if chunked else PROMPTS
    flags = dict(PD, chunked_prefill_size=16) if chunked else PD
    with Engine(str(model_dir), device="cpu", **flags) as engine:
        before = engine.generate(input_ids=batch, sampling_params=GREEDY)
        for delay_s in (0.0, 0.002, 0.01, 0.03, 0.1, 0.3):
            rids = [engine.submit(input_ids=prompt, sampling_params=long) for prompt in batch]
            time.sleep(delay_s)
            for rid in rids:
                engine.abort(rid)
            for rid in rids:
                [result] = engine.wait(rid, timeout=60)
                assert result["finish_reason"]["type"] == "abort", (delay_s, result["finish_reason"])
                assert len(result["output_ids"]) < long["max_new_tokens"]
        idle_stats(engine, time.time())
        after = engine.generate(input_ids=batch, sampling_params=GREEDY)
    assert [r["output_ids"] for r in after] == [r["output_ids"] for r in before]


def live_idle_stats(engine: Engine, dead_rank: int, survivors: int, since_s: float,
                    timeout_s: float = 30.0) -> list[EngineStats]:
    """The ``survivors`` engines' snapshots once each is taken after ``since_s`` and shows nothing held
    (counted by the topology: an engine killed early may never have published one)."""
    deadline = time.monotonic() + timeout_s
    stats: list[EngineStats] = []
    while time.monotonic() < deadline:
        stats = [s for rank, s in engine.stats_by_engine.items() if rank != dead_rank and s.time_s > since_s]
        if len(stats) == survivors and not any(
                s.pd_queue_reqs or s.pd_transfer_reqs or s.num_running_reqs or s.num_queue_reqs or s.token_usage
                for s in stats):
            return stats
        time.sleep(0.1)
    raise AssertionError(f"the surviving engines did not go back to idle: {stats}")


@pytest.mark.parametrize("topology, process, rank, delay_s", [
    ((1, 2), "engine_decode0", 1, 1.0),  # killed while decoding
    ((1, 2), "engine_decode1", 2, 1.0),
    # killed just before the requests come: some are routed to it before the launcher notices (a tiny
    # prompt's prefill and transfer take milliseconds, so a later kill finds them all handed off)
    ((2, 1), "engine_prefill0", 0, -1.0),
])
def test_survivors_keep_serving_after_an_engine_dies(model_dir, topology, process, rank, delay_s):
    num_prefill, num_decode = topology
    flags = dict(PD, pd_prefill=num_prefill, pd_decode=num_decode, load_balance_method="round_robin")
    many = [p for _ in range(3) for p in PROMPTS]  # spread over every engine of both roles
    with Engine(str(model_dir), device="cpu", **flags) as engine:
        before = engine.generate(input_ids=many, sampling_params=GREEDY)
        if delay_s < 0:
            engine.pipeline.children[process].kill()
        rids = [engine.submit(input_ids=prompt, sampling_params=dict(GREEDY, max_new_tokens=300))
                for prompt in many]
        if delay_s >= 0:
            time.sleep(delay_s)
            engine.pipeline.children[process].kill()
        ended = {"result": 0, "error": 0}
        for rid in rids:
            try:
                [result] = engine.wait(rid, timeout=60)
            except GenerateError as error:
                assert f"engine {rank if 'prefill' in process else rank - num_prefill} died" in str(error)
                ended["error"] += 1
            else:
                assert result["finish_reason"]["type"] in ("length", "abort"), result["finish_reason"]
                ended["result"] += 1
        assert ended["error"] > 0, ended  # the dead engine had some of them
        assert engine.failure is None and engine.pipeline.lost == {process}
        after = engine.generate(input_ids=many, sampling_params=GREEDY)
        since_s = time.time()
        live_idle_stats(engine, rank, num_prefill + num_decode - 1, since_s)
        role = "prefill" if "prefill" in process else "decode"
        down = f"pd_down.{role}.{rank if role == 'prefill' else rank - num_prefill}"
        router = wait_for(lambda: engine.stage_counters.get("router", {}).get(down) and engine.stage_counters["router"])
    assert [r["output_ids"] for r in after] == [r["output_ids"] for r in before]
    assert router[f"pd_{role}_engines_up"] == (num_prefill if role == "prefill" else num_decode) - 1
    assert router[f"pd_{'decode' if role == 'prefill' else 'prefill'}_engines_up"] == (
        num_decode if role == "prefill" else num_prefill)


def wait_for(predicate, timeout_s: float = 10.0):
    """``predicate()``'s first truthy value (counters are published once a second)."""
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)
    return value


@pytest.mark.parametrize("process", ["engine_decode0", "engine_prefill0"])
def test_a_killed_engine_fails_its_requests_instead_of_hanging(model_dir, process):
    with Engine(str(model_dir), device="cpu", **PD) as engine:
        rids = [engine.submit(input_ids=prompt, sampling_params=dict(GREEDY, max_new_tokens=4000))
                for prompt in PROMPTS]
        first = next(engine.stream(rids[0], timeout=60))  # decoding on the decode engine by now
        assert first.token_ids_delta
        threading.Timer(0.1, engine.pipeline.children[process].kill).start()
        for rid in rids[1:]:
            with pytest.raises(GenerateError, match="engine failed"):
                engine.wait(rid, timeout=60)
        with pytest.raises(GenerateError):
            engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
