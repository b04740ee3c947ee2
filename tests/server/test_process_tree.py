"""SIGKILL of the server leaves no descendant behind: engine process and grammar sandbox die with it."""
from __future__ import annotations

import json
import os
import re
import signal
import time
import urllib.request

from tests.server.conftest import ServerProcess

STARTED = re.compile(r"process (\S+) started \(pid (\d+)\)")


def alive(pid: int) -> bool:
    """A process that exists and is not a zombie (a dead child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (walks /proc by parent pid)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as handle:
                    parents[int(entry)] = int(handle.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {p for p in found if alive(p)}


def test_sigkill_of_the_server_kills_every_descendant(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "tree.log", "--placement", "serving")
    try:
        server.wait_ready()
        body = {"model": "m", "prompt": "To be", "max_tokens": 4, "regex": "(yes|no)"}
        request = urllib.request.Request(server.url + "/v1/completions", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            assert response.status == 200
        started = {name: int(pid) for name, pid in STARTED.findall(server.log_text())}
        assert any(name.startswith("grammar-sandbox") for name in started) and "engine" in started, started
        assert all(alive(pid) for pid in started.values())
        below = descendants(server.process.pid)
        assert set(started.values()) <= below, (started, below)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(10)
        deadline = time.monotonic() + 5.0
        while any(alive(pid) for pid in below) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in below if alive(pid)], server.log_text()
    finally:
        server.stop()
