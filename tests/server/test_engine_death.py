"""When the engine process dies, running requests are answered (503), not left hanging, and the server exits."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess

import aiohttp
import pytest

from tests.server.conftest import running_server


def engine_child_pids(server_pid: int) -> list[int]:
    """Our server's spawned engine process (a direct child running multiprocessing's spawn_main)."""
    children = subprocess.run(["pgrep", "-P", str(server_pid)], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in children:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            if b"spawn_main" in handle.read():
                pids.append(int(pid))
    return pids


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "death.log", "--placement", "serving") as process:
        yield process


def test_engine_death_answers_503_and_server_exits(server):
    [engine_pid] = engine_child_pids(server.process.pid)

    async def stream_while_engine_dies():
        body = {"prompt": "To be, or not", "max_tokens": 600, "stream": True, "ignore_eos": True}
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + "/v1/completions", json=body) as response:
                events = []
                async for line in response.content:
                    if line.startswith(b"data:"):
                        events.append(line.strip())
                        if len(events) == 2:
                            os.kill(engine_pid, signal.SIGKILL)
                return events

    events = asyncio.run(asyncio.wait_for(stream_while_engine_dies(), 60))
    assert events[-1] == b"data: [DONE]"
    error = json.loads(events[-2][5:])["error"]
    assert error["code"] == 503 and "engine" in error["message"]
    assert server.process.wait(30) == 1
