"""The Engine end to end on CPU (reference kernels): parity with transformers and invariance.

Each request's greedy output must not depend on what else runs with it, how
its prompt is chunked, whether its prefix came from the radix cache, or
whether it was retracted and resumed. After every run the KV pool and radix
cache must account for every slot.
"""
from __future__ import annotations

import pytest

from pipeline.engine import Engine, GenerateError
from pipeline.messages import SamplingParamsError
from tests.engine.conftest import hf_greedy, random_prompts

GREEDY = {"temperature": 0.0, "max_new_tokens": 12, "ignore_eos": True}


def _engine(path, **kwargs) -> Engine:
    kwargs.setdefault("max_total_tokens", 4096)
    kwargs.setdefault("kernel_backend", "reference")
    kwargs.setdefault("device", "cpu")
    return Engine(str(path), **kwargs)


def _run(engine: Engine, prompts: list[list[int]], params: dict = GREEDY) -> list[list[int]]:
    return [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=[params] * len(prompts))]


def _assert_no_leak(engine: Engine, free_before: int) -> None:
    engine.check_integrity()
    kv = engine.schedule.kv
    assert kv.pool.num_free_tokens + kv.tree.evictable_size == free_before
    assert kv.tree.protected_size == 0 and not kv.holders


@pytest.mark.parametrize("model", ["tiny_llama", "tiny_qwen3"])
def test_greedy_matches_transformers(model, request) -> None:
    path = request.getfixturevalue(model)
    prompts = random_prompts(6, seed=1)
    expected = hf_greedy(path, prompts, GREEDY["max_new_tokens"])
    with _engine(path) as engine:
        assert _run(engine, prompts) == expected
        results = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
        assert results["meta_info"]["prompt_tokens"] == len(prompts[0])
        assert results["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"]
        assert results["finish_reason"]["type"] == "length"


def test_output_invariant_to_batching_chunking_cache_and_retraction(tiny_llama) -> None:
    prompts = random_prompts(16, seed=2, low=5, high=60)
    with _engine(tiny_llama, disable_radix_cache=True) as engine:
        alone = [_run(engine, [p])[0] for p in prompts]
    with _engine(tiny_llama) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _run(engine, prompts) == alone  # batched with 15 others
        again = _run(engine, prompts)  # every prompt now a radix-cache hit
        assert again == alone
        hits = engine.generate(input_ids=prompts[3], sampling_params=GREEDY)["meta_info"]["cached_tokens"]
        assert hits >= len(prompts[3]) - 1
        engine.schedule.kv.flush()
        _assert_no_leak(engine, free_before)
    with _engine(tiny_llama, chunked_prefill_size=16) as engine:
        assert _run(engine, prompts) == alone
    with _engine(tiny_llama, page_size=16, chunked_prefill_size=16) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _run(engine, prompts) == alone
        assert _run(engine, prompts[:4]) == alone[:4]
        engine.schedule.kv.flush()
        _assert_no_leak(engine, free_before)
    with _engine(tiny_llama, max_total_tokens=160, chunked_prefill_size=32) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _run(engine, prompts[:8]) == alone[:8]
        assert engine.schedule.num_retractions > 0
        engine.schedule.kv.flush()
        _assert_no_leak(engine, free_before)


def test_shared_prefix_hits_cache_and_n_siblings_share(tiny_llama) -> None:
    system = random_prompts(1, seed=3, low=40, high=41)[0]
    with _engine(tiny_llama) as engine:
        first = engine.generate(input_ids=system + [5, 6], sampling_params=GREEDY)
        second = engine.generate(input_ids=system + [7, 8, 9], sampling_params=GREEDY)
        assert first["meta_info"]["cached_tokens"] <= 1
        assert second["meta_info"]["cached_tokens"] >= len(system)
        sampled = engine.generate(input_ids=system + [11], sampling_params={
            "n": 4, "temperature": 1.0, "seed": 7, "max_new_tokens": 6, "ignore_eos": True})
        assert len(sampled) == 4
        assert sum(r["meta_info"]["cached_tokens"] >= len(system) for r in sampled) >= 3
        assert engine.schedule.kv.tree.hit_rate > 0


def test_seeded_sampling_is_reproducible(tiny_llama) -> None:
    params = {"temperature": 0.9, "top_p": 0.9, "top_k": 50, "seed": 1234, "max_new_tokens": 10,
              "ignore_eos": True}
    prompts = random_prompts(3, seed=4)
    with _engine(tiny_llama) as engine:
        first = _run(engine, prompts, params)
        second = _run(engine, prompts[:1], params)
        assert second[0] == first[0]
        other = _run(engine, prompts[:1], {**params, "seed": 99})
        assert other[0] != first[0]


def test_finish_reasons_and_logprobs(tiny_llama) -> None:
    prompt = random_prompts(1, seed=5)[0]
    with _engine(tiny_llama) as engine:
        base = engine.generate(input_ids=prompt, sampling_params=GREEDY)
        stop_at = base["output_ids"][3]
        stopped = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "stop_token_ids": [stop_at]})
        assert stopped["finish_reason"] == {"type": "stop", "matched": stop_at}
        assert stopped["output_ids"] == base["output_ids"][: base["output_ids"].index(stop_at) + 1]
        late = engine.generate(input_ids=prompt, sampling_params={
            **GREEDY, "stop_token_ids": [stop_at], "min_new_tokens": 8})
        assert len(late["output_ids"]) >= 8
        assert stop_at not in late["output_ids"][:8]  # banned, not merely ignored, under the minimum
        logprobs = engine.generate(input_ids=prompt, sampling_params={
            **GREEDY, "return_logprob": True, "top_logprobs_num": 3})
        entries = logprobs["meta_info"]["output_token_logprobs"]
        assert [tid for _, tid in entries] == base["output_ids"]
        assert all(lp <= 0 for lp, _ in entries)
        tops = logprobs["meta_info"]["output_top_logprobs"]
        assert all(top[0][1] == tid and abs(top[0][0] - lp) < 1e-5 for top, (lp, tid) in zip(tops, entries))
        zero = engine.generate(input_ids=prompt, sampling_params={"max_new_tokens": 0})
        assert zero["output_ids"] == [] and zero["finish_reason"]["type"] == "length"


def test_bad_input_raises_typed_errors(tiny_llama) -> None:
    with _engine(tiny_llama) as engine:
        with pytest.raises(SamplingParamsError):
            engine.generate("hi", {"temperature": -1})
        with pytest.raises(SamplingParamsError):
            engine.generate("hi", {"no_such_param": 1})
        with pytest.raises(GenerateError):
            engine.generate(input_ids=[5] * 600, sampling_params={"max_new_tokens": 4})
        assert engine.generate("First Citizen", {"max_new_tokens": 2})["finish_reason"] is not None


def test_generate_subcommand(tiny_llama, capsys) -> None:
    from pipeline.cli import main

    argv = ["generate", "--model-path", str(tiny_llama), "--prompt", "First Citizen", "--max-new-tokens", "5",
            "--temperature", "0", "--max-total-tokens", "1024", "--json"]
    assert main(argv) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["meta_info"]["completion_tokens"] == len(result["output_ids"]) <= 5
    assert main(["generate", "--model-path", str(tiny_llama), "--prompt", "x", "--top-p", "0"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_stream_matches_generate_and_regex_constrains_output(tiny_llama) -> None:
    import re

    with _engine(tiny_llama) as engine:
        params = {"temperature": 0.0, "max_new_tokens": 10}
        whole = engine.generate("First Citizen: Before", params)
        chunks = list(engine.generate_stream("First Citizen: Before", params))
        assert "".join(c["text"] for c in chunks) == whole["text"]
        assert sum(len(c["output_ids"]) for c in chunks) == len(whole["output_ids"])
        assert chunks[-1]["finish_reason"] == whole["finish_reason"]
        constrained = engine.generate("All: Speak", {"regex": "(ab|ba){2}", "max_new_tokens": 12, "temperature": 0.8,
                                                     "seed": 5})
        assert re.fullmatch("(ab|ba){2}", constrained["text"]), constrained
        with pytest.raises(GenerateError):
            engine.generate("All: Speak", {"regex": "(", "max_new_tokens": 4})
        assert engine.generate("All", {"max_new_tokens": 2})["finish_reason"] is not None


def test_paged_retraction_keeps_outputs_and_frees_everything(tiny_llama) -> None:
    prompts = random_prompts(8, seed=12, low=5, high=50)
    params = {**GREEDY, "max_new_tokens": 30}
    with _engine(tiny_llama, disable_radix_cache=True) as engine:
        alone = [_run(engine, [p], params)[0] for p in prompts]
    with _engine(tiny_llama, page_size=16, max_total_tokens=160, chunked_prefill_size=32) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _run(engine, prompts, params) == alone
        assert engine.schedule.num_retractions > 0
        engine.schedule.kv.flush()
        _assert_no_leak(engine, free_before)


def test_shutdown_answers_requests_still_waiting(tiny_llama) -> None:
    engine = _engine(tiny_llama)
    rid = engine.submit(input_ids=[0, 5, 6], sampling_params={"max_new_tokens": 400, "ignore_eos": True})
    engine.shutdown(timeout_s=0.01)
    with pytest.raises(GenerateError):
        engine.wait(rid, timeout=10)
    with pytest.raises(GenerateError):
        engine.submit("again")
