"""``--log-requests`` and the schedule stage's periodic batch line, read from a live server's log.

One server (``--log-requests --log-level info``) for the module. A request
with a client rid must leave exactly one ``Finished request`` line whose
numbers are the response's; under sustained load the schedule stage must log
SGLang's ``Decode batch.`` line with running requests and a non-zero
generation throughput.
"""
from __future__ import annotations

import json
import re
import threading
import time
import urllib.request

import pytest

from stages.ingest.streams import request_log_line
from tests.server.conftest import running_server

LINE = re.compile(r"Finished request rid=(?P<rid>\S+) prompt_tokens=(?P<prompt>\d+) "
                  r"completion_tokens=(?P<completion>\d+) ttft_s=(?P<ttft>\S+) latency_s=(?P<latency>\S+) "
                  r"finish_reason=(?P<reason>\S+)")
BATCH = re.compile(r"Decode batch\. #running-req: (?P<running>\d+), #queue-req: (?P<queued>\d+), "
                   r"#token: (?P<tokens>\d+), token usage: (?P<usage>[\d.]+), "
                   r"gen throughput \(token/s\): (?P<throughput>[\d.]+), cache hit rate: (?P<hit>[\d.]+)%")


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("request_logs") / "server.log"
    with running_server(model_dir, log_path, "--log-requests") as process:
        yield process


def generate(server, body: dict, timeout_s: float = 120.0) -> dict:
    request = urllib.request.Request(server.url + "/generate", data=json.dumps(body).encode(),
                                     headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


def log_matches(server, pattern: re.Pattern, predicate=lambda m: True, timeout_s: float = 10.0) -> list:
    deadline = time.monotonic() + timeout_s
    while True:
        server.log.flush()
        found = [m for m in pattern.finditer(server.log_path.read_text()) if predicate(m)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_request_log_line_format():
    assert request_log_line("a", 3, 4, 0.012345, 0.5, "length") == (
        "Finished request rid=a prompt_tokens=3 completion_tokens=4 ttft_s=0.0123 latency_s=0.5000 "
        "finish_reason=length")
    assert "ttft_s=none" in request_log_line("a", 3, 0, None, 0.5, "abort")


def test_finished_request_is_logged_with_its_numbers(server):
    input_ids = [11, 12, 13, 14, 15, 16, 17]
    start_s = time.perf_counter()
    result = generate(server, {"rid": "log-probe-1", "input_ids": input_ids,
                               "sampling_params": {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}})
    client_latency_s = time.perf_counter() - start_s
    meta = result["meta_info"]
    assert meta["prompt_tokens"] == 7 and meta["completion_tokens"] == 5
    lines = log_matches(server, LINE, lambda m: m["rid"] == "log-probe-1")
    assert len(lines) == 1, [m.group(0) for m in lines]
    line = lines[0]
    assert int(line["prompt"]) == 7 and int(line["completion"]) == 5 and line["reason"] == "length"
    ttft_s, latency_s = float(line["ttft"]), float(line["latency"])
    assert 0 < ttft_s <= latency_s <= client_latency_s


def test_each_sequence_of_n_is_logged(server):
    generate(server, {"rid": "log-probe-n", "input_ids": [21, 22, 23],
                      "sampling_params": {"max_new_tokens": 3, "n": 2, "temperature": 0.8, "ignore_eos": True}})
    lines = log_matches(server, LINE, lambda m: m["rid"].startswith("log-probe-n"))
    assert sorted(m["rid"] for m in lines) == ["log-probe-n.0", "log-probe-n.1"]
    assert all(int(m["prompt"]) == 3 and int(m["completion"]) == 3 for m in lines)


def test_batch_line_under_load(server):
    before = len(log_matches(server, BATCH, timeout_s=0))
    stop = threading.Event()
    errors: list[BaseException] = []

    def keep_busy(k: int) -> None:
        while not stop.is_set():
            try:
                generate(server, {"input_ids": [k + 1, 2, 3, 4], "sampling_params": {
                    "max_new_tokens": 64, "temperature": 0, "ignore_eos": True}})
            except BaseException as error:  # noqa: BLE001 - reported by the assert below
                errors.append(error)
                return

    threads = [threading.Thread(target=keep_busy, args=(k,), daemon=True) for k in range(8)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 60
    try:
        lines = log_matches(server, BATCH, timeout_s=0)
        while len(lines) <= before and not errors and time.monotonic() < deadline:
            time.sleep(0.2)
            lines = log_matches(server, BATCH, timeout_s=0)
    finally:
        stop.set()
        for thread in threads:
            thread.join(120)
    assert not errors, errors
    assert len(lines) > before, server.log_text()
    busy = [m for m in lines[before:] if int(m["running"]) >= 1]
    assert busy, [m.group(0) for m in lines[before:]]
    assert all(float(m["throughput"]) > 0 and int(m["tokens"]) > 0 for m in busy)
