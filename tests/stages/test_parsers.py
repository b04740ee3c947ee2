"""Tool-call and reasoning parsers on recorded outputs, whole and streamed in random chunkings."""
from __future__ import annotations

import json
import random

import jsonschema
import pytest
import torch

from stages.constrain.grammar import GrammarCompiler
from stages.parsers.reasoning import (ReasoningParserError, ReasoningResult, StreamingReasoningParser,
                                      parse_reasoning)
from stages.parsers.tool_calls import (ParsedOutput, ToolParserError, collect, forced_tool_parser,
                                       make_tool_parser, parse_tool_calls, parse_with, tool_choice_to_json_schema)
from tests.stages.test_constrain import generate, tiny_tokenizer, tiny_vocab  # noqa: F401 (fixtures)


def fixed_ids(index: int) -> str:
    return f"call_{index}"


def random_chunks(text: str, rng: random.Random) -> list[str]:
    chunks, i = [], 0
    while i < len(text):
        size = rng.choice([1, 1, 2, 3, 5, 8, 13])
        chunks.append(text[i:i + size])
        i += size
    return chunks


def calls_of(parsed: ParsedOutput) -> list[tuple[str, object]]:
    return [(call.function.name, json.loads(call.function.arguments)) for call in parsed.tool_calls]


QWEN_OUTPUTS = [
    ("The capital of France is Paris.", "The capital of France is Paris.", []),
    ('I will look that up.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
     '</tool_call>', "I will look that up.\n", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
    ('<tool_call>\n{"name": "search", "arguments": {"q": "say \\"hi\\" {not a brace}", "n": [1, {"k": null}]}}\n'
     '</tool_call>\n<tool_call>\n{"name": "wiki", "arguments": {"title": "Zoë – ☃"}}\n</tool_call>', "\n",
     [("search", {"q": 'say "hi" {not a brace}', "n": [1, {"k": None}]}), ("wiki", {"title": "Zoë – ☃"})]),
    ('<tool_call>\n{"arguments": {"x": 1}, "name": "late_name"}\n</tool_call>', "", [("late_name", {"x": 1})]),
    ('<tool_call>\n{"name": "no_args"}\n</tool_call>', "", [("no_args", {})]),
    ("a < b and <tool> and <tool_call>not json</tool_call> end",
     "a < b and <tool> and <tool_call>not json</tool_call> end", []),
    ('Sure.<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call> trailing text',
     "Sure. trailing text", [("f", {"a": 1})]),
]

LLAMA_OUTPUTS = [
    ('<|python_tag|>{"name": "get_weather", "parameters": {"city": "San Francisco"}}', "",
     [("get_weather", {"city": "San Francisco"})]),
    ('\n{"name": "a", "parameters": {"x": [1, 2]}}; {"name": "b", "parameters": {}}', "\n",
     [("a", {"x": [1, 2]}), ("b", {})]),
    ('{"answer": 42} is the JSON you asked for', '{"answer": 42} is the JSON you asked for', []),
    ("Hello there, no tools needed.", "Hello there, no tools needed.", []),
    ('Let me call it. <|python_tag|>{"type": "function", "name": "f", "parameters": {"s": "};"}}',
     "Let me call it. ", [("f", {"s": "};"})]),
]


@pytest.mark.parametrize("parser_name,text,content,calls",
                         [("qwen25", *case) for case in QWEN_OUTPUTS] + [("qwen3", *QWEN_OUTPUTS[2])]
                         + [("llama3", *case) for case in LLAMA_OUTPUTS])
def test_tool_calls_whole_and_streamed(parser_name, text, content, calls):
    whole = parse_tool_calls(text, parser_name, fixed_ids)
    assert whole.content == content
    assert calls_of(whole) == calls
    assert [c.id for c in whole.tool_calls] == [f"call_{i}" for i in range(len(calls))]
    rng = random.Random(len(text))
    for _ in range(25):
        parser = make_tool_parser(parser_name, fixed_ids)
        deltas = [parser.feed(chunk) for chunk in random_chunks(text, rng)] + [parser.finish()]
        assert collect(deltas) == whole
        pieces = [piece for delta in deltas for piece in delta.tool_calls]
        for index in range(len(calls)):  # name first (with id), then only argument chunks
            mine = [p for p in pieces if p.index == index]
            assert mine[0].name == calls[index][0] and mine[0].id == f"call_{index}"
            assert all(p.name is None and p.id is None for p in mine[1:])


def test_truncated_call_keeps_streamed_arguments():
    text = '<tool_call>\n{"name": "f", "arguments": {"a": "hel'
    parsed = parse_tool_calls(text, "qwen25", fixed_ids)
    assert parsed.content == "" and parsed.tool_calls[0].function.arguments == '{"a": "hel'
    unfinished_header = parse_tool_calls('Hi <tool_call>\n{"name": "f', "qwen25", fixed_ids)
    assert unfinished_header.content == 'Hi <tool_call>\n{"name": "f' and unfinished_header.tool_calls == []


def test_arguments_stream_before_the_call_ends():
    parser = make_tool_parser("qwen25", fixed_ids)
    first = parser.feed('<tool_call>\n{"name": "f", "arguments": {"city": "Par')
    assert [p.to_openai() for p in first.tool_calls] == [
        {"index": 0, "id": "call_0", "type": "function", "function": {"name": "f", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": "Par'}}]
    second = parser.feed('is"}}\n</tool_call>')
    assert [p.arguments for p in second.tool_calls] == ['is"}']
    assert parser.finish().tool_calls == []


def test_message_content_is_none_around_calls():
    parsed = parse_tool_calls('\n<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>\n', "qwen3", fixed_ids)
    assert parsed.message_content is None
    assert parse_tool_calls("hi", "qwen3").message_content == "hi"


def test_unknown_parser_names():
    with pytest.raises(ToolParserError, match="unknown tool call parser"):
        make_tool_parser("mistral")
    with pytest.raises(ReasoningParserError, match="unknown reasoning parser"):
        StreamingReasoningParser("o1")


# --------------------------------------------------------------------------- tool_choice

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 7}},
        "required": ["city", "days"]}}},
    {"type": "function", "function": {"name": "ping"}},
]


def test_tool_choice_schemas():
    assert tool_choice_to_json_schema(TOOLS, "auto") is None and tool_choice_to_json_schema(TOOLS, "none") is None
    named = json.loads(tool_choice_to_json_schema(TOOLS, {"type": "function", "function": {"name": "get_weather"}}))
    assert named == TOOLS[0]["function"]["parameters"]
    required = json.loads(tool_choice_to_json_schema(TOOLS, "required"))
    assert required["type"] == "array" and required["minItems"] == 1
    assert [o["properties"]["name"]["enum"] for o in required["items"]["anyOf"]] == [["get_weather"], ["ping"]]
    with pytest.raises(ToolParserError, match="not in tools"):
        tool_choice_to_json_schema(TOOLS, {"type": "function", "function": {"name": "nope"}})
    with pytest.raises(ToolParserError, match="at least one tool"):
        tool_choice_to_json_schema([], "required")
    with pytest.raises(ToolParserError):
        tool_choice_to_json_schema(TOOLS, "sometimes")


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_calls_from_constrained_output(tiny_vocab, tool_choice):
    compiler = GrammarCompiler(tiny_vocab)
    grammar = compiler.compile("json_schema", tool_choice_to_json_schema(TOOLS, tool_choice))
    compiler.close()
    rng, chunk_rng = torch.Generator().manual_seed(3), random.Random(3)
    parameters = {t["function"]["name"]: t["function"].get("parameters", {"type": "object"}) for t in TOOLS}
    for number in range(6):
        text = generate(grammar, tiny_vocab, rng, free_steps=number * 4).decode()
        whole = parse_with(forced_tool_parser(tool_choice, fixed_ids), text)
        parser = forced_tool_parser(tool_choice, fixed_ids)
        assert collect([parser.feed(c) for c in random_chunks(text, chunk_rng)] + [parser.finish()]) == whole
        assert whole.tool_calls and whole.content == ""
        for call in whole.tool_calls:
            jsonschema.validate(json.loads(call.function.arguments), parameters[call.function.name])


# --------------------------------------------------------------------------- reasoning

REASONING_OUTPUTS = [
    ("qwen3", "<think>\nThe user wants 2+2.\n\nThat is 4.\n</think>\n\nThe answer is 4.",
     ReasoningResult("The user wants 2+2.\n\nThat is 4.", "The answer is 4.")),
    ("qwen3", "Hello! How can I help?", ReasoningResult(None, "Hello! How can I help?")),
    ("qwen3", "  <thinking> is not a tag here", ReasoningResult(None, "  <thinking> is not a tag here")),
    ("qwen3", "<think>\n\n</think>\n\nHi there", ReasoningResult(None, "Hi there")),
    ("qwen3", "<think>\nstill going, cut off at max_tokens   ",
     ReasoningResult("still going, cut off at max_tokens", "")),
    ("deepseek-r1", "Okay, so the user asks...\n</think>\n\nAnswer: 4 < 5", ReasoningResult(
        "Okay, so the user asks...", "Answer: 4 < 5")),
    ("deepseek-r1", "<think>\nhmm  </think>ok <think> stays", ReasoningResult("hmm", "ok <think> stays")),
    ("deepseek-r1", "thinking without end </thi", ReasoningResult("thinking without end </thi", "")),
]


@pytest.mark.parametrize("parser_name,text,expected", REASONING_OUTPUTS)
def test_reasoning_whole_and_streamed(parser_name, text, expected):
    assert parse_reasoning(text, parser_name) == expected
    rng = random.Random(len(text))
    for _ in range(25):
        parser = StreamingReasoningParser(parser_name)
        deltas = [parser.feed(chunk) for chunk in random_chunks(text, rng)] + [parser.finish()]
        reasoning = "".join(d.reasoning for d in deltas)
        assert (reasoning or None) == expected.reasoning_content
        assert "".join(d.content for d in deltas) == expected.content


def test_reasoning_then_tool_calls_stream():
    text = ('<think>\nNeed weather.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": '
            '{"city": "Oslo", "days": 2}}\n</tool_call>')
    rng = random.Random(0)
    reasoning_parser, tool_parser = StreamingReasoningParser("qwen3"), make_tool_parser("qwen3", fixed_ids)
    reasoning, deltas = "", []
    for chunk in random_chunks(text, rng) + [None]:
        split = reasoning_parser.feed(chunk) if chunk is not None else reasoning_parser.finish()
        reasoning += split.reasoning
        deltas.append(tool_parser.feed(split.content))
    deltas.append(tool_parser.finish())
    assert reasoning == "Need weather."
    assert calls_of(collect(deltas)) == [("get_weather", {"city": "Oslo", "days": 2})]
