"""Operating the server: SIGTERM drain with --shutdown-timeout, the --watchdog-timeout stall alarm,
idle and half-open connections, --help, a port in use, a kernel backend that cannot run."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import aiohttp
import pytest

from stages.ingest.server import KEEPALIVE_TIMEOUT_S, RateLimitedAcceptErrors
from tests.server.conftest import REPO, ServerProcess, free_port, health_status, running_server
from tests.server.test_process_tree import STARTED

LONG_STREAM = {"prompt": "To be, or not", "max_tokens": 900, "stream": True, "ignore_eos": True}


async def read_events(response: aiohttp.ClientResponse, events: list[bytes]) -> None:
    async for line in response.content:
        if line.startswith(b"data:"):
            events.append(line.strip())


# -- SIGTERM drain --------------------------------------------------------------------


def test_sigterm_drain_aborts_at_shutdown_timeout_and_exits_0(model_dir, tmp_path):
    server = ServerProcess(model_dir, tmp_path / "drain.log", "--shutdown-timeout", "3")
    try:
        server.wait_ready()
        health_during_drain: list[int] = []

        async def stream_through_sigterm() -> tuple[list[bytes], float]:
            events: list[bytes] = []
            async with aiohttp.ClientSession() as session:
                async with session.post(server.url + "/v1/completions", json=LONG_STREAM) as response:
                    reading = asyncio.ensure_future(read_events(response, events))
                    while len(events) < 2:
                        await asyncio.sleep(0.05)
                    server.process.send_signal(signal.SIGTERM)
                    sent_s = time.monotonic()
                    await asyncio.sleep(0.5)
                    health_during_drain.append(await asyncio.to_thread(health_status, server.url))
                    await asyncio.wait_for(reading, 30)
            return events, sent_s

        events, sent_s = asyncio.run(stream_through_sigterm())
        assert health_during_drain == [503]
        assert events[-1] == b"data: [DONE]"
        last = json.loads(events[-2][5:])
        assert "error" in last or last["choices"][0]["finish_reason"] == "abort", last
        assert server.process.wait(15) == 0, server.log_text()
        assert time.monotonic() - sent_s < 3 + 8, "the drain ran past --shutdown-timeout plus a few seconds"
        assert "aborting them" in server.log_text()
    finally:
        server.stop()


# -- watchdog and connections (one serving-placement server) ------------------------


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "operator.log"
    with running_server(model_dir, log, "--placement", "serving") as process:
        yield process


def test_watchdog_marks_health_503_while_the_engine_is_stopped(model_dir, tmp_path):
    """--watchdog-timeout 2: the engine process SIGSTOPped mid-stream turns /health 503 within seconds (and
    the stall is logged); SIGCONT brings it back to 200."""
    with running_server(model_dir, tmp_path / "watchdog.log", "--placement", "serving",
                        "--watchdog-timeout", "2") as server:
        engine_pid = int(dict(STARTED.findall(server.log_text()))["engine"])
        events: list[bytes] = []

        def stream() -> None:
            body = json.dumps(LONG_STREAM).encode()
            request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                             headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    for line in response:
                        events.append(line)
            except OSError:
                pass

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        deadline = time.monotonic() + 30
        while len(events) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(server.url, 5) == 200
        os.kill(engine_pid, signal.SIGSTOP)
        try:
            deadline = time.monotonic() + 10  # 2 s timeout, checked every 0.5 s, counters once a second
            while health_status(server.url, 5) != 503 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert health_status(server.url, 5) == 503
            assert "watchdog: the engine made no progress" in server.log_text()
        finally:
            os.kill(engine_pid, signal.SIGCONT)
        deadline = time.monotonic() + 10
        while health_status(server.url, 5) != 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert health_status(server.url, 5) == 200


def test_idle_and_half_open_connections_are_closed_and_clients_still_served(server):
    host, port = "127.0.0.1", server.port
    idle = [socket.create_connection((host, port)) for _ in range(40)]
    half_open = [socket.create_connection((host, port)) for _ in range(20)]
    for sock in half_open:  # headers begun, never finished
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
    try:
        assert health_status(server.url, 5) == 200
        body = json.dumps({"prompt": "To be", "max_tokens": 2}).encode()
        request = urllib.request.Request(server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            assert response.status == 200
        deadline = time.monotonic() + KEEPALIVE_TIMEOUT_S + 5
        for sock in idle + half_open:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            assert closed_by_server(sock), "a connection stayed open past the keep-alive timeout"
    finally:
        for sock in idle + half_open:
            sock.close()


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes (an error response before the close is fine); False on timeout."""
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def test_accept_errors_are_logged_once_per_interval(caplog):
    handler = RateLimitedAcceptErrors(interval_s=60.0)
    loop = asyncio.new_event_loop()
    try:
        with caplog.at_level("ERROR"):
            for _ in range(50):
                handler(loop, {"message": "socket.accept() out of system resource",
                               "exception": OSError(24, "Too many open files")})
    finally:
        loop.close()
    assert len([r for r in caplog.records if "cannot accept" in r.getMessage()]) == 1
    assert handler.num_suppressed == 49


# -- start-up -----------------------------------------------------------------------


def serve_command(*flags: str, env: dict | None = None, timeout_s: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.serve", *flags], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s, env=dict(env or os.environ, PYTHONPATH=str(REPO)))


def test_help_describes_every_flag_with_its_default():
    from pipeline.config import build_parser

    result = serve_command("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    flags = [a for a in build_parser()._actions if a.option_strings != ["-h", "--help"]]
    for action in flags:
        assert action.help and "(default: " in action.help, action.option_strings
        assert len(action.help.split("(default:")[0].strip()) > 3, action.option_strings
    assert "--shutdown-timeout SHUTDOWN_TIMEOUT seconds SIGTERM lets running requests finish" in text
    assert "(default: 30.0)" in text


def test_port_in_use_fails_fast_with_the_reason(model_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start_s = time.monotonic()
        result = serve_command("--model-path", str(model_dir), "--port", str(port),
                               env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert time.monotonic() - start_s < 30
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1] == f"port {port} is already in use"


def test_triton_backend_without_cuda_or_interpreter_fails_at_start(model_dir):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = serve_command("--model-path", str(model_dir), "--port", str(free_port()), "--kernel-backend",
                           "triton", env=dict(env, CUDA_VISIBLE_DEVICES=""))
    assert result.returncode == 2
    assert "--kernel-backend triton cannot run here" in result.stderr and "TRITON_INTERPRET" in result.stderr
