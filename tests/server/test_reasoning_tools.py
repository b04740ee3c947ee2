"""Reasoning output and tool calls as the official ``openai`` client reads them.

Two servers:

* a scripted one (the real ingest stage and HTTP app in-process, a fake
  engine that answers every request with a text the test chose, in 3-character
  pieces), for exact outputs: ``reasoning_content``/``reasoning`` present
  (null when there is none) in messages and in every stream chunk, one
  ``tool_calls`` entry per index in a chunk, ``parallel_tool_calls: false``,
  and a call cut by ``max_tokens``;
* a live ``stagewise serve`` of a tiny random checkpoint whose tokenizer has
  ``<think>``/``</think>`` tokens and whose chat template closes the think
  block when ``enable_thinking`` is false (as Qwen3's does), with
  ``--reasoning-parser qwen3 --tool-call-parser qwen25``: forced tool calls
  shaped by the grammar (``$defs`` schemas, one call without parallel calls, no
  call when cut by ``max_tokens``), and the grammar waiting for the think block.
"""
from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pipeline.messages import FinishReason, GenerateRequest, TextOutput
from stages.ingest import build_app
from stages.parsers.tool_calls import ToolParserError, tool_choice_to_json_schema
from tests.server.conftest import running_server
from tests.server.test_ingest_unit import fake_ingest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}}, "required": ["city"]}}}
PING = {"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}
TWO_CALLS = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
             '<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call>')


# --------------------------------------------------------------------------- scripted engine


async def scripted_engine(requests, outputs, script: dict[str, Any]) -> None:
    """Answer each chat request with ``script['text']`` in 3-character pieces, ending with ``script['finish']``."""
    while True:
        message = await requests.aget()
        if not isinstance(message, GenerateRequest):
            continue
        script.setdefault("seen", []).append(message)
        text, pieces = script["text"], []
        pieces = [text[i:i + 3] for i in range(0, len(text), 3)] or [""]
        for position, piece in enumerate(pieces):
            last = position == len(pieces) - 1
            outputs.put(TextOutput(rid=message.rid, parent_rid=message.rid, index=0, text_delta=piece,
                                   token_ids_delta=[7], prompt_tokens=3, completion_tokens=position + 1,
                                   finish_reason=FinishReason(type=script["finish"]) if last else None))


def with_scripted_server(test, **arg_overrides) -> None:
    """Run ``await test(client, script)`` against the scripted server (openai.AsyncOpenAI client)."""

    async def main() -> None:
        ctx, requests, outputs = fake_ingest(**arg_overrides)
        script: dict[str, Any] = {"text": "", "finish": "stop"}
        tasks = [asyncio.ensure_future(ctx.ingest.pump()),
                 asyncio.ensure_future(scripted_engine(requests, outputs, script))]
        server = TestClient(TestServer(build_app(ctx)))
        await server.start_server()
        client = openai.AsyncOpenAI(api_key="unused", base_url=str(server.make_url("/v1")), max_retries=0)
        try:
            await test(client, script)
        finally:
            await client.close()
            await server.close()
            for task in tasks:
                task.cancel()

    asyncio.run(main())


async def chat(client: openai.AsyncOpenAI, **kwargs: Any) -> Any:
    return await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "hi"}],
                                                **kwargs)


async def stream_chunks(client: openai.AsyncOpenAI, **kwargs: Any) -> list[Any]:
    return [chunk async for chunk in await chat(client, stream=True, **kwargs)]


def streamed_calls(chunks: list[Any]) -> dict[int, dict[str, str]]:
    """Tool calls put together from stream chunks, as clients do (by index)."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for entry in chunk.choices[0].delta.tool_calls or []:
            call = calls.setdefault(entry.index, {"name": "", "arguments": ""})
            call["name"] += entry.function.name or ""
            call["arguments"] += entry.function.arguments or ""
    return calls


def test_reasoning_content_is_null_not_missing():
    """SGLang's reasoning tests read ``delta.reasoning_content`` on every chunk; a missing key raises."""

    async def test(client, script):
        script["text"] = "Just an answer."
        message = (await chat(client)).choices[0].message
        assert message.content == "Just an answer." and message.reasoning_content is None
        assert message.model_extra["reasoning"] is None
        chunks = await stream_chunks(client)
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[-1].choices[0].finish_reason == "stop"
        for chunk in chunks:
            delta = chunk.choices[0].delta
            assert delta.reasoning_content is None and delta.model_extra["reasoning"] is None
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Just an answer."

    with_scripted_server(test, reasoning_parser="qwen3")


def test_reasoning_content_and_vllm_reasoning_field():
    async def test(client, script):
        script["text"] = "<think>\nTwo and two.\n</think>\n\nFour."
        message = (await chat(client)).choices[0].message
        assert (message.reasoning_content, message.model_extra["reasoning"], message.content) == (
            "Two and two.", "Two and two.", "Four.")
        chunks = await stream_chunks(client)
        reasoning, vllm_reasoning, content = "", "", ""
        for chunk in chunks:
            delta = chunk.choices[0].delta
            if delta.content:
                content += delta.content
            elif delta.reasoning_content:
                reasoning += delta.reasoning_content
                vllm_reasoning += delta.model_extra["reasoning"]
        assert (reasoning, vllm_reasoning, content) == ("Two and two.", "Two and two.", "Four.")

    with_scripted_server(test, reasoning_parser="qwen3")


def test_one_tool_call_entry_per_index_in_a_chunk():
    """A forced call streams its id, name and first arguments in one entry, never two entries of one index."""

    async def test(client, script):
        script["text"] = '{"city": "Paris"}'
        forced = {"type": "function", "function": {"name": "get_weather"}}
        chunks = await stream_chunks(client, tools=[WEATHER], tool_choice=forced)
        entries = [c.choices[0].delta.tool_calls for c in chunks if c.choices[0].delta.tool_calls]
        for chunk_entries in entries:
            assert len({e.index for e in chunk_entries}) == len(chunk_entries)
        first = entries[0][0]
        assert first.id and first.type == "function" and first.function.name == "get_weather"
        assert first.function.arguments == '{"c'  # the first piece of text rides with the name
        assert streamed_calls(chunks) == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        assert chunks[-1].choices[0].finish_reason == "tool_calls"
        script["text"] = TWO_CALLS  # the auto parser: a whole call in one feed is one entry too
        chunks = await stream_chunks(client, tools=[WEATHER, PING])
        for chunk in chunks:
            indices = [e.index for e in chunk.choices[0].delta.tool_calls or []]
            assert len(indices) == len(set(indices))
        assert streamed_calls(chunks) == {0: {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                                          1: {"name": "ping", "arguments": "{}"}}

    with_scripted_server(test, tool_call_parser="qwen25")


def test_parallel_tool_calls_false_keeps_one_call():
    async def test(client, script):
        script["text"] = TWO_CALLS
        both = (await chat(client, tools=[WEATHER, PING])).choices[0].message.tool_calls
        assert [c.function.name for c in both] == ["get_weather", "ping"]
        one = await chat(client, tools=[WEATHER, PING], parallel_tool_calls=False)
        assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
        assert one.choices[0].finish_reason == "tool_calls"
        chunks = await stream_chunks(client, tools=[WEATHER, PING], parallel_tool_calls=False)
        assert list(streamed_calls(chunks)) == [0]
        await chat(client, tools=[WEATHER, PING], tool_choice="required", parallel_tool_calls=False)
        schema = json.loads(script["seen"][-1].sampling.json_schema)
        assert schema["maxItems"] == 1 and schema["minItems"] == 1

    with_scripted_server(test, tool_call_parser="qwen25")


def test_call_cut_by_max_tokens_is_no_call():
    async def test(client, script):
        script.update(text='Checking.<tool_call>\n{"name": "get_weather", "arguments": {"ci', finish="length")
        choice = (await chat(client, tools=[WEATHER], max_tokens=16)).choices[0]
        assert choice.finish_reason == "length" and choice.message.tool_calls == []
        assert choice.message.content == "Checking."
        script["text"] = "{"
        forced = {"type": "function", "function": {"name": "get_weather"}}
        choice = (await chat(client, tools=[WEATHER], tool_choice=forced, max_tokens=1)).choices[0]
        assert choice.finish_reason == "length" and choice.message.tool_calls == [] and choice.message.content == ""
        script.update(text='<tool_call>\n{"name": "ping", "arguments": {}}\n</tool_call><tool_call>\n{"na')
        choice = (await chat(client, tools=[WEATHER, PING], max_tokens=30)).choices[0]
        assert [c.function.name for c in choice.message.tool_calls] == ["ping"]  # the finished call stays

    with_scripted_server(test, tool_call_parser="qwen25")


def test_grammar_waits_for_reasoning_unless_thinking_is_off():
    """Chat requests with a grammar ask the engine to keep the think block free, unless thinking is off."""

    async def test(client, script):
        script["text"] = '{"city": "Rome"}'
        forced = {"type": "function", "function": {"name": "get_weather"}}
        await chat(client, tools=[WEATHER], tool_choice=forced)
        await chat(client, response_format={"type": "json_object"})
        await chat(client, tools=[WEATHER], tool_choice=forced, extra_body={
            "chat_template_kwargs": {"enable_thinking": False}})
        await chat(client, tools=[WEATHER], tool_choice=forced, extra_body={"separate_reasoning": False})
        await chat(client)
        assert [m.sampling.grammar_after_reasoning for m in script["seen"]] == [True, True, False, False, False]

    with_scripted_server(test, reasoning_parser="qwen3")


# --------------------------------------------------------------------------- a live server

THINK_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{% elif open_think is defined and open_think %}{{ '<think>\\n' }}{% endif %}"
    "{% endif %}"
)
DEFS_TOOL = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "properties": {"where": {"$ref": "#/$defs/Place"}, "nights": {"type": "integer",
                                                                                   "minimum": 1, "maximum": 9}},
    "required": ["where", "nights"],
    "$defs": {"Place": {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome"]}},
                        "required": ["city"], "additionalProperties": False}}}}}
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}


def make_thinking_model(path: Path) -> Path:
    """The tests' tiny Llama with ``<think>``/``</think>`` added as (non-special) tokens and THINK_TEMPLATE
    (``enable_thinking`` false closes the think block in the prompt, ``open_think`` opens it there)."""
    import torch
    from tokenizers import AddedToken
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from tests.server.tiny_model import BOS, EOS, IM_END, IM_START, train_tiny_tokenizer

    backend = train_tiny_tokenizer(400)
    backend.add_tokens([AddedToken("<think>", special=False), AddedToken("</think>", special=False)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                        additional_special_tokens=[IM_START, IM_END])
    tokenizer.chat_template = THINK_TEMPLATE
    tokenizer.save_pretrained(str(path))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(str(path), safe_serialization=True)
    return path


@pytest.fixture(scope="module")
def thinking_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_thinking_model(tmp_path_factory.mktemp("thinking_llama"))


@pytest.fixture(scope="module")
def client(thinking_model: Path, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("logs") / "server.log"
    with running_server(thinking_model, log, "--reasoning-parser", "qwen3", "--tool-call-parser", "qwen25",
                        "--kernel-backend", "reference") as server:
        yield openai.OpenAI(api_key="unused", base_url=server.url + "/v1", max_retries=0, timeout=120)


def ask(client: openai.OpenAI, tools: list | None, tool_choice: Any, **kwargs: Any) -> Any:
    extra = {"tools": tools, "tool_choice": tool_choice} if tools else {}
    return client.chat.completions.create(model="m", messages=[{"role": "user", "content": "Book a trip"}],
                                          temperature=0, **extra, **kwargs)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book"}}])
def test_live_forced_call_with_defs_schema(client, tool_choice):
    parameters = DEFS_TOOL["function"]["parameters"]
    choice = ask(client, [DEFS_TOOL, WEATHER], tool_choice, max_tokens=120, extra_body=NO_THINKING).choices[0]
    # "required" lets a random model go on making calls until max_tokens (the unfinished last one is dropped)
    assert choice.finish_reason == "tool_calls" or tool_choice == "required", choice
    assert choice.message.reasoning_content is None and choice.message.tool_calls
    for call in choice.message.tool_calls:
        schema = parameters if call.function.name == "book" else WEATHER["function"]["parameters"]
        jsonschema.validate(json.loads(call.function.arguments), schema)
    chunks = list(ask(client, [DEFS_TOOL, WEATHER], tool_choice, max_tokens=120, extra_body=NO_THINKING,
                      stream=True))
    for chunk in chunks:
        entries = chunk.choices[0].delta.tool_calls or []
        assert len({e.index for e in entries}) == len(entries)
    streamed = list(streamed_calls(chunks).values())
    assert [c["arguments"] for c in streamed[:len(choice.message.tool_calls)]] == [
        c.function.arguments for c in choice.message.tool_calls]  # greedy: the same output streamed


def test_live_required_without_parallel_calls_makes_one_call(client):
    choice = ask(client, [WEATHER, PING], "required", parallel_tool_calls=False, max_tokens=120,
                 extra_body=NO_THINKING).choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1


def test_required_schema_moves_defs_to_the_root():
    """Each tool's $defs end at the combined schema's root; other local refs point into the tool's place."""
    relative = {"type": "function", "function": {"name": "tag", "parameters": {
        "type": "object", "properties": {"label": {"type": "string", "maxLength": 3},
                                         "alias": {"$ref": "#/properties/label"}}, "required": ["alias"]}}}
    twin = json.loads(json.dumps(DEFS_TOOL))
    twin["function"]["name"] = "book2"
    schema = json.loads(tool_choice_to_json_schema([DEFS_TOOL, twin, relative], "required"))
    assert schema["$defs"] == DEFS_TOOL["function"]["parameters"]["$defs"]
    assert all("$defs" not in item["properties"]["parameters"] for item in schema["items"]["anyOf"])
    jsonschema.validate([{"name": "book", "parameters": {"where": {"city": "Oslo"}, "nights": 2}},
                         {"name": "tag", "parameters": {"alias": "abc"}}], schema)
    for bad in ({"name": "book", "parameters": {"where": {"city": "Lima"}, "nights": 2}},
                {"name": "tag", "parameters": {"alias": "abcd"}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate([bad], schema)
    twin["function"]["parameters"]["$defs"]["Place"]["required"] = []
    with pytest.raises(ToolParserError, match="Place") as error:
        tool_choice_to_json_schema([DEFS_TOOL, twin], "required")
    assert error.value.param == "tools"


def test_live_conflicting_defs_are_a_400(client):
    other = json.loads(json.dumps(DEFS_TOOL))
    other["function"]["name"] = "book2"
    other["function"]["parameters"]["$defs"]["Place"]["properties"]["city"]["enum"] = ["Lima"]
    with pytest.raises(openai.BadRequestError) as error:
        ask(client, [DEFS_TOOL, other], "required", max_tokens=8)
    assert "Place" in error.value.body["message"] and error.value.body["param"] == "tools"
    same = json.loads(json.dumps(DEFS_TOOL))
    same["function"]["name"] = "book2"  # the same definition twice is fine
    assert ask(client, [DEFS_TOOL, same], "required", max_tokens=4, extra_body=NO_THINKING).choices


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "book"}}])
def test_live_call_cut_by_max_tokens(client, tool_choice):
    choice = ask(client, [DEFS_TOOL], tool_choice, max_tokens=2, extra_body=NO_THINKING).choices[0]
    assert choice.finish_reason == "length" and choice.message.tool_calls == []


def test_live_grammar_waits_for_the_think_block(client):
    """A JSON schema applies from the first token when the prompt closed the think block, and not while
    the model thinks (the template opened the block, so the output starts in it)."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Oslo", "Rome"]}},
              "required": ["city"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "place", "schema": schema}}
    closed = ask(client, None, None, response_format=response_format, max_tokens=40,
                 extra_body=NO_THINKING).choices[0].message
    assert closed.reasoning_content is None
    jsonschema.validate(json.loads(closed.content), schema)
    thinking = ask(client, None, None, response_format=response_format, max_tokens=12,
                   extra_body={"chat_template_kwargs": {"open_think": True}, "ignore_eos": True}).choices[0]
    assert thinking.finish_reason == "length"
    text = (thinking.message.reasoning_content or "") + (thinking.message.content or "")
    assert text and not text.lstrip().startswith("{"), text  # free text, not the schema's object
