"""Overlap scheduling: the step planned ahead gives the outputs of the synchronous loop.

With overlap on, the schedule stage plans step N+1 before step N's tokens
reach the host; those tokens reach step N+1 through ``-row`` placeholders
resolved on the device (``triton_kernels/future.py``). These tests run the
Engine with overlap on and off and require the same tokens, finish reasons
and a clean KV pool; they also check that the overlap runs did run ahead,
so a path that silently fell back to the synchronous loop fails.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest
import torch

from pipeline.engine import Engine
from tests.engine.common import ARCHITECTURES, assert_pool_clean, cpu_engine, tiny_checkpoints
from tests.engine.conftest import random_prompts
from tests.models.tiny import hf_greedy, load_hf
from triton_kernels import future

GREEDY = {"temperature": 0.0, "max_new_tokens": 10, "ignore_eos": True}


def _engine(path, overlap: bool, **kwargs) -> Engine:
    engine = cpu_engine(path, disable_overlap_schedule=not overlap, **kwargs)
    engine.ahead_batches = _count_future_batches(engine)
    return engine


def _count_future_batches(engine: Engine) -> list[int]:
    """Spy on the forward stage: how many batches fed tokens still in flight (a one-item list)."""
    forward = engine.stages["forward"]
    count = [0]
    run_batch = forward.run_batch

    def counting(batch):
        count[0] += batch.future_input
        return run_batch(batch)

    forward.run_batch = counting
    return count


def _results(engine: Engine, prompts, params) -> list[tuple]:
    out = engine.generate(input_ids=prompts, sampling_params=params if isinstance(params, list)
                          else [params] * len(prompts))
    return [(r["output_ids"], r["finish_reason"]["type"], r["meta_info"]["completion_tokens"]) for r in out]


def _assert_clean(engine: Engine, free_before: int) -> None:
    # The step planned ahead for a request that just finished may still be on its way back.
    assert_pool_clean(engine, free_before)
    assert not engine.schedule.in_flight
    assert all(r.pending_tokens == 0 for r in engine.schedule.running_reqs)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> Callable[[str], Path]:
    return tiny_checkpoints(tmp_path_factory, "overlap", 400, vocab_size=400)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "sync"])
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers_with_overlap_on_and_off(arch, overlap, checkpoints) -> None:
    path = checkpoints(arch)
    hf = load_hf(path)
    prompts = [[3 + (7 * i + 5 * j) % 300 for j in range(n)] for i, n in enumerate((5, 17, 9))]
    expected = [hf_greedy(hf, p, GREEDY["max_new_tokens"]) for p in prompts]
    with _engine(path, overlap) as engine:
        got = [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=[GREEDY] * 3)]
        assert got == expected
        assert (engine.ahead_batches[0] > 0) == overlap


def test_mixed_workload_same_with_overlap_on_and_off(tiny_llama) -> None:
    """Stops, lengths, seeds, penalties, min_new_tokens, logprobs and n > 1, all batched together."""
    prompts = random_prompts(12, seed=11, low=4, high=50)
    base = [{"temperature": 0.0, "max_new_tokens": 3 + i % 7} for i in range(12)]  # EOS may stop some
    base[1] = {"temperature": 0.8, "top_p": 0.9, "seed": 5, "max_new_tokens": 9}
    base[2] = {"temperature": 1.0, "top_k": 20, "seed": 6, "max_new_tokens": 12, "repetition_penalty": 1.3,
               "frequency_penalty": 0.5}
    base[3] = {"temperature": 0.0, "max_new_tokens": 8, "min_new_tokens": 6, "stop_token_ids": [5, 6, 7, 8]}
    base[4] = {"temperature": 0.0, "max_new_tokens": 6, "return_logprob": True, "top_logprobs_num": 2}
    base[5] = {"temperature": 0.7, "seed": 9, "max_new_tokens": 7, "n": 3}
    base[6] = {"temperature": 0.0, "max_new_tokens": 1}
    with _engine(tiny_llama, False) as engine:
        greedy = engine.generate(input_ids=prompts[3], sampling_params={"temperature": 0.0, "max_new_tokens": 8})
        base[3]["stop_token_ids"] = [greedy["output_ids"][6]]  # stops at 7 tokens (min_new_tokens 6)
        sync = _results(engine, prompts, base)
        sync_logprobs = engine.generate(input_ids=prompts[4], sampling_params=base[4])["meta_info"]
    with _engine(tiny_llama, True) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, base) == sync
        ahead = engine.generate(input_ids=prompts[4], sampling_params=base[4])["meta_info"]
        assert [t for _, t in ahead["output_token_logprobs"]] == [t for _, t in sync_logprobs["output_token_logprobs"]]
        assert ([lp for lp, _ in ahead["output_token_logprobs"]]
                == pytest.approx([lp for lp, _ in sync_logprobs["output_token_logprobs"]]))
        assert engine.ahead_batches[0] > 0
        _assert_clean(engine, free_before)
    assert any(r[1] == "stop" for r in sync) and any(r[1] == "length" for r in sync)


def test_stop_token_in_flight_emits_nothing_extra(tiny_llama) -> None:
    """A request that stops at step N while step N+1 ran for it ends exactly where it would have."""
    prompt = random_prompts(1, seed=12)[0]
    with _engine(tiny_llama, True) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        full = engine.generate(input_ids=prompt, sampling_params=GREEDY)["output_ids"]
        for k in (1, 4, 8):
            stopped = engine.generate(input_ids=prompt, sampling_params={**GREEDY, "stop_token_ids": [full[k]]})
            first = full.index(full[k])
            assert stopped["output_ids"] == full[:first + 1]
            assert stopped["meta_info"]["completion_tokens"] == first + 1
            assert stopped["finish_reason"] == {"type": "stop", "matched": full[k]}
        assert engine.ahead_batches[0] > 0
        _assert_clean(engine, free_before)


@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_and_small_pool_with_overlap(tiny_llama, page_size) -> None:
    prompts = random_prompts(8, seed=13, low=10, high=40)
    params = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
    with _engine(tiny_llama, False, page_size=page_size) as engine:
        alone = _results(engine, prompts, params)
    with _engine(tiny_llama, True, max_total_tokens=160, chunked_prefill_size=32, page_size=page_size) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, params) == alone
        assert engine.schedule.num_retractions > 0
        assert engine.ahead_batches[0] > 0
        _assert_clean(engine, free_before)


def test_abort_while_two_batches_in_flight(tiny_llama) -> None:
    prompt = random_prompts(1, seed=14)[0]
    with _engine(tiny_llama, True) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        rid = engine.submit(input_ids=prompt, sampling_params={**GREEDY, "max_new_tokens": 400}, stream=True)
        chunks = []
        for chunk in engine.stream(rid):
            chunks.append(chunk)
            if len(chunks) == 5:
                engine.abort(rid)
        assert chunks[-1].finish_reason.type == "abort"
        total = sum(len(c.token_ids_delta) for c in chunks)
        assert total == chunks[-1].completion_tokens < 400
        after = engine.generate(input_ids=prompt, sampling_params=GREEDY)  # the engine still serves
        assert len(after["output_ids"]) == GREEDY["max_new_tokens"]
        _assert_clean(engine, free_before)


def test_constrained_rows_run_synchronously_and_stay_exact(tiny_llama) -> None:
    prompt = random_prompts(1, seed=15)[0]
    params = {"temperature": 0.0, "max_new_tokens": 12, "regex": "(ab|cd)+e"}
    with _engine(tiny_llama, False) as engine:
        sync = engine.generate(input_ids=prompt, sampling_params=params)
    with _engine(tiny_llama, True) as engine:
        ahead = engine.generate(input_ids=prompt, sampling_params=params)
        assert ahead["output_ids"] == sync["output_ids"]
        assert ahead["text"] == sync["text"]
        assert engine.ahead_batches[0] == 0  # the only request is constrained: never ahead


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_future_token_kernels(backend) -> None:
    store = future.store_future_tokens if backend == "triton" else future.store_future_tokens_reference
    resolve = future.resolve_future_tokens if backend == "triton" else future.resolve_future_tokens_reference
    buffer = torch.zeros(10, dtype=torch.int64)
    store(buffer, torch.tensor([3, 1, 7], dtype=torch.int64), torch.tensor([42, 7, 1000], dtype=torch.int32))
    assert buffer.tolist() == [0, 7, 0, 42, 0, 0, 0, 1000, 0, 0]
    ids = torch.tensor([5, -3, 0, -7, -1, 99], dtype=torch.int64)
    resolve(ids, buffer)
    assert ids.tolist() == [5, 42, 0, 1000, 7, 99]
    if backend == "triton":
        with pytest.raises(ValueError):
            resolve(ids.to(torch.int32), buffer)


def _spy_ahead_after_prefill(engine: Engine) -> list[int]:
    """Count batches planned ahead while a batch with a prefill row was in flight."""
    schedule = engine.schedule
    count = [0]
    plan = schedule._plan

    def spying(ahead: bool = False):
        after_prefill = ahead and any(row.is_prefill for row in schedule.in_flight[0][1])
        batch = plan(ahead)
        count[0] += after_prefill and batch is not None
        return batch

    schedule._plan = spying
    return count


@pytest.mark.parametrize("mixed", [True, False], ids=["mixed", "prefill-or-decode"])
def test_mixed_chunk_on_and_off_same_outputs_with_overlap_on_and_off(tiny_llama, mixed) -> None:
    """Chunked prompts (chunk 16) beside running decodes: every configuration gives the same tokens,
    and with overlap on the step after a prefill chunk is planned ahead."""
    prompts = random_prompts(6, seed=21, low=20, high=70)
    params = [{"temperature": 0.0, "max_new_tokens": 6 + 3 * i, "ignore_eos": True} for i in range(6)]
    with _engine(tiny_llama, False, chunked_prefill_size=16, enable_mixed_chunk=False) as engine:
        reference = _results(engine, prompts, params)
    with _engine(tiny_llama, True, chunked_prefill_size=16, enable_mixed_chunk=mixed) as engine:
        after_prefill = _spy_ahead_after_prefill(engine)
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, params) == reference
        staggered = []  # a long prompt arriving while another request decodes: chunks run ahead too
        rid = engine.submit(input_ids=prompts[0], sampling_params=params[5], stream=True)
        for i, chunk in enumerate(engine.stream(rid)):
            if i == 1:
                staggered = engine.generate(input_ids=prompts[3], sampling_params=params[3])["output_ids"]
        assert staggered == reference[3][0]
        assert after_prefill[0] > 0
        _assert_clean(engine, free_before)
    with _engine(tiny_llama, False, chunked_prefill_size=16, enable_mixed_chunk=True) as engine:
        assert _results(engine, prompts, params) == reference


def test_max_running_requests_from_kv_capacity_and_the_flag_overrides(tiny_llama, caplog) -> None:
    from pipeline.config import running_requests_limit

    assert running_requests_limit(0, 442_000, 131_072) == 2048        # Llama-3.1-8B on an H100: the floor
    assert running_requests_limit(0, 1_000_000, 32_768) == 4096       # kv/context*512 = 15625: the ceiling
    assert running_requests_limit(0, 400_000, 65_536) == 3125         # in between
    assert running_requests_limit(0, 3000, 512) == 1500               # a small pool: half its tokens
    assert running_requests_limit(300, 442_000, 131_072) == 300       # the flag wins
    assert running_requests_limit(10_000, 1000, 512) == 500           # but never past half the tokens
    with caplog.at_level("INFO", logger="stages.forward.runner"):
        with _engine(tiny_llama, True, max_total_tokens=3000) as engine:
            assert engine.schedule.max_running == 1500 == engine.stages["forward"].runner.num_rows - 1
    assert any("max_running_requests=1500 (from the KV capacity" in r.getMessage() for r in caplog.records)
    with _engine(tiny_llama, True, max_total_tokens=3000, max_running_requests=2) as engine:
        widest = [0]
        run_batch = engine.stages["forward"].run_batch

        def widest_batch(batch):
            widest[0] = max(widest[0], len(batch.rids))
            return run_batch(batch)

        engine.stages["forward"].run_batch = widest_batch
        _results(engine, random_prompts(5, seed=22, low=4, high=20), GREEDY)
        assert engine.schedule.max_running == 2 and widest[0] == 2
