"""Prefill/decode disaggregation on CPU (gloo): one prefill and one decode engine in their own processes.

Greedy tokens equal the non-disaggregated engine's (and transformers'); the
request features that cross the handoff (n > 1, logprobs, stop strings, a
prompt of several prefill chunks) behave as without disaggregation; both KV
pools are back to idle afterwards.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import pytest

from pipeline.config import ConfigError, parse_args
from pipeline.engine import Engine
from pipeline.messages import EngineStats
from tests.engine.common import tiny_checkpoints
from tests.models.tiny import hf_greedy, load_hf, prompts

VOCAB = 1024
NEW_TOKENS = 6
PD = {"pd_prefill": 1, "pd_decode": 1}
PROMPTS = prompts(VOCAB, [5, 11, 17], seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Callable[[str], Path]:
    return tiny_checkpoints(tmp_path_factory, "pd", VOCAB)


def engine_run(model_dir: Path, prompts_: list[list[int]], params: dict | list[dict], **flags) -> list[dict]:
    params_list = params if isinstance(params, list) else [params] * len(prompts_)
    with Engine(str(model_dir), device="cpu", **flags) as engine:
        return engine.generate(input_ids=prompts_, sampling_params=params_list)


@pytest.mark.parametrize("architecture", ["llama3.1", "qwen3"])
def test_pd_greedy_equals_one_engine_and_transformers(checkpoint, architecture):
    model_dir = checkpoint(architecture)
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    expected = [hf_greedy(load_hf(model_dir), prompt, NEW_TOKENS) for prompt in PROMPTS]
    plain = [r["output_ids"] for r in engine_run(model_dir, PROMPTS, params)]
    disaggregated = [r["output_ids"] for r in engine_run(model_dir, PROMPTS, params, **PD)]
    assert plain == expected
    assert disaggregated == expected


@pytest.mark.parametrize("architecture", ["llama2", "llama_bias", "llama3.2", "mistral", "qwen2", "qwen3_tied",
                                          "qwen3_moe", "qwen2_moe"])
def test_pd_greedy_equals_transformers_on_every_architecture(checkpoint, architecture):
    model_dir = checkpoint(architecture)
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    expected = [hf_greedy(load_hf(model_dir), prompt, NEW_TOKENS) for prompt in PROMPTS]
    assert [r["output_ids"] for r in engine_run(model_dir, PROMPTS, params, **PD)] == expected


def test_pd_features_cross_the_handoff(checkpoint):
    """n > 1 with a seed, logprobs with top-k and prompt logprobs, a prompt of several chunks, a
    JSON-schema request (its grammar replayed on the decode engine): all as without disaggregation."""
    model_dir = checkpoint("llama3.1")
    long_prompt = prompts(VOCAB, [40], seed=9)[0]
    batch = [PROMPTS[0], PROMPTS[1], long_prompt, PROMPTS[2]]
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    params = [
        {"max_new_tokens": NEW_TOKENS, "temperature": 0.8, "seed": 5, "n": 2, "ignore_eos": True},
        {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_logprob": True,
         "top_logprobs_num": 2, "logprob_start_len": 0},
        {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True},
        {"max_new_tokens": 12, "temperature": 0, "json_schema": schema},
    ]
    plain = engine_run(model_dir, batch, params, chunked_prefill_size=16)
    disaggregated = engine_run(model_dir, batch, params, chunked_prefill_size=16, **PD)
    assert len(plain) == len(disaggregated) == 5  # n=2 gives two sequences
    for one, other in zip(plain, disaggregated):
        assert other["output_ids"] == one["output_ids"]
        assert other["text"] == one["text"]
        assert other["finish_reason"] == one["finish_reason"]
        assert other["meta_info"]["completion_tokens"] == one["meta_info"]["completion_tokens"]
    logprobs, expected = disaggregated[2]["meta_info"], plain[2]["meta_info"]
    assert [t for _, t in logprobs["output_token_logprobs"]] == [t for _, t in expected["output_token_logprobs"]]
    assert [lp for lp, _ in logprobs["output_token_logprobs"]] == pytest.approx(
        [lp for lp, _ in expected["output_token_logprobs"]], abs=1e-4)
    assert len(logprobs["output_top_logprobs"]) == NEW_TOKENS
    assert [t for _, t in logprobs["input_token_logprobs"]] == [t for _, t in expected["input_token_logprobs"]]


def test_pd_stop_string_ends_the_request(checkpoint):
    model_dir = checkpoint("llama3.1")
    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    text = engine_run(model_dir, [PROMPTS[1]], greedy)[0]["text"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert stop.strip(), f"no stop string to cut in {text!r}"
    params = dict(greedy, stop=[stop])
    plain = engine_run(model_dir, [PROMPTS[1]], params)[0]
    disaggregated = engine_run(model_dir, [PROMPTS[1]], params, **PD)[0]
    assert disaggregated["text"] == plain["text"] and len(plain["text"]) < len(text)
    assert disaggregated["finish_reason"] == plain["finish_reason"]


def _settled_stats(engine: Engine, since_s: float, timeout_s: float = 20.0) -> dict[str, EngineStats]:
    """Each role's first snapshot taken after ``since_s`` with nothing left in flight (engine 0: prefill, 1: decode)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = {s.role: s for s in engine.stats_by_engine.values() if s.time_s > since_s}
        if set(stats) == {"prefill", "decode"} and not any(
                s.pd_queue_reqs or s.pd_transfer_reqs or s.num_running_reqs for s in stats.values()):
            return stats
        time.sleep(0.1)
    raise TimeoutError(f"no settled snapshot from both roles: {engine.stats_by_engine}")


def test_pd_hands_off_every_request_and_reports_the_transfers(checkpoint):
    """Every request (a JSON-schema one included) is handed off: the prefill engine samples one token
    per request, the decode engine all the others; both count the same KV bytes moved."""
    model_dir = checkpoint("llama3.1")
    schema = '{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}'
    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    params = [greedy, greedy, {"max_new_tokens": 12, "temperature": 0, "json_schema": schema}]
    plain = engine_run(model_dir, PROMPTS, params)
    with Engine(str(model_dir), device="cpu", **PD) as engine:
        disaggregated = engine.generate(input_ids=PROMPTS, sampling_params=params)
        stats = _settled_stats(engine, time.time())
    assert [r["output_ids"] for r in disaggregated] == [r["output_ids"] for r in plain]
    assert disaggregated[2]["text"] == plain[2]["text"] and disaggregated[2]["text"].startswith("{")
    prefill, decode = stats["prefill"], stats["decode"]
    assert (prefill.dp_rank, decode.dp_rank) == (0, 1)
    completion = sum(r["meta_info"]["completion_tokens"] for r in disaggregated)
    assert prefill.pd_handoffs == decode.pd_handoffs == len(PROMPTS)
    assert prefill.num_generated_tokens == len(PROMPTS)  # the first token of each
    assert decode.num_generated_tokens == completion - len(PROMPTS)  # every token after the first
    assert prefill.pd_transfers == decode.pd_transfers == len(PROMPTS)
    assert prefill.pd_transfer_failures == decode.pd_transfer_failures == 0
    assert prefill.pd_transfer_bytes == decode.pd_transfer_bytes > 0
    assert prefill.pd_transfer_seconds > 0 and decode.pd_transfer_seconds > 0


def test_placement_pd_flags(checkpoint):
    """--placement pd starts 1 + 1 engines unless counted; a count implies it; a per-role command runs one engine."""
    base = ["--model-path", str(checkpoint("llama3.1")), "--device", "cpu"]
    args = parse_args(base + ["--placement", "pd"])
    assert (args.placement, args.pd_prefill, args.pd_decode) == ("pd", 1, 1)
    args = parse_args(base + ["--pd-decode", "2"])
    assert (args.placement, args.pd_prefill, args.pd_decode) == ("pd", 1, 2)
    for mode in ("prefill", "decode"):
        with pytest.raises(ConfigError, match=f"--disaggregation-mode {mode} runs one engine"):
            parse_args(base + ["--placement", "pd", "--disaggregation-mode", mode])
        args = parse_args(base + ["--disaggregation-mode", mode])  # one engine of a multi-host topology
        assert (args.disaggregation_mode, args.pd_prefill) == (mode, 0)
    with pytest.raises(ConfigError, match="not --placement serving"):
        parse_args(base + ["--placement", "serving", "--pd-prefill", "1"])


def test_pd_transports_shm_and_torch_give_equal_output_and_count_the_bytes(checkpoint):
    """The same-host shared-memory transport (the default) and torch.distributed (gloo) move the same
    bytes, name themselves in EngineStats, and give the non-disaggregated output."""
    model_dir = checkpoint("llama3.1")
    long_prompt = prompts(VOCAB, [40], seed=9)[0]
    batch = PROMPTS + [long_prompt]
    greedy = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True}
    plain = [r["output_ids"] for r in engine_run(model_dir, batch, greedy)]
    stats: dict[str, dict[str, EngineStats]] = {}
    for backend in ("auto", "torch"):
        with Engine(str(model_dir), device="cpu", disaggregation_transfer_backend=backend, chunked_prefill_size=16,
                    **PD) as engine:
            assert [r["output_ids"] for r in engine.generate(input_ids=batch, sampling_params=greedy)] == plain
            stats[backend] = _settled_stats(engine, time.time())
    assert {s.pd_transport for s in stats["auto"].values()} == {"shm"}
    assert {s.pd_transport for s in stats["torch"].values()} == {"gloo"}
    moved = {backend: {role: s.pd_transfer_bytes for role, s in by_role.items()} for backend, by_role in stats.items()}
    assert moved["auto"] == moved["torch"] and moved["auto"]["prefill"] == moved["auto"]["decode"] > 0


def test_pd_long_prompt_kv_moves_while_its_prefill_goes_on(checkpoint):
    """A prompt of many chunks is handed off after its first chunk; its KV goes in segments as the chunks
    are computed, so sends start before its prefill ends (the prefill engine counts the segments sent
    while their request was still prefilling); output, logprobs and bytes are as without overlap."""
    model_dir = checkpoint("llama3.1")
    long_prompts = prompts(VOCAB, [200, 130], seed=11)
    params = {"max_new_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True, "return_logprob": True,
              "logprob_start_len": 0}
    plain = engine_run(model_dir, long_prompts, params, chunked_prefill_size=16)
    with Engine(str(model_dir), device="cpu", chunked_prefill_size=16, **PD) as engine:
        disaggregated = engine.generate(input_ids=long_prompts, sampling_params=params)
        stats = _settled_stats(engine, time.time())
        deadline = time.monotonic() + 10
        while not engine.stage_counters.get("schedule@p0", {}).get("pd_segments_overlapped"):
            assert time.monotonic() < deadline, f"no segment overlapped a prefill: {engine.stage_counters}"
            time.sleep(0.1)
    for one, other in zip(plain, disaggregated):
        assert other["output_ids"] == one["output_ids"]
        assert [t for _, t in other["meta_info"]["input_token_logprobs"]] == [
            t for _, t in one["meta_info"]["input_token_logprobs"]]
        assert [lp for lp, _ in other["meta_info"]["output_token_logprobs"]] == pytest.approx(
            [lp for lp, _ in one["meta_info"]["output_token_logprobs"]], abs=1e-4)
    assert stats["prefill"].pd_transfers == stats["decode"].pd_transfers == len(long_prompts)
    assert stats["prefill"].pd_transfer_bytes == stats["decode"].pd_transfer_bytes > 0
