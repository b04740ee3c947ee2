"""Every request field of /v1/completions, /v1/chat/completions and /generate is honoured or refused.

The walk (``test_every_declared_field_is_honoured_or_refused``) enumerates
the protocol Structs' fields, so a field added without a test fails it: each
field must name a behaviour test (here or in another test file, whose source
mentions the field) or a value that is refused with a 400 naming it. OpenAI,
vLLM and SGLang fields the Structs do not declare must be refused by name
(``test_undeclared_client_fields_are_refused_by_name``). The behaviour tests
below run against one live server through the official openai client
(``extra_body`` for the fields OpenAI does not have).
"""
from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import msgspec
import openai
import pytest

from stages.ingest.protocol import ChatCompletionRequest, CompletionRequest, NativeGenerateRequest
from tests.server.conftest import running_server

REPO = Path(__file__).resolve().parents[2]
HERE = "tests/server/test_request_fields.py"
PROMPT = "First Citizen: Before we proceed"
CHAT = [{"role": "user", "content": "hi"}]
COMPLETIONS, CHAT_COMPLETIONS, GENERATE = "/v1/completions", "/v1/chat/completions", "/generate"
STRUCTS = {COMPLETIONS: CompletionRequest, CHAT_COMPLETIONS: ChatCompletionRequest, GENERATE: NativeGenerateRequest}
MINIMAL = {COMPLETIONS: {"prompt": PROMPT, "max_tokens": 2}, CHAT_COMPLETIONS: {"messages": CHAT, "max_tokens": 2},
           GENERATE: {"text": PROMPT, "sampling_params": {"max_new_tokens": 2}}}

# Field -> the behaviour test that shows it is honoured ("path::test"; the test's source names the field).
HONOURED = {
    "model": f"{HERE}::test_any_model_name_is_answered_by_the_served_model",
    "max_tokens": "tests/server/test_openai_api.py::test_n2_gives_two_choices",
    "max_completion_tokens": f"{HERE}::test_max_completion_tokens_wins_over_max_tokens",
    "temperature": f"{HERE}::test_sampling_knobs_reach_the_sampler",
    "top_p": f"{HERE}::test_sampling_knobs_reach_the_sampler",
    "top_k": f"{HERE}::test_sampling_knobs_reach_the_sampler",
    "min_p": f"{HERE}::test_sampling_knobs_reach_the_sampler",
    "seed": f"{HERE}::test_sampling_knobs_reach_the_sampler",
    "presence_penalty": f"{HERE}::test_penalties_change_the_greedy_output",
    "frequency_penalty": f"{HERE}::test_penalties_change_the_greedy_output",
    "repetition_penalty": f"{HERE}::test_penalties_change_the_greedy_output",
    "n": "tests/server/test_openai_api.py::test_n2_gives_two_choices",
    "stop": "tests/server/test_openai_api.py::test_stop_string_cuts_output",
    "stop_token_ids": f"{HERE}::test_stop_token_ids_and_min_tokens",
    "min_tokens": f"{HERE}::test_stop_token_ids_and_min_tokens",
    "ignore_eos": "tests/server/test_openai_api.py::test_chat_without_max_tokens_fills_the_context",
    "skip_special_tokens": f"{HERE}::test_special_token_text_options",
    "spaces_between_special_tokens": f"{HERE}::test_special_token_text_options",
    "no_stop_trim": f"{HERE}::test_stop_regex_cuts_and_reports_the_pattern",
    "stream": "tests/server/test_openai_api.py::test_completion_stream_equals_whole",
    "stream_options": f"{HERE}::test_usage_chunks_follow_stream_options",
    "response_format": "tests/server/test_openai_api.py::test_structured_output_through_http",
    "regex": "tests/server/test_openai_api.py::test_structured_output_through_http",
    "json_schema": "tests/server/test_openai_api.py::test_structured_output_through_http",
    "logit_bias": f"{HERE}::test_logit_bias_forces_and_forbids_tokens",
    "user": f"{HERE}::test_identifiers_and_hints_leave_the_output_alone",
    "prompt_cache_key": f"{HERE}::test_identifiers_and_hints_leave_the_output_alone",
    "safety_identifier": f"{HERE}::test_identifiers_and_hints_leave_the_output_alone",
    "rid": "tests/server/test_bad_input_fuzz.py::test_rid_clash_in_a_batch_leaves_nothing_behind",
    "stop_regex": f"{HERE}::test_stop_regex_cuts_and_reports_the_pattern",
    "ebnf": f"{HERE}::test_ebnf_grammar_constrains_and_recursion_is_refused",
    "structured_outputs": f"{HERE}::test_vllm_structured_outputs_and_guided_fields",
    "guided_json": f"{HERE}::test_vllm_structured_outputs_and_guided_fields",
    "guided_regex": f"{HERE}::test_vllm_structured_outputs_and_guided_fields",
    "guided_choice": f"{HERE}::test_vllm_structured_outputs_and_guided_fields",
    "guided_grammar": f"{HERE}::test_vllm_structured_outputs_and_guided_fields",
    "truncate_prompt_tokens": f"{HERE}::test_truncate_prompt_tokens_keeps_the_last_tokens",
    "return_token_ids": f"{HERE}::test_return_token_ids",
    "service_tier": f"{HERE}::test_default_only_fields",
    "store": f"{HERE}::test_default_only_fields",
    "modalities": f"{HERE}::test_default_only_fields",
    "parallel_tool_calls": "tests/server/test_reasoning_tools.py::test_parallel_tool_calls_false_keeps_one_call",
    "prompt_logprobs": f"{HERE}::test_prompt_logprob_fields",
    # /v1/completions
    "prompt": "tests/server/test_openai_api.py::test_completion_stream_equals_whole",
    "echo": "tests/server/test_ingest_unit.py::test_echo_engine_round_trip",
    "logprobs": "tests/server/test_openai_api.py::test_logprobs",
    "best_of": f"{HERE}::test_best_of_equal_to_n_is_served",
    # /v1/chat/completions
    "messages": "tests/server/test_openai_api.py::test_chat_stream_equals_whole",
    "top_logprobs": "tests/server/test_openai_api.py::test_logprobs",
    "tools": "tests/server/test_ingest_unit.py::test_forced_tool_choice_constrains_output",
    "tool_choice": "tests/server/test_ingest_unit.py::test_forced_tool_choice_constrains_output",
    "chat_template_kwargs": "tests/stages/test_tokenize.py::test_tools_and_template_kwargs_reach_the_template",
    "add_generation_prompt": f"{HERE}::test_continue_final_message_leaves_the_last_turn_open",
    "continue_final_message": f"{HERE}::test_continue_final_message_leaves_the_last_turn_open",
    "separate_reasoning": f"{HERE}::test_separate_reasoning_false_keeps_the_think_text",
    "functions": f"{HERE}::test_legacy_functions_become_tools",
    "function_call": f"{HERE}::test_legacy_functions_become_tools",
    # /generate
    "text": "tests/server/test_openai_api.py::test_native_generate",
    "input_ids": "tests/server/test_openai_api.py::test_native_generate",
    "sampling_params": "tests/server/test_openai_api.py::test_native_generate",
    "return_logprob": "tests/server/test_openai_api.py::test_native_generate",
    "top_logprobs_num": f"{HERE}::test_native_top_logprobs_num",
    "logprob_start_len": f"{HERE}::test_prompt_logprob_fields",
    "return_text_in_logprobs": f"{HERE}::test_prompt_logprob_fields",
    "token_ids_logprob": f"{HERE}::test_prompt_logprob_fields",
    "image_data": "tests/server/test_vl_server.py::test_native_generate_image_data",
    "video_data": "tests/server/test_vl_server.py::test_native_generate_image_data",
}

# Field -> a value that must be refused with a 400 naming the field (values we do not serve).
REFUSED = {
    "suffix": " and so on",
    "metadata": {"tag": "x"},
}

# Client fields of OpenAI, vLLM and SGLang that the Structs do not declare: a 400 naming each.
UNDECLARED = {
    COMPLETIONS: {"audio": {}, "use_beam_search": True, "allowed_token_ids": [1], "bad_words": ["x"],
                  "include_stop_str_in_output": True, "add_special_tokens": False, "length_penalty": 1.0,
                  "lora_path": "x", "return_hidden_states": True, "priority": 1, "cache_salt": "s",
                  "return_tokens_as_token_ids": True, "logits_processors": [], "not_a_field": 1},
    CHAT_COMPLETIONS: {"audio": {"voice": "alloy", "format": "wav"}, "prediction": {"type": "content", "content": "x"},
                       "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low",
                       "documents": [], "chat_template": "{{ 1 }}", "mm_processor_kwargs": {},
                       "stream_reasoning": True, "echo": True, "not_a_field": 1},
    GENERATE: {"lora_path": "x", "return_hidden_states": True, "custom_logit_processor": "x",
               "session_params": {}, "modalities": ["text"], "not_a_field": 1},
}


def declared(struct: type) -> set[str]:
    return {field.encode_name for field in msgspec.structs.fields(struct)}


def test_every_declared_field_is_honoured_or_refused():
    missing = {path: sorted(declared(struct) - set(HONOURED) - set(REFUSED)) for path, struct in STRUCTS.items()}
    assert all(not names for names in missing.values()), f"fields with neither a behaviour test nor a refusal: {missing}"
    assert_behaviour_tests(HONOURED)


@functools.lru_cache(maxsize=None)
def function_sources(path: str) -> dict[str, str]:
    """The source of each top-level test function of a file (parsed once per file)."""
    source = (REPO / path).read_text()
    return {node.name: ast.get_source_segment(source, node) for node in ast.parse(source).body
            if isinstance(node, ast.FunctionDef)}


def assert_behaviour_tests(honoured: dict[str, str]) -> None:
    """Each ``field: "path::test"`` names a test function that exists and whose source mentions the field."""
    for field, where in honoured.items():
        path, name = where.split("::")
        if not (REPO / path).is_file():
            pytest.fail(f"{field}: {path} does not exist")
        tests = function_sources(path)
        assert name in tests, f"{field}: no test {name} in {path}"
        assert field in tests[name], f"{field}: {where} does not mention it"


def test_undeclared_fields_are_really_undeclared():
    for path, fields in UNDECLARED.items():
        assert not set(fields) & declared(STRUCTS[path]), path


# --------------------------------------------------------------------------- the live server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "fields.log", "--placement", "single") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def assert_refused(server, path: str, field: str, value, words: str = "") -> None:
    status, body = server.post_json(path, dict(MINIMAL[path], **{field: value}))
    assert status == 400, (path, field, body)
    error = body["error"]
    assert error["param"] == field or (error["param"] or "").startswith(field + "."), (field, error)
    assert field in error["message"] and words in error["message"], error


@pytest.mark.parametrize("path,field", [(p, f) for p, fields in UNDECLARED.items() for f in fields])
def test_undeclared_client_fields_are_refused_by_name(server, path, field):
    assert_refused(server, path, field, UNDECLARED[path][field], "not serve")


@pytest.mark.parametrize("path,field", [(p, f) for p in (COMPLETIONS, CHAT_COMPLETIONS) for f in REFUSED
                                        if f in declared(STRUCTS[p])])
def test_refused_fields_are_a_400_naming_them(server, path, field):
    assert_refused(server, path, field, REFUSED[field])


def greedy(client, **extra) -> openai.types.Completion:
    extra_body = dict(extra.pop("extra_body", {}), ignore_eos=True)
    return client.completions.create(model="m", prompt=PROMPT, max_tokens=extra.pop("max_tokens", 8),
                                     temperature=extra.pop("temperature", 0), extra_body=extra_body, **extra)


def text(reply) -> str:
    return reply.choices[0].text


def token_ids(reply) -> list[int]:
    return reply.model_dump()["choices"][0]["token_ids"]


def test_any_model_name_is_answered_by_the_served_model(client):
    reply = greedy(client, max_tokens=2)
    assert reply.model == "demo" or reply.model == client.models.list().data[0].id
    assert client.completions.create(model="another-name", prompt=PROMPT, max_tokens=2).model == reply.model


def test_max_completion_tokens_wins_over_max_tokens(client):
    reply = client.chat.completions.create(model="m", messages=CHAT, max_tokens=9, max_completion_tokens=3,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.completion_tokens == 3


def test_sampling_knobs_reach_the_sampler(client):
    base = text(greedy(client, max_tokens=12))
    assert text(greedy(client, max_tokens=12, temperature=1.0, extra_body={"top_k": 1})) == base
    assert text(greedy(client, max_tokens=12, temperature=1.0, top_p=1e-6)) == base
    assert text(greedy(client, max_tokens=12, temperature=1.0, extra_body={"min_p": 1.0})) == base
    hot = [text(greedy(client, max_tokens=12, temperature=5.0, seed=s)) for s in (1, 2, 3)]
    assert any(sample != base for sample in hot)  # temperature 5 over 4096 tokens leaves greedy
    assert text(greedy(client, max_tokens=12, temperature=5.0, seed=1)) == hot[0]  # the seed reproduces it


def test_penalties_change_the_greedy_output(client):
    base = token_ids(greedy(client, max_tokens=24, extra_body={"return_token_ids": True}))
    assert len(set(base)) < len(base)  # the greedy output repeats tokens, which a penalty must change
    for field in ("presence_penalty", "frequency_penalty"):
        changed = token_ids(greedy(client, max_tokens=24, **{field: 2.0}, extra_body={"return_token_ids": True}))
        assert changed != base, field
    changed = token_ids(greedy(client, max_tokens=24, extra_body={"repetition_penalty": 2.0,
                                                                  "return_token_ids": True}))
    assert changed != base


def test_stop_token_ids_and_min_tokens(client):
    first = token_ids(greedy(client, max_tokens=6, extra_body={"return_token_ids": True}))
    stopped = greedy(client, max_tokens=6, extra_body={"stop_token_ids": [first[1]], "return_token_ids": True})
    assert token_ids(stopped) == first[:2] and stopped.choices[0].finish_reason == "stop"
    held = greedy(client, max_tokens=6, extra_body={"stop_token_ids": [first[0]], "min_tokens": 3,
                                                    "return_token_ids": True})
    assert len(token_ids(held)) >= 3  # the stop id is banned until three tokens are out


def test_special_token_text_options(client, tokenizer):
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    forced = dict(logit_bias={str(end): 100}, return_token_ids=True)
    assert text(greedy(client, max_tokens=2, extra_body=forced)) == ""  # skipped by default
    kept = greedy(client, max_tokens=2, extra_body=dict(forced, skip_special_tokens=False))
    assert token_ids(kept) == [end, end] and text(kept) == "<|im_end|> <|im_end|>"
    tight = greedy(client, max_tokens=2, extra_body=dict(forced, skip_special_tokens=False,
                                                         spaces_between_special_tokens=False))
    assert text(tight) == "<|im_end|><|im_end|>"


def test_logit_bias_forces_and_forbids_tokens(client, server):
    base = token_ids(greedy(client, extra_body={"return_token_ids": True}))
    forced = greedy(client, logit_bias={"5": 100}, extra_body={"return_token_ids": True})
    assert token_ids(forced) == [5] * 8
    assert token_ids(greedy(client, logit_bias={"5": 1000}, extra_body={"return_token_ids": True})) == [5] * 8
    banned = token_ids(greedy(client, logit_bias={str(base[0]): -100}, extra_body={"return_token_ids": True}))
    assert base[0] not in banned
    chat = client.chat.completions.create(model="m", messages=CHAT, max_tokens=3, temperature=0,
                                          logit_bias={"7": 100}, extra_body={"return_token_ids": True,
                                                                             "ignore_eos": True})
    assert chat.model_dump()["choices"][0]["token_ids"] == [7, 7, 7]
    status, native = server.post_json(GENERATE, {"text": PROMPT, "sampling_params": {
        "max_new_tokens": 3, "temperature": 0, "ignore_eos": True, "logit_bias": {"9": 100}}})
    assert status == 200 and native["output_ids"] == [9, 9, 9]
    assert_refused(server, COMPLETIONS, "logit_bias", {"99999999": 1.0}, "vocabulary")
    assert_refused(server, COMPLETIONS, "logit_bias", {"token": 1.0}, "token ids")


def test_stop_regex_cuts_and_reports_the_pattern(client):
    base = text(greedy(client, max_tokens=30))
    piece = base[len(base) // 2:len(base) // 2 + 2]
    pattern = "".join(f"[{c}]" if c.isalnum() else f"\\x{ord(c):02x}" for c in piece)
    cut = greedy(client, max_tokens=30, extra_body={"stop_regex": [pattern, "never\\d{9}"]})
    assert text(cut) == base[:base.find(piece)]
    assert cut.choices[0].finish_reason == "stop" and cut.model_dump()["choices"][0]["matched_stop"] == pattern
    kept = greedy(client, max_tokens=30, extra_body={"stop_regex": pattern, "no_stop_trim": True})
    assert text(kept) == base[:base.find(piece) + 2]
    streamed = "".join(chunk.choices[0].text for chunk in greedy(client, max_tokens=30, stream=True,
                                                                extra_body={"stop_regex": pattern}))
    assert streamed == text(cut)
    chat = client.chat.completions.create(model="m", messages=CHAT, max_tokens=30, temperature=0,
                                          extra_body={"stop_regex": "[a-z]", "ignore_eos": True})
    assert chat.choices[0].finish_reason == "stop" and not any(c.islower() for c in chat.choices[0].message.content)


def test_ebnf_grammar_constrains_and_recursion_is_refused(client, server):
    grammar = 'root ::= answer "!"\nanswer ::= "yes" | "no"  # two choices'
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=4,
                                      extra_body={"ebnf": grammar})
    assert text(reply) in ("yes!", "no!")
    status, native = server.post_json(GENERATE, {"text": PROMPT, "sampling_params": {
        "max_new_tokens": 8, "ebnf": 'root ::= [0-9]{2} ("a" | "b")'}})
    assert status == 200 and len(native["text"]) == 3 and native["text"][:2].isdigit()
    assert_refused(server, COMPLETIONS, "ebnf", 'root ::= "(" root ")" | "x"', "recursive rules are not supported")
    assert_refused(server, COMPLETIONS, "ebnf", "root ::= missing", "not defined")


def test_vllm_structured_outputs_and_guided_fields(client, server):
    def completion(**extra_body) -> str:
        return text(client.completions.create(model="m", prompt=PROMPT, max_tokens=12, temperature=1.0, seed=2,
                                              extra_body=extra_body))

    assert completion(structured_outputs={"choice": ["red", "blue"]}) in ("red", "blue")
    assert completion(guided_choice=["left", "right"]) in ("left", "right")
    assert len(completion(structured_outputs={"regex": "[0-9]{4}"})) == 4
    assert completion(guided_regex="x[ab]{3}")[0] == "x"
    assert completion(structured_outputs={"grammar": 'root ::= "on" | "off"'}) in ("on", "off")
    assert completion(guided_grammar='root ::= "up" | "down"') in ("up", "down")
    schema = {"type": "object", "properties": {"k": {"type": "boolean"}}, "required": ["k"],
              "additionalProperties": False}
    for extra_body in ({"structured_outputs": {"json": schema}}, {"guided_json": json.dumps(schema)}):
        reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=20, temperature=0,
                                          extra_body=extra_body)
        assert isinstance(json.loads(text(reply))["k"], bool)
    assert_refused(server, COMPLETIONS, "structured_outputs", {"regex": "a", "choice": ["b"]}, "exactly one")
    assert_refused(server, COMPLETIONS, "structured_outputs", {"structural_tag": "{}"}, "not serve")
    status, body = server.post_json(COMPLETIONS, dict(MINIMAL[COMPLETIONS], guided_regex="a", guided_choice=["b"]))
    assert status == 400 and body["error"]["param"] == "guided_choice"


def test_truncate_prompt_tokens_keeps_the_last_tokens(client, tokenizer, server):
    ids = tokenizer.encode(PROMPT)
    reply = greedy(client, max_tokens=2, extra_body={"truncate_prompt_tokens": 3, "return_token_ids": True})
    assert reply.usage.prompt_tokens == 3
    assert reply.model_dump()["choices"][0]["prompt_token_ids"] == ids[-3:]
    whole = greedy(client, max_tokens=2, extra_body={"truncate_prompt_tokens": -1})
    assert whole.usage.prompt_tokens == len(ids)
    assert_refused(server, COMPLETIONS, "truncate_prompt_tokens", 0)
    assert_refused(server, COMPLETIONS, "truncate_prompt_tokens", 10**6, "context length")


def test_return_token_ids(client, tokenizer):
    reply = greedy(client, max_tokens=6, extra_body={"return_token_ids": True})
    choice = reply.model_dump()["choices"][0]
    assert choice["prompt_token_ids"] == tokenizer.encode(PROMPT)
    assert len(choice["token_ids"]) == 6 and tokenizer.decode(choice["token_ids"]) == choice["text"]
    assert "token_ids" not in greedy(client, max_tokens=2).model_dump()["choices"][0]
    chunks = list(greedy(client, max_tokens=6, stream=True, extra_body={"return_token_ids": True}))
    streamed = [t for chunk in chunks for c in chunk.model_dump()["choices"] for t in c.get("token_ids") or []]
    assert streamed == choice["token_ids"]
    assert any(c.get("prompt_token_ids") == choice["prompt_token_ids"] for chunk in chunks
               for c in chunk.model_dump()["choices"])
    chat = client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, temperature=0,
                                          extra_body={"return_token_ids": True, "ignore_eos": True}).model_dump()
    assert tokenizer.decode(chat["prompt_token_ids"]).endswith("<|im_start|>assistant\n")
    assert len(chat["choices"][0]["token_ids"]) == 4


def test_continue_final_message_leaves_the_last_turn_open(client, tokenizer, server):
    turns = CHAT + [{"role": "assistant", "content": "Well, my"}]
    opened = client.chat.completions.create(model="m", messages=turns, max_tokens=2, temperature=0,
                                            extra_body={"continue_final_message": True, "return_token_ids": True,
                                                        "add_generation_prompt": False}).model_dump()
    assert tokenizer.decode(opened["prompt_token_ids"]).endswith("<|im_start|>assistant\nWell, my")
    default = client.chat.completions.create(model="m", messages=turns, max_tokens=2, temperature=0,
                                             extra_body={"return_token_ids": True}).model_dump()
    assert tokenizer.decode(default["prompt_token_ids"]).endswith("Well, my<|im_end|>\n<|im_start|>assistant\n")
    closed = client.chat.completions.create(model="m", messages=turns, max_tokens=2, temperature=0,
                                            extra_body={"return_token_ids": True,
                                                        "add_generation_prompt": False}).model_dump()
    assert tokenizer.decode(closed["prompt_token_ids"]).endswith("Well, my<|im_end|>\n")
    status, body = server.post_json(CHAT_COMPLETIONS, dict(MINIMAL[CHAT_COMPLETIONS], messages=turns,
                                                       continue_final_message=True, add_generation_prompt=True))
    assert status == 400 and body["error"]["param"] == "continue_final_message"


def test_separate_reasoning_false_keeps_the_think_text():
    from stages.ingest.parsing import make_parsing

    answer = "<think>pondering</think>The answer."
    separated = make_parsing(None, "deepseek-r1", None, True, None).whole(answer)
    assert separated["reasoning_content"] == "pondering" and separated["content"] == "The answer."
    together = make_parsing(None, "deepseek-r1", None, False, None).whole(answer)
    assert "pondering" in together["content"] and not together.get("reasoning_content")


def test_legacy_functions_become_tools(client, server):
    functions = [{"name": "get_time", "description": "the time in a city",
                  "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 5}},
                                 "required": ["city"], "additionalProperties": False}}]
    reply = client.chat.completions.create(model="m", messages=CHAT, max_tokens=40, temperature=0,
                                           functions=functions, function_call={"name": "get_time"})
    calls = reply.choices[0].message.tool_calls
    assert calls and calls[0].function.name == "get_time" and "city" in json.loads(calls[0].function.arguments)
    status, body = server.post_json(CHAT_COMPLETIONS, dict(MINIMAL[CHAT_COMPLETIONS], functions=functions,
                                                       tools=[{"type": "function", "function": functions[0]}]))
    assert status == 400 and "functions" in body["error"]["message"]
    assert server.post_json(CHAT_COMPLETIONS, dict(MINIMAL[CHAT_COMPLETIONS], functions=functions,
                                               function_call="none"))[0] == 200


def test_usage_chunks_follow_stream_options(client):
    def chunks(path: str, **options):
        if path == COMPLETIONS:
            return list(greedy(client, max_tokens=4, stream=True, stream_options=options))
        return list(client.chat.completions.create(model="m", messages=CHAT, max_tokens=4, stream=True,
                                                   stream_options=options, extra_body={"ignore_eos": True}))

    for path in (COMPLETIONS, CHAT_COMPLETIONS):
        assert all(chunk.usage is None for chunk in chunks(path, include_usage=False, continuous_usage_stats=True))
        last_only = chunks(path, include_usage=True)
        assert last_only[-1].usage is not None and all(chunk.usage is None for chunk in last_only[:-1])
        every = chunks(path, include_usage=True, continuous_usage_stats=True)
        with_text = [chunk for chunk in every if chunk.choices and (
            getattr(chunk.choices[0], "text", None) or getattr(getattr(chunk.choices[0], "delta", None),
                                                               "content", None))]
        assert with_text and all(chunk.usage is not None for chunk in with_text), path
        assert every[-1].usage.completion_tokens == 4


def test_identifiers_and_hints_leave_the_output_alone(client):
    base = text(greedy(client))
    assert text(greedy(client, user="someone")) == base
    assert text(greedy(client, extra_body={"prompt_cache_key": "k1", "safety_identifier": "u1"})) == base


def test_default_only_fields(client, server):
    base = text(greedy(client))
    assert text(greedy(client, extra_body={"store": False, "service_tier": "auto"})) == base
    assert_refused(server, COMPLETIONS, "store", True)
    assert_refused(server, COMPLETIONS, "service_tier", "flex")
    reply = client.chat.completions.create(model="m", messages=CHAT, max_tokens=2, modalities=["text"])
    assert reply.choices[0].message.content is not None
    assert_refused(server, CHAT_COMPLETIONS, "modalities", ["text", "audio"])


def test_best_of_equal_to_n_is_served(client, server):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=2, n=2, best_of=2)
    assert len(reply.choices) == 2
    assert_refused(server, COMPLETIONS, "best_of", 3)


def test_native_top_logprobs_num(server):
    status, body = server.post_json(GENERATE, {"text": PROMPT, "return_logprob": True, "top_logprobs_num": 3,
                                           "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert status == 200
    assert [len(top) for top in body["meta_info"]["output_top_logprobs"]] == [3, 3]


def test_prompt_logprob_fields(client, server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    reply = greedy(client, max_tokens=1, extra_body={"prompt_logprobs": 2}).model_dump()
    prompt = reply["choices"][0]["prompt_logprobs"]
    assert len(prompt) == len(ids) and prompt[0] is None and all(entry for entry in prompt[1:])
    status, body = server.post_json(GENERATE, {"text": PROMPT, "return_logprob": True, "logprob_start_len": 0,
                                           "return_text_in_logprobs": True, "token_ids_logprob": [5, 9],
                                           "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert status == 200
    meta = body["meta_info"]
    assert [entry[1] for entry in meta["input_token_logprobs"]] == ids
    assert meta["input_token_logprobs"][1][2] == tokenizer.decode([ids[1]])  # return_text_in_logprobs
    assert [[entry[1] for entry in step] for step in meta["output_token_ids_logprobs"]] == [[5, 9], [5, 9]]
    status, plain = server.post_json(GENERATE, {"text": PROMPT, "return_logprob": True,
                                            "sampling_params": {"max_new_tokens": 2, "temperature": 0}})
    assert status == 200 and plain["meta_info"]["input_token_logprobs"] == []  # logprob_start_len -1: none
    assert plain["meta_info"]["output_token_logprobs"][0][2] is None  # no text unless asked
