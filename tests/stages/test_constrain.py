"""Structured output: vocabulary mapping, grammar compile, masks, constrained generations.

A tiny byte-level BPE tokenizer is trained here (``tokenizers``, ~1 s) on a
slice of tinyshakespeare plus JSON-looking text. Generations sample random
allowed tokens from random logits through the produced bitmask (applied with
the PyTorch reference), steering towards an accepting state after a few free
steps so that every generation ends; each output must then parse and
validate, and every step's mask must equal the grammar's allowed set with EOS
exactly in accepting states.
"""
from __future__ import annotations

import json
import math
import random
import re
from collections import deque
from pathlib import Path

import jsonschema
import numpy as np
import pytest
import torch
from outlines_core import Index
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from stages.constrain.bitmask import apply_token_bitmask_reference, bitmask_words, pack_bitmask, unpack_bitmask
from stages.constrain.grammar import (CompiledGrammar, GrammarCompiler, GrammarError, GrammarState, choices_regex,
                                      grammar_regex, response_format_to_sampling)
from stages.constrain.schema import SchemaError, schema_to_regex
from stages.constrain.vocab import build_token_vocab, gpt2_byte_table, vocab_for_tokenizer

DATA = Path(__file__).resolve().parents[2] / "models" / "demo" / "tinyshakespeare.txt"
EXTRA_MODEL_IDS = 13  # the model's vocab is larger than the tokenizer's: padding ids never allowed


def training_text() -> str:
    text = DATA.read_text()[:150_000]
    rng = random.Random(0)
    json_lines = [json.dumps({"name": rng.choice(["ann", "bo", "Zoë"]), "id": rng.randint(-999, 99999),
                              "tags": ["x", "y"][: rng.randint(0, 2)], "ok": rng.random() < 0.5,
                              "score": round(rng.uniform(-5, 5), 3), "nested": {"k": None}})
                  for _ in range(400)]
    return text + "\n".join(json_lines)


def train_tiny_tokenizer(vocab_size: int = 700) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([training_text()], trainer)
    tokenizer.add_tokens([AddedToken("<think>", special=False)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_end|>"])


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return train_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_vocab(tiny_tokenizer):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    return vocab_for_tokenizer(tiny_tokenizer, [tiny_tokenizer.eos_token_id, im_end])


@pytest.fixture(scope="session")
def compiler(tiny_vocab):
    grammar_compiler = GrammarCompiler(tiny_vocab)
    yield grammar_compiler
    grammar_compiler.close()


# --------------------------------------------------------------------------- vocabulary


def test_gpt2_byte_table_is_a_bijection():
    table = gpt2_byte_table()
    assert len(table) == 256 and len(set(table.values())) == 256
    assert table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[ord("A")] == "A"


def test_byte_level_vocab_matches_decode(tiny_tokenizer, tiny_vocab):
    backend = tiny_tokenizer.backend_tokenizer
    special = set(tiny_tokenizer.all_special_ids)
    seen = set()
    for data, ids in tiny_vocab.token_bytes.items():
        for token_id in ids:
            seen.add(token_id)
            assert token_id not in special
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                continue  # half of a multi-byte character: decode() would show U+FFFD
            assert backend.decode([token_id], skip_special_tokens=False) == text, token_id
    assert tiny_vocab.kind == "byte_level"
    assert special.isdisjoint(seen) and tiny_vocab.eos_token_id == tiny_tokenizer.eos_token_id
    assert seen == set(range(tiny_vocab.tokenizer_size)) - special
    think_id = tiny_tokenizer.convert_tokens_to_ids("<think>")
    assert tiny_vocab.token_bytes[b"<think>"] == [think_id]
    assert tiny_vocab.token_bytes[b" "] == [tiny_tokenizer.convert_tokens_to_ids("Ġ")]


def test_vocab_is_cached_per_tokenizer(tiny_tokenizer, tiny_vocab):
    im_end = tiny_tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert vocab_for_tokenizer(tiny_tokenizer, [tiny_tokenizer.eos_token_id, im_end]) is tiny_vocab
    rebuilt = build_token_vocab(tiny_tokenizer, [tiny_tokenizer.eos_token_id, im_end])
    assert rebuilt is not tiny_vocab and rebuilt.key == tiny_vocab.key


def sentencepiece_tokenizer() -> Tokenizer:
    pieces = ["<unk>", "<s>", "</s>", "<0x0A>", "<0xE2>", "<0x82>", "<0xAC>", "▁", "▁the", "▁a", "b", "é", "▁▁",
              "a", "the"]
    tokenizer = Tokenizer(models.BPE(vocab={p: i for i, p in enumerate(pieces)}, merges=[],
                                     byte_fallback=True, unk_token="<unk>"))
    tokenizer.add_special_tokens(["<unk>", "<s>", "</s>"])
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def test_sentencepiece_vocab():
    tokenizer = sentencepiece_tokenizer()
    vocab = build_token_vocab(tokenizer, [2])
    assert vocab.kind == "sentencepiece"
    expected = {b"\n": [3], b"\xe2": [4], b"\x82": [5], b"\xac": [6], b" ": [7], b" the": [8], b" a": [9],
                b"b": [10], "é".encode(): [11], b"  ": [12], b"a": [13], b"the": [14]}
    assert vocab.token_bytes == expected
    index = Index("( the| a)+b\n", vocab.outlines_vocabulary())
    state = GrammarState(CompiledGrammar(grammar_id=0, index=index), vocab)
    for token_id in (8, 9, 10, 3):
        assert token_id in state.allowed_token_ids()
        state.advance(token_id)
    assert state.accepting and not state.broken and state.allowed_token_ids() == [2]


def test_tokenizer_without_eos_is_rejected():
    tokenizer = sentencepiece_tokenizer()
    with pytest.raises(ValueError, match="eos"):
        build_token_vocab(tokenizer)


# --------------------------------------------------------------------------- bitmask


def test_pack_unpack_roundtrip_and_apply():
    generator = torch.Generator().manual_seed(0)
    allowed = torch.rand(3, 77, generator=generator) < 0.3
    packed = pack_bitmask(allowed)
    assert packed.dtype == torch.int32 and packed.shape == (3, bitmask_words(77))
    assert torch.equal(unpack_bitmask(packed, 77), allowed)
    logits = torch.randn(5, 77, generator=generator)
    masked = apply_token_bitmask_reference(logits, packed, [4, 0, 2])
    assert torch.equal(masked[1], logits[1]) and torch.equal(masked[3], logits[3])
    for i, row in enumerate([4, 0, 2]):
        assert torch.equal(torch.isfinite(masked[row]), allowed[i])


# --------------------------------------------------------------------------- generations

SCHEMAS = [
    {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "address": {"type": "object", "properties": {
            "city": {"type": "string", "enum": ["Rome", "Verona", "Padua"]},
            "zip": {"type": "integer", "minimum": 10000, "maximum": 99999}},
            "required": ["city", "zip"]}},
     "required": ["name", "address"]},
    {"type": "object", "properties": {
        "ids": {"type": "array", "items": {"type": "integer", "minimum": -20, "maximum": 300},
                "minItems": 2, "maxItems": 4},
        "ok": {"type": "boolean"},
        "note": {"type": ["string", "null"], "maxLength": 5}},
     "required": ["ids", "ok"]},
    {"type": "object", "properties": {
        "score": {"type": "number", "minimum": -3, "maximum": 7},
        "ratio": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 2},
        "count": {"type": "integer", "minimum": 5},
        "rank": {"type": "integer", "maximum": -2}},
     "required": ["score", "ratio", "count", "rank"]},
    {"type": "array", "items": {"type": "object", "properties": {
        "role": {"enum": ["user", "assistant"]},
        "turns": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["role"]}, "minItems": 1, "maxItems": 3},
    json.loads(response_format_to_sampling({"type": "json_object"})["json_schema"]),
]
REGEXES = [r"[0-9]{3}-[0-9]{4}", r"(yes|no), because [a-z ]{1,12}\.", r"\{\"k\": [1-9][0-9]?\}"]
CHOICES = [["Romeo", "Juliet", "Mercutio (friend)"], ["a.b", "a*b", "[x]", "  spaces  "]]


def distances_to_accept(index: Index) -> dict[int, int]:
    """Fewest tokens from each state to an accepting state (BFS on reversed transitions)."""
    reverse: dict[int, list[int]] = {}
    for state, moves in index.get_transitions().items():
        for next_state in moves.values():
            reverse.setdefault(next_state, []).append(state)
    distance = {state: 0 for state in index.get_final_states()}
    queue = deque(distance)
    while queue:
        state = queue.popleft()
        for previous in reverse.get(state, []):
            if previous not in distance:
                distance[previous] = distance[state] + 1
                queue.append(previous)
    return distance


_GRAPHS: dict[int, tuple[Index, dict, dict]] = {}


def transitions_and_distances(index: Index) -> tuple[dict, dict]:
    if id(index) not in _GRAPHS:
        _GRAPHS[id(index)] = (index, index.get_transitions(), distances_to_accept(index))
    return _GRAPHS[id(index)][1:]


def generate(grammar: CompiledGrammar, vocab, rng: torch.Generator, free_steps: int, max_steps: int = 400) -> bytes:
    """Sample one constrained output, checking every mask (fresh or cached) on the way."""
    state = GrammarState(grammar, vocab)
    transitions, distance = transitions_and_distances(grammar.index)
    id_to_bytes = {i: data for data, ids in vocab.token_bytes.items() for i in ids}
    model_vocab_size = vocab.tokenizer_size + EXTRA_MODEL_IDS
    output = b""
    for step in range(max_steps):
        row = torch.full((bitmask_words(model_vocab_size),), -1, dtype=torch.int32)
        state.write_mask(row, model_vocab_size)
        allowed = set(unpack_bitmask(row.view(1, -1), model_vocab_size)[0].nonzero().flatten().tolist())
        assert allowed == set(state.allowed_token_ids()), f"mask differs from the grammar at step {step}"
        for stop_id in vocab.stop_token_ids:
            assert (stop_id in allowed) == state.guide.is_finished(), "EOS must be allowed exactly when accepting"
        logits = torch.randn(1, model_vocab_size, generator=rng)
        if step >= free_steps:  # steer: only tokens that get closer to an accepting state (or EOS)
            here = distance[state.guide.get_state()]
            closer = [t for t in allowed if t in vocab.stop_token_ids or distance[transitions[
                state.guide.get_state()][t]] < here]
            logits[0, closer] += 50.0
        masked = apply_token_bitmask_reference(logits, row.view(1, -1), [0])
        token_id = int(torch.multinomial(torch.softmax(masked[0], -1), 1, generator=rng))
        assert token_id in allowed
        state.advance(token_id)
        assert not state.broken
        if token_id in vocab.stop_token_ids:
            assert state.finished
            return output
        output += id_to_bytes[token_id]
    raise AssertionError(f"no EOS after {max_steps} steps: {output!r}")


def test_100_constrained_generations(compiler, tiny_vocab):
    rng = torch.Generator().manual_seed(1234)
    cases = ([("json_schema", json.dumps(schema), schema) for schema in SCHEMAS]
             + [("regex", regex, regex) for regex in REGEXES]
             + [("choices", json.dumps(choices), choices) for choices in CHOICES])
    counts = {"json_schema": 0, "regex": 0, "choices": 0}
    for number in range(100):
        kind, spec, reference = cases[number % len(cases)]
        grammar = compiler.compile(kind, spec)
        text = generate(grammar, tiny_vocab, rng, free_steps=number % 25).decode("utf-8")
        if kind == "json_schema":
            jsonschema.validate(json.loads(text), reference)
        elif kind == "regex":
            assert re.fullmatch(reference, text), (reference, text)
        else:
            assert text in reference
        counts[kind] += 1
    assert counts == {"json_schema": 50, "regex": 30, "choices": 20}
    assert compiler.mask_cache.hits > compiler.mask_cache.misses > 0


def test_compile_is_cached(compiler):
    spec = json.dumps({"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]})
    before = compiler.num_compiles
    first = compiler.compile("json_schema", spec)
    assert compiler.compile("json_schema", spec) is first
    assert compiler.num_compiles == before + 1


@pytest.mark.parametrize("kind,spec,reason", [
    ("json_schema", "{not json", "not valid JSON"),
    ("json_schema", '{"type": "foo"}', "Unsupported type: foo"),
    ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 4}', "leave no value"),
    ("json_schema", '{"type": "number", "minimum": 0.5, "maximum": 0.9}', "no number"),
    ("regex", "([a-z]", "invalid regex"),
    ("regex", "a(?=b)", "does not support"),
    ("choices", "[]", "non-empty"),
    ("choices", '"abc"', "JSON list"),
    ("grammar", "x", "unknown grammar kind"),
])
def test_invalid_grammar_gives_the_reason(compiler, kind, spec, reason):
    with pytest.raises(GrammarError, match=re.escape(reason)):
        compiler.compile(kind, spec)


def test_stop_token_in_non_accepting_state_breaks_and_forces_eos(compiler, tiny_vocab):
    state = GrammarState(compiler.compile("regex", "[0-9]{3}"), tiny_vocab)
    state.advance(tiny_vocab.eos_token_id)
    assert state.broken and state.allowed_token_ids() == sorted(tiny_vocab.stop_token_ids)


def test_choices_regex_escapes_metacharacters():
    regex = choices_regex(["a.b", "(x)", "c|d", "e*"])
    for choice in ["a.b", "(x)", "c|d", "e*"]:
        assert re.fullmatch(regex, choice)
    assert not re.fullmatch(regex, "axb") and not re.fullmatch(regex, "c")


def test_bounded_numbers_in_schema_regex():
    regex = schema_to_regex({"type": "integer", "minimum": -3, "maximum": 12})
    assert [x for x in range(-20, 20) if re.fullmatch(regex, str(x))] == list(range(-3, 13))
    assert grammar_regex("json_schema", '{"type": "integer"}') == "(-)?(0|[1-9][0-9]*)"


def test_response_format_to_sampling():
    assert response_format_to_sampling(None) == {}
    assert response_format_to_sampling({"type": "text"}) == {}
    json_object = json.loads(response_format_to_sampling({"type": "json_object"})["json_schema"])
    assert json_object["type"] == "object"
    assert re.fullmatch(grammar_regex("json_schema", json.dumps(json_object)), '{"a": [1, "x"], "b": {"c": null}}')
    assert grammar_regex("json_schema", '{"type": "object"}') == grammar_regex("json_schema", json.dumps(json_object))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    spec = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    assert json.loads(response_format_to_sampling(spec)["json_schema"]) == schema
    for bad in [{"type": "xml"}, {"type": "json_schema"}, {"type": "json_schema", "json_schema": {"name": "x"}}]:
        with pytest.raises(GrammarError):
            response_format_to_sampling(bad)


def test_mask_for_a_model_vocab_smaller_than_the_tokenizer(compiler, tiny_vocab):
    """Ids the model cannot produce stay cleared, also in the cached row."""
    state = GrammarState(compiler.compile("regex", "[a-z ]{1,30}"), tiny_vocab)
    small = tiny_vocab.tokenizer_size - 37  # not a multiple of 32: the last word is cut inside
    for _ in range(2):  # fresh, then from the cache
        row = torch.full((bitmask_words(small),), -1, dtype=torch.int32)
        state.write_mask(row, small)
        allowed = unpack_bitmask(row.view(1, -1), bitmask_words(small) * 32)[0]
        assert allowed.any() and not allowed[small:].any()
        expected = [t for t in state.allowed_token_ids() if t < small]
        assert allowed.nonzero().flatten().tolist() == expected


def test_mask_row_cache_evicts_by_bytes():
    from stages.constrain.bitmask import MaskRowCache

    cache = MaskRowCache(max_bytes=3 * 400)
    for state in range(5):
        cache.put((0, state, 3200), np.full(100, state, dtype=np.uint32))
    assert cache.num_bytes == 1200 and sorted(key[1] for key in cache.rows) == [2, 3, 4]
    assert cache.get((0, 1, 3200)) is None and cache.get((0, 4, 3200))[0] == 4


def _within(value: float, schema: dict) -> bool:
    return (value >= schema.get("minimum", -math.inf) and value <= schema.get("maximum", math.inf)
            and value > schema.get("exclusiveMinimum", -math.inf) and value < schema.get("exclusiveMaximum", math.inf))


def test_number_bounds_are_sound_and_keep_open_intervals():
    rng = random.Random(0)
    texts = [f"{x / 100:.2f}" for x in range(-800, 800, 7)]
    texts += [f"{x}{tail}" for x in range(-8, 9) for tail in ("", ".0")]
    for _ in range(300):
        schema = {"type": rng.choice(["number", "integer"])}
        for key in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"):
            if rng.random() < 0.4:
                schema[key] = rng.choice([rng.randint(-5, 5), rng.randint(-50, 50) / 10])
        try:
            regex = re.compile(schema_to_regex(schema))
        except SchemaError:
            continue
        for text in texts:
            if regex.fullmatch(text):
                assert _within(float(text), schema), (schema, text)
    open_unit = re.compile(schema_to_regex({"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1}))
    assert open_unit.fullmatch("0.5") and open_unit.fullmatch("0.01") and not open_unit.fullmatch("0")
    assert re.fullmatch(schema_to_regex({"type": "number", "exclusiveMinimum": -3, "maximum": -2}), "-2.5")
