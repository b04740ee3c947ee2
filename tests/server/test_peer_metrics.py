"""/metrics exports SGLang's and vLLM's family names beside stagewise's, with the same values.

One server, a known amount of traffic (completions with ignore_eos, so every token count is known), then
one scrape: the token counters of the three prefixes equal each other and the usage the API reported; the
latency histograms have one observation per sequence (TTFT, E2E) under every prefix; the engine gauges
match; the labels are the ones each project uses (``model_name``; vLLM's ``engine``).
"""
from __future__ import annotations

import time
import urllib.request

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import running_server

PROMPTS = ["First Citizen: Before we proceed", "Speak, speak.", "You are all resolved rather to die"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "peer_metrics.log") as process:
        yield process


@pytest.fixture(scope="module")
def traffic(server) -> dict:
    """Send the traffic once; return the usage totals, the model name and the scraped samples."""
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = scrape(server)
    prompt_tokens = completion_tokens = 0
    for prompt in PROMPTS:
        answer = client.completions.create(model="m", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                           extra_body={"ignore_eos": True})
        prompt_tokens += answer.usage.prompt_tokens
        completion_tokens += answer.usage.completion_tokens
    return {"before": before, "after": scrape_with_engine_stats(server), "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens, "model": client.models.list().data[0].id}


def scrape(server) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=30) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def scrape_with_engine_stats(server, timeout_s: float = 20.0) -> dict[tuple[str, tuple], float]:
    """A scrape taken once the engine has reported its gauges (EngineStats come about once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        samples = scrape(server)
        if any(name == "stagewise:num_running_reqs" for name, _ in samples) or time.monotonic() > deadline:
            return samples
        time.sleep(0.2)


def value(samples: dict, name: str, **labels: str) -> float:
    """The one sample called ``name`` whose labels include ``labels`` (no bucket's ``le``)."""
    found = [v for (n, ls), v in samples.items() if n == name and set(labels.items()) <= set(ls)
             and "le" not in dict(ls)]
    assert len(found) == 1, f"{name}{labels}: {len(found)} samples"
    return found[0]


def increase(traffic: dict, name: str, **labels: str) -> float:
    before = [v for (n, ls), v in traffic["before"].items() if n == name and set(labels.items()) <= set(ls)]
    return value(traffic["after"], name, **labels) - (before[0] if before else 0.0)


SGLANG = {"model_name"}
VLLM = {"model_name", "engine"}


def test_token_counters_agree_across_prefixes(traffic):
    model = traffic["model"]
    for kind, expected in (("prompt_tokens_total", traffic["prompt_tokens"]),
                           ("generation_tokens_total", traffic["completion_tokens"])):
        ours = increase(traffic, f"stagewise:{kind}", model_name=model)
        sglang = increase(traffic, f"sglang:{kind}", model_name=model)
        vllm = increase(traffic, f"vllm:{kind}", model_name=model, engine="0")
        assert ours == sglang == vllm == expected, kind
    assert traffic["completion_tokens"] == MAX_TOKENS * len(PROMPTS)


def test_request_counts_and_latency_histograms(traffic):
    model, n = traffic["model"], len(PROMPTS)
    assert increase(traffic, "sglang:num_requests_total", model_name=model) == n
    assert increase(traffic, "vllm:request_success_total", model_name=model, finished_reason="length") == n
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        counts = [increase(traffic, f"{prefix}:{name}_count", model_name=model) for prefix in
                  ("stagewise", "sglang", "vllm")]
        sums = [increase(traffic, f"{prefix}:{name}_sum", model_name=model) for prefix in
                ("stagewise", "sglang", "vllm")]
        assert counts == [n, n, n] and sums[0] == pytest.approx(sums[1]) == pytest.approx(sums[2]) and sums[0] > 0
    itl = [increase(traffic, f"{name}_count", model_name=model) for name in (
        "stagewise:inter_token_latency_seconds", "sglang:inter_token_latency_seconds",
        "vllm:inter_token_latency_seconds", "vllm:time_per_output_token_seconds")]
    assert len(set(itl)) == 1 and 0 < itl[0] <= n * (MAX_TOKENS - 1)
    assert increase(traffic, "sglang:time_per_output_token_seconds_count", model_name=model) == n
    assert increase(traffic, "vllm:request_generation_tokens_sum", model_name=model) == traffic["completion_tokens"]
    assert increase(traffic, "vllm:request_prompt_tokens_sum", model_name=model) == traffic["prompt_tokens"]


def test_engine_gauges_under_peer_names(traffic):
    after, model = traffic["after"], traffic["model"]
    pairs = [("stagewise:num_running_reqs", "sglang:num_running_reqs", "vllm:num_requests_running"),
             ("stagewise:num_queue_reqs", "sglang:num_queue_reqs", "vllm:num_requests_waiting"),
             ("stagewise:token_usage", "sglang:token_usage", "vllm:kv_cache_usage_perc")]
    for ours, sglang, vllm in pairs:
        mine = value(after, ours, model_name=model)
        assert value(after, sglang, model_name=model) == mine
        assert value(after, vllm, model_name=model, engine="0") == mine
    for name in ("cache_hit_rate", "gen_throughput", "max_total_num_tokens"):
        assert value(after, f"sglang:{name}", model_name=model) == value(after, f"stagewise:{name}", model_name=model)
    assert value(after, "sglang:max_total_num_tokens", model_name=model) == 16384  # the fixture's flag


def test_labels_are_the_peers(traffic):
    for (name, labels), _ in traffic["after"].items():
        keys = {k for k, _ in labels} - {"le", "finished_reason"}
        if name.startswith("sglang:"):
            assert keys == SGLANG, name
        elif name.startswith("vllm:"):
            assert keys == VLLM, name
