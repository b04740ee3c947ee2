"""Client chat templates on a live server (--allow-request-chat-template): rendered in the sandbox.

A template that loops answers its own client with a 400 naming the time limit while another client's
request is served at once; a template that builds a 100 MB string is a 400 and the server does not grow;
a good template renders like the server's own would; the sandbox workers die with a SIGKILLed server.
"""
from __future__ import annotations

import asyncio
import json
import re
import signal
import time

import aiohttp
import pytest

from stages.template_sandbox import RENDER_TIMEOUT_S
from tests.server.conftest import running_server
from tests.server.test_process_tree import alive

CHAT = "/v1/chat/completions"
USER = [{"role": "user", "content": "hi"}]
NESTED_LOOP = "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"
STARTED = re.compile(r"process chat-template-sandbox-\d+ started \(pid (\d+)\)")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "template.log"
    with running_server(model_dir, log, "--allow-request-chat-template") as process:
        yield process


async def post(session: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, dict, float]:
    start = time.monotonic()
    async with session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=120)) as response:
        return response.status, json.loads(await response.text()), time.monotonic() - start


def chat(template: str, **fields) -> dict:
    return {"messages": USER, "max_tokens": 2, "chat_template_kwargs": {"chat_template": template}, **fields}


def peak_rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as handle:
        return int(re.search(r"VmHWM:\s+(\d+) kB", handle.read()).group(1))


def test_a_good_client_template_is_rendered(server):
    async def go():
        async with aiohttp.ClientSession() as session:
            template = "{% for m in messages %}{{ m['content'] }}{{ suffix }}{% endfor %}"
            status, body, _ = await post(session, server.url + CHAT, chat(template, chat_template_kwargs={
                "chat_template": template, "suffix": " and more"}, max_tokens=1))
            assert status == 200, body
            assert body["usage"]["prompt_tokens"] > 1  # "hi and more"

    asyncio.run(go())


def test_a_nested_loop_template_does_not_freeze_another_client(server):
    async def go():
        async with aiohttp.ClientSession() as session:
            bad = asyncio.create_task(post(session, server.url + CHAT, chat(NESTED_LOOP)))
            await asyncio.sleep(0.5)  # the loop is running in a sandbox worker now
            status, body, seconds = await post(session, server.url + "/v1/completions",
                                               {"prompt": "Hello", "max_tokens": 2})
            assert status == 200 and body["usage"]["completion_tokens"] == 2, body
            assert seconds < RENDER_TIMEOUT_S / 2, f"the other client waited {seconds:.1f} s"
            assert not bad.done(), "the loop finished early: the test saw no overlap"
            return await bad

    status, body, seconds = asyncio.run(go())
    assert status == 400, body
    assert body["error"]["param"] == "chat_template_kwargs.chat_template"
    assert f"time limit of {RENDER_TIMEOUT_S:g} s" in body["error"]["message"]
    assert seconds < RENDER_TIMEOUT_S + 5


def test_a_huge_string_is_a_400_and_the_server_does_not_grow(server):
    async def go(template: str):
        async with aiohttp.ClientSession() as session:
            return await post(session, server.url + CHAT, chat(template))

    before = peak_rss_kb(server.process.pid)
    for template, reason in [("{{ 'ab' * 50000000 }}", "more than the limit"),
                             ("{{ 'ab' * 5000000000 }}", "ran out of memory")]:
        status, body, _ = asyncio.run(go(template))
        assert status == 400 and body["error"]["param"] == "chat_template_kwargs.chat_template", body
        # which limit answers first depends on the machine's speed (the sandbox test pins each one)
        message = body["error"]["message"]
        assert reason in message or f"time limit of {RENDER_TIMEOUT_S:g} s" in message, body
    grown_mb = (peak_rss_kb(server.process.pid) - before) / 1024
    assert grown_mb < 50, f"the server's peak RSS grew by {grown_mb:.0f} MB"  # the string alone is 100 MB


def test_the_sandbox_workers_die_with_the_server(server):
    pids = [int(pid) for pid in STARTED.findall(server.log_text())]
    assert pids and any(alive(pid) for pid in pids), server.log_text()
    server.process.send_signal(signal.SIGKILL)
    server.process.wait(10)
    deadline = time.monotonic() + 5.0
    while any(alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(alive(pid) for pid in pids)
