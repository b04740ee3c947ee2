"""Bounded JSON strings counted beside the automaton (stages/constrain/bounded.py).

The counted grammar must allow exactly what the exact bounded regex allows:
random walks run it in lockstep with an outlines Index of the exact regex and
compare the allowed tokens at every step, then validate the finished text
with ``jsonschema``. A schema the counting cannot handle exactly falls back to
the exact regex; a long maxLength compiles in well under the exact path's time.
"""
from __future__ import annotations

import json
import random
import time

import jsonschema
import numpy as np
import pytest
from outlines_core import Guide, Index

from stages.constrain.bounded import token_tables
from stages.constrain.grammar import GrammarCompiler, GrammarState, json_schema_regexes
from stages.constrain.sandbox import CompileSandbox
from stages.constrain.schema import STRING_CHAR, schema_regexes
from stages.constrain.vocab import TokenVocab, build_token_vocab
from tests.stages.test_constrain import distances_to_accept, train_tiny_tokenizer

COUNTED_SCHEMAS = [
    {"type": "string", "minLength": 2, "maxLength": 7},
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 4},
        "code": {"type": "string", "minLength": 3, "maxLength": 3},
        "note": {"type": "string", "minLength": 2},
        "n": {"type": "integer", "minimum": 0, "maximum": 9}},
     "required": ["name", "code"]},
    {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 3}, "maxItems": 3},
    {"type": "object", "properties": {
        "tag": {"type": ["string", "null"], "maxLength": 2},
        "inner": {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}, "t": {"type": "string"}},
                  "required": ["s", "t"]}},
     "required": ["inner"]},
]


@pytest.fixture(scope="module")
def vocab():
    return build_token_vocab(train_tiny_tokenizer())


@pytest.fixture(scope="module")
def compiler(vocab):
    return GrammarCompiler(vocab, max_workers=0)


def distances(index: Index) -> tuple[dict, dict]:
    """(transitions, fewest tokens to an accepting state) of an Index."""
    return index.get_transitions(), distances_to_accept(index)


def lockstep_walk(grammar, exact: Index, graph: tuple[dict, dict], vocab, rng: random.Random,
                  free_steps: int) -> bytes:
    """A random walk of the counted grammar, checking its allowed set against the exact Index at every step."""
    state, guide = GrammarState(grammar, vocab), Guide(exact)
    transitions, distance = graph
    id_bytes = {i: data for data, ids in vocab.token_bytes.items() for i in ids}
    output = b""
    for step in range(300):
        allowed = set(state.allowed_token_ids())
        expected = set(guide.get_tokens()) - {vocab.eos_token_id}
        if guide.is_finished():
            expected |= set(vocab.stop_token_ids)
        assert allowed == expected, f"step {step} after {output!r}: extra {sorted(allowed - expected)[:5]}, " \
                                    f"missing {sorted(expected - allowed)[:5]}"
        here = guide.get_state()
        choices = [t for t in allowed if t not in vocab.stop_token_ids]
        if guide.is_finished() and (step >= free_steps or rng.random() < 0.2 or not choices):
            state.advance(vocab.eos_token_id)
            assert state.finished
            return output
        if step >= free_steps:  # steer towards an accepting state
            choices = [t for t in choices if distance[transitions[here][t]] < distance[here]] or choices
        token = rng.choice(choices)
        state.advance(token)
        guide.advance(token, return_tokens=False)
        assert not state.broken
        output += id_bytes[token]
    raise AssertionError(f"no end after 300 steps: {output!r}")


@pytest.mark.parametrize("number", range(len(COUNTED_SCHEMAS)))
def test_counted_grammar_allows_exactly_what_the_bounded_regex_allows(compiler, vocab, number):
    schema = COUNTED_SCHEMAS[number]
    spec = json.dumps(schema)
    grammar = compiler.compile("json_schema", spec)
    assert grammar.bounded is not None, "this schema's strings should be counted"
    exact = Index(json_schema_regexes(spec).exact, vocab.outlines_vocabulary())
    graph = distances(exact)
    rng = random.Random(number)
    texts = set()
    for walk in range(12):
        text = lockstep_walk(grammar, exact, graph, vocab, rng, free_steps=walk * 3)
        jsonschema.validate(json.loads(text.decode("utf-8")), schema)
        texts.add(text)
    assert len(texts) > 3  # the walks really explore


def test_strings_reach_min_and_max_length(compiler, vocab):
    """Walks that write as many characters as allowed hit maxLength exactly and can close there."""
    schema = {"type": "array", "items": {"type": "string", "minLength": 2, "maxLength": 6}, "minItems": 3,
              "maxItems": 3}
    grammar = compiler.compile("json_schema", json.dumps(schema))
    rng = random.Random(7)
    lengths = set()
    id_bytes = {i: data for data, ids in vocab.token_bytes.items() for i in ids}
    for _ in range(10):
        state, output = GrammarState(grammar, vocab), b""
        while not state.accepting:
            allowed = [t for t in state.allowed_token_ids() if t not in vocab.stop_token_ids]
            inside = [t for t in allowed if b'"' not in id_bytes[t]]  # keep writing while we may
            token = rng.choice(inside or allowed)
            state.advance(token)
            output += id_bytes[token]
        value = json.loads(output)
        jsonschema.validate(value, schema)
        lengths.update(len(item) for item in value)
    assert lengths == {6}


def test_escapes_and_utf8_count_once(compiler, vocab):
    grammar = compiler.compile("json_schema", json.dumps({"type": "string", "maxLength": 3}))
    state = GrammarState(grammar, vocab)
    single = {data: ids[0] for data, ids in vocab.token_bytes.items() if len(data) == 1}
    for byte in b'"\\n\xc3\xab':  # opening quote, the escape \n, then ë as two bytes
        state.advance(single[bytes([byte])])
    assert not state.broken and state.string_len == 2
    state.advance(single[b"x"])
    assert state.string_len == 3
    assert single[b"y"] not in state.allowed_token_ids() and single[b'"'] in state.allowed_token_ids()
    state.advance(single[b"y"])  # past maxLength: the grammar breaks instead of accepting it
    assert state.broken


def test_shared_state_falls_back_to_the_exact_regex(compiler, vocab):
    """Two bounded strings in one automaton state (anyOf) cannot be told apart: bounds stay in the regex."""
    schema = {"anyOf": [{"type": "string", "maxLength": 2}, {"type": "string", "minLength": 4, "maxLength": 5}]}
    grammar = compiler.compile("json_schema", json.dumps(schema))
    assert grammar.bounded is None
    exact = Index(json_schema_regexes(json.dumps(schema)).exact, vocab.outlines_vocabulary())
    text = lockstep_walk(grammar, exact, distances(exact), vocab, random.Random(3), free_steps=4)
    jsonschema.validate(json.loads(text), schema)


def test_exact_regex_is_what_outlines_builds():
    from outlines_core.json_schema import build_regex_from_schema

    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 5},
                                               "b": {"type": "string", "minLength": 1}}, "required": ["a"]}
    regexes = schema_regexes(schema)
    assert regexes.exact.replace('("', '"').replace('")', '"') == build_regex_from_schema(json.dumps(schema))
    assert regexes.bounds == ((0, 5), (1, None))
    assert f"{STRING_CHAR}*" in regexes.unbounded and "{0,5}" not in regexes.unbounded
    assert r"\x010\x02" in regexes.marked and r"\x011\x02" in regexes.marked


def test_long_max_length_compiles_fast(compiler, vocab):
    """maxLength 200: the bounded regex takes far longer than 10 s even on this 700-token vocabulary."""
    schema = {"type": "object", "properties": {f"s{i}": {"type": "string", "maxLength": 200 + i} for i in range(4)},
              "required": ["s0", "s1"]}
    start = time.perf_counter()
    grammar = compiler.compile("json_schema", json.dumps(schema))
    assert grammar.bounded is not None
    assert time.perf_counter() - start < 2.0
    state = GrammarState(grammar, vocab)
    single = {data: ids[0] for data, ids in vocab.token_bytes.items() if len(data) == 1}
    for byte in b'{"s0":"':
        state.advance(single[bytes([byte])])
    for _ in range(200):
        state.advance(single[b"a"])
    assert not state.broken and state.string_len == 200
    assert single[b"a"] not in state.allowed_token_ids()


def test_token_tables_count_characters(vocab):
    tables = token_tables(vocab)
    assert tables is token_tables(vocab)  # cached on the vocabulary
    words = tables.plain_rows.view(np.uint8)
    bits = np.unpackbits(words, axis=1, bitorder="little")
    for data, ids in vocab.token_bytes.items():
        if b'"' in data or b"\\" in data:
            assert ids[0] in tables.special_ids
            continue
        chars = sum(1 for byte in data if byte & 0xC0 != 0x80)  # UTF-8 continuation bytes count 0
        assert bits[chars, ids[0]] == 1 and (chars == 0 or bits[chars - 1, ids[0]] == 0)


def tricky_vocab(size: int = 2500, seed: int = 0) -> TokenVocab:
    """All bytes, quote/escape/punctuation pieces, UTF-8 pieces (whole and cut), and random joins of them."""
    rng = random.Random(seed)
    pieces: dict[bytes, None] = {bytes([b]): None for b in range(256)}
    for text in ['",', '"}', '\\"', '":"', '","', '"]', '{"', '["', '"},{"', '\\n', '\\\\', 'n"', '"a', 'ab"',
                 '\\"x', 'é', 'ab', 'xyz', ' the', '中文', '😀', ': ', ', ', '"\\', '""', 'true', '1']:
        pieces[text.encode()] = None
    for char in "éü中😀ж":
        data = char.encode()
        for cut in range(1, len(data)):
            pieces[data[:cut]] = None
            pieces[data[cut:]] = None
    base = list(pieces)
    while len(pieces) < size:
        joined = rng.choice(base) + rng.choice(base)
        if len(joined) <= 8:
            pieces[joined] = None
    token_bytes = {data: [i] for i, data in enumerate(pieces)}
    return TokenVocab(token_bytes=token_bytes, eos_token_id=size, stop_token_ids=(size,), tokenizer_size=size + 1,
                      kind="byte_level")


def test_tokens_that_close_and_open_strings_are_counted_exactly():
    """Quote, escape and cut UTF-8 pieces (``"},{"``, ``\\"x``, half a character) against the exact Index."""
    vocab = tricky_vocab()
    compiler = GrammarCompiler(vocab, max_workers=0)
    schema = {"type": "array", "items": {"type": "object", "properties": {
        "a": {"type": "string", "minLength": 1, "maxLength": 3}, "b": {"type": "string", "maxLength": 2}},
        "required": ["a", "b"]}, "minItems": 1, "maxItems": 3}
    spec = json.dumps(schema)
    grammar = compiler.compile("json_schema", spec)
    assert grammar.bounded is not None
    exact = Index(json_schema_regexes(spec).exact, vocab.outlines_vocabulary())
    graph = distances(exact)
    rng = random.Random(11)
    for walk in range(15):
        text = lockstep_walk(grammar, exact, graph, vocab, rng, free_steps=walk * 2)
        jsonschema.validate(json.loads(text.decode("utf-8")), schema)


def test_long_max_length_compiles_in_the_sandbox_within_a_short_budget(vocab):
    """The serving path (sandboxed compile, 5 s budget here): the bounded regex would run out of time."""
    sandbox = CompileSandbox(vocab.eos_token_id, vocab.token_bytes, timeout_s=5.0, num_workers=1)
    compiler = GrammarCompiler(vocab, max_workers=1, sandbox=sandbox)
    try:
        grammar = compiler.compile("json_schema", json.dumps({"type": "string", "minLength": 5, "maxLength": 300}))
        assert grammar.bounded is not None
        state = GrammarState(grammar, vocab)
        quote = vocab.token_bytes[b'"'][0]
        state.advance(quote)
        assert quote not in state.allowed_token_ids()  # minLength 5 not reached
    finally:
        compiler.close()
