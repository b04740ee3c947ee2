"""Grammar compiles in the sandbox: same Index as in-process, and a runaway grammar is an error, not a crash."""
from __future__ import annotations

import json
import time
from concurrent.futures import CancelledError

import pytest

from stages.constrain.grammar import GrammarCompiler, GrammarError, build_index, grammar_regex
from stages.constrain.sandbox import CompileCancelled, CompileSandbox
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


def test_slow_compile_does_not_delay_another_and_abort_frees_its_worker(tiny_vocab):
    box = CompileSandbox(tiny_vocab.eos_token_id, tiny_vocab.token_bytes, timeout_s=60.0, memory_bytes=2 << 30,
                         num_workers=2)
    compiler = GrammarCompiler(tiny_vocab, max_workers=2, sandbox=box)
    try:
        slow = compiler.submit("regex", "[\\s\\S]{0,100000}")
        time.sleep(0.5)  # the slow one holds a worker
        start = time.monotonic()
        small = compiler.submit("json_schema", json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}}))
        assert small.result(timeout=20).index is not None
        assert time.monotonic() - start < 10 and not slow.done()
        busy_pids = [pid for pid in box.worker_pids() if pid is not None]
        compiler.release(slow)  # its only request was aborted
        with pytest.raises((CompileCancelled, CancelledError)):
            slow.result(timeout=5)
        assert len([pid for pid in box.worker_pids() if pid is not None]) == len(busy_pids) - 1
        # both workers serve again: two compiles side by side
        again = [compiler.submit("choices", json.dumps([f"x{i}", "y"])) for i in range(2)]
        assert all(f.result(timeout=20).index is not None for f in again)
    finally:
        compiler.close()


def test_release_keeps_a_compile_another_request_waits_for(tiny_vocab):
    box = CompileSandbox(tiny_vocab.eos_token_id, tiny_vocab.token_bytes, timeout_s=3.0, memory_bytes=1 << 30)
    compiler = GrammarCompiler(tiny_vocab, max_workers=2, sandbox=box)
    try:
        first = compiler.submit("regex", "[\\s\\S]{0,100000}")
        second = compiler.submit("regex", "[\\s\\S]{0,100000}")
        assert first is second
        compiler.release(first)  # one of two waiters left: the compile goes on (and hits the budget)
        with pytest.raises(GrammarError, match="grammar too complex"):
            second.result(timeout=20)
    finally:
        compiler.close()


def test_cache_is_bounded_in_bytes_and_clear_empties_it(tiny_vocab):
    bound = 600_000
    compiler = GrammarCompiler(tiny_vocab, max_workers=0, cache_bytes=bound)
    sizes = []
    for i in range(8):
        grammar = compiler.compile("regex", f"[a-z ]{{0,{300 + i}}}")
        sizes.append(grammar.num_bytes)
        assert compiler.num_bytes <= max(bound, grammar.num_bytes)
    assert min(sizes) > 0 and sum(sizes) > bound, sizes  # the workload really overflows the bound
    assert len(compiler._cache) < 8
    compiler.compile("regex", "[a-z ]{0,307}")  # the newest is cached
    assert compiler.num_compiles == 8
    compiler.clear()
    assert compiler.num_bytes == 0 and not compiler._cache and not compiler.mask_cache.rows
    compiler.compile("regex", "[a-z ]{0,307}")
    assert compiler.num_compiles == 9
