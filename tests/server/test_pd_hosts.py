"""Prefill and decode engines started apart, joined by ``stagewise router`` (pipeline/pd_hosts.py).

Three processes on localhost, as they would run on three hosts: ``stagewise
serve --disaggregation-mode prefill`` and ``... decode`` (each listening on its
``--disaggregation-bootstrap-port``), and ``stagewise router --pd-disaggregation
--prefill URL PORT --decode URL PORT`` serving HTTP. Channels between them go
over TCP, the KV over gloo (TCP). Greedy output over HTTP equals the
in-process engine's; an unreachable engine address is a start-up error that
names it.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from pipeline.engine import Engine
from tests.server.conftest import REPO, free_port, wait_for_url

PROMPTS = [[5, 6, 7, 8, 9], [11, 3, 40, 2, 9, 17, 23], [100, 200, 300]]
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
COMMON = ["--device", "cpu", "--disable-radix-cache", "--log-level", "info"]


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
