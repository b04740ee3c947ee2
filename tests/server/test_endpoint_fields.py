"""Every request field of the other endpoints is honoured or refused with a 400 naming it.

``test_request_fields.py`` walks /v1/completions, /v1/chat/completions and
/generate; this file walks the rest: /v1/responses (and its input items,
content parts, tools and ``text``), Ollama's /api/generate, /api/chat (with
its messages and options) and /api/show, /tokenize and /detokenize,
/v1/batches (the create body and each input line), the /v1/files upload form
and the list query parameters, /abort_request, /flush_cache, /invocations,
chat messages' own keys and ``chat_template_kwargs``.

The walk enumerates each Struct's fields (and each hand-checked key list), so
a field added without a test fails it: every field names a behaviour test
whose source mentions it, or a value refused with a 400 naming it. Keys
accepted and not read by design are listed in the code with their reason
(``MESSAGE_KEYS_UNUSED``, ``responses_api.ACCEPTED_UNUSED``) and tested
here. Undeclared keys are sent to a live server and must come back as a 400
naming them (Ollama's errors are ``{"error": "<message>"}``: the message
names the key).
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request

import msgspec
import openai
import pytest

from stages.ingest import batch_api, ollama_routes, responses_api
from stages.ingest.convert import chat_request, make_sampling
from stages.ingest.misc_routes import DetokenizeBody, TokenizeBody
from stages.ingest.protocol import (MESSAGE_KEYS_UNUSED, AbortRequestBody, ChatCompletionRequest, ChatMessageIn,
                                    ContentPart, FunctionCallIn, ToolCallIn)
from tests.server.conftest import running_server
from tests.server.test_request_fields import assert_behaviour_tests, declared

HERE = "tests/server/test_endpoint_fields.py"
RESPONSES_TESTS, OLLAMA_TESTS = "tests/server/test_responses_api.py", "tests/server/test_ollama.py"
BATCH_TESTS, ENDPOINT_TESTS = "tests/server/test_batch_api.py", "tests/server/test_endpoints.py"
PROMPT = "First Citizen: Before we proceed"
CHAT = [{"role": "user", "content": "hi"}]

# Fields /api/generate and /api/chat share (OllamaBody): behaviour tests and refused values.
OLLAMA_SHARED = ({
    "model": f"{HERE}::test_ollama_any_model_name_and_keep_alive",
    "stream": f"{OLLAMA_TESTS}::test_generate_whole_and_streamed_agree",
    "format": f"{OLLAMA_TESTS}::test_format_json_is_enforced",
    "options": f"{HERE}::test_ollama_options_become_sampling_params",
    "keep_alive": f"{HERE}::test_ollama_any_model_name_and_keep_alive",
}, {"think": True, "logprobs": True, "top_logprobs": 2, "keep_alive": 0})

# Struct -> {field: behaviour test}, {field: a value refused with a 400 naming the field}.
WALK = {
    responses_api.ResponsesRequest: ({
        "input": f"{RESPONSES_TESTS}::test_message_list_input_and_retrieve",
        "model": f"{RESPONSES_TESTS}::test_string_input_with_instructions_matches_chat",
        "instructions": f"{RESPONSES_TESTS}::test_string_input_with_instructions_matches_chat",
        "previous_response_id": f"{RESPONSES_TESTS}::test_previous_response_id_continues_the_conversation",
        "store": f"{RESPONSES_TESTS}::test_previous_response_id_continues_the_conversation",
        "max_output_tokens": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "temperature": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "top_p": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "top_k": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "min_p": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "repetition_penalty": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "seed": f"{HERE}::test_responses_sampling_fields_reach_the_sampler",
        "tools": f"{RESPONSES_TESTS}::test_forced_function_call_and_its_output_round_trip",
        "tool_choice": f"{RESPONSES_TESTS}::test_forced_function_call_and_its_output_round_trip",
        "parallel_tool_calls": f"{HERE}::test_responses_parallel_tool_calls_false_keeps_one_call",
        "text": f"{HERE}::test_responses_text_format_and_echoed_fields",
        "metadata": f"{HERE}::test_responses_text_format_and_echoed_fields",
        "user": f"{HERE}::test_responses_text_format_and_echoed_fields",
        "service_tier": f"{HERE}::test_responses_text_format_and_echoed_fields",
        "truncation": f"{HERE}::test_responses_text_format_and_echoed_fields",
        "stream": f"{RESPONSES_TESTS}::test_stream_events_add_up_to_the_whole_response",
    }, {"background": True, "reasoning": {"effort": "low"}, "include": ["reasoning.encrypted_content"],
        "top_logprobs": 2, "max_tool_calls": 1, "conversation": "conv_1", "prompt": {"id": "pmpt_1"},
        "stream_options": {"include_obfuscation": False}, "truncation": "auto", "service_tier": "flex"}),
    ollama_routes.OllamaGenerateBody: ({
        **OLLAMA_SHARED[0],
        "prompt": f"{OLLAMA_TESTS}::test_generate_raw_sends_the_prompt_as_is",
        "raw": f"{OLLAMA_TESTS}::test_generate_raw_sends_the_prompt_as_is",
        "system": f"{HERE}::test_ollama_system_prompt_reaches_the_template",
    }, {**OLLAMA_SHARED[1], "suffix": " end", "template": "{{ .Prompt }}", "context": [1, 2], "images": ["aGk="]}),
    ollama_routes.OllamaChatBody: ({
        **OLLAMA_SHARED[0], "messages": f"{OLLAMA_TESTS}::test_chat_whole_and_streamed_agree",
    }, {**OLLAMA_SHARED[1], "tools": [{"type": "function", "function": {"name": "f"}}]}),
    ollama_routes.OllamaShowBody: ({"model": f"{OLLAMA_TESTS}::test_list_and_show"}, {}),
    ollama_routes.OllamaMessage: ({
        "role": f"{OLLAMA_TESTS}::test_chat_whole_and_streamed_agree",
        "content": f"{OLLAMA_TESTS}::test_chat_whole_and_streamed_agree",
        "tool_calls": f"{HERE}::test_ollama_message_fields_become_chat_turns",
        "tool_name": f"{HERE}::test_ollama_message_fields_become_chat_turns",
        "thinking": f"{HERE}::test_ollama_message_fields_become_chat_turns",
    }, {"images": ["aGk="]}),
    ollama_routes.OllamaToolCall: ({"function": f"{HERE}::test_ollama_message_fields_become_chat_turns"}, {}),
    ollama_routes.OllamaOptions: ({name: f"{HERE}::test_ollama_options_become_sampling_params"
                                   for name in ollama_routes.OPTION_NAMES}, {}),
    TokenizeBody: ({
        "model": f"{HERE}::test_tokenize_detokenize_any_model_name",
        "prompt": f"{ENDPOINT_TESTS}::test_tokenize_options_and_sglang_list_form",
        "add_special_tokens": f"{ENDPOINT_TESTS}::test_tokenize_options_and_sglang_list_form",
        "return_token_strs": f"{ENDPOINT_TESTS}::test_tokenize_options_and_sglang_list_form",
        "messages": f"{ENDPOINT_TESTS}::test_tokenize_messages_counts_what_a_chat_is_prompted_with",
        "add_generation_prompt": f"{ENDPOINT_TESTS}::test_tokenize_messages_counts_what_a_chat_is_prompted_with",
        "continue_final_message": f"{HERE}::test_tokenize_chat_options",
        "tools": f"{HERE}::test_tokenize_chat_options",
        "chat_template_kwargs": f"{HERE}::test_chat_template_kwargs_keys",
    }, {}),
    DetokenizeBody: ({
        "model": f"{HERE}::test_tokenize_detokenize_any_model_name",
        "tokens": f"{ENDPOINT_TESTS}::test_detokenize_round_trip_in_both_shapes",
        "skip_special_tokens": f"{ENDPOINT_TESTS}::test_detokenize_round_trip_in_both_shapes",
    }, {}),
    batch_api.BatchCreate: ({
        "input_file_id": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
        "endpoint": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
        "completion_window": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
        "metadata": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
    }, {"output_expires_after": {"anchor": "created_at", "seconds": 3600}, "completion_window": "1h"}),
    batch_api.BatchLine: ({
        "custom_id": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
        "url": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
        "body": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
        "method": f"{HERE}::test_batch_line_keys_and_method",
    }, {}),
    AbortRequestBody: ({
        "rid": "tests/server/test_ingest_unit.py::test_overload_is_503_and_abort_request_ends_stream",
        "abort_all": f"{HERE}::test_abort_request_fields",
    }, {}),
    ChatMessageIn: ({
        "role": "tests/server/test_openai_api.py::test_chat_stream_equals_whole",
        "content": "tests/server/test_openai_api.py::test_chat_stream_equals_whole",
        "name": f"{HERE}::test_chat_message_keys",
        "tool_calls": f"{RESPONSES_TESTS}::test_forced_function_call_and_its_output_round_trip",
        "tool_call_id": f"{HERE}::test_chat_message_keys",
        "reasoning_content": f"{HERE}::test_chat_message_keys",
        "reasoning": f"{HERE}::test_chat_message_keys",
        "function_call": f"{HERE}::test_chat_message_keys",
        **{key: f"{HERE}::test_chat_message_keys" for key in MESSAGE_KEYS_UNUSED},
    }, {}),
    ContentPart: ({key: f"{HERE}::test_content_parts_are_read" for key in ("type", "text", "image_url", "video_url",
                                                                           "video")}, {}),
    ToolCallIn: ({key: f"{HERE}::test_tool_call_keys" for key in ("id", "type", "function", "index")}, {}),
    FunctionCallIn: ({key: f"{HERE}::test_tool_call_keys" for key in ("name", "arguments", "parsed_arguments")}, {}),
}

# Key lists checked by hand (dicts, forms, query strings): each key -> its behaviour test.
KEY_LISTS = {
    "files form": (batch_api.FORM_FIELDS, {"file": f"{BATCH_TESTS}::test_chat_batch_writes_output_and_error_files",
                                           "purpose": f"{BATCH_TESTS}::test_bad_requests"}),
    "files query": (batch_api.FILE_QUERY, {name: f"{BATCH_TESTS}::test_file_listing_pages_and_orders"
                                           for name in ("order", "after", "limit")}
                    | {"purpose": f"{HERE}::test_list_query_parameters"}),
    "batches query": (batch_api.BATCH_QUERY, {name: f"{HERE}::test_list_query_parameters"
                                              for name in ("after", "limit")}),
    "responses tools": (tuple(responses_api.TOOL_KEYS), {
        key: f"{RESPONSES_TESTS}::test_forced_function_call_and_its_output_round_trip"
        for key in ("type", "name", "parameters")} | {key: f"{HERE}::test_responses_item_keys"
                                                      for key in ("description", "strict")}),
    "responses items": (tuple({key for keys in responses_api.INPUT_KEYS.values() for key in keys}
                              | {key for keys in responses_api.PART_KEYS.values() for key in keys}
                              | set(responses_api.ACCEPTED_UNUSED)),
                        {key: f"{HERE}::test_responses_item_keys" for key in (
                            "type", "role", "content", "call_id", "name", "arguments", "output", "text", "refusal",
                            "image_url", "summary", "encrypted_content", *responses_api.ACCEPTED_UNUSED)}),
}


def test_every_field_is_honoured_or_refused():
    missing = {struct.__name__: sorted(declared(struct) - set(honoured) - set(refused))
               for struct, (honoured, refused) in WALK.items()}
    assert all(not names for names in missing.values()), f"fields with neither a behaviour test nor a refusal: {missing}"
    stray = {struct.__name__: sorted((set(honoured) | set(refused)) - declared(struct))
             for struct, (honoured, refused) in WALK.items()}
    assert all(not names for names in stray.values()), f"fields the Structs do not declare: {stray}"
    for honoured, _ in WALK.values():
        assert_behaviour_tests(honoured)
    reasons = responses_api.ACCEPTED_UNUSED
    assert set().union(*responses_api.UNUSED_BY_KIND.values()) == set(reasons) and all(reasons.values())
    for what, (keys, honoured) in KEY_LISTS.items():
        assert set(keys) == set(honoured), (what, set(keys) ^ set(honoured))
        assert_behaviour_tests(honoured)


def test_every_body_struct_forbids_undeclared_fields():
    for struct in WALK:
        if struct is not ollama_routes.OllamaOptions:  # options: unknown names are refused by name first
            assert struct.__struct_config__.forbid_unknown_fields, struct.__name__


# --------------------------------------------------------------------------- the live server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "endpoint_fields.log",
                        "--placement", "single") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def call(server, method: str, path: str, body=None, data: bytes | None = None,
         headers: dict | None = None) -> tuple[int, dict]:
    payload = data if data is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(server.url + path, data=payload, method=method,
                                     headers=headers or {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def message_of(body: dict) -> str:
    """The error text, OpenAI-shaped or Ollama-shaped."""
    return body["error"]["message"] if isinstance(body["error"], dict) else body["error"]


def assert_named_400(server, path: str, body: dict, name: str, method: str = "POST") -> dict:
    """A 400 naming ``name``: in ``param`` (OpenAI's shape) or in the message (Ollama's, which has no param)."""
    status, answer = call(server, method, path, body)
    assert status == 400, (path, name, answer)
    if isinstance(answer["error"], dict):
        assert (answer["error"]["param"] or "").endswith(name), (path, name, answer)
    else:
        assert name in answer["error"], (path, name, answer)
    return answer


OLLAMA_MINIMAL = {"model": "demo", "stream": False, "options": {"num_predict": 2}}
MINIMAL = {
    "/v1/responses": {"input": "hi", "max_output_tokens": 2},
    "/api/generate": dict(OLLAMA_MINIMAL, prompt=PROMPT),
    "/api/chat": dict(OLLAMA_MINIMAL, messages=CHAT),
    "/api/show": {"model": "demo"},
    "/tokenize": {"prompt": PROMPT},
    "/detokenize": {"tokens": [1, 2]},
    "/abort_request": {"rid": "nothing-running"},
    "/invocations": {"messages": CHAT, "max_tokens": 2},
}
UNDECLARED = {
    "/v1/responses": {"prompt_cache_key": "k", "safety_identifier": "u", "frequency_penalty": 1.0,
                      "not_a_field": 1},
    "/api/generate": {"width": 64, "height": 64, "steps": 4, "not_a_field": 1},
    "/api/chat": {"prompt": PROMPT, "not_a_field": 1},
    "/api/show": {"verbose": True, "not_a_field": 1},
    "/tokenize": {"chat_template": "{{ 1 }}", "not_a_field": 1},
    "/detokenize": {"not_a_field": 1},
    "/abort_request": {"not_a_field": 1},
    "/invocations": {"not_a_field": 1},
}
REFUSED_LIVE = {"/v1/responses": responses_api.ResponsesRequest, "/api/generate": ollama_routes.OllamaGenerateBody,
                "/api/chat": ollama_routes.OllamaChatBody}


@pytest.mark.parametrize("path,field", [(p, f) for p, fields in UNDECLARED.items() for f in fields])
def test_undeclared_fields_are_refused_by_name(server, path, field):
    assert_named_400(server, path, dict(MINIMAL[path], **{field: UNDECLARED[path][field]}), field)


@pytest.mark.parametrize("path,field", [(p, f) for p, struct in REFUSED_LIVE.items() for f in WALK[struct][1]])
def test_refused_values_are_a_400_naming_them(server, path, field):
    assert_named_400(server, path, dict(MINIMAL[path], **{field: WALK[REFUSED_LIVE[path]][1][field]}), field)


def test_nested_undeclared_keys_are_refused_by_name(server):
    assert_named_400(server, "/api/chat", dict(MINIMAL["/api/chat"], messages=[
        {"role": "user", "content": "hi", "images": ["aGk="]}]), "images")
    assert_named_400(server, "/api/chat", dict(MINIMAL["/api/chat"], messages=[
        {"role": "user", "content": "hi", "mood": "calm"}]), "mood")
    assert_named_400(server, "/api/generate", dict(MINIMAL["/api/generate"], options={"num_ctx": 2048}), "num_ctx")
    assert_named_400(server, "/api/chat", dict(MINIMAL["/api/chat"], messages=[{"role": "assistant", "content": "",
                     "tool_calls": [{"function": {"name": "f", "arguments": {}}, "id": "x"}]}]),
                     "messages[0].tool_calls[0].id")
    assert_named_400(server, "/v1/chat/completions", {"messages": [dict(CHAT[0], mood="calm")], "max_tokens": 2},
                     "messages[0].mood")
    assert_named_400(server, "/v1/responses", {"input": [{"role": "user", "content": "hi", "mood": "calm"}]},
                     "input[0].mood")
    assert_named_400(server, "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi", "mood": "calm"}]}]}, "input[0].content[0].mood")
    assert_named_400(server, "/v1/responses", {"input": "hi", "text": {"verbosity": "low"}}, "text.verbosity")
    assert_named_400(server, "/v1/responses", {"input": [{"role": "user", "content": [
        {"type": "input_text", "text": "hi", "annotations": []}]}]}, "input[0].content[0].annotations")
    assert_named_400(server, "/v1/responses", {"input": "hi", "tools": [
        {"type": "function", "name": "f", "mood": "calm"}]}, "tools[0].mood")


def test_responses_retrieve_query_is_refused_by_name(client, server):
    response = client.responses.create(model="m", input="hi", max_output_tokens=2)
    assert call(server, "GET", f"/v1/responses/{response.id}")[0] == 200
    assert_named_400(server, f"/v1/responses/{response.id}?stream=true", None, "stream", method="GET")


def test_no_embeddings_route(server):
    status, _ = call(server, "POST", "/v1/embeddings", {"model": "m", "input": "x"})
    assert status == 404  # not served at all: nothing is half-answered


# --------------------------------------------------------------------------- /v1/responses


def responses_text(client, **fields) -> str:
    return client.responses.create(model="m", input=PROMPT, max_output_tokens=fields.pop("max_output_tokens", 10),
                                   **fields).output_text


def test_responses_sampling_fields_reach_the_sampler(client):
    base = responses_text(client, temperature=0)
    assert responses_text(client, temperature=5.0, extra_body={"top_k": 1}) == base
    assert responses_text(client, temperature=5.0, top_p=1e-6) == base
    assert responses_text(client, temperature=5.0, extra_body={"min_p": 1.0}) == base
    hot = [responses_text(client, temperature=5.0, extra_body={"seed": s}) for s in (1, 2)]
    assert any(sample != base for sample in hot)
    assert responses_text(client, temperature=5.0, extra_body={"seed": 1}) == hot[0]  # the seed reproduces it
    assert responses_text(client, temperature=0, extra_body={"repetition_penalty": 2.0},
                          max_output_tokens=24) != responses_text(client, temperature=0, max_output_tokens=24)
    short = client.responses.create(model="m", input=PROMPT, max_output_tokens=3, temperature=0)
    assert short.usage.output_tokens <= 3


def test_responses_parallel_tool_calls_false_keeps_one_call(client):
    tools = [{"type": "function", "name": name, "parameters": {"type": "object", "properties": {}}}
             for name in ("now", "later")]
    response = client.responses.create(model="m", input="call", tools=tools, tool_choice="required",
                                       parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    assert response.parallel_tool_calls is False
    assert [item.type for item in response.output].count("function_call") == 1


def test_responses_text_format_and_echoed_fields(client, server):
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"],
              "additionalProperties": False}
    response = client.responses.create(model="m", input=PROMPT, max_output_tokens=20, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "k", "schema": schema}},
                                       metadata={"job": "t"}, user="someone", service_tier="auto",
                                       truncation="disabled")
    assert isinstance(json.loads(response.output_text)["k"], bool)
    assert response.metadata == {"job": "t"} and response.user == "someone"
    plain = client.responses.create(model="m", input=PROMPT, max_output_tokens=6, temperature=0,
                                    service_tier="default")
    assert plain.output_text == responses_text(client, temperature=0, max_output_tokens=6, user="x")


def test_responses_item_keys(client, server):
    """Items sent back as the API returned them (ids, statuses, annotations, logprobs) are read for their
    content only; ``detail`` of an image and a tool's ``description``/``strict`` are accepted too."""
    earlier = client.responses.create(model="m", input=PROMPT, max_output_tokens=4, temperature=0)
    sent_back = [item.model_dump(exclude_none=True) for item in earlier.output]
    assert {"id", "status"} <= set(sent_back[0]) and {"annotations", "logprobs"} <= set(sent_back[0]["content"][0])
    items = [{"type": "message", "role": "user", "content": PROMPT}, *sent_back,
             {"type": "reasoning", "summary": [], "encrypted_content": "x", "id": "rs_1"},
             {"type": "message", "role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]},
             {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}", "status": "completed"},
             {"type": "function_call_output", "call_id": "c1", "output": "done", "id": "fco_1"},
             {"role": "user", "content": [{"type": "input_text", "text": "And?"},
                                          {"type": "output_text", "text": " Well?"}]}]
    follow = client.responses.create(model="m", input=items, max_output_tokens=2, temperature=0,
                                     tools=[{"type": "function", "name": "f", "description": "a tool",
                                             "strict": True, "parameters": {"type": "object"}}])
    assert follow.status in ("completed", "incomplete")
    image = {"type": "input_image", "image_url": "http://127.0.0.1:1/x.png"}
    answers = [call(server, "POST", "/v1/responses", {"input": [{"role": "user", "content": [part]}],
                                                      "max_output_tokens": 2}) for part in (image, dict(image, detail="low"))]
    assert answers[0] == answers[1]  # detail changes nothing (this text model answers both alike)


# --------------------------------------------------------------------------- Ollama


def test_ollama_options_become_sampling_params():
    options = {"temperature": 0.7, "top_p": 0.9, "top_k": 5, "min_p": 0.05, "seed": 3, "stop": ["\n"],
               "num_predict": 7, "presence_penalty": 0.5, "frequency_penalty": 0.25, "repeat_penalty": 1.1}
    assert set(options) == set(ollama_routes.OPTION_NAMES)
    body = ollama_routes.OllamaGenerateBody(model="m", prompt="x", options=options)
    sampling = make_sampling(ollama_routes.sampling_params(body), ollama_routes.ERROR_NAMES)
    for name, field in ollama_routes.OPTION_NAMES.items():
        assert getattr(sampling, field) == pytest.approx(options[name]) or \
            list(getattr(sampling, field)) == options[name], name


def test_ollama_message_fields_become_chat_turns():
    body = msgspec.convert({"model": "m", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "thinking": "look it up",
         "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": "sunny", "tool_name": "get_weather"}]}, ollama_routes.OllamaChatBody)
    turns = ollama_routes.chat_generate_request(body, "r").messages
    assert turns[1].reasoning_content == "look it up"  # thinking
    assert turns[1].tool_calls[0].function.name == "get_weather"  # tool_calls
    assert json.loads(turns[1].tool_calls[0].function.arguments) == {"city": "Paris"}
    assert turns[2].role == "tool" and turns[2].name == "get_weather"  # tool_name


def test_ollama_system_prompt_reaches_the_template(server, tokenizer):
    status, plain = call(server, "POST", "/api/generate", MINIMAL["/api/generate"])
    status2, with_system = call(server, "POST", "/api/generate", dict(MINIMAL["/api/generate"], system="Be brief."))
    assert status == status2 == 200
    system_tokens = len(tokenizer.encode("<|im_start|>system\nBe brief.<|im_end|>\n", add_special_tokens=False))
    assert with_system["prompt_eval_count"] == plain["prompt_eval_count"] + system_tokens


def test_ollama_any_model_name_and_keep_alive(server):
    """keep_alive: any positive or negative duration is met (the model is always loaded); 0 (unload) is a 400."""
    status, base = call(server, "POST", "/api/generate", dict(MINIMAL["/api/generate"], options={
        "num_predict": 4, "temperature": 0}))
    assert status == 200
    for keep_alive in (300, "5m", "1h30m", -1, "-1m"):
        status, answer = call(server, "POST", "/api/generate", dict(
            MINIMAL["/api/generate"], model="another-name", keep_alive=keep_alive,
            options={"num_predict": 4, "temperature": 0}))
        assert status == 200 and answer["response"] == base["response"], keep_alive
        assert answer["model"] == "another-name"
    for keep_alive in (0, "0", "0s", "0m0s"):
        assert_named_400(server, "/api/generate", dict(MINIMAL["/api/generate"], keep_alive=keep_alive),
                         "keep_alive")
    assert_named_400(server, "/api/generate", {"model": "demo", "keep_alive": 0}, "keep_alive")  # ollama stop
    assert_named_400(server, "/api/generate", dict(MINIMAL["/api/generate"], keep_alive="soon"), "keep_alive")
    assert call(server, "POST", "/api/generate", {"model": "demo", "keep_alive": "10m"})[0] == 200  # load


# --------------------------------------------------------------------------- tokenize, detokenize, templates


def test_tokenize_detokenize_any_model_name(server, tokenizer):
    status, tokens = call(server, "POST", "/tokenize", {"model": "another-name", "prompt": PROMPT})
    assert status == 200 and tokens["tokens"] == tokenizer.encode(PROMPT)
    status, text = call(server, "POST", "/detokenize", {"model": "another-name", "tokens": tokens["tokens"]})
    assert status == 200 and text["text"] == tokenizer.decode(tokens["tokens"])


def test_tokenize_chat_options(server, tokenizer):
    turns = CHAT + [{"role": "assistant", "content": "Well, my"}]
    status, opened = call(server, "POST", "/tokenize", {"messages": turns, "continue_final_message": True})
    assert status == 200 and tokenizer.decode(opened["tokens"]).endswith("assistant\nWell, my")
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    status, _ = call(server, "POST", "/tokenize", {"messages": CHAT, "tools": tools})
    assert status == 200
    assert_named_400(server, "/tokenize", {"messages": CHAT, "tools": [{"type": "retrieval"}]}, "tools[0]")


def test_chat_template_kwargs_keys(server):
    """Every key is a template variable and reaches the template (tests/stages/test_tokenize.py shows one read);
    a client template needs the server flag; a key that is one of the template call's own arguments is a 400."""
    assert call(server, "POST", "/tokenize", {"messages": CHAT, "chat_template_kwargs": {"shout": True}})[0] == 200
    assert_named_400(server, "/tokenize", {"messages": CHAT, "chat_template_kwargs": {"chat_template": "{{ 1 }}"}},
                     "chat_template_kwargs.chat_template")
    for key in ("tools", "add_generation_prompt", "messages", "tokenize"):
        assert_named_400(server, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 2,
                                                          "chat_template_kwargs": {key: True}},
                         f"chat_template_kwargs.{key}")


def test_chat_message_keys(client, server):
    """An answer's message sent back as the client got it (with refusal, annotations, audio) prompts the
    model exactly as its role and content alone do; name, tool_call_id, reasoning and the legacy
    function_call are read."""
    base = client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, temperature=0)
    sent_back = base.choices[0].message.model_dump()
    assert set(MESSAGE_KEYS_UNUSED) <= {"refusal", "annotations", "audio"} <= set(sent_back)
    again = client.chat.completions.create(model="m", messages=CHAT + [sent_back, CHAT[0]], max_tokens=4,
                                           temperature=0, extra_body={"return_token_ids": True})
    plain = client.chat.completions.create(model="m", max_tokens=4, temperature=0, extra_body={
        "return_token_ids": True}, messages=CHAT + [{"role": "assistant", "content": sent_back["content"]}, CHAT[0]])
    assert again.model_dump()["prompt_token_ids"] == plain.model_dump()["prompt_token_ids"]  # refusal etc. unread
    assert ChatMessageIn(role="assistant", reasoning="hm").reasoning_content == "hm"  # vLLM's name
    assert ChatMessageIn(role="assistant", reasoning="a", reasoning_content="b").reasoning_content == "b"
    legacy = msgspec.convert({"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}, ChatMessageIn)
    assert legacy.tool_calls[0].function.name == "f"
    named = client.chat.completions.create(model="m", max_tokens=2, extra_body={"return_token_ids": True}, messages=[
        {"role": "user", "content": "hi", "name": "ann"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "ok", "tool_call_id": "c1"}])
    assert named.choices[0].message is not None
    assert_named_400(server, "/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "tool", "content": "ok"}]}, "tool_call_id")


def test_content_parts_are_read(server):
    parts = [{"type": "text", "text": "look "}, {"type": "image_url", "image_url": {"url": "http://h/a.png"}},
             {"type": "video_url", "video_url": {"url": "http://h/b.mp4"}},
             {"type": "video", "video": ["http://h/f0.png", "http://h/f1.png"]}, {"type": "text", "text": "now"}]
    body = msgspec.convert({"messages": [{"role": "user", "content": parts}]}, ChatCompletionRequest)
    request = chat_request(body, "r", 0.0)
    assert request.messages[0].content == "look now"  # the text parts, joined
    assert request.image_urls == ["http://h/a.png", "http://h/b.mp4", str(["http://h/f0.png", "http://h/f1.png"])]
    assert_named_400(server, "/v1/chat/completions", {"max_tokens": 2, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]}]}, "cache_control")


def test_tool_call_keys(client, server):
    """A tool call sent back as a streamed or parse()d answer holds it (with index, parsed_arguments) prompts
    the model as the call alone does: id, type, function name and arguments are read."""
    call_of = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}
    extra = {"id": "c1", "type": "function", "index": 0,
             "function": {"name": "f", "arguments": '{"a": 1}', "parsed_arguments": {"a": 1}}}
    prompts = []
    for tool_call in (call_of, extra):
        reply = client.chat.completions.create(model="m", max_tokens=1, extra_body={"return_token_ids": True},
                                               messages=[CHAT[0], {"role": "assistant", "tool_calls": [tool_call]},
                                                         {"role": "tool", "tool_call_id": "c1", "content": "2"}])
        prompts.append(reply.model_dump()["prompt_token_ids"])
    assert prompts[0] == prompts[1]
    body = msgspec.convert({"messages": [CHAT[0], {"role": "assistant", "tool_calls": [extra]}]}, ChatCompletionRequest)
    [read] = chat_request(body, "r", 0.0).messages[1].tool_calls  # what the template is given
    assert (read.id, read.type, read.function.name, read.function.arguments) == ("c1", "function", "f", '{"a": 1}')
    assert_named_400(server, "/v1/chat/completions", {"max_tokens": 2, "messages": [
        {"role": "assistant", "tool_calls": [dict(call_of, mood=1)]}]}, "messages[0].tool_calls[0].mood")


# --------------------------------------------------------------------------- batches, files, control


def upload(server, data: bytes, extra_fields: dict[str, str] | None = None) -> tuple[int, dict]:
    boundary = "fieldsboundary"
    fields = {"purpose": "batch", **(extra_fields or {})}
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
             for name, value in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="in.jsonl"\r\n'
                 f"Content-Type: application/octet-stream\r\n\r\n".encode() + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return call(server, "POST", "/v1/files", data=body,
                headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})


def test_batch_line_keys_and_method(server):
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 1}},
             {"custom_id": "get", "method": "GET", "url": "/v1/completions", "body": {"prompt": "x"}},
             {"custom_id": "extra", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x"}, "mood": 1},
             {"custom_id": "inner", "method": "POST", "url": "/v1/completions", "body": {"prompt": "x", "mood": 1}}]
    status, uploaded = upload(server, b"".join(json.dumps(line).encode() + b"\n" for line in lines))
    assert status == 200
    status, batch = call(server, "POST", "/v1/batches", {"input_file_id": uploaded["id"],
                                                         "endpoint": "/v1/completions"})
    assert status == 200
    deadline = time.monotonic() + 120
    while batch["status"] not in ("completed", "failed") and time.monotonic() < deadline:
        time.sleep(0.2)
        batch = call(server, "GET", f"/v1/batches/{batch['id']}")[1]
    assert batch["status"] == "completed" and batch["request_counts"]["completed"] == 1
    with urllib.request.urlopen(f"{server.url}/v1/files/{batch['error_file_id']}/content") as response:
        errors = [json.loads(line) for line in response.read().splitlines()]
    by_id = {record["custom_id"]: record["error"]["message"] for record in errors}
    assert "GET" in by_id["get"] and "mood" in by_id["extra"] and "mood" in by_id["inner"]
    assert_named_400(server, "/v1/batches", {"input_file_id": uploaded["id"], "endpoint": "/v1/completions",
                                             "priority": 1}, "priority")


def test_list_query_parameters(server):
    assert upload(server, b"{}\n", {"expires_after[anchor]": "created_at"})[0] == 400
    status, uploaded = upload(server, b"{}\n")
    assert status == 200
    status, listed = call(server, "GET", "/v1/files?purpose=batch")
    assert status == 200 and uploaded["id"] in [f["id"] for f in listed["data"]]
    status, other = call(server, "GET", "/v1/files?purpose=assistants")
    assert status == 200 and other["data"] == []
    assert_named_400(server, "/v1/files?limit=1&page=2", None, "page", method="GET")
    for endpoint in ("/v1/completions", "/v1/completions"):
        call(server, "POST", "/v1/batches", {"input_file_id": uploaded["id"], "endpoint": endpoint})
    status, first = call(server, "GET", "/v1/batches?limit=1")
    assert status == 200 and len(first["data"]) == 1 and first["has_more"]
    status, after = call(server, "GET", f"/v1/batches?limit=1&after={first['data'][0]['id']}")
    assert status == 200 and after["data"][0]["id"] != first["data"][0]["id"]
    assert_named_400(server, "/v1/batches?order=asc", None, "order", method="GET")


def test_abort_request_fields(server):
    status, answer = call(server, "POST", "/abort_request", {"abort_all": True})
    assert status == 200 and answer == {"aborted": []}  # nothing running
    assert call(server, "POST", "/abort_request", {"rid": "nothing-running"})[0] == 404


def test_flush_cache_takes_no_parameters(server):
    assert call(server, "POST", "/flush_cache", {})[0] == 200
    assert call(server, "GET", "/flush_cache")[0] == 200
    assert_named_400(server, "/flush_cache", {"timeout": 5}, "timeout")
    assert_named_400(server, "/flush_cache?timeout=5", None, "timeout", method="GET")


def test_invocations_refuse_undeclared_completion_fields(server):
    assert_named_400(server, "/invocations", {"prompt": PROMPT, "max_tokens": 2, "not_a_field": 1}, "not_a_field")
