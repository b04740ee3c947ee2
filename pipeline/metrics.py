"""Prometheus metrics of a running server: SGLang's names under ``stagewise:``.

One ``ServerMetrics`` per server, with its own ``CollectorRegistry`` (so tests
can run several servers in one process). Request-level series are labelled
``model_name`` (SGLang's label):

=============================================  =========  ==========================================
name                                           kind       fed by
=============================================  =========  ==========================================
stagewise:time_to_first_token_seconds          histogram  ingest, first token of each sequence
stagewise:inter_token_latency_seconds          histogram  ingest, gap between outputs / new tokens
stagewise:e2e_request_latency_seconds          histogram  ingest, arrival -> final output
stagewise:prompt_tokens_total                  counter    ingest, per finished sequence
stagewise:generation_tokens_total              counter    ingest, per output
stagewise:num_requests_total{finish_reason}    counter    ingest, per finished sequence
stagewise:spec_accept_length                   histogram  ingest, tokens per verify step of a sequence
stagewise:num_running_reqs, num_queue_reqs,    gauge      EngineStats from the schedule stage
  token_usage, cache_hit_rate, gen_throughput,             of each engine replica
  max_total_num_tokens
=============================================  =========  ==========================================

Data parallelism (``--dp-size N``, N > 1): the engine gauges carry a second
label, ``dp_rank``, one series per replica (``EngineStats.dp_rank``), as
SGLang labels its per-rank scheduler gauges; sum them for the whole server
(``sum without (dp_rank) (stagewise:num_running_reqs)``). With one replica
the label is left off, so the series are the same as before data
parallelism existed.

Pipeline series, read at scrape time (``PipelineCollector``), labelled
``process`` and ``stage`` (or ``channel``): ``stagewise:stage_messages_in_total``,
``stagewise:stage_messages_out_total``, ``stagewise:stage_busy_seconds_total``,
``stagewise:stage_steps_total``, ``stagewise:stage_messages_rejected_total``
and ``stagewise:channel_queue_depth``; for a vision-language model also the
forward stage's ``stagewise:mm_images_encoded_total``, ``mm_videos_encoded_total``,
``mm_encode_seconds_total``, ``mm_cache_lookups_total``, ``mm_cache_hits_total``
and the gauge ``mm_cache_hit_rate`` (``MM_SERIES``; the stage's ``telemetry()``).
They come from ``ProcessCounters``:
the runner of each process sends one a second to the ingest stage with the
counters of every stage it runs (``stage_counters(stage)`` below builds one
stage's entry); ``set_process_counters`` keeps the latest per process, so
one ``/metrics`` shows every process.

Peer names. Dashboards and autoscalers written for SGLang or vLLM query
their own families, so the same observations are also exported under the
names and labels those projects use (``PEER_FAMILIES`` lists them). Every
observation feeds all three prefixes in one call, so their values agree:
``sglang:prompt_tokens_total == vllm:prompt_tokens_total ==
stagewise:prompt_tokens_total`` at any scrape.

==========================================  =======================================  ========================
ours                                        SGLang (``model_name``)                  vLLM (``model_name``,
                                                                                     ``engine``)
==========================================  =======================================  ========================
time_to_first_token_seconds                 same name                                same name
inter_token_latency_seconds                 same name                                same name, and
                                                                                     time_per_output_token_seconds
(per sequence: (e2e - TTFT) / (tokens - 1)) time_per_output_token_seconds            --
e2e_request_latency_seconds                 same name                                same name
prompt_tokens_total, generation_tokens_     same names                               same names
total
num_requests_total{finish_reason}           num_requests_total (no reason label)     request_success_total
                                                                                     {finished_reason}
(per sequence token counts)                 --                                       request_prompt_tokens,
                                                                                     request_generation_tokens
num_running_reqs, num_queue_reqs            same names                               num_requests_running,
                                                                                     num_requests_waiting
token_usage                                 same name                                kv_cache_usage_perc
cache_hit_rate, gen_throughput,             same names                               --
max_total_num_tokens
==========================================  =======================================  ========================

vLLM's ``engine`` label is the data-parallel rank (``"0"`` with one
replica); the SGLang gauges take ``dp_rank`` exactly as ours do.

Prefill/decode disaggregation (``--placement pd``): every prefill and decode
engine reports its own EngineStats (``dp_rank`` is its engine index, so the
engine gauges carry ``dp_rank`` there too), and ``DisaggregationCollector``
exports, labelled ``role`` (prefill / decode) and ``engine``, the series
``PD_SERIES`` lists: ``stagewise:pd_handoffs_total``,
``stagewise:pd_transfers_total``, ``stagewise:pd_transfer_failures_total``,
``stagewise:pd_transfer_bytes_total``, ``stagewise:pd_transfer_seconds_total``,
``stagewise:pd_generated_tokens_total`` and the gauges
``stagewise:pd_queue_reqs`` and ``stagewise:pd_transfer_reqs``. A prefill
engine counts what it sent, a decode engine what it received.
"""
from __future__ import annotations

from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from pipeline.messages import EngineStats, ProcessCounters

PREFIX = "stagewise:"
# SGLang's buckets (seconds).
TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  15.0, 20.0, 25.0, 30.0)
ITL_BUCKETS_S = (0.001, 0.002, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2,
                 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)
E2E_BUCKETS_S = (0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 90.0, 120.0, 150.0,
                 180.0, 240.0, 300.0, 600.0)
ENGINE_GAUGES = ("num_running_reqs", "num_queue_reqs", "token_usage", "cache_hit_rate", "gen_throughput",
                 "max_total_num_tokens")


STAGE_SERIES = (  # counter key -> (series name, help)
    ("messages_in", "stage_messages_in", "Messages a stage took from its inbox"),
    ("messages_out", "stage_messages_out", "Messages a stage emitted"),
    ("busy_s", "stage_busy_seconds", "Seconds a stage spent stepping"),
    ("steps", "stage_steps", "Steps a stage ran"),
    ("messages_rejected", "stage_messages_rejected", "Malformed messages a stage dropped at a process border"),
)

PD_SERIES = (  # EngineStats field -> (series, kind, help) of a prefill or decode engine
    ("pd_handoffs", "pd_handoffs", "counter", "Requests handed to a decode engine (prefill) or taken over (decode)"),
    ("pd_transfers", "pd_transfers", "counter", "KV transfers ended: sends (prefill) or receives (decode)"),
    ("pd_transfer_failures", "pd_transfer_failures", "counter", "KV transfers that failed or timed out"),
    ("pd_transfer_bytes", "pd_transfer_bytes", "counter", "Bytes of K and V moved"),
    ("pd_transfer_seconds", "pd_transfer_seconds", "counter", "Seconds KV transfers took, start to end, summed"),
    ("num_generated_tokens", "pd_generated_tokens", "counter", "Tokens sampled on this engine"),
    ("pd_queue_reqs", "pd_queue_reqs", "gauge",
     "Handoffs waiting: for a decode engine's accept (prefill), for room or a grammar (decode)"),
    ("pd_transfer_reqs", "pd_transfer_reqs", "gauge", "KV transfers in flight"),
)

MM_SERIES = (  # the forward stage's multimodal counters (stages/forward/multimodal.py): key -> (series, help)
    ("mm_images_encoded", "mm_images_encoded", "Images the vision encoder encoded"),
    ("mm_videos_encoded", "mm_videos_encoded", "Videos the vision encoder encoded"),
    ("mm_encode_s", "mm_encode_seconds", "Seconds the vision encoder ran"),
    ("mm_cache_lookups", "mm_cache_lookups", "Images and videos looked up in the multimodal embedding cache"),
    ("mm_cache_hits", "mm_cache_hits", "Multimodal embedding cache lookups that found the embeddings"),
)


def multimodal_summary(stages: dict[str, dict[str, float]]) -> dict[str, float] | None:
    """The multimodal counters summed over the stages that report them (one forward stage per
    data-parallel replica), with the cache hit rate; None when no stage reports them (a text model)."""
    reporting = [values for values in stages.values() if "mm_images_encoded" in values]
    if not reporting:
        return None
    totals = {key: sum(values.get(key, 0.0) for values in reporting) for key, _, _ in MM_SERIES}
    lookups = totals["mm_cache_lookups"]
    totals["mm_cache_hit_rate"] = totals["mm_cache_hits"] / lookups if lookups else 0.0
    return totals


class PipelineCollector:
    """Stage and channel series from the latest ProcessCounters of each process, read at scrape time."""

    def __init__(self) -> None:
        self.latest: dict[str, ProcessCounters] = {}  # process -> its latest report

    def update(self, counters: ProcessCounters) -> None:
        self.latest[counters.process] = counters

    def collect(self) -> Iterable[Any]:
        labels = ["process", "stage"]
        families = {key: CounterMetricFamily(PREFIX + name, help_text, labels=labels)
                    for key, name, help_text in STAGE_SERIES}
        depth = GaugeMetricFamily(PREFIX + "channel_queue_depth", "Messages waiting in a stage's inbox channel",
                                  labels=["process", "channel"])
        mm = {key: CounterMetricFamily(PREFIX + name, help_text, labels=labels) for key, name, help_text in MM_SERIES}
        hit_rate = GaugeMetricFamily(PREFIX + "mm_cache_hit_rate", "Multimodal embedding cache hits per lookup",
                                     labels=labels)
        for process in sorted(self.latest):
            stages = self.latest[process].stages
            for name in sorted(stages):
                values = stages[name]
                for key, family in families.items():
                    family.add_metric([process, name], float(values.get(key, 0.0)))
                depth.add_metric([process, name], float(values.get("queue_depth", 0.0)))
                if "mm_images_encoded" in values:  # a vision-language model's forward stage
                    for key, family in mm.items():
                        family.add_metric([process, name], float(values.get(key, 0.0)))
                    lookups = values.get("mm_cache_lookups", 0.0)
                    hit_rate.add_metric([process, name], values.get("mm_cache_hits", 0.0) / lookups if lookups else 0.0)
        yield from families.values()
        yield depth
        if mm["mm_images_encoded"].samples:
            yield from mm.values()
            yield hit_rate


class DisaggregationCollector:
    """The ``stagewise:pd_*`` series from each prefill/decode engine's latest EngineStats, read at scrape time."""

    def __init__(self, model_name: str, last_stats: dict[int, EngineStats]) -> None:
        self.model_name = model_name
        self.last_stats = last_stats  # ServerMetrics' dict: dp_rank -> latest snapshot

    def collect(self) -> Iterable[Any]:
        labels = ["model_name", "role", "engine"]
        families = [(field, (CounterMetricFamily if kind == "counter" else GaugeMetricFamily)(
            PREFIX + name, help_text, labels=labels)) for field, name, kind, help_text in PD_SERIES]
        transport = GaugeMetricFamily(PREFIX + "pd_transport_info", "The KV transport of each engine (value 1)",
                                      labels=labels + ["transport"])
        engines = [(rank, stats) for rank, stats in sorted(self.last_stats.items()) if stats.role]
        for rank, stats in engines:
            for field, family in families:
                family.add_metric([self.model_name, stats.role, str(rank)], float(getattr(stats, field)))
            if stats.pd_transport:
                transport.add_metric([self.model_name, stats.role, str(rank), stats.pd_transport], 1.0)
        if engines:
            yield from (family for _, family in families)
            yield transport


def stage_counters(stage: Any) -> dict[str, float]:
    """One stage's counters plus its inbox depth, as plain floats (one entry of ProcessCounters.stages)."""
    values = stage.counters.as_dict() if hasattr(stage.counters, "as_dict") else dict(vars(stage.counters))
    values = {k: float(v) for k, v in values.items()}
    values.update(stage.telemetry() if hasattr(stage, "telemetry") else {})
    inbox = getattr(stage, "inbox", None)
    values["queue_depth"] = float(len(inbox)) if inbox is not None else 0.0
    return values


SGLANG_PREFIX = "sglang:"
VLLM_PREFIX = "vllm:"
SPEC_ACCEPT_BUCKETS = (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 8.0, 10.0)
TOKEN_COUNT_BUCKETS = tuple(float(m * 10 ** e) for e in range(6) for m in (1, 2, 5))  # vLLM's 1-2-5 ladder
SGLANG_ENGINE_GAUGES = ENGINE_GAUGES  # SGLang's scheduler gauges carry our names
VLLM_ENGINE_GAUGES = (("num_running_reqs", "num_requests_running"), ("num_queue_reqs", "num_requests_waiting"),
                      ("token_usage", "kv_cache_usage_perc"))  # (EngineStats field, vLLM name)


class RequestSeries:
    """Per-request histograms and counters under one prefix, bound to that project's labels."""

    def __init__(self, registry: CollectorRegistry, prefix: str, labels: dict[str, str]) -> None:
        names, values = list(labels), list(labels.values())

        def histogram(name: str, help_text: str, buckets: tuple[float, ...]) -> Any:
            return Histogram(prefix + name, help_text, names, buckets=buckets, registry=registry).labels(*values)

        def counter(name: str, help_text: str) -> Any:
            return Counter(prefix + name, help_text, names, registry=registry).labels(*values)

        self.ttft = histogram("time_to_first_token_seconds", "Time to first token", TTFT_BUCKETS_S)
        self.itl = histogram("inter_token_latency_seconds", "Time between two output tokens", ITL_BUCKETS_S)
        self.e2e = histogram("e2e_request_latency_seconds", "Arrival to last token of a sequence", E2E_BUCKETS_S)
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens of finished sequences")
        self.generation_tokens = counter("generation_tokens", "Generated tokens")


class ServerMetrics:
    """Every metric of one server, in its own registry; ``render()`` is the /metrics body."""

    def __init__(self, model_name: str, dp_size: int = 1) -> None:
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.dp_size = dp_size
        labels = {"model_name": model_name}
        self.ours = RequestSeries(self.registry, PREFIX, labels)
        self.sglang = RequestSeries(self.registry, SGLANG_PREFIX, labels)
        self.vllm = RequestSeries(self.registry, VLLM_PREFIX, {"model_name": model_name, "engine": "0"})
        self.series = (self.ours, self.sglang, self.vllm)
        self.ttft, self.itl, self.e2e = self.ours.ttft, self.ours.itl, self.ours.e2e
        self.prompt_tokens, self.generation_tokens = self.ours.prompt_tokens, self.ours.generation_tokens
        self.num_requests = Counter(PREFIX + "num_requests", "Finished sequences by finish reason",
                                    ["model_name", "finish_reason"], registry=self.registry)
        self._add_peer_request_series()
        engine_labels = ["model_name", "dp_rank"] if dp_size > 1 else ["model_name"]
        self.engine = {name: Gauge(PREFIX + name, f"EngineStats.{name} of an engine replica", engine_labels,
                                   registry=self.registry) for name in ENGINE_GAUGES}
        self.sglang_engine = {name: Gauge(SGLANG_PREFIX + name, f"EngineStats.{name} of an engine replica",
                                          engine_labels, registry=self.registry) for name in SGLANG_ENGINE_GAUGES}
        self.vllm_engine = {field: Gauge(VLLM_PREFIX + name, f"EngineStats.{field} of an engine replica",
                                         ["model_name", "engine"], registry=self.registry)
                            for field, name in VLLM_ENGINE_GAUGES}
        self.last_stats: dict[int, EngineStats] = {}  # dp_rank -> that replica's latest snapshot
        self.registry.register(DisaggregationCollector(model_name, self.last_stats))
        self.pipeline = PipelineCollector()
        self.registry.register(self.pipeline)
        self.spec_accept_length = Histogram(
            PREFIX + "spec_accept_length", "Tokens emitted per speculative verify step, per sequence",
            ["model_name"], buckets=SPEC_ACCEPT_BUCKETS, registry=self.registry).labels(model_name)

    def _add_peer_request_series(self) -> None:
        """The peer families that have no stagewise twin (see the table in the module docstring)."""
        vllm_labels = ["model_name", "engine"]
        self.sglang_tpot = Histogram(SGLANG_PREFIX + "time_per_output_token_seconds",
                                     "Per sequence: (e2e - TTFT) / (generated tokens - 1)", ["model_name"],
                                     buckets=ITL_BUCKETS_S, registry=self.registry).labels(self.model_name)
        self.sglang_requests = Counter(SGLANG_PREFIX + "num_requests", "Finished sequences", ["model_name"],
                                       registry=self.registry).labels(self.model_name)
        self.vllm_tpot = Histogram(VLLM_PREFIX + "time_per_output_token_seconds", "Time between two output tokens",
                                   vllm_labels, buckets=ITL_BUCKETS_S,
                                   registry=self.registry).labels(self.model_name, "0")
        self.vllm_success = Counter(VLLM_PREFIX + "request_success", "Finished sequences by finish reason",
                                    vllm_labels + ["finished_reason"], registry=self.registry)
        self.vllm_prompt_lengths = Histogram(VLLM_PREFIX + "request_prompt_tokens", "Prompt tokens per sequence",
                                             vllm_labels, buckets=TOKEN_COUNT_BUCKETS,
                                             registry=self.registry).labels(self.model_name, "0")
        self.vllm_generation_lengths = Histogram(VLLM_PREFIX + "request_generation_tokens",
                                                 "Generated tokens per sequence", vllm_labels,
                                                 buckets=TOKEN_COUNT_BUCKETS,
                                                 registry=self.registry).labels(self.model_name, "0")

    # -- fed by the ingest stage --------------------------------------------------
    def observe_first_token(self, seconds: float) -> None:
        for series in self.series:
            series.ttft.observe(seconds)

    def observe_inter_token(self, seconds: float) -> None:
        for series in self.series:
            series.itl.observe(seconds)
        self.vllm_tpot.observe(seconds)

    def count_tokens(self, num_prompt_tokens: int, num_generated_tokens: int) -> None:
        for series in self.series:
            if num_prompt_tokens:
                series.prompt_tokens.inc(num_prompt_tokens)
            if num_generated_tokens:
                series.generation_tokens.inc(num_generated_tokens)

    def observe_finished(self, finish_reason: str, num_prompt_tokens: int, e2e_s: float,
                         ttft_s: float | None = None, num_generated_tokens: int = 0) -> None:
        """One sequence ended; ``ttft_s`` is None when it ended before its first token."""
        self.num_requests.labels(self.model_name, finish_reason).inc()
        self.sglang_requests.inc()
        self.vllm_success.labels(self.model_name, "0", finish_reason).inc()
        self.count_tokens(num_prompt_tokens, 0)
        for series in self.series:
            series.e2e.observe(e2e_s)
        self.vllm_prompt_lengths.observe(num_prompt_tokens)
        self.vllm_generation_lengths.observe(num_generated_tokens)
        if ttft_s is not None and num_generated_tokens > 1:
            self.sglang_tpot.observe((e2e_s - ttft_s) / (num_generated_tokens - 1))

    def observe_spec_accept_length(self, verify_ct: int, accepted: int) -> None:
        """A finished sequence that ran speculative steps: its tokens per verify step."""
        self.spec_accept_length.observe((verify_ct + accepted) / verify_ct)

    def set_engine_stats(self, stats: EngineStats) -> None:
        """One replica's snapshot: its ``dp_rank`` series (the only series when dp_size is 1)."""
        self.last_stats[stats.dp_rank] = stats
        label_values = (self.model_name, str(stats.dp_rank)) if self.dp_size > 1 else (self.model_name,)
        for name, gauge in self.engine.items():
            gauge.labels(*label_values).set(float(getattr(stats, name)))
        for name, gauge in self.sglang_engine.items():
            gauge.labels(*label_values).set(float(getattr(stats, name)))
        for field, gauge in self.vllm_engine.items():
            gauge.labels(self.model_name, str(stats.dp_rank)).set(float(getattr(stats, field)))

    def set_process_counters(self, counters: ProcessCounters) -> None:
        self.pipeline.update(counters)

    def render(self) -> tuple[bytes, str]:
        """(body, content type) of the Prometheus text exposition."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
