"""The small peer endpoints end to end: models.retrieve, tokenize/detokenize, flush_cache (GET), version,
get_load/load, invocations, ping, server_info fields and CORS (live server and CorsPolicy alone)."""
from __future__ import annotations

import asyncio
import json
from importlib import metadata

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from pipeline.config import ConfigError, ServerArgs
from stages.ingest.cors import CorsPolicy, cors_middleware, install_cors, parse_list
from tests.server.conftest import running_server

PROMPT = "First Citizen: Before we proceed"
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "endpoints.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.models.list().data[0].id


def call(server, method: str, path: str, body: dict | None = None,
         headers: dict | None = None) -> tuple[int, dict | str, dict]:
    async def go():
        data = None if body is None else json.dumps(body).encode()
        sent = dict(JSON_HEADERS if body is not None else {}, **(headers or {}))
        async with aiohttp.ClientSession() as session:
            async with session.request(method, server.url + path, data=data, headers=sent) as response:
                text = await response.text()
                try:
                    parsed = json.loads(text)
                except ValueError:
                    parsed = text
                return response.status, parsed, dict(response.headers)

    return asyncio.run(go())


# --------------------------------------------------------------------------- models, version, info


def test_models_retrieve(client, model_name):
    card = client.models.retrieve(model_name)
    assert card.id == model_name and card.object == "model"
    listed = client.models.list().data[0]
    assert card.model_dump() == listed.model_dump()
    with pytest.raises(openai.NotFoundError) as caught:
        client.models.retrieve("no-such-model")
    assert caught.value.body["param"] == "model"


def test_version_and_server_info(server):
    status, body, _ = call(server, "GET", "/version")
    assert status == 200 and body["version"] == metadata.version("stagewise")
    for path in ("/server_info", "/get_server_info"):
        status, info, _ = call(server, "GET", path)
        assert status == 200 and info["version"] == body["version"]
        assert info["max_total_num_tokens"] == 16384  # the test server's --max-total-tokens


def test_flush_cache_by_get_and_post(server):
    assert call(server, "GET", "/flush_cache")[0] == 200
    assert call(server, "POST", "/flush_cache")[0] == 200
    assert call(server, "PUT", "/flush_cache")[0] == 405


def test_ping(server):
    assert call(server, "GET", "/ping")[0] == 200


# --------------------------------------------------------------------------- tokenize / detokenize


def test_tokenize_prompt_counts_what_a_completion_is_prompted_with(server, client, tokenizer):
    status, body, _ = call(server, "POST", "/tokenize", {"prompt": PROMPT})
    assert status == 200
    assert body["tokens"] == tokenizer.encode(PROMPT) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == client.models.list().data[0].max_model_len
    completion = client.completions.create(model="m", prompt=PROMPT, max_tokens=1, temperature=0)
    assert completion.usage.prompt_tokens == body["count"]
    status, v1, _ = call(server, "POST", "/v1/tokenize", {"prompt": PROMPT})
    assert status == 200 and v1 == body


def test_tokenize_options_and_sglang_list_form(server, tokenizer):
    status, plain, _ = call(server, "POST", "/tokenize", {"prompt": PROMPT, "add_special_tokens": False})
    assert status == 200 and plain["tokens"] == tokenizer.encode(PROMPT, add_special_tokens=False)
    status, listed, _ = call(server, "POST", "/tokenize", {"prompt": [PROMPT, "Speak."]})
    assert status == 200
    assert listed["tokens"] == [tokenizer.encode(PROMPT), tokenizer.encode("Speak.")]
    assert listed["count"] == [len(ids) for ids in listed["tokens"]]
    status, strs, _ = call(server, "POST", "/tokenize", {"prompt": PROMPT, "return_token_strs": True})
    assert status == 200 and strs["token_strs"] == tokenizer.convert_ids_to_tokens(strs["tokens"])


def test_tokenize_messages_counts_what_a_chat_is_prompted_with(server, client):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak, speak."}]
    status, body, _ = call(server, "POST", "/tokenize", {"messages": messages})
    assert status == 200 and body["count"] == len(body["tokens"]) > 0
    chat = client.chat.completions.create(model="m", messages=messages, max_tokens=1, temperature=0)
    assert chat.usage.prompt_tokens == body["count"]
    status, open_turn, _ = call(server, "POST", "/tokenize", {"messages": messages, "add_generation_prompt": False})
    assert status == 200 and open_turn["count"] < body["count"]


@pytest.mark.parametrize("body,param", [({}, "prompt"), ({"prompt": "a", "messages": []}, "prompt"),
                                        ({"prompt": 5}, "prompt"), ({"messages": []}, "messages")])
def test_tokenize_bad_bodies_are_400(server, body, param):
    status, answer, _ = call(server, "POST", "/tokenize", body)
    assert status == 400 and answer["error"]["param"] == param


def test_detokenize_round_trip_in_both_shapes(server, tokenizer):
    ids = tokenizer.encode(PROMPT)
    status, body, _ = call(server, "POST", "/detokenize", {"tokens": ids})
    assert status == 200 and body["prompt"] == body["text"] == tokenizer.decode(ids)
    assert PROMPT in body["text"]
    status, nested, _ = call(server, "POST", "/v1/detokenize", {"tokens": [ids, ids[:2]]})
    assert status == 200 and nested["text"] == [tokenizer.decode(ids), tokenizer.decode(ids[:2])]
    status, skipped, _ = call(server, "POST", "/detokenize", {"tokens": ids, "skip_special_tokens": True})
    assert status == 200 and skipped["text"] == tokenizer.decode(ids, skip_special_tokens=True)


def test_detokenize_out_of_vocabulary_is_400(server):
    status, body, _ = call(server, "POST", "/detokenize", {"tokens": [1, 10 ** 9]})
    assert status == 400 and body["error"]["param"] == "tokens" and "vocabulary" in body["error"]["message"]
    status, body, _ = call(server, "POST", "/detokenize", {"tokens": "abc"})
    assert status == 400 and body["error"]["param"] == "tokens"


# --------------------------------------------------------------------------- load


def test_get_load_idle(server):
    status, loads, _ = call(server, "GET", "/get_load")
    assert status == 200 and len(loads) == 1
    assert loads[0] == {"dp_rank": 0, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": loads[0]["num_tokens"]}
    assert call(server, "GET", "/load")[1] == {"server_load": 0}


def test_load_counts_a_request_in_flight(server):
    async def go():
        body = {"model": "m", "prompt": PROMPT, "max_tokens": 200, "stream": True, "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/completions", json=body) as stream:
                assert stream.status == 200
                await stream.content.readline()  # the first event: the request is running
                async with session.get(server.url + "/load") as response:
                    during = await response.json()
                await stream.read()
            async with session.get(server.url + "/load") as response:
                after = await response.json()
        return during, after

    during, after = asyncio.run(go())
    assert during == {"server_load": 1} and after == {"server_load": 0}


# --------------------------------------------------------------------------- SageMaker


def test_invocations_route_by_body_shape(server):
    status, chat, _ = call(server, "POST", "/invocations",
                           {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert status == 200 and chat["object"] == "chat.completion"
    status, completion, _ = call(server, "POST", "/invocations", {"prompt": PROMPT, "max_tokens": 2})
    assert status == 200 and completion["object"] == "text_completion"
    status, error, _ = call(server, "POST", "/invocations", {"input": "x"})
    assert status == 400 and error["error"]["param"] == "messages"


# --------------------------------------------------------------------------- CORS on the live server (defaults)


def test_preflight_is_answered_with_defaults(server):
    status, _, headers = call(server, "OPTIONS", "/v1/chat/completions", headers={
        "Origin": "https://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type, authorization"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "*"
    assert "POST" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type, authorization"


def test_responses_carry_allow_origin_streams_and_errors_too(server):
    origin = {"Origin": "https://app.example"}
    assert call(server, "GET", "/v1/models", headers=origin)[2]["Access-Control-Allow-Origin"] == "*"
    status, _, headers = call(server, "POST", "/v1/completions",
                              {"model": "m", "prompt": PROMPT, "max_tokens": 2, "stream": True}, origin)
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "*"
    assert call(server, "GET", "/nope", headers=origin)[2]["Access-Control-Allow-Origin"] == "*"
    assert "Access-Control-Allow-Origin" not in call(server, "GET", "/v1/models")[2]  # no Origin, no header


def test_cors_keeps_json_only_bodies(server):
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/completions", data=b'{"prompt": "x"}',
                                    headers={"Content-Type": "text/plain", "Origin": "https://evil.example"}) as r:
                return r.status

    assert asyncio.run(go()) == 415


def test_options_without_preflight_headers_is_405(server):
    assert call(server, "OPTIONS", "/v1/completions")[0] == 405


# --------------------------------------------------------------------------- CorsPolicy alone (narrowed flags)


async def _ok(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


def cors_call(args: ServerArgs, method: str, headers: dict) -> tuple[int, dict, str]:
    async def go():
        policy = CorsPolicy(args)
        app = web.Application(middlewares=[cors_middleware(policy)])
        install_cors(app, policy)
        app.router.add_route("*", "/x", _ok)
        async with TestClient(TestServer(app)) as test_client:
            response = await test_client.request(method, "/x", headers=headers)
            return response.status, dict(response.headers), await response.text()

    return asyncio.run(go())


NARROW = ServerArgs(allowed_origins='["https://good.example"]', allowed_methods="GET,POST",
                    allowed_headers="content-type", allow_credentials=True)


def test_narrowed_origins_echo_the_origin_with_credentials():
    status, headers, _ = cors_call(NARROW, "GET", {"Origin": "https://good.example"})
    assert status == 200 and headers["Access-Control-Allow-Origin"] == "https://good.example"
    assert headers["Access-Control-Allow-Credentials"] == "true" and headers["Vary"] == "Origin"
    status, headers, _ = cors_call(NARROW, "GET", {"Origin": "https://evil.example"})
    assert status == 200 and "Access-Control-Allow-Origin" not in headers


@pytest.mark.parametrize("headers,why", [
    ({"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}, "origin"),
    ({"Origin": "https://good.example", "Access-Control-Request-Method": "DELETE"}, "method"),
    ({"Origin": "https://good.example", "Access-Control-Request-Method": "POST",
      "Access-Control-Request-Headers": "x-secret"}, "header"),
])
def test_narrowed_preflight_refusals(headers, why):
    status, answer_headers, text = cors_call(NARROW, "OPTIONS", headers)
    assert status == 400 and "Access-Control-Allow-Origin" not in answer_headers
    assert why in json.loads(text)["error"]["message"]


def test_narrowed_preflight_allowed():
    status, headers, _ = cors_call(NARROW, "OPTIONS", {"Origin": "https://good.example",
                                                    "Access-Control-Request-Method": "post",
                                                    "Access-Control-Request-Headers": "Content-Type"})
    assert status == 200 and headers["Access-Control-Allow-Methods"] == "GET, POST"
    assert headers["Access-Control-Allow-Headers"] == "content-type"
    assert headers["Access-Control-Allow-Origin"] == "https://good.example"


def test_parse_list_forms_and_errors():
    assert parse_list("allowed-origins", "a, b") == ("a", "b")
    assert parse_list("allowed-origins", '["a", "b"]') == ("a", "b")
    with pytest.raises(ConfigError, match="--allowed-origins"):
        parse_list("allowed-origins", "[1, 2]")
    with pytest.raises(ConfigError, match="--allowed-headers"):
        parse_list("allowed-headers", "[not json")
