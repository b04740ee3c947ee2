"""Prefill and decode engines started apart, joined by ``stagewise router`` (pipeline/pd_hosts.py).

Three processes on localhost, as they would run on three hosts: ``stagewise
serve --disaggregation-mode prefill`` and ``... decode`` (each listening on its
``--disaggregation-bootstrap-port``), and ``stagewise router --pd-disaggregation
--prefill URL PORT --decode URL PORT`` serving HTTP. Channels between them go
over TCP, the KV over gloo (TCP). Greedy output over HTTP equals the
in-process engine's; an unreachable engine address is a start-up error that
names it.

Engines and routers that die (SIGKILL, as a crash or a lost host would):
with 1 prefill + 2 decode engines, a decode engine killed under load ends
each request with a result or an error naming it, the survivors serve new
requests with unchanged greedy output and their pools go back to idle,
``/get_server_info`` lists it in ``engines_down``; the last decode engine
killed fails the router (``/health`` 503, exit 1) as under ``--placement
pd``. A router killed: its engines
exit within seconds, saying why.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from pipeline.channel import ChannelClosed
from pipeline.engine import Engine
from pipeline.messages import Abort
from pipeline.tcp_channel import ChannelHub, Heartbeat, TcpProducer
from tests.server.conftest import REPO, free_port, health_status, wait_for_url

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 40, 2, 9, 17, 23], [100, 200, 300]]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
COMMON = ["--device", "cpu", "--disable-radix-cache", "--log-level", "info"]
DECODING_S = 5.0  # about how long the requests an engine is killed under should take at the measured speed


def _start(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline.cli", *args], cwd=REPO, env=env, stdout=out,
                                stderr=subprocess.STDOUT)


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _generate(url: str, input_ids: list[int]) -> list[int]:
    request = urllib.request.Request(url + "/generate", data=json.dumps({
        "input_ids": input_ids, "sampling_params": GREEDY}).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())["output_ids"]


def test_engines_started_apart_serve_like_one_engine(model_dir, tmp_path):
    expected = []
    with Engine(str(model_dir), device="cpu", disable_radix_cache=True) as engine:
        expected = [r["output_ids"] for r in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]
    prefill_port, decode_port, http_port = free_port(), free_port(), free_port()
    model = ["--model-path", str(model_dir)]
    processes = [
        _start(["serve", *model, *COMMON, "--disaggregation-mode", "prefill",
                "--disaggregation-bootstrap-port", str(prefill_port)], tmp_path / "prefill.log"),
        _start(["serve", *model, *COMMON, "--disaggregation-mode", "decode",
                "--disaggregation-bootstrap-port", str(decode_port)], tmp_path / "decode.log"),
    ]
    router_log = tmp_path / "router.log"
    router = _start(["router", "--pd-disaggregation", "--prefill", "http://127.0.0.1:30000", str(prefill_port),
                     "--decode", "http://127.0.0.1:30001", str(decode_port), "--dist-init-addr",
                     f"127.0.0.1:{free_port()}", *model, *COMMON, "--port", str(http_port)], router_log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for_url(url + "/health", router, "router", lambda: router_log.read_text()[-4000:], 300)
        got = [_generate(url, prompt) for prompt in PROMPTS]
        with urllib.request.urlopen(url + "/get_server_info", timeout=30) as response:
            info = json.loads(response.read())
    finally:
        for process in [router, *processes]:
            _stop(process)
    assert got == expected
    assert info["engine_roles"] == {"0": "prefill", "1": "decode"} and info["engines_down"] == []


def test_an_unreachable_engine_is_a_start_up_error(model_dir, tmp_path):
    closed_port = free_port()  # nothing listens there
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "router", "--pd-disaggregation", "--prefill",
         f"http://127.0.0.1:{closed_port}", str(closed_port), "--decode", "http://127.0.0.1:1", str(closed_port),
         "--connect-timeout-s", "1", "--model-path", str(model_dir), *COMMON, "--port", str(free_port())],
        cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"prefill0 engine: cannot reach 127.0.0.1:{closed_port}" in result.stderr


@pytest.mark.parametrize("flags, message", [
    (["--prefill", "http://127.0.0.1:1", "x"], "optional bootstrap port"),
    (["--decode", "http://127.0.0.1:1"], "at least one --prefill engine"),
])
def test_router_flags_are_checked(model_dir, flags, message):
    result = subprocess.run([sys.executable, "-m", "pipeline.cli", "router", "--pd-disaggregation", *flags,
                             "--model-path", str(model_dir), "--device", "cpu"],
                            cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 2 and message in result.stderr


def _engine(role: str, model_dir: Path, port: int, log: Path) -> subprocess.Popen:
    return _start(["serve", "--model-path", str(model_dir), *COMMON, "--disaggregation-mode", role,
                   "--disaggregation-bootstrap-port", str(port)], log)


def _router(model_dir: Path, prefill: list[int], decode: list[int], http_port: int, log: Path) -> subprocess.Popen:
    engines = [arg for port in prefill for arg in ("--prefill", "http://127.0.0.1:30000", str(port))]
    engines += [arg for port in decode for arg in ("--decode", "http://127.0.0.1:30001", str(port))]
    return _start(["router", "--pd-disaggregation", *engines, "--dist-init-addr", f"127.0.0.1:{free_port()}",
                   "--model-path", str(model_dir), *COMMON, "--load-balance-method", "round_robin",
                   "--port", str(http_port)], log)


def _outcome(url: str, input_ids: list[int], max_new_tokens: int) -> tuple[int, list[int] | str]:
    """(200, output ids) or (HTTP status, the error message)."""
    request = urllib.request.Request(url + "/generate", data=json.dumps({
        "input_ids": input_ids, "sampling_params": dict(GREEDY, max_new_tokens=max_new_tokens)}).encode(),
        headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return 200, json.loads(response.read())["output_ids"]
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())["error"]["message"]


def _info(url: str) -> dict:
    with urllib.request.urlopen(url + "/get_server_info", timeout=30) as response:
        return json.loads(response.read())


def _wait_decoding(url: str, rank: int, timeout_s: float = 60.0) -> None:
    """Until a fresh snapshot of engine ``rank`` shows requests running."""
    since_s, deadline = time.time(), time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(s["dp_rank"] == rank and s["time_s"] > since_s and s["num_running_reqs"]
               for s in _info(url)["engine_stats_per_dp_rank"]):
            return
        time.sleep(0.05)
    raise AssertionError(f"engine {rank} never ran a request")


def _wait_unhealthy(url: str, timeout_s: float = 30.0) -> int | None:
    """/health's first answer other than 200 (None: the server had already closed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (status := health_status(url)) != 200:
                return status
        except OSError:
            return None
        time.sleep(0.1)
    raise AssertionError(f"/health still answers 200 after {timeout_s:g} s")


def _wait_survivors_idle(url: str, ranks: set[int], since_s: float, timeout_s: float = 60.0) -> list[dict]:
    """The snapshots of the engines ``ranks`` once each is taken after ``since_s`` and shows nothing held."""
    deadline = time.monotonic() + timeout_s
    stats: list[dict] = []
    while time.monotonic() < deadline:
        stats = [s for s in _info(url)["engine_stats_per_dp_rank"] if s["dp_rank"] in ranks and s["time_s"] > since_s]
        if len(stats) == len(ranks) and not any(
                s["pd_queue_reqs"] or s["pd_transfer_reqs"] or s["num_running_reqs"] or s["num_queue_reqs"]
                or s["token_usage"] for s in stats):
            return stats
        time.sleep(0.2)
    raise AssertionError(f"the surviving engines did not go back to idle: {stats}")


def test_a_decode_engine_killed_under_load_leaves_the_survivors_serving(model_dir, tmp_path):
    ports = {name: free_port() for name in ("prefill0", "decode0", "decode1")}
    engines = {name: _engine(name.rstrip("01"), model_dir, port, tmp_path / f"{name}.log")
               for name, port in ports.items()}
    http_port = free_port()
    router_log = tmp_path / "router.log"
    router = _router(model_dir, [ports["prefill0"]], [ports["decode0"], ports["decode1"]], http_port, router_log)
    url = f"http://127.0.0.1:{http_port}"
    many = PROMPTS * 3  # round robin over the decode engines: each gets some
    try:
        wait_for_url(url + "/health", router, "router", lambda: router_log.read_text()[-4000:], 300)
        with ThreadPoolExecutor(len(many)) as pool:
            started = time.monotonic()
            before = list(pool.map(lambda p: _outcome(url, p, 8), many))
            short_s = time.monotonic() - started
            started = time.monotonic()
            list(pool.map(lambda p: _outcome(url, p, 40), many))
            # the decode time of one token, prefills taken out (the two runs differ by 32 tokens)
            per_token_s = max(time.monotonic() - started - short_s, 1e-3) / 32
            long = min(512, max(32, int(DECODING_S / per_token_s)))  # still decoding when the kill comes
            loaded = [pool.submit(_outcome, url, prompt, long) for prompt in many]
            _wait_decoding(url, rank=2)  # decode engine 1 holds some of them
            engines["decode1"].send_signal(signal.SIGKILL)
            during = [future.result() for future in loaded]
            after = list(pool.map(lambda p: _outcome(url, p, 8), many))
        survivors_idle = _wait_survivors_idle(url, {0, 1}, time.time())
        info, health = _info(url), health_status(url)
        engines["decode0"].send_signal(signal.SIGKILL)  # the last decode engine: nothing can be served
        last_health = _wait_unhealthy(url)
        router_code = router.wait(60)  # it fails the server, as --placement pd does
        logs = router_log.read_text()
    finally:
        for process in [router, *engines.values()]:
            _stop(process)
    assert all(status == 200 for status, _ in before), before
    errors = [got for status, got in during if status != 200]
    assert errors, "decode engine 1 had none of the requests"
    assert all("decode engine 1 died" in message and "engine_decode1" in message for message in errors), errors
    assert all(len(got) == long for status, got in during if status == 200)
    assert after == before  # the survivors' greedy output is unchanged
    assert len(survivors_idle) == 2
    assert info["engines_down"] == ["decode.1"] and health == 200
    assert last_health in (503, None) and router_code == 1, (last_health, router_code)
    assert "decode engine 1 (127.0.0.1:" in logs and "is gone: its connection closed" in logs
    assert "every decode engine is gone (the last: 'engine_decode0'" in logs


def test_engines_exit_when_their_router_is_killed(model_dir, tmp_path):
    ports = {"prefill": free_port(), "decode": free_port()}
    engines = {role: _engine(role, model_dir, port, tmp_path / f"{role}.log") for role, port in ports.items()}
    http_port = free_port()
    router_log = tmp_path / "router.log"
    router = _router(model_dir, [ports["prefill"]], [ports["decode"]], http_port, router_log)
    url = f"http://127.0.0.1:{http_port}"
    try:
        wait_for_url(url + "/health", router, "router", lambda: router_log.read_text()[-4000:], 300)
        with ThreadPoolExecutor(2) as pool:
            running = pool.submit(_outcome, url, PROMPTS[0], 100_000)  # in flight when the router dies
            time.sleep(1.0)
            router.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            codes = {role: process.wait(30) for role, process in engines.items()}
            exited_s = time.monotonic() - killed_at
            try:
                running.result(timeout=30)
            except OSError:
                pass  # the connection to the dead router broke: expected
    finally:
        for process in [router, *engines.values()]:
            _stop(process)
    assert codes == {"prefill": 1, "decode": 1} and exited_s < 15, (codes, exited_s)
    for role in engines:
        log = (tmp_path / f"{role}.log").read_text()
        said = f"went away (its connection closed): {role} engine 0 drops what it holds and exits"
        assert said in log, log[-3000:]


# --------------------------------------------------------------------------- the liveness parts, in one process


def test_a_heartbeat_that_stops_or_goes_silent_is_reported_once():
    hub = ChannelHub("127.0.0.1", 0)
    address = f"127.0.0.1:{hub.port}"
    lost: dict[str, list[str]] = {"closed": [], "silent": []}
    hub.watch("liveness.closed", 5.0, lost["closed"].append)
    try:
        heartbeat = Heartbeat("liveness.closed", address, interval_s=0.1)
        time.sleep(0.5)
        assert lost["closed"] == []  # beating: nothing reported
        heartbeat.close()
        hub.watch("liveness.silent", 0.5, lost["silent"].append)
        with socket.create_connection(("127.0.0.1", hub.port)) as silent:  # says its name, then nothing
            name = b"liveness.silent"
            silent.sendall(len(name).to_bytes(4, "big") + name)
            deadline = time.monotonic() + 10
            while not (lost["closed"] and lost["silent"]) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        hub.close()
    assert lost == {"closed": ["its connection closed"], "silent": ["no heartbeat for 0.5 s"]}


def test_a_peer_that_never_sends_its_first_heartbeat_is_reported_once():
    """A peer that died after the topology went out but before its heartbeat connected."""
    hub = ChannelHub("127.0.0.1", 0)
    lost: list[str] = []
    hub.watch("liveness.never", 0.3, lost.append)
    hub.watch("liveness.late", 0.3, lost.append)  # connects at once: never reported while it beats
    heartbeat = Heartbeat("liveness.late", f"127.0.0.1:{hub.port}", interval_s=0.05)
    try:
        time.sleep(1.0)
        reported = list(lost)
    finally:
        heartbeat.close()
        hub.close()
    assert reported == ["no heartbeat connection within 0.3 s"]


@pytest.mark.parametrize("drop", [False, True])
def test_a_producer_whose_consumer_went_away_drops_or_raises(drop):
    with socket.create_server(("127.0.0.1", 0)) as server:
        producer = TcpProducer("c", Abort, f"127.0.0.1:{server.getsockname()[1]}", drop_when_closed=drop).connect()
        server.accept()[0].close()  # the producer's reachability probe
        conn, _ = server.accept()
        conn.close()  # the consumer's process ended
        time.sleep(0.2)
        if drop:
            for _ in range(5):  # the first may still be buffered; the others find the connection reset
                producer.put(Abort(rid="x"))
            assert producer.dropped >= 4
        else:
            with pytest.raises(ChannelClosed, match="closed the connection"):
                for _ in range(5):
                    producer.put(Abort(rid="x"))
        producer.close()


def test_abandon_unblocks_a_put_stuck_on_a_peer_that_stopped_reading():
    with socket.create_server(("127.0.0.1", 0)) as server:
        producer = TcpProducer("c", Abort, f"127.0.0.1:{server.getsockname()[1]}", drop_when_closed=True).connect()
        server.accept()[0].close()  # the producer's reachability probe
        conn, _ = server.accept()  # accepted, never read: the socket buffers fill and put blocks
        big = Abort(rid="x" * (1 << 20))
        sender = threading.Thread(target=lambda: [producer.put(big) for _ in range(64)], daemon=True)
        sender.start()
        time.sleep(1.0)
        assert sender.is_alive()  # blocked on the full buffers
        producer.abandon()
        sender.join(10)
        conn.close()
    assert not sender.is_alive() and producer.dropped >= 1
