"""``stagewise serve --placement pd``: a front end, one prefill and one decode engine (gloo on CPU).

Completions over HTTP equal the non-disaggregated engine's greedy tokens;
``/metrics`` has the ``stagewise:pd_*`` series of each role (bytes moved
both ways, the decode engine sampling every token after the first), and
``/get_server_info`` names each engine's role.
"""
from __future__ import annotations

import json
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pipeline.engine import Engine
from tests.server.conftest import running_server

MAX_TOKENS = 8
PROMPTS = ["To be, or not to be", "The quick brown fox", "Once upon a time there"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "pd.log"
    with running_server(model_dir, log, "--placement", "pd", "--disable-radix-cache") as process:
        yield process


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def _complete(url: str, prompt: str) -> dict:
    request = urllib.request.Request(url + "/generate", data=json.dumps({
        "text": prompt, "sampling_params": {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True},
    }).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _pd_samples(url: str) -> dict[tuple[str, str], float]:
    """(series name, role) -> value of every ``stagewise:pd_*`` sample."""
    samples = {}
    for family in text_string_to_metric_families(_get(url + "/metrics").decode()):
        for sample in family.samples:
            if sample.name.startswith("stagewise:pd_") and not sample.name.endswith("_created"):
                samples[(sample.name, sample.labels["role"])] = sample.value
    return samples


def _wait_for(predicate, timeout_s: float = 30.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.25)


def test_pd_server_output_metrics_and_roles(server, model_dir):
    results = [_complete(server.url, prompt) for prompt in PROMPTS]
    with Engine(str(model_dir), device="cpu", disable_radix_cache=True) as engine:
        expected = engine.generate(PROMPTS, {"max_new_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True})
    assert [r["output_ids"] for r in results] == [r["output_ids"] for r in expected]

    # the first token of each, and the start-up warm-up's one token (it ends there: no handoff)
    generated = {"prefill": len(PROMPTS) + 1, "decode": len(PROMPTS) * (MAX_TOKENS - 1)}

    def settled():
        samples = _pd_samples(server.url)
        # each engine publishes its stats once a second, on its own: wait for both roles' counts,
        # tokens included (a snapshot taken while the last request decoded has its transfers and
        # handoffs, not yet all its tokens)
        done = all(samples.get((name, role)) == len(PROMPTS) for role in ("prefill", "decode")
                   for name in ("stagewise:pd_transfers_total", "stagewise:pd_handoffs_total"))
        done = done and all(samples.get(("stagewise:pd_generated_tokens_total", role)) == count
                            for role, count in generated.items())
        idle = not any(v for (name, _), v in samples.items() if name.endswith(("queue_reqs", "transfer_reqs")))
        return samples if done and idle else None

    samples = _wait_for(settled)
    assert samples, (f"the engines never reported {len(PROMPTS)} transfers and {generated} generated tokens: "
                     f"{_pd_samples(server.url)}")
    for role in ("prefill", "decode"):
        assert samples[("stagewise:pd_handoffs_total", role)] == len(PROMPTS)
        assert samples[("stagewise:pd_transfer_failures_total", role)] == 0
        assert samples[("stagewise:pd_transfer_seconds_total", role)] > 0
    sent = samples[("stagewise:pd_transfer_bytes_total", "prefill")]
    assert sent == samples[("stagewise:pd_transfer_bytes_total", "decode")] > 0

    info = json.loads(_get(server.url + "/get_server_info"))
    assert info["placement"] == "pd" and (info["pd_prefill"], info["pd_decode"]) == (1, 1)
    assert info["engine_roles"] == {"0": "prefill", "1": "decode"}
    roles = {entry["dp_rank"]: entry["role"] for entry in info["engine_stats_per_dp_rank"]}
    assert roles == {0: "prefill", 1: "decode"}
    # one host: the KV went through shared memory, named in both places
    assert {entry["pd_transport"] for entry in info["engine_stats_per_dp_rank"]} == {"shm"}
    assert samples[("stagewise:pd_transport_info", "prefill")] == 1
    assert samples[("stagewise:pd_transport_info", "decode")] == 1
    assert 'transport="shm"' in _get(server.url + "/metrics").decode()
