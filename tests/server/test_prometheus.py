"""A real Prometheus scraping a live server, queried through its HTTP API.

The module starts one server and the ``prometheus`` binary (Debian's package;
``.ci/run`` installs it) with a temporary config (1 s scrapes of the server's
``/metrics``), data directory and free port. After a baseline scrape of an
idle server with an empty prefix cache, the test sends ``NUM_REQUESTS``
requests with distinct prompts and checks, through Prometheus' query API,
that the request and token counters moved by exactly the traffic, that the
TTFT median (``histogram_quantile`` over the bucket increase) is the one the
server's own buckets give, and that the KV usage is the traffic's cached
tokens. Then every PromQL expression of ``deploy/grafana-dashboard.json``
must return data. No ``prometheus`` binary is a failure, not a skip.
"""
from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.server.conftest import REPO, free_port, running_server, wait_for_url

DASHBOARD = REPO / "deploy" / "grafana-dashboard.json"
NUM_REQUESTS = 6
MAX_NEW_TOKENS = 8
SCRAPE_INTERVAL = "1s"


# ----------------------------------------------------------------------------- helpers
def http_json(url: str, body: dict | None = None, timeout_s: float = 60.0) -> dict:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        return json.loads(response.read())


class Prometheus:
    """One ``prometheus`` process scraping ``target`` (host:port) every second."""

    def __init__(self, target: str, workdir: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            pytest.fail("the prometheus binary is not on PATH (`apt-get install -y prometheus`; .ci/run does it)")
        config = {"global": {"scrape_interval": SCRAPE_INTERVAL, "evaluation_interval": SCRAPE_INTERVAL},
                  "scrape_configs": [{"job_name": "stagewise", "scrape_interval": SCRAPE_INTERVAL,
                                      "scrape_timeout": SCRAPE_INTERVAL, "metrics_path": "/metrics",
                                      "static_configs": [{"targets": [target]}]}]}
        config_path = workdir / "prometheus.yml"
        config_path.write_text(json.dumps(config))  # YAML is a superset of JSON
        self.url = f"http://127.0.0.1:{free_port()}"
        self.log_path = workdir / "prometheus.log"
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [binary, f"--config.file={config_path}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={self.url.removeprefix('http://')}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        wait_for_url(self.url + "/-/ready", self.process, "prometheus", self.log_text, timeout_s)

    def log_text(self) -> str:
        self.log.flush()
        return self.log_path.read_text()[-4000:]

    def query(self, expr: str, at_s: float | None = None) -> list[dict]:
        """An instant query's result vector (each item: ``metric`` labels and ``value`` [time, "v"])."""
        params = {"query": expr} | ({} if at_s is None else {"time": f"{at_s:.3f}"})
        reply = http_json(self.url + "/api/v1/query?" + urllib.parse.urlencode(params))
        assert reply["status"] == "success", reply
        assert reply["data"]["resultType"] == "vector", reply
        return reply["data"]["result"]

    def scalar(self, expr: str, at_s: float | None = None) -> float:
        result = self.query(expr, at_s)
        assert len(result) == 1, f"{expr}: {result}"
        return float(result[0]["value"][1])

    def wait_for(self, expr: str, predicate, timeout_s: float = 30.0) -> float:
        """Poll ``expr`` (one series) until ``predicate(value)``; the value."""
        deadline = time.monotonic() + timeout_s
        value = None
        while time.monotonic() < deadline:
            result = self.query(expr)
            if len(result) == 1:
                value = float(result[0]["value"][1])
                if predicate(value):
                    return value
            time.sleep(0.25)
        raise AssertionError(f"{expr} never matched; last value {value}; prometheus log: {self.log_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def scrape(server) -> dict[tuple[str, tuple], float]:
    """The server's own /metrics, as {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(server.url + "/metrics", timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def ttft_buckets(values: dict) -> dict[float, float]:
    """Cumulative TTFT bucket counts by upper bound (+Inf included)."""
    return {float(dict(labels)["le"]): value for (name, labels), value in values.items()
            if name == "stagewise:time_to_first_token_seconds_bucket"}


def histogram_quantile(q: float, buckets: dict[float, float]) -> float:
    """Prometheus' histogram_quantile over cumulative buckets (linear within the bucket holding rank q*count)."""
    bounds = sorted(buckets)
    total = buckets[math.inf]
    rank = q * total
    lower, below = 0.0, 0.0
    for upper in bounds:
        if buckets[upper] >= rank:
            if upper == math.inf:
                return lower
            return lower + (upper - lower) * (rank - below) / (buckets[upper] - below)
        lower, below = upper, buckets[upper]
    raise AssertionError("unreachable: +Inf holds every observation")


# ----------------------------------------------------------------------------- the run
@pytest.fixture(scope="module")
def run(model_dir, tmp_path_factory):
    """Server + Prometheus, a baseline, the traffic; what each test checks against."""
    workdir = tmp_path_factory.mktemp("prometheus")
    with running_server(model_dir, workdir / "server.log") as server:
        prometheus = Prometheus(f"127.0.0.1:{server.port}", workdir)
        try:
            prometheus.wait_ready()
            yield traffic(server, prometheus, model_dir)
        finally:
            prometheus.stop()


def traffic(server, prometheus: Prometheus, model_dir: Path) -> dict:
    http_json(server.url + "/flush_cache", {})
    flushed_s = time.time()
    # A scrape after the flush took effect: the server is idle, its cache empty, its counters still.
    prometheus.wait_for(f'timestamp(stagewise:token_usage) > {flushed_s + 1.5:.3f}', lambda v: True)
    prometheus.wait_for("stagewise:token_usage", lambda v: v == 0.0)
    baseline_s = time.time()
    before = scrape(server)
    vocab_size = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    prompts = [[(100 + 37 * k + 5 * i) % vocab_size for i in range(5 + k)] for k in range(NUM_REQUESTS)]
    assert len({p[0] for p in prompts}) == NUM_REQUESTS  # distinct first tokens: no shared prefix
    results, latencies_s = [], []
    for k, input_ids in enumerate(prompts):
        start_s = time.perf_counter()
        results.append(http_json(server.url + "/generate", {
            "rid": f"prom-{k}", "input_ids": input_ids,
            "sampling_params": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0, "ignore_eos": True}}))
        latencies_s.append(time.perf_counter() - start_s)
    base_requests = sum(v for (name, _), v in before.items() if name == "stagewise:num_requests_total")
    prometheus.wait_for("sum(stagewise:num_requests_total)", lambda v: v == base_requests + NUM_REQUESTS)
    done_s = time.time()
    prometheus.wait_for(f"timestamp(stagewise:token_usage) > {done_s + 1.5:.3f}", lambda v: True)
    return {"server": server, "prometheus": prometheus, "baseline_s": baseline_s, "before": before,
            "after": scrape(server), "prompts": prompts, "results": results, "latencies_s": latencies_s}


# ----------------------------------------------------------------------------- tests
def test_request_and_token_counters(run):
    prometheus, t0 = run["prometheus"], run["baseline_s"]

    def moved(expr: str) -> float:
        return prometheus.scalar(expr) - prometheus.scalar(expr, at_s=t0)

    assert all(r["meta_info"]["finish_reason"]["type"] == "length" for r in run["results"])
    assert moved('sum(stagewise:num_requests_total{finish_reason="length"})') == NUM_REQUESTS
    assert moved("sum(stagewise:num_requests_total)") == NUM_REQUESTS
    assert moved("sum(stagewise:prompt_tokens_total)") == sum(map(len, run["prompts"]))
    assert moved("sum(stagewise:generation_tokens_total)") == NUM_REQUESTS * MAX_NEW_TOKENS
    assert moved("sum(stagewise:time_to_first_token_seconds_count)") == NUM_REQUESTS
    assert moved("sum(stagewise:e2e_request_latency_seconds_count)") == NUM_REQUESTS


def test_ttft_quantile(run):
    prometheus, t0 = run["prometheus"], run["baseline_s"]
    bucket = "stagewise:time_to_first_token_seconds_bucket"
    p50 = prometheus.scalar(f"histogram_quantile(0.5, sum by (le) ({bucket}) - sum by (le) ({bucket} @ {t0:.3f}))")
    before, after = ttft_buckets(run["before"]), ttft_buckets(run["after"])
    increase = {le: after[le] - before.get(le, 0.0) for le in after}
    assert increase[math.inf] == NUM_REQUESTS
    assert p50 == pytest.approx(histogram_quantile(0.5, increase), rel=1e-9)
    # The server's TTFT of each request is within the client's whole round trip: the median's bucket
    # lies at or below the bucket holding the slowest round trip.
    slowest_s = max(run["latencies_s"])
    assert 0 < p50 <= min(le for le in increase if le >= slowest_s)


def test_kv_usage_is_the_traffics_cached_tokens(run):
    prometheus = run["prometheus"]
    usage = prometheus.scalar("stagewise:token_usage")
    capacity = prometheus.scalar("stagewise:max_total_num_tokens")
    # Each finished request leaves prompt + output - 1 tokens of KV (the last sampled token is never
    # run through the model) in the radix cache; the prompts share no prefix; --page-size is 1.
    expected = sum(len(p) + MAX_NEW_TOKENS - 1 for p in run["prompts"])
    assert round(usage * capacity) == expected
    assert usage == next(v for (name, _), v in run["after"].items() if name == "stagewise:token_usage")
    assert prometheus.scalar("sum(stagewise:num_running_reqs)") == 0


def test_every_dashboard_panel_returns_data(run):
    prometheus = run["prometheus"]
    dashboard = json.loads(DASHBOARD.read_text())
    titles = {panel["title"] for panel in dashboard["panels"]}
    assert {"Request rate", "Time to first token", "Inter-token latency", "End-to-end latency",
            "Tokens per second", "Running and queued requests", "KV cache usage", "Prefix cache hit rate",
            "Per-stage busy time"} <= titles
    empty = []
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            result = prometheus.query(target["expr"])
            values = [float(item["value"][1]) for item in result]
            if not values or all(math.isnan(v) for v in values):
                empty.append((panel["title"], target["expr"], result))
    assert not empty, empty
