"""/v1/responses through the official openai client: a live server (tiny model) and the in-process fake engine."""
from __future__ import annotations

import json

import openai
import pytest

from tests.server import test_ingest_unit as fake
from tests.server.conftest import running_server

WEATHER_TOOL = {"type": "function", "name": "get_weather", "description": "the weather in a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]}},
    "required": ["city"], "additionalProperties": False}}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "responses.log", "--placement", "single") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat_text(client, messages, max_tokens=8):
    whole = client.chat.completions.create(model="m", messages=messages, max_tokens=max_tokens, temperature=0)
    return whole.choices[0].message.content, whole.usage


# --------------------------------------------------------------------------- live server


def test_string_input_with_instructions_matches_chat(client):
    response = client.responses.create(model="m", input="Speak, speak.", instructions="Answer in verse.",
                                       max_output_tokens=8, temperature=0)
    text, usage = chat_text(client, [{"role": "system", "content": "Answer in verse."},
                                     {"role": "user", "content": "Speak, speak."}])
    assert response.object == "response" and response.id.startswith("resp_")
    assert response.output_text == text
    assert response.usage.input_tokens == usage.prompt_tokens
    assert response.usage.output_tokens == usage.completion_tokens
    assert response.usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    [message] = response.output
    assert message.type == "message" and message.role == "assistant"
    if usage.completion_tokens == 8:  # cut by max_output_tokens
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    else:
        assert response.status == "completed"
    assert response.instructions == "Answer in verse." and response.max_output_tokens == 8


def test_message_list_input_and_retrieve(client):
    items = [{"role": "user", "content": "Who goes there?"},
             {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "A friend."}]},
             {"role": "developer", "content": [{"type": "input_text", "text": "Be short."}]},
             {"role": "user", "content": [{"type": "input_text", "text": "Stand and "},
                                          {"type": "input_text", "text": "unfold yourself."}]}]
    response = client.responses.create(model="m", input=items, max_output_tokens=6, temperature=0)
    text, usage = chat_text(client, [{"role": "user", "content": "Who goes there?"},
                                     {"role": "assistant", "content": "A friend."},
                                     {"role": "system", "content": "Be short."},
                                     {"role": "user", "content": "Stand and unfold yourself."}], max_tokens=6)
    assert response.output_text == text and response.usage.input_tokens == usage.prompt_tokens
    again = client.responses.retrieve(response.id)
    assert again.id == response.id and again.output_text == text and again.usage == response.usage
    assert again.output[0].id == response.output[0].id


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model="m", input="Good morrow.", instructions="Reply.", max_output_tokens=5,
                                    temperature=0)
    second = client.responses.create(model="m", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=5, temperature=0)
    text, usage = chat_text(client, [{"role": "user", "content": "Good morrow."},
                                     {"role": "assistant", "content": first.output_text},
                                     {"role": "user", "content": "And then?"}], max_tokens=5)
    assert second.previous_response_id == first.id
    assert second.output_text == text and second.usage.input_tokens == usage.prompt_tokens  # no old instructions
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="m", input="x", previous_response_id="resp_nope", max_output_tokens=2)
    unstored = client.responses.create(model="m", input="x", store=False, max_output_tokens=2)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_stream_events_add_up_to_the_whole_response(client):
    kwargs = dict(model="m", input="What news?", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final_kind = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          final_kind]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == whole.output_text == events[-4].text == events[-3].part.text
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    final = events[-1].response
    assert final.output_text == whole.output_text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (whole.usage.input_tokens,
                                                                     whole.usage.output_tokens)
    assert client.responses.retrieve(final.id).output_text == whole.output_text


def test_forced_function_call_and_its_output_round_trip(client):
    kwargs = dict(model="m", input="Weather in Paris?", tools=[WEATHER_TOOL], max_output_tokens=20, temperature=0,
                  tool_choice={"type": "function", "name": "get_weather"})
    response = client.responses.create(**kwargs)
    calls = [item for item in response.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather"
    assert json.loads(calls[0].arguments)["city"] in ("Paris", "Rome")
    events = list(client.responses.create(stream=True, **kwargs))
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    [done] = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert arguments == done.arguments == calls[0].arguments
    added = [e.item for e in events if e.type == "response.output_item.added"]
    assert [item.type for item in added] == ["function_call"] and added[0].name == "get_weather"
    # the call and its output go back as input items: the same prompt as the chat form of that conversation
    follow = client.responses.create(model="m", max_output_tokens=4, temperature=0, tools=[WEATHER_TOOL], input=[
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": calls[0].call_id, "name": "get_weather", "arguments": calls[0].arguments},
        {"type": "function_call_output", "call_id": calls[0].call_id, "output": "sunny"}])
    chat = client.chat.completions.create(model="m", max_tokens=4, temperature=0, tools=[
        {"type": "function", "function": {k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")}}],
        messages=[{"role": "user", "content": "Weather in Paris?"},
                  {"role": "assistant", "content": None, "tool_calls": [{"id": calls[0].call_id, "type": "function",
                   "function": {"name": "get_weather", "arguments": calls[0].arguments}}]},
                  {"role": "tool", "tool_call_id": calls[0].call_id, "content": "sunny"}])
    assert follow.usage.input_tokens == chat.usage.prompt_tokens
    assert follow.output_text == chat.choices[0].message.content


@pytest.mark.parametrize("extra, param", [
    ({"background": True}, "background"),
    ({"reasoning": {"effort": "high"}}, "reasoning"),
    ({"include": ["message.output_text.logprobs"]}, "include"),
    ({"truncation": "auto"}, "truncation"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": [{"type": "bogus"}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content[0].type"),
    ({"max_output_tokens": -1}, "max_output_tokens"),
    ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER_TOOL]}, "tool_choice"),
])
def test_unserved_or_bad_fields_are_a_400_naming_them(client, extra, param):
    body = dict({"model": "m", "input": "hi", "max_output_tokens": 2}, **extra)
    with pytest.raises(openai.BadRequestError) as caught:
        client.post("/responses", body=body, cast_to=object)
    assert caught.value.status_code == 400 and caught.value.body["param"] == param


def test_cancel_is_refused_without_background(client):
    response = client.responses.create(model="m", input="hi", max_output_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.responses.cancel(response.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.cancel("resp_nope")


# --------------------------------------------------------------------------- fake engine: parsers


class Tokenizer(fake.FakeTokenizer):
    def encode(self, text, add_special_tokens=False):
        return list(range(len(text.split())))


def test_reasoning_and_tool_call_items(monkeypatch):
    """Parser output (reasoning, text, a tool call) -> three output items, whole and streamed alike."""
    monkeypatch.setattr(fake, "FakeTokenizer", Tokenizer)

    async def test(http, ctx):
        client = openai.AsyncOpenAI(base_url=str(http.make_url("/v1")), api_key="unused", max_retries=0)
        kwargs = dict(model="m", input="weather in Paris?", tools=[WEATHER_TOOL])
        whole = await client.responses.create(**kwargs)
        assert [item.type for item in whole.output] == ["reasoning", "message", "function_call"]
        assert whole.output[0].content[0].text == "weather?" and whole.output_text == "Checking."
        assert (whole.output[2].name, whole.output[2].arguments) == ("get_weather", '{"city": "Paris"}')
        assert whole.usage.output_tokens_details.reasoning_tokens == 1
        events = [event async for event in await client.responses.create(stream=True, **kwargs)]
        added = [(e.output_index, e.item.type) for e in events if e.type == "response.output_item.added"]
        assert added == [(0, "reasoning"), (1, "message"), (2, "function_call")]
        reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
        arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        assert (reasoning, arguments) == ("weather?", '{"city": "Paris"}')
        final = events[-1].response
        assert events[-1].type == "response.completed"
        assert [item.model_dump(exclude={"id", "call_id"}) for item in final.output] == [
            item.model_dump(exclude={"id", "call_id"}) for item in whole.output]

    seen = fake.run("tool", test, tool_call_parser="qwen25", reasoning_parser="qwen3")
    assert seen[0].tools == [{"type": "function", "function": {
        k: WEATHER_TOOL[k] for k in ("name", "description", "parameters")}}]


def test_engine_error_mid_stream_ends_with_response_failed(monkeypatch):
    monkeypatch.setattr(fake, "FakeTokenizer", Tokenizer)

    async def test(http, ctx):
        client = openai.AsyncOpenAI(base_url=str(http.make_url("/v1")), api_key="unused", max_retries=0)
        events = [event async for event in await client.responses.create(model="m", input="x", stream=True)]
        assert [e.type for e in events][-2:] == ["error", "response.failed"]
        assert events[-1].response.status == "failed" and "engine fell over" in events[-2].message

    fake.run("fail", test)
