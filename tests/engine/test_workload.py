"""A random 200-request workload: mixed lengths, sampling modes and aborts; nothing lost or leaked."""
from __future__ import annotations

import random
import time
from pathlib import Path

import pytest

from pipeline.config import DEMO_MODEL_PATH
from pipeline.engine import Engine
from tests.engine.conftest import random_prompts


def _demo_or_tiny(tiny_llama: Path) -> Path:
    demo = Path(DEMO_MODEL_PATH)
    has_weights = any(demo.glob("*.safetensors")) and (demo / "config.json").exists()
    return demo if has_weights else tiny_llama


def test_random_workload_with_aborts_accounts_for_every_request(tiny_llama) -> None:
    rng = random.Random(0)
    path = _demo_or_tiny(tiny_llama)
    with Engine(str(path), max_total_tokens=3000, chunked_prefill_size=64, max_running_requests=24,
                kernel_backend="reference", device="cpu") as engine:
        kv = engine.schedule.kv
        free_before = kv.pool.num_free_tokens
        prompts = random_prompts(200, seed=6, low=2, high=120)
        rids, aborted = [], set()
        for i, ids in enumerate(prompts):
            params = {"max_new_tokens": rng.randint(1, 24), "temperature": rng.choice([0.0, 0.7]),
                      "top_p": rng.choice([1.0, 0.8]), "seed": rng.randint(0, 1 << 30),
                      "n": 2 if i % 25 == 0 else 1}
            if i % 3 == 0:
                params["frequency_penalty"] = 0.5
            rids.append(engine.submit(input_ids=ids, sampling_params=params))
            if i % 7 == 3:
                engine.abort(rids[rng.randrange(len(rids))] if i % 2 else rids[-1])
                aborted.add(len(rids) - 1)
        time.sleep(0.05)
        for k in range(0, 200, 11):
            engine.abort(rids[k])
        finished = {}
        for rid in rids:
            results = engine.wait(rid, timeout=120)
            assert results and all(r["finish_reason"] is not None for r in results), rid
            finished[rid] = results
        assert len(finished) == 200
        reasons = {r["finish_reason"]["type"] for rs in finished.values() for r in rs}
        assert "abort" in reasons and "length" in reasons
        for rs in finished.values():
            for r in rs:
                if r["finish_reason"]["type"] == "length":
                    assert r["meta_info"]["completion_tokens"] == len(r["output_ids"])
        deadline = time.time() + 10
        while engine.schedule.has_work() and time.time() < deadline:
            time.sleep(0.01)
        kv.flush()
        engine.check_integrity()
        assert kv.pool.num_free_tokens == free_before
        assert not kv.holders and kv.tree.total_size == 0
