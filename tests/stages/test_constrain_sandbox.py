"""Grammar compiles in the sandbox: same Index as in-process, and a runaway grammar is an error, not a crash."""
from __future__ import annotations

import json

import pytest

from stages.constrain.grammar import GrammarCompiler, GrammarError, build_index, grammar_regex
from stages.constrain.sandbox import CompileSandbox
from tests.stages.test_constrain import tiny_tokenizer, tiny_vocab  # noqa: F401 (fixtures)

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "age": {"type": "integer", "minimum": 1, "maximum": 99}},
          "required": ["name", "age"]}


@pytest.fixture
def sandbox(tiny_vocab):
    box = CompileSandbox(tiny_vocab.eos_token_id, tiny_vocab.token_bytes, timeout_s=5.0, memory_bytes=2 << 30)
    yield box
    box.close()


def test_sandboxed_index_equals_in_process_index(tiny_vocab, sandbox):
    regex = grammar_regex("json_schema", json.dumps(SCHEMA))
    assert build_index(regex, tiny_vocab, sandbox).get_transitions() == build_index(regex, tiny_vocab).get_transitions()


def test_compiler_reason_comes_back_from_the_child(tiny_vocab, sandbox):
    with pytest.raises(GrammarError, match="invalid regex"):
        build_index("([a-z]", tiny_vocab, sandbox)


def test_runaway_grammar_fails_and_the_next_compile_works(tiny_vocab):
    box = CompileSandbox(tiny_vocab.eos_token_id, tiny_vocab.token_bytes, timeout_s=3.0, memory_bytes=1 << 30)
    compiler = GrammarCompiler(tiny_vocab, max_workers=1, sandbox=box)
    try:
        with pytest.raises(GrammarError, match="grammar too complex"):
            compiler.compile("regex", "[\\s\\S]{0,100000}")
        assert compiler.compile("choices", json.dumps(["Romeo", "Juliet"])).index is not None
    finally:
        compiler.close()
