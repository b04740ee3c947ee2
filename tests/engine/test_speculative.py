"""Speculative decoding (NGRAM) through the Engine: the same tokens as without it.

Prompts repeat a short pattern, so the n-gram drafter finds matches and the
tiny random models accept some drafts; every test that needs drafts to be
verified checks that they were (``total_verify_ct`` / ``total_accepted``),
so a path that silently stopped speculating fails.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import pytest

from pipeline.config import ConfigError
from pipeline.engine import Engine
from tests.engine.common import ARCHITECTURES, assert_pool_clean, cpu_engine, tiny_checkpoints

GREEDY = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}


def _prompts(count: int, period: int = 6) -> list[list[int]]:
    """Prompts that repeat a pattern (n-gram matches from the first step)."""
    return [[3 + (11 * i + 7 * (j % period)) % 300 for j in range(8 + 5 * i)] for i in range(count)]


def _engine(path, spec: bool, **kwargs) -> Engine:
    if spec:
        kwargs.setdefault("speculative_algorithm", "NGRAM")
        kwargs.setdefault("speculative_num_draft_tokens", 5)
    return cpu_engine(path, **kwargs)


def _results(engine: Engine, prompts, params) -> list[tuple]:
    out = engine.generate(input_ids=prompts, sampling_params=params if isinstance(params, list)
                          else [params] * len(prompts))
    return [(r["output_ids"], r["finish_reason"]["type"], r["meta_info"]["completion_tokens"], r["text"])
            for r in out]


def _assert_clean(engine: Engine, free_before: int) -> None:
    assert_pool_clean(engine, free_before)
    assert not engine.schedule.spec.states  # per-request drafting state is dropped at the end


def _accepted(engine: Engine) -> int:
    return engine.schedule.spec.total_accepted


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Callable[[str], Path]:
    return tiny_checkpoints(tmp_path_factory, "spec", 400, vocab_size=400)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_greedy_without_speculation(arch, checkpoints) -> None:
    path = checkpoints(arch)
    prompts = _prompts(4)
    with _engine(path, False) as engine:
        expected = _results(engine, prompts, GREEDY)
    with _engine(path, True) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, GREEDY) == expected
        assert _accepted(engine) > 0
        _assert_clean(engine, free_before)


def test_meta_info_counts_verify_steps(checkpoints) -> None:
    with _engine(checkpoints("llama3.1"), True) as engine:
        out = engine.generate(input_ids=_prompts(1)[0], sampling_params=GREEDY)
        meta = out["meta_info"]
        assert meta["spec_verify_ct"] >= 1
        assert 0 <= meta["spec_accepted_tokens"] <= meta["completion_tokens"] - 1
        # every verify step emits its accepted drafts plus one token; the first token comes from prefill
        assert meta["spec_verify_ct"] + meta["spec_accepted_tokens"] <= meta["completion_tokens"] - 1


def test_seeded_sampling_emits_the_same_tokens(checkpoints) -> None:
    """Each position is drawn with the seed and step the plain sampler uses for it."""
    path = checkpoints("qwen3")
    prompts = _prompts(4)
    params = [{"temperature": 0.7, "top_k": 20, "top_p": 0.9, "min_p": 0.02, "seed": 100 + i,
               "max_new_tokens": 20, "ignore_eos": True} for i in range(4)]
    with _engine(path, False) as engine:
        expected = _results(engine, prompts, params)
    with _engine(path, True) as engine:
        assert _results(engine, prompts, params) == expected
        assert engine.schedule.spec.total_verify_ct > 0


def test_sampling_distribution_matches_without_speculation(checkpoints) -> None:
    """Unseeded-style check: different seed sets with and without speculation give the same token
    distribution at a drafted position (two-sample chi-square over the 5 most frequent tokens
    and the rest, rejected only at p < 0.001: critical value 20.5 for 5 degrees of freedom)."""
    path = checkpoints("llama3.1")
    prompt = _prompts(1, period=4)[0]
    num, position = 160, 5

    def histogram(spec: bool, seed_base: int) -> dict[int, int]:
        params = [{"temperature": 0.3, "seed": seed_base + i, "max_new_tokens": position + 1, "ignore_eos": True}
                  for i in range(num)]
        with _engine(path, spec) as engine:
            out = engine.generate(input_ids=[prompt] * num, sampling_params=params)
            if spec:
                assert engine.schedule.spec.total_accepted > 0
        counts: dict[int, int] = {}
        for r in out:
            counts[r["output_ids"][position]] = counts.get(r["output_ids"][position], 0) + 1
        return counts

    plain, spec = histogram(False, 10_000), histogram(True, 50_000)
    assert len(plain) >= 3 and max(plain.values()) < 0.9 * num  # a real distribution, not one token
    top = sorted(plain, key=plain.get, reverse=True)[:5]
    bins_a = [plain.get(t, 0) for t in top] + [num - sum(plain.get(t, 0) for t in top)]
    bins_b = [spec.get(t, 0) for t in top] + [num - sum(spec.get(t, 0) for t in top)]
    chi2 = sum((a - b) ** 2 / (a + b) for a, b in zip(bins_a, bins_b) if a + b)
    assert chi2 < 20.5, (bins_a, bins_b)
    assert not math.isnan(chi2)


def test_stops_and_lengths_cut_inside_an_accepted_run(checkpoints) -> None:
    path = checkpoints("llama3.1")
    prompt = _prompts(1, period=4)[0]
    with _engine(path, False) as engine:
        full = engine.generate(input_ids=prompt, sampling_params=GREEDY)
        cases = [{**GREEDY, "stop_token_ids": [full["output_ids"][k]]} for k in (2, 7, 13)]
        cases += [{**GREEDY, "max_new_tokens": k} for k in (1, 2, 5, 11)]
        cases += [{**GREEDY, "stop": [full["text"][k:k + 3]]} for k in (4, 20) if full["text"][k:k + 3].strip()]
        expected = _results(engine, [prompt] * len(cases), cases)
    with _engine(path, True) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        got = [_results(engine, [prompt], case)[0] for case in cases]  # one at a time: runs are long
        assert got == expected
        assert _accepted(engine) > 0
        _assert_clean(engine, free_before)


def test_grammar_penalty_and_logprob_rows_beside_drafting_rows(checkpoints) -> None:
    """Rows that may not draft (regex, penalties, logprobs, min_new_tokens) share batches with
    drafting rows and come out as without speculation."""
    path = checkpoints("qwen3")
    prompts = _prompts(6)
    params = [dict(GREEDY) for _ in range(6)]
    params[1] = {"temperature": 0.0, "max_new_tokens": 12, "regex": "(ab|cd)+e"}
    params[2] = {"temperature": 1.0, "seed": 3, "max_new_tokens": 16, "repetition_penalty": 1.3,
                 "frequency_penalty": 0.4}
    params[3] = {"temperature": 0.0, "max_new_tokens": 10, "return_logprob": True, "top_logprobs_num": 2}
    params[4] = {"temperature": 0.0, "max_new_tokens": 14, "min_new_tokens": 6}
    with _engine(path, False) as engine:
        expected = _results(engine, prompts, params)
    with _engine(path, True) as engine:
        out = engine.generate(input_ids=prompts, sampling_params=params)
        assert [(r["output_ids"], r["finish_reason"]["type"], r["meta_info"]["completion_tokens"], r["text"])
                for r in out] == expected
        assert "spec_verify_ct" not in out[1]["meta_info"]  # the grammar row never drafted
        assert "spec_verify_ct" not in out[3]["meta_info"]
        assert _accepted(engine) > 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_small_pool_and_radix_cache(checkpoints, page_size) -> None:
    path = checkpoints("llama3.1")
    prompts = _prompts(8)
    params = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}
    with _engine(path, False, page_size=page_size) as engine:
        alone = _results(engine, prompts, params)
    with _engine(path, True, max_total_tokens=200, chunked_prefill_size=32, page_size=page_size) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, params) == alone
        assert engine.schedule.num_retractions > 0
        assert _accepted(engine) > 0
        again = engine.generate(input_ids=prompts[0], sampling_params=params)  # a radix cache hit
        assert again["output_ids"] == alone[0][0] and again["meta_info"]["cached_tokens"] > 0
        _assert_clean(engine, free_before)


def test_unserved_speculative_options_are_refused(checkpoints) -> None:
    path = checkpoints("llama3.1")
    for options in ({"speculative_algorithm": "EAGLE"}, {"speculative_algorithm": "EAGLE3"},
                    {"speculative_algorithm": "NGRAM", "speculative_eagle_topk": 4, "kv_cache_dtype": "fp8_e4m3"},
                    {"speculative_algorithm": "NGRAM", "speculative_num_draft_tokens": 1}):
        with pytest.raises(ConfigError, match="speculative"):
            _engine(path, False, **options)


def _branching_prompts(count: int) -> list[list[int]]:
    """A repeated pattern whose last token alternates, so one suffix has two continuations."""
    return [[3 + (11 * i + 7 * (j % 6) + 50 * ((j // 6) % 2) * (j % 6 == 5)) % 300 for j in range(30 + 5 * i)]
            for i in range(count)]


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-paths"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_ngram_trees_greedy_equal_greedy_without_speculation(arch, graphs, checkpoints) -> None:
    """--speculative-eagle-topk 2 and 4 with NGRAM: each row drafts a tree of the most frequent
    continuations (stages/speculative/ngram.py), verified in one target forward under its tree
    mask (eager, and the verify graphs' paths run eagerly); batched greedy output equals the
    plain engine's, some batches carry real trees, and the pool is clean after."""
    path = checkpoints(arch)
    prompts = _branching_prompts(4)
    with _engine(path, False) as engine:
        expected = _results(engine, prompts, GREEDY)
    for topk in (2, 4):
        with _engine(path, True, speculative_eagle_topk=topk, speculative_num_draft_tokens=6,
                     cuda_graph_max_bs=4) as engine:
            runner = engine.stages["forward"].runner
            if graphs:
                runner.use_graphs(eager=True)
            run_batch, trees = runner.run_batch, [0]

            def counting(batch):
                trees[0] += sum(1 for p in batch.sampling.draft_parents if p)
                return run_batch(batch)

            runner.run_batch = counting
            free_before = engine.schedule.kv.pool.num_free_tokens
            assert _results(engine, prompts, GREEDY) == expected, topk
            assert trees[0] > 0 and _accepted(engine) > 0, (topk, trees[0])
            _assert_clean(engine, free_before)
