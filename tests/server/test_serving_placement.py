"""The serving placement (front-end process + engine process): smoke test, API key, metrics, SIGTERM."""
from __future__ import annotations

import asyncio
import json
import signal
import time

import aiohttp
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import running_server

API_KEY = "sk-test-key"
PROMPT = "All: Speak, speak."
ENGINE_STAGES = ("schedule", "forward", "sample", "multimodal")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    key_file = logs / "api_key"
    key_file.write_text(API_KEY + "\n")  # a file keeps the key off the command line (/proc/<pid>/cmdline)
    with running_server(model_dir, logs / "serving.log", "--placement", "serving", "--api-key-file", str(key_file),
                        "--record-path", str(logs / "traffic.rec")) as process:
        process.record_path = logs / "traffic.rec"
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_smoke_completion_and_chat(client):
    kwargs = dict(model="m", prompt=PROMPT, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kwargs)
    streamed = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))
    assert streamed == whole.choices[0].text and whole.usage.completion_tokens == 8
    chat_kwargs = dict(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0,
                       extra_body={"ignore_eos": True})
    chat = client.chat.completions.create(**chat_kwargs)
    chunks = client.chat.completions.create(stream=True, **chat_kwargs)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, n=2, extra_body={"ignore_eos": True})
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == 6


def test_flush_cache_reaches_the_engine_process(server, client):
    """FlushCache travels the request path, so it crosses into the engine process like a request."""
    kwargs = dict(model="m", prompt=PROMPT * 3, max_tokens=2, temperature=0, extra_body={"ignore_eos": True})
    client.completions.create(**kwargs)
    again = client.completions.create(**kwargs)
    assert again.usage.prompt_tokens_details.cached_tokens > 0

    async def flush():
        async with aiohttp.ClientSession() as session:
            headers = {"Authorization": f"Bearer {API_KEY}"}
            async with session.post(server.url + "/flush_cache", headers=headers) as response:
                return response.status

    assert asyncio.run(flush()) == 200
    after = client.completions.create(**kwargs)
    assert after.usage.prompt_tokens_details.cached_tokens == 0


def test_api_key_required(server):
    async def go():
        async with aiohttp.ClientSession() as session:
            statuses = []
            for headers in ({}, {"Authorization": "Bearer wrong"}):
                async with session.get(server.url + "/v1/models", headers=headers) as response:
                    body = await response.json()
                    statuses.append((response.status, body["error"]["type"]))
            async with session.get(server.url + "/health") as response:
                statuses.append((response.status, None))
            return statuses

    assert asyncio.run(go()) == [(401, "authentication_error"), (401, "authentication_error"), (200, None)]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_non_utf8_key_header_is_a_json_401(server):
    """Raw header bytes that are not UTF-8 (Authorization or x-api-key) used to be a 500 with a text body."""
    async def send(header: bytes) -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
        writer.write(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + header + b"\r\n\r\n")
        await writer.drain()
        reply = await asyncio.wait_for(reader.read(), 30)
        writer.close()
        head, _, body = reply.partition(b"\r\n\r\n")
        return head.split(b"\r\n")[0], body

    for header in (b"Authorization: Bearer \xff\xfe" + API_KEY.encode(), b"x-api-key: \xc3\x28",
                   b"Authorization: \xff"):
        status_line, body = asyncio.run(send(header))
        assert b" 401 " in status_line, (header, status_line, body)
        assert json.loads(body)["error"]["type"] == "authentication_error"


def test_api_key_is_never_shown(server, client):
    """Not on the command line (read from --api-key-file), not in the log, not in /get_server_info."""
    async def info():
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {API_KEY}"}) as session:
            async with session.get(server.url + "/get_server_info") as response:
                return response.status, await response.text()

    status, text = asyncio.run(info())
    assert status == 200 and API_KEY not in text and "api_key" not in json.loads(text)
    assert API_KEY.encode() not in open(f"/proc/{server.process.pid}/cmdline", "rb").read()
    deadline = time.monotonic() + 15
    while "serving " not in server.log_path.read_text() and time.monotonic() < deadline:  # the start-up line
        time.sleep(0.1)
    log = server.log_path.read_text()
    assert "serving " in log and API_KEY not in log


def test_metrics_cover_both_processes(server, client):
    client.completions.create(model="m", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    time.sleep(1.2)  # engine-process counters arrive with the next EngineStats (once a second)

    async def scrape():
        async with aiohttp.ClientSession() as session:
            async with session.get(server.url + "/metrics") as response:
                return await response.text()

    samples = {(s.name, s.labels.get("stage")): s.value
               for family in text_string_to_metric_families(asyncio.run(scrape())) for s in family.samples}
    for stage in ENGINE_STAGES + ("tokenize", "detokenize", "ingest"):
        assert samples[("stagewise:stage_messages_in_total", stage)] > 0, stage


def test_sigterm_answers_in_flight_request_then_exits(server):
    async def stream_through_shutdown():
        headers = {"Authorization": f"Bearer {API_KEY}"}
        body = {"prompt": PROMPT, "max_tokens": 48, "stream": True, "ignore_eos": True}
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(server.url + "/v1/completions", json=body) as response:
                events = []
                async for line in response.content:
                    if line.startswith(b"data:"):
                        events.append(line.strip())
                        if len(events) == 1:
                            server.process.send_signal(signal.SIGTERM)
        return events

    events = asyncio.run(stream_through_shutdown())
    assert events[-1] == b"data: [DONE]"
    assert json.loads(events[-2][5:])["choices"][0]["finish_reason"] == "length"
    assert server.process.wait(60) == 0
    assert "stopped" in server.log_text()


@pytest.mark.parametrize("stage", ["ingest", "tokenize", "multimodal", "schedule", "detokenize"])
def test_recorded_traffic_replays_into_one_stage(server, stage):
    """Runs after the SIGTERM test: the whole two-process run was recorded, a drain under SIGTERM included;
    each stage replays identically (every stage, on another workload: tests/server/test_replay.py)."""
    from pipeline.harness import replay

    assert server.process.poll() is not None, "the server must have stopped (recording complete)"
    assert replay(str(server.record_path), stage) is None
