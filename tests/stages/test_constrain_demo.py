"""100 structured generations from the demo model through the whole Engine (CPU).

Every schema here describes a finite language (bounded strings, integers,
enums and arrays), and ``max_new_tokens`` exceeds the longest sentence of each,
so a correct constrain stage must end every generation with a stop, whatever
the model prefers; each output must then parse and validate.
"""
from __future__ import annotations

import json

import jsonschema

from pipeline.engine import Engine
from tests.stages.test_constrain import SCHEMAS as MASK_TEST_SCHEMAS

# The bounded schemas of the mask-level tests (nested object, array of ints, array of
# objects), plus two with enums next to bounded strings and integers.
SCHEMAS = [
    MASK_TEST_SCHEMAS[0], MASK_TEST_SCHEMAS[1], MASK_TEST_SCHEMAS[3],
    {"type": "object", "properties": {
        "act": {"type": "integer", "minimum": 1, "maximum": 5},
        "scene": {"type": "integer", "minimum": 1, "maximum": 9},
        "speaker": {"enum": ["ROMEO", "JULIET", "NURSE"]}},
     "required": ["act", "speaker"]},
    {"type": "object", "properties": {
        "line": {"type": "string", "maxLength": 20},
        "mood": {"enum": ["merry", "sad"]}},
     "required": ["line", "mood"]},
]
PROMPTS = ["ROMEO:\n", "JULIET:\n", "First Citizen:\n", "To be, or not", "My lord, "]
PER_SCHEMA = 20


def test_one_hundred_demo_model_generations_validate() -> None:
    requests = []
    for s, schema in enumerate(SCHEMAS):
        for i in range(PER_SCHEMA):
            params = {"max_new_tokens": 300, "json_schema": json.dumps(schema), "seed": 1000 * s + i,
                      "temperature": 0.0 if i == 0 else 1.0}
            requests.append((schema, PROMPTS[i % len(PROMPTS)], params))
    with Engine(max_total_tokens=65536, max_running_requests=128, kernel_backend="reference",
                device="cpu") as engine:
        results = engine.generate([prompt for _, prompt, _ in requests],
                                  [params for _, _, params in requests])
    assert len(results) == len(SCHEMAS) * PER_SCHEMA == 100
    distinct = set()
    for (schema, _, _), result in zip(requests, results):
        assert result["finish_reason"]["type"] == "stop", result
        value = json.loads(result["text"])
        jsonschema.validate(value, schema)
        distinct.add(result["text"])
    assert len(distinct) > 50  # sampled outputs really vary: the grammar is not forcing one answer
