"""The HTTP server end to end (single placement), through the official openai client and raw aiohttp."""
from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import running_server

PROMPT = "First Citizen: Before we proceed"
JSON_HEADERS = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "single.log", "--placement", "single") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def post(server, path: str, body: dict | bytes) -> tuple[int, dict]:
    async def go():
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + path, data=data, headers=JSON_HEADERS) as response:
                return response.status, await response.json(content_type=None)

    return asyncio.run(go())


def get(server, path: str) -> tuple[int, str]:
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + path) as response:
                return response.status, await response.text()

    return asyncio.run(go())


# --------------------------------------------------------------------------- happy paths


def test_completion_stream_equals_whole(client, tokenizer):
    kwargs = dict(model="m", prompt=PROMPT, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text and len(whole.choices[0].text) > 0
    assert whole.choices[0].finish_reason == "length"
    prompt_tokens = len(tokenizer.encode(PROMPT))
    assert (whole.usage.prompt_tokens, whole.usage.completion_tokens) == (prompt_tokens, 12)
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].usage.prompt_tokens == prompt_tokens
    running = list(client.completions.create(stream=True, stream_options={"include_usage": True,
                                                                          "continuous_usage_stats": True}, **kwargs))
    counts = [c.usage.completion_tokens for c in running]
    assert counts == sorted(counts) and counts[-1] == 12


def test_chat_stream_equals_whole(client, tokenizer):
    messages = [{"role": "user", "content": "Speak, speak."}]
    kwargs = dict(model="m", messages=messages, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert whole.choices[0].message.role == "assistant"
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer.encode(rendered, add_special_tokens=False))
    assert whole.usage.prompt_tokens == prompt_tokens and whole.usage.completion_tokens == 10
    assert chunks[-1].usage.total_tokens == prompt_tokens + 10


def test_chat_without_max_tokens_fills_the_context(client, tokenizer, model_dir):
    """No max_tokens means "up to the context length", so a long prompt is not a 400."""
    context_length = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]

    def prompt_tokens_of(num_words: int) -> tuple[list[dict], int]:
        messages = [{"role": "user", "content": " ".join(["Speak, speak."] * num_words)}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return messages, len(tokenizer.encode(rendered, add_special_tokens=False))

    num_words = 1
    while prompt_tokens_of(num_words * 2)[1] < context_length - 40:
        num_words *= 2
    while prompt_tokens_of(num_words + 1)[1] < context_length - 40:
        num_words += 1
    messages, prompt_tokens = prompt_tokens_of(num_words)
    assert 0 < context_length - prompt_tokens < 128  # the old default of 128 new tokens would not fit
    reply = client.chat.completions.create(model="m", messages=messages, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.prompt_tokens + reply.usage.completion_tokens == context_length


def test_n2_gives_two_choices(client):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=6, n=2, temperature=1.0, seed=3,
                                      extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == [0, 1]
    assert reply.usage.completion_tokens == 12
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], n=2,
                                          max_tokens=4, seed=5, extra_body={"ignore_eos": True})
    assert [c.index for c in chat.choices] == [0, 1] and chat.usage.completion_tokens == 8


def test_stop_string_cuts_output(client):
    base = dict(model="m", prompt=PROMPT, max_tokens=40, temperature=1.0, seed=11, extra_body={"ignore_eos": True})
    text = client.completions.create(**base).choices[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert len(stop) == 2
    reply = client.completions.create(stop=[stop, "\u2603never"], **base)
    assert reply.choices[0].text == text[:text.find(stop)]
    assert reply.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(stop=stop, stream=True, **base))
    assert streamed == text[:text.find(stop)]


def test_logprobs(client):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=5, logprobs=2, temperature=0,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 5
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    assert all(len(top) >= 1 for top in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == reply.choices[0].text
    chat = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=3,
                                          logprobs=True, top_logprobs=2, temperature=0,
                                          extra_body={"ignore_eos": True})
    content = chat.choices[0].logprobs.content
    assert len(content) == 3 and all(len(entry.top_logprobs) == 2 for entry in content)
    # greedy: the chosen token is the most likely one
    assert all(entry.logprob >= max(t.logprob for t in entry.top_logprobs) - 1e-4 for entry in content)


def test_models_and_info(client, server):
    [model] = client.models.list().data
    assert model.id and model.owned_by == "stagewise"
    status, body = get(server, "/get_model_info")
    assert status == 200 and json.loads(body)["is_generation"] is True
    status, body = get(server, "/get_server_info")
    info = json.loads(body)
    assert status == 200 and "api_key" not in info and info["context_length"] > 0
    assert wait_stats(server, lambda stats: True)["max_total_num_tokens"] > 0  # EngineStats come once a second
    assert get(server, "/health_generate")[0] == 200


def test_native_generate(server, tokenizer):
    status, body = post(server, "/generate", {"text": PROMPT, "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}, "return_logprob": True})
    assert status == 200
    meta = body["meta_info"]
    assert meta["prompt_tokens"] == len(tokenizer.encode(PROMPT)) and meta["completion_tokens"] == 4
    assert meta["finish_reason"] == {"type": "length", "length": 4} and meta["e2e_latency"] > 0
    assert "cached_tokens" in meta and len(meta["output_token_logprobs"]) == 4
    assert len(body["output_ids"]) == 4 and body["text"] == tokenizer.decode(body["output_ids"])
    ids = tokenizer.encode(PROMPT)
    status, again = post(server, "/generate", {"input_ids": ids, "sampling_params": {
        "max_new_tokens": 4, "temperature": 0, "ignore_eos": True}})
    assert status == 200 and again["output_ids"] == body["output_ids"]
    assert again["meta_info"]["cached_tokens"] > 0
    status, batch = post(server, "/generate", {"text": [PROMPT, "Speak"], "sampling_params": {"max_new_tokens": 2}})
    assert status == 200 and isinstance(batch, list) and len(batch) == 2


def test_native_generate_stream(server):
    async def go():
        async with aiohttp.ClientSession() as session:
            body = {"text": PROMPT, "stream": True,
                    "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}}
            async with session.post(server.url + "/generate", json=body) as response:
                events = [line async for line in response.content if line.startswith(b"data:")]
        return events

    events = asyncio.run(go())
    assert events[-1].strip() == b"data: [DONE]"
    last = json.loads(events[-2][5:])
    assert last["meta_info"]["finish_reason"]["type"] == "length" and len(last["output_ids"]) == 5


# --------------------------------------------------------------------------- bad input


BAD_REQUESTS = [
    ("/v1/completions", b"{not json", "not valid JSON"),
    ("/v1/completions", b"[1, 2]", "Expected `object`"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": "x"}, "max_tokens"),
    ("/v1/completions", {"prompt": PROMPT, "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": PROMPT, "top_p": 1.5}, "top_p"),
    ("/v1/completions", {"prompt": PROMPT, "n": 0}, "n="),
    ("/v1/completions", {"prompt": PROMPT, "presence_penalty": 5}, "presence_penalty"),
    ("/v1/completions", {"prompt": PROMPT, "logprobs": 99}, "logprobs"),
    ("/v1/completions", {"prompt": PROMPT, "stop": ["s"] * 17}, "stop"),
    ("/v1/completions", {"prompt": ""}, "empty"),
    ("/v1/completions", {"prompt": [1, 999999]}, "vocabulary"),
    ("/v1/completions", {"prompt": PROMPT, "max_tokens": 100000}, "context length"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "hi"}]}, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "schema"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 3}, "logprobs"),
    ("/generate", {"text": PROMPT, "sampling_params": {"max_new_token": 3}}, "unknown"),
    ("/generate", {"sampling_params": {}}, "exactly one"),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/generate", {"input_ids": ["a"]}, "input_ids"),
]


@pytest.mark.parametrize("path, body, words", BAD_REQUESTS, ids=[f"{i}-{w}" for i, (_, _, w) in
                                                                   enumerate(BAD_REQUESTS)])
def test_bad_input_is_a_400_naming_the_problem(server, path, body, words):
    status, reply = post(server, path, body)
    assert status == 400, reply
    error = reply["error"]
    assert words in error["message"] or words == error["param"], error
    assert error["type"] == "invalid_request_error" and error["code"] == 400


def test_stream_error_before_first_token_is_plain_400(server):
    status, reply = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                          "max_tokens": 100000, "stream": True})
    assert status == 400 and "context length" in reply["error"]["message"]


def test_unknown_route_is_openai_shaped_404(server):
    status, reply = post(server, "/v1/nothing", {})
    assert status == 404 and "error" in reply


# --------------------------------------------------------------------------- load, disconnects, metrics


def engine_stats(server) -> dict:
    return json.loads(get(server, "/get_server_info")[1])["engine_stats"]


def forward_steps(server) -> float:
    """Batches the forward stage has taken, from the counters each process's runner sends once a second."""
    time.sleep(1.2)  # a report newer than anything before this call
    return json.loads(get(server, "/get_server_info")[1])["stage_counters"]["forward"]["messages_in"]


def wait_stats(server, predicate, timeout_s: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stats = engine_stats(server)
        if stats is not None and predicate(stats):
            return stats
        time.sleep(0.1)
    raise AssertionError(f"engine stats never matched; last: {stats}")


def used_tokens_after_flush(server) -> int:
    status, _ = post(server, "/flush_cache", {})
    assert status == 200
    since = time.time()
    stats = wait_stats(server, lambda s: s["time_s"] > since + 0.3 and s["num_running_reqs"] == 0)
    return round(stats["token_usage"] * stats["max_total_num_tokens"])


def test_disconnect_mid_stream_frees_kv(server):
    baseline = used_tokens_after_flush(server)
    steps_before = forward_steps(server)

    async def disconnect_after_two_chunks():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": PROMPT, "max_tokens": 400, "stream": True, "ignore_eos": True}
            response = await session.post(server.url + "/v1/completions", json=body)
            seen = 0
            async for line in response.content:
                seen += line.startswith(b"data:")
                if seen == 2:
                    break
            response.close()  # drop the connection mid-stream

    asyncio.run(disconnect_after_two_chunks())
    disconnected = time.time()
    stats = wait_stats(server, lambda s: s["time_s"] > disconnected + 0.3 and s["num_running_reqs"] == 0)
    # the request stopped early: far fewer than 400 tokens were decoded
    assert stats["num_running_reqs"] == 0 and forward_steps(server) - steps_before < 300
    assert used_tokens_after_flush(server) == baseline


def test_fifty_concurrent_streams_finish(server):
    async def one(session, i):
        body = {"prompt": f"{PROMPT} {i}", "max_tokens": 6, "stream": True, "ignore_eos": True, "temperature": 0}
        async with session.post(server.url + "/v1/completions", json=body) as response:
            assert response.status == 200
            events = [line.strip() async for line in response.content if line.startswith(b"data:")]
        finishes = [json.loads(e[5:])["choices"][0]["finish_reason"] for e in events[:-1]]
        return events[-1] == b"data: [DONE]" and finishes[-1] == "length"

    async def all_of_them():
        async with aiohttp.ClientSession() as session:
            return await asyncio.wait_for(asyncio.gather(*(one(session, i) for i in range(50))), 120)

    assert all(asyncio.run(all_of_them()))


def metric_values(server) -> dict[tuple[str, tuple], float]:
    status, text = get(server, "/metrics")
    assert status == 200
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


def test_metrics_parse_and_move(server, client):
    before = metric_values(server)
    client.completions.create(model="m", prompt=PROMPT, max_tokens=7, temperature=0, extra_body={"ignore_eos": True})
    after = metric_values(server)
    model = next(dict(labels)["model_name"] for name, labels in after if name.endswith("generation_tokens_total"))
    key = ("stagewise:generation_tokens_total", (("model_name", model),))
    assert after[key] - before.get(key, 0.0) == 7
    finished = ("stagewise:num_requests_total", (("finish_reason", "length"), ("model_name", model)))
    assert after[finished] - before.get(finished, 0.0) == 1
    ttft = ("stagewise:time_to_first_token_seconds_count", (("model_name", model),))
    assert after[ttft] > before.get(ttft, 0.0)
    stages = {dict(labels)["stage"] for name, labels in after if name == "stagewise:stage_messages_in_total"}
    assert stages == {"ingest", "tokenize", "multimodal", "schedule", "forward", "constrain", "sample",
                      "detokenize"}
    assert ("stagewise:num_running_reqs", (("model_name", model),)) in after


def test_bench_serving_runs_against_the_server(server, tmp_path):
    from perf.bench_serving import main as bench

    output = tmp_path / "bench.jsonl"
    record = bench(["--base-url", server.url, "--num-prompts", "6", "--random-input-len", "24",
                    "--random-output-len", "5", "--random-range-ratio", "1.0", "--request-rate", "inf",
                    "--max-concurrency", "3", "--output-file", str(output)])
    assert record["completed"] == 6 and record["failed"] == 0
    assert record["total_output_tokens"] == 30 and record["total_input_tokens"] == 6 * 24
    assert record["ttft"]["mean_ms"] > 0 and record["server"]["device_name"] == "cpu"
    assert json.loads(output.read_text().splitlines()[-1])["completed"] == 6


def test_huge_prompt_does_not_stall_other_streams(server):
    """A ~150k-token prompt is tokenized off the event loop: a running stream keeps flowing.

    ``truncate_prompt_tokens`` keeps the prompt past the early byte-length refusal, so
    the whole text is really tokenized (then cut to its last 16 tokens and served).
    """
    huge = "First Citizen: Before we proceed any further, hear me speak. " * 7000

    async def go():
        async with aiohttp.ClientSession() as session:
            body = {"prompt": PROMPT, "max_tokens": 120, "stream": True, "ignore_eos": True}
            gaps, started = [], asyncio.Event()

            async def stream():
                async with session.post(server.url + "/v1/completions", json=body) as response:
                    last = None
                    async for line in response.content:
                        if line.startswith(b"data:"):
                            now = time.perf_counter()
                            if last is not None:
                                gaps.append(now - last)
                            last = now
                            started.set()

            async def huge_request():
                await started.wait()
                start = time.perf_counter()
                huge_body = {"prompt": huge, "max_tokens": 1, "truncate_prompt_tokens": 16}
                async with session.post(server.url + "/v1/completions", json=huge_body) as response:
                    reply = await response.json()
                return response.status, reply, time.perf_counter() - start

            _, (status, reply, huge_s) = await asyncio.gather(stream(), huge_request())
            return gaps, status, reply, huge_s

    gaps, status, reply, huge_s = asyncio.run(go())
    assert status == 200 and reply["usage"]["prompt_tokens"] == 16, reply
    assert huge_s > 0.1  # it really took a while to tokenize...
    assert max(gaps) < max(0.5 * huge_s, 0.3), (max(gaps), huge_s)  # ...and the stream never waited for it


def test_structured_output_through_http(client):
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer", "minimum": 1, "maximum": 99}},
              "required": ["name", "age"]}
    reply = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Name a king"}], max_tokens=60, temperature=0.8, seed=2,
        response_format={"type": "json_schema", "json_schema": {"name": "king", "schema": schema}})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"name", "age"} and 1 <= value["age"] <= 99 and len(value["name"]) <= 12
    choice = client.completions.create(model="m", prompt=PROMPT, max_tokens=8, extra_body={"regex": "(yes|no)"})
    assert choice.choices[0].text in ("yes", "no")
