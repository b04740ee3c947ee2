"""Malformed and edge-case requests against one real server: every client mistake is an OpenAI-shaped 4xx.

Each row of ``BAD_REQUESTS`` is (route, body, HTTP status, the ``param`` the error must name, a piece of
its message). A body given as bytes is sent as is (bad JSON, bad UTF-8, deep nesting); a dict is sent as
JSON. The module ends by checking that nothing leaked: no request in flight, no running request in the
engine, and the KV pool back at its starting use after a cache flush.
"""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest

from stages.ingest.streaming import MAX_BODY_DEPTH, json_depth_exceeds
from tests.server.conftest import running_server

C, CHAT, GEN = "/v1/completions", "/v1/chat/completions", "/generate"
USER = [{"role": "user", "content": "hi"}]
INT64_OVER = 1 << 63


def deep_tools_body(**fields) -> bytes:
    """A chat body whose one tool's parameters nest ~300 JSON levels deep: past the schema limit (64),
    within the body limit (MAX_BODY_DEPTH), so the tool check answers."""
    schema = '{"type": "array", "items": ' * 300 + '{"type": "string"}' + "}" * 300
    tools = '[{"type": "function", "function": {"name": "f", "parameters": ' + schema + "}}]"
    return json.dumps(chat(tools="TOOLS", **fields)).replace('"TOOLS"', tools).encode()


def completion(**fields) -> dict:
    return {"prompt": "Hello", "max_tokens": 2, **fields}


def chat(**fields) -> dict:
    return {"messages": USER, "max_tokens": 2, **fields}


def native(**fields) -> dict:
    return {"text": "Hello", "sampling_params": {"max_new_tokens": 2}, **fields}


def tool(function: object, **fields) -> dict:
    return {"type": "function", "function": function, **fields}


BAD_REQUESTS = [
    # wrong JSON types: msgspec names the path
    (C, completion(max_tokens="2"), 400, "max_tokens", "Expected `int | null`"),
    (C, completion(max_tokens=2.5), 400, "max_tokens", "Expected `int | null`"),
    (C, completion(temperature={"a": 1}), 400, "temperature", "Expected"),
    (C, completion(stop=[["x"]]), 400, "stop[0]", "Expected `str`"),
    (C, completion(prompt=None), 400, "prompt", "Expected"),
    (CHAT, chat(messages="hi"), 400, "messages", "Expected `array`"),
    (CHAT, chat(messages=[{"content": "x"}]), 400, "messages[0]", "role"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), 400, "messages[0].role", "wizard"),
    (GEN, native(sampling_params=[1]), 400, "sampling_params", "Expected `object | null`"),
    (GEN, native(sampling_params={"bogus": 1}), 400, "sampling_params.bogus", "unknown"),
    # prompts
    (C, completion(prompt=""), 400, "prompt", "must not be empty"),
    (C, completion(prompt=[]), 400, "prompt", "must not be empty"),
    (C, completion(prompt=[1, "a"]), 400, "prompt", "list of token ids"),
    (C, completion(prompt=[[1], [INT64_OVER]]), 400, "prompt", "2**63"),
    (C, completion(prompt=[10 ** 9]), 400, "prompt", "outside the vocabulary"),  # checked in ingest
    (GEN, native(text=["a", ""]), 400, "text[1]", "must not be empty"),
    (GEN, {"input_ids": [INT64_OVER]}, 400, "input_ids", "2**63"),
    (GEN, {"input_ids": []}, 400, "input_ids", "must not be empty"),
    # token ids the model has no row for: never decoded (echo) or embedded, whatever their size
    *[(C, completion(prompt=[1, bad], **echo), 400, "prompt", "outside the vocabulary")
      for bad in (-1, 1 << 32, INT64_OVER - 1) for echo in ({}, {"echo": True})],
    (C, completion(prompt=[[1], [2, -5]], echo=True, logprobs=1), 400, "prompt", "outside the vocabulary"),
    *[(GEN, {"input_ids": [1, bad]}, 400, "input_ids", "outside the vocabulary") for bad in (-1, 1 << 32)],
    # ints beyond 64 bits never reach the engine (a huge top_k used to kill the sampler)
    (C, completion(top_k=1 << 64), 400, "top_k", "64-bit"),
    (C, completion(seed=INT64_OVER), 400, "seed", "64-bit"),
    (C, completion(stop_token_ids=[INT64_OVER]), 400, "stop_token_ids", "64-bit"),
    (GEN, native(sampling_params={"top_k": 1 << 70}), 400, "sampling_params.top_k", "64-bit"),
    # ranges
    (C, completion(n=0), 400, "n", "must be in"),
    (C, completion(max_tokens=-1), 400, "max_tokens", ">= 0"),
    (C, completion(max_tokens=10 ** 9), 400, "max_tokens", "context length"),
    (C, completion(logprobs=21), 400, "logprobs", "must be in"),
    (CHAT, chat(top_logprobs=3), 400, "top_logprobs", "needs logprobs"),
    (CHAT, chat(max_tokens=None, min_tokens=5000), 400, "min_tokens", "context length"),
    (C, completion(stop=["x"] * 100), 400, "stop", "at most"),
    (C, completion(stop=["x" * 10000]), 400, "stop", "characters"),
    (C, completion(prompt=["a"] * 100, n=128), 400, "n", "split the batch"),  # never fits: not a 503
    # chat messages and tools
    (CHAT, chat(messages=[{"role": "user"}]), 400, "messages[0].content", "needs content"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text"}]}]), 400, "messages[0].content", "text"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "audio"}]}]), 400, "messages[0].content",
     "unsupported content part"),
    (CHAT, chat(messages=[{"role": "tool", "content": "sunny"}]), 400, "messages[0].tool_call_id",
     "needs tool_call_id"),
    (CHAT, chat(tools=[{}]), 400, "tools[0]", "function"),
    (CHAT, chat(tools=[tool({"name": ""})]), 400, "tools[0].function.name", "name"),
    (CHAT, chat(tools=[tool({"name": "f", "parameters": 5})]), 400, "tools[0].function.parameters", "schema"),
    (CHAT, chat(tool_choice="required"), 400, "tool_choice", "needs tools"),
    (CHAT, deep_tools_body(tool_choice="required"), 400, "tools[0].function.parameters", "nested"),
    (CHAT, deep_tools_body(), 400, "tools[0].function.parameters", "nested"),
    (C, completion(response_format={"type": "json_schema", "json_schema": {"name": "x"}}), 400,
     "response_format.json_schema", "schema"),
    (C, completion(regex="("), 400, "regex", "invalid regex"),
    # bodies that are not JSON objects
    (C, b'{"prompt": "x", "temperature": NaN}', 400, None, "NaN and Infinity are not JSON numbers"),
    (GEN, b'{"text": "x", "sampling_params": {"top_p": -Infinity}}', 400, None, "NaN and Infinity"),
    (C, b'{"prompt": "\xff\xfe"}', 400, None, "UTF-8"),
    (C, b'{"prompt": "\\ud800"}', 400, None, "unpaired UTF-16 surrogate"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\udfff"}]}', 400, None, "unpaired UTF-16 surrogate"),
    # nesting is checked on the raw body before anything else (msgspec's own limit varies with Python)
    (C, b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400, None, "nested too deeply"),
    (CHAT, b'{"messages": [], "chat_template_kwargs": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5001, 400, None,
     "nested too deeply"),
    (CHAT, b'{"messages": [], "chat_template_kwargs": ' + b'{"a": ' * MAX_BODY_DEPTH + b"1" + b"}" * 513,
     400, None, "nested too deeply"),
    (CHAT, b'{"messages": [], "chat_template_kwargs": ' + b'{"a": ' * (MAX_BODY_DEPTH - 1) + b"1" + b"}" * 512,
     400, "messages", "must not be empty"),
    (C, b'{"prompt": "' + b"[" * 5000 + b'\\"{{", "max_tokens": "2"}', 400, "max_tokens", "Expected `int"),
    (C, b"", 400, None, "empty"),
    (C, b'{"prompt": "' + b"a" * (65 << 20) + b'"}', 413, None, "Too Large"),
    (C, b"[]", 400, None, "Expected `object`"),
    # control routes
    ("/abort_request", {"rid": "no-such-request"}, 404, "rid", "no running request"),
    ("/abort_request", {}, 400, "rid", "abort_all"),
]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "fuzz.log", "--placement", "single") as process:
        yield process


async def _request(url: str, method: str, body: dict | bytes | None, headers: dict | None = None) -> tuple[int, str]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if headers is None and method == "POST" else headers
    async with aiohttp.ClientSession() as session:
        async with session.request(method, url, data=data, headers=headers,
                                   timeout=aiohttp.ClientTimeout(total=60)) as response:
            return response.status, await response.text()


def call(server, path: str, body: dict | bytes | None = None, method: str = "POST",
         headers: dict | None = None) -> tuple[int, str]:
    return asyncio.run(_request(server.url + path, method, body, headers))


def engine_stats(server) -> dict:
    return json.loads(call(server, "/get_server_info", method="GET")[1])


def settled_kv_use(server) -> tuple[int, dict]:
    """Tokens held in the KV pool after a cache flush, once no request runs; with the last server info."""
    assert call(server, "/flush_cache", {})[0] == 200
    since = time.time()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        info = engine_stats(server)
        stats = info["engine_stats"]
        if stats and stats["time_s"] > since + 0.3 and stats["num_running_reqs"] == 0:
            return round(stats["token_usage"] * stats["max_total_num_tokens"]), info
        time.sleep(0.1)
    raise AssertionError(f"engine never settled: {info}")


@pytest.fixture(scope="module")
def kv_baseline(server) -> int:
    return settled_kv_use(server)[0]


@pytest.mark.parametrize("path,body,status,param,message", BAD_REQUESTS,
                         ids=[f"{i}-{row[0].strip('/')}" for i, row in enumerate(BAD_REQUESTS)])
def test_bad_request_is_a_named_client_error(server, kv_baseline, path, body, status, param, message):
    got_status, text = call(server, path, body)
    error = json.loads(text)["error"]
    assert (got_status, error["code"]) == (status, status), text
    assert error["param"] == param, text
    assert message in error["message"], text


@pytest.mark.parametrize("raw,limit,deeper", [
    (b'{"a": "[[[", "b": [1, {"c": "\\"]"}]}', 2, True), (b'{"a": "[[[", "b": [1, {"c": "\\"]"}]}', 3, False),
    (b'{"a": "\\\\", "b": [[["x"]]]}', 3, True), (b'{"a": "\\\\", "b": [[["x"]]]}', 4, False),
    (b"[]" * 5000, 1, False), (b"[" * 5000 + b"]" * 5000, 4999, True), (b"[" * 5000 + b"]" * 5000, 5000, False),
    (b"[" * (3 << 20) + b"]" * (3 << 20) + b"[[]]", 2, True), (b"[]" * (3 << 20) + b"[[[]]]", 2, True),
])
def test_body_depth_counts_brackets_outside_strings(raw, limit, deeper):
    """Brackets inside strings (escaped quotes and backslashes included) do not nest; depth spans chunks."""
    assert json_depth_exceeds(raw, limit) is deeper


@pytest.mark.parametrize("path", [C, CHAT, GEN, "/abort_request"])  # /flush_cache takes GET too, as SGLang's
def test_get_on_a_post_route_is_405(server, path):
    status, text = call(server, path, method="GET")
    assert status == 405 and json.loads(text)["error"]["code"] == 405


def test_edge_cases_that_are_served(server, kv_baseline):
    """Allowed forms: token-id and batched prompts, content parts, n=2 streams, echo with logprobs."""
    ok = [(C, completion(prompt=[[1, 2], [3]], n=2)), (C, completion(prompt=["a", "b"], echo=True, logprobs=1)),
          (C, completion(prompt=" ", seed=-1, top_k=INT64_OVER - 1)),
          (CHAT, chat(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}]}])),
          (CHAT, chat(stream=True, n=2)), (C, completion(stream=True, n=2, prompt=["a", "b"]))]
    for path, body in ok:
        status, text = call(server, path, body)
        assert status == 200 and '"error"' not in text, (body, text)


def test_concurrent_aborts_of_one_request(server, kv_baseline):
    async def go():
        url = server.url
        running = asyncio.Event()
        async with aiohttp.ClientSession() as session:
            async def stream():
                body = {"prompt": "Hi", "max_tokens": 600, "ignore_eos": True, "stream": True, "rid": "fuzz-abort"}
                events = []
                async with session.post(url + C, json=body) as response:
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            events.append(line)
                            running.set()
                return events

            async def abort():
                async with session.post(url + "/abort_request", json={"rid": "fuzz-abort"}) as response:
                    return response.status

            task = asyncio.ensure_future(stream())
            await asyncio.wait_for(running.wait(), 60)
            statuses = await asyncio.gather(*(abort() for _ in range(8)))
            return statuses, await asyncio.wait_for(task, 60)

    statuses, events = asyncio.run(go())
    assert sorted(statuses) == [200] + [404] * 7
    assert events[-1].strip() == b"data: [DONE]"
    assert json.loads(events[-2][5:])["choices"][0]["finish_reason"] == "abort"


JSON_POST_ROUTES = [C, CHAT, GEN, "/abort_request", "/flush_cache"]


@pytest.mark.parametrize("path", JSON_POST_ROUTES)
@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                                          None])
def test_post_body_must_be_declared_json(server, path, content_type):
    """A page on any site can POST text/plain or a form without a CORS preflight: those are 415, not JSON."""
    body = json.dumps({"prompt": "Hi", "max_tokens": 1, "rid": "csrf"}).encode()
    headers = {} if content_type is None else {"Content-Type": content_type}
    status, text = call(server, path, body, headers=headers)
    error = json.loads(text)["error"]
    assert (status, error["code"], error["param"]) == (415, 415, "Content-Type"), text


def test_json_with_charset_and_bare_flush_are_served(server):
    body = {"prompt": "Hi", "max_tokens": 1}
    assert call(server, C, body, headers={"Content-Type": "Application/JSON; charset=utf-8"})[0] == 200
    assert call(server, "/flush_cache", None, headers={})[0] == 200  # SGLang's clients POST it bare
    assert call(server, "/flush_cache", b"", headers={"Content-Type": "text/plain"})[0] == 200  # still no body
    assert call(server, "/flush_cache", b"{}", headers={"Content-Type": "text/plain"})[0] == 415
    assert call(server, GEN, None, headers={})[0] == 415  # bare elsewhere: no


async def _stream_until_running(session, body: dict, path: str = C):
    """Start a streamed request; return once its first token came, with the task that collects its events."""
    running = asyncio.Event()

    async def stream():
        events = []
        async with session.post(path, json=body) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    events.append(line)
                    running.set()
        return events

    task = asyncio.ensure_future(stream())
    await asyncio.wait_for(running.wait(), 60)
    return task


def test_rid_clash_in_a_batch_leaves_nothing_behind(server, kv_baseline):
    """rid "dup" with two prompts while "dup-1" runs used to leave "dup-0" in the table forever."""
    async def go():
        async with aiohttp.ClientSession(server.url) as session:
            long = {"prompt": "Hi", "max_tokens": 600, "ignore_eos": True, "stream": True}
            victim = await _stream_until_running(session, dict(long, rid="dup-1"))
            clashes = []
            for _ in range(20):  # more than --max-queued-requests' worth of leaks would need
                async with session.post("/generate", json={"text": ["a", "b"], "rid": "dup-1",
                                                           "sampling_params": {"max_new_tokens": 1}}) as response:
                    clashes.append((response.status, (await response.json())["error"]["param"]))
            async with session.post("/abort_request", json={"rid": "dup-1"}) as response:
                assert response.status == 200
            events = await asyncio.wait_for(victim, 60)
            async with session.post("/v1/completions", json={"prompt": ["a", "b"], "max_tokens": 1,
                                                             "rid": "dup"}) as response:
                batch = await response.json()
            return clashes, events, batch

    clashes, events, batch = asyncio.run(go())
    assert clashes == [(400, "rid")] * 20
    assert json.loads(events[-2][5:])["choices"][0]["finish_reason"] == "abort"
    assert batch["id"] == "dup" and len(batch["choices"]) == 2
    info = wait_idle(server)
    assert (info["num_requests_in_flight"], info["num_sequences_in_flight"]) == (0, 0)


def test_a_rid_cannot_reach_another_clients_request(server, kv_baseline):
    """rid "victim.0" (the victim's sequence 0 under the old scheme) neither aborts nor fails the victim."""
    async def go():
        async with aiohttp.ClientSession(server.url) as session:
            victim_body = {"prompt": "Hi", "max_tokens": 40, "ignore_eos": True, "n": 2, "stream": True,
                           "rid": "victim"}
            victim = await _stream_until_running(session, victim_body)
            attacks = []
            for rid in ("victim.0", "victim.1", "victim-0", "victim"):  # refused late (tokenize) or at once
                body = {"prompt": [10 ** 9], "max_tokens": 1, "rid": rid}
                async with session.post("/v1/completions", json=body) as response:
                    attacks.append(response.status)
                body = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6, "rid": rid}
                async with session.post("/v1/chat/completions", json=body) as response:
                    attacks.append(response.status)
            return attacks, await asyncio.wait_for(victim, 60)

    attacks, events = asyncio.run(go())
    assert attacks == [400] * 8
    finishes = [choice["finish_reason"] for line in events[:-1] for choice in json.loads(line[5:])["choices"]
                if choice["finish_reason"]]
    assert "error" not in b"".join(events).decode() and finishes == ["length", "length"]
    info = wait_idle(server)
    assert (info["num_requests_in_flight"], info["num_sequences_in_flight"]) == (0, 0)


def test_reusing_a_rid_right_after_its_abort(server, kv_baseline):
    """The pipeline's Abort for the old request must not end the new one with the same rid."""
    async def go():
        async with aiohttp.ClientSession(server.url) as session:
            body = {"prompt": "Hi", "max_tokens": 600, "ignore_eos": True, "stream": True, "rid": "again"}
            first = await _stream_until_running(session, body)
            async with session.post("/abort_request", json={"rid": "again"}) as response:
                assert response.status == 200
            async with session.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True,
                                                             "rid": "again"}) as response:
                second = await response.json()
            return await asyncio.wait_for(first, 60), second

    first, second = asyncio.run(go())
    assert json.loads(first[-2][5:])["choices"][0]["finish_reason"] == "abort"
    assert second["id"] == "again" and second["choices"][0]["finish_reason"] == "length", second
    info = wait_idle(server)
    assert (info["num_requests_in_flight"], info["num_sequences_in_flight"]) == (0, 0)


def wait_idle(server, timeout_s: float = 20.0) -> dict:
    """Server info once the request table is empty (handlers finish just after their last byte)."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = engine_stats(server)
        if info["num_requests_in_flight"] == 0 or time.monotonic() > deadline:
            return info
        time.sleep(0.05)


def test_nothing_leaked(server, kv_baseline):
    """Runs last: after every bad request the server is healthy and holds no request and no KV."""
    assert call(server, "/health", method="GET")[0] == 200
    used, info = settled_kv_use(server)
    assert info["num_requests_in_flight"] == 0 and info["num_sequences_in_flight"] == 0
    assert used == kv_baseline
