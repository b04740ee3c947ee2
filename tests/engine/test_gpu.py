"""The Engine on a GPU: Triton kernels, pinned uploads and CUDA-graph decode agree with transformers."""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine
from tests.engine.conftest import hf_greedy, random_prompts

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}


def _run(path, prompts, **kwargs) -> list[list[int]]:
    with Engine(str(path), device="cuda", dtype="float32", max_total_tokens=8192, **kwargs) as engine:
        free = engine.schedule.kv.pool.num_free_tokens
        outs = [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=[GREEDY] * len(prompts))]
        engine.schedule.kv.flush()
        engine.check_integrity()
        assert engine.schedule.kv.pool.num_free_tokens == free
        return outs


def test_gpu_engine_matches_transformers_with_and_without_cuda_graphs(tiny_llama) -> None:
    prompts = random_prompts(12, seed=11, low=3, high=90)
    expected = hf_greedy(tiny_llama, prompts, GREEDY["max_new_tokens"])
    graphs = _run(tiny_llama, prompts, cuda_graph_max_bs=8)
    eager = _run(tiny_llama, prompts, disable_cuda_graph=True)
    paged = _run(tiny_llama, prompts, page_size=16, chunked_prefill_size=32, cuda_graph_max_bs=16)
    matches = sum(a == b for a, b in zip(graphs, expected))
    assert graphs == eager == paged
    assert matches >= len(prompts) - 1, f"{matches}/{len(prompts)} prompts match transformers"
