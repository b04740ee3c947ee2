"""Structured output through the whole Engine (CPU, reference kernels, tiny random Llama).

Constrained requests ride in the same batches as unconstrained ones; the
unconstrained ones must produce exactly the tokens they produce alone, and
each constrained output must match its grammar and end with a stop.
"""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from pipeline.engine import Engine, GenerateError
from tests.engine.conftest import random_prompts, tiny_llama  # noqa: F401 (fixture)

GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "role": {"enum": ["king", "fool"]}},
          "required": ["name", "age", "role"]}
REGEX = r"(ACT|SCENE) [IVX]{1,3}\."
CHOICES = ["Romeo", "Juliet", "Mercutio"]


def _engine(path) -> Engine:
    return Engine(str(path), max_total_tokens=4096, kernel_backend="reference", device="cpu")


def test_constrained_rows_leave_unconstrained_rows_unchanged(tiny_llama):
    prompts = random_prompts(4, seed=11)
    with _engine(tiny_llama) as engine:
        alone = [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=[GREEDY] * 4)]
    constrained = [{"temperature": 0.0, "max_new_tokens": 80, "json_schema": json.dumps(SCHEMA)},
                   {"temperature": 0.7, "seed": 3, "max_new_tokens": 80, "json_schema": json.dumps(SCHEMA)},
                   {"temperature": 0.0, "max_new_tokens": 40, "regex": REGEX},
                   {"temperature": 1.0, "seed": 5, "max_new_tokens": 40, "choices": CHOICES}]
    extra_prompts = random_prompts(len(constrained), seed=12)
    with _engine(tiny_llama) as engine:
        results = engine.generate(input_ids=prompts + extra_prompts,
                                  sampling_params=[GREEDY] * 4 + constrained)
    assert [r["output_ids"] for r in results[:4]] == alone
    for result in results[4:]:
        assert result["finish_reason"]["type"] == "stop", result
    jsonschema.validate(json.loads(results[4]["text"]), SCHEMA)
    jsonschema.validate(json.loads(results[5]["text"]), SCHEMA)
    assert re.fullmatch(REGEX, results[6]["text"]), results[6]["text"]
    assert results[7]["text"] in CHOICES


@pytest.mark.parametrize("params,reason", [
    ({"json_schema": '{"type": "nope"}'}, "Unsupported type: nope"),
    ({"regex": "([a-z]"}, "invalid regex"),
])
def test_bad_grammar_is_a_400_with_the_reason(tiny_llama, params, reason):
    with _engine(tiny_llama) as engine:
        with pytest.raises(GenerateError, match=re.escape(reason)) as error:
            engine.generate(input_ids=random_prompts(1, seed=1)[0], sampling_params={"max_new_tokens": 8, **params})
        assert error.value.status_code == 400
        ok = engine.generate(input_ids=random_prompts(1, seed=2)[0],
                             sampling_params={"max_new_tokens": 20, "choices": CHOICES, "temperature": 0.0})
        assert ok["text"] in CHOICES


def test_max_tokens_mid_structure_is_length(tiny_llama):
    """A grammar still open when max_new_tokens runs out ends with "length", output a valid prefix."""
    with _engine(tiny_llama) as engine:
        result = engine.generate(input_ids=random_prompts(1, seed=4)[0], sampling_params={
            "temperature": 0.0, "max_new_tokens": 3, "json_schema": json.dumps(SCHEMA)})
    assert result["finish_reason"]["type"] == "length"
    assert len(result["output_ids"]) == 3
    assert result["text"].lstrip().startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(result["text"])
