"""``stagewise serve``: the HTTP server, all eight stages behind OpenAI and SGLang APIs.

::

    stagewise serve                                   # the bundled demo model
    stagewise serve --model-path DIR --port 30000 --placement serving

One pipeline description (``serving_spec``) runs under either placement:

* ``single``: every stage in this process. The ingest stage serves HTTP on
  its own thread (its asyncio loop); the other seven run as one stage loop
  on a background thread.
* ``serving``: a front-end process (this one: ingest, tokenize, detokenize)
  and an engine process (multimodal, forward, constrain, sample, schedule).
  Multimodal sits with the engine so its output reaches the scheduler
  without crossing a process border; aborts from detokenize take the
  request path (tokenize -> multimodal -> schedule), so the schedule inbox
  has producers in one process only.

Channels (``producer.outbox -> channel``)::

    ingest.out, detokenize.abort          -> tokenize     GenerateRequest | Abort | FlushCache
    tokenize.out                          -> multimodal   TokenizedRequest | Abort | FlushCache
    multimodal.out, sample.schedule,
      constrain.schedule                  -> schedule
    schedule.forward                      -> forward
    schedule.constrain, sample.constrain  -> constrain
    forward.sample, constrain.sample      -> sample
    schedule.detokenize, schedule.stats,
      tokenize.detokenize                 -> detokenize
    detokenize.out, tokenize.errors       -> ingest

Start-up logs the address, model, dtype and KV capacity; ``/health`` is 503
until a warm-up generation went through. SIGTERM/SIGINT: stop listening,
let running requests finish (up to ``DRAIN_TIMEOUT_S``), then stop the
pipeline without losing a message.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from typing import Any

import msgspec

from pipeline.config import ConfigError, ServerArgs, parse_args
from pipeline.messages import (ConstrainInbox, DetokenizeInbox, EngineStats, ForwardInbox, IngestInbox,
                               MultimodalInbox, SampleInbox, ScheduleInbox, TokenizeInbox)
from pipeline.placement import ChannelSpec, Pipeline, PipelineSpec, StageSpec

logger = logging.getLogger("stagewise.serve")

DRAIN_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 900.0
CAPACITY = 1 << 14
ENGINE_PROCESS_STAGES = ("multimodal", "forward", "constrain", "sample", "schedule")

# Assembly hand-off inside one process: the forward stage measures the KV pool
# after loading weights; the schedule stage (built after it) needs that
# ModelInfo, and its EngineStats report the counters of its neighbours.
_ASSEMBLY: dict[str, Any] = {"stages": []}


# --------------------------------------------------------------------------- stage factories


def _registered(stage: Any) -> Any:
    _ASSEMBLY["stages"].append(stage)
    return stage


def make_ingest(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.ingest import IngestStage

    return IngestStage(args, inbox, outboxes)


def make_tokenize(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.tokenize import TokenizeStage

    return _registered(TokenizeStage(args, inbox, outboxes))


def make_tokenize_inline(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    """Tokenize on the stepping thread (deterministic): for replaying a recording of the stage."""
    from stages.tokenize import TokenizeStage

    return _registered(TokenizeStage(args, inbox, outboxes, num_workers=0))


def make_multimodal(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.multimodal import MultimodalStage

    return _registered(MultimodalStage(args, inbox, outboxes))


def make_forward(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.forward import ForwardStage

    stage = _registered(ForwardStage(args, inbox, outboxes))
    _ASSEMBLY["model_info"] = stage.model_info
    return stage


def make_constrain(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.constrain import ConstrainStage
    from stages.tokenize import load_tokenizer

    info = _ASSEMBLY["model_info"]
    return _registered(ConstrainStage(args, load_tokenizer(args.tokenizer_path), inbox, outboxes,
                                      vocab_size=info.vocab_size, eos_token_ids=info.eos_token_ids))


def make_sample(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.sample import SampleStage

    return _registered(SampleStage(args, inbox, outboxes))


def make_schedule(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.schedule import ScheduleStage

    class ReportingScheduleStage(ScheduleStage):
        """The schedule stage, whose EngineStats also carry this process's stage counters."""

        def emit(self, outbox: str, message: Any) -> None:
            if outbox == "stats" and isinstance(message, EngineStats):
                message = msgspec.structs.replace(message, stage_counters=process_stage_counters(self))
            super().emit(outbox, message)

    return _registered(ReportingScheduleStage(args, _ASSEMBLY["model_info"], inbox, outboxes))


def make_detokenize(args: ServerArgs, inbox: Any, outboxes: dict) -> Any:
    from stages.detokenize import DetokenizeStage

    return _registered(DetokenizeStage(args, inbox, outboxes))


def process_stage_counters(schedule: Any) -> dict[str, dict[str, float]]:
    from pipeline.metrics import stage_counters

    stages = {id(s): s for s in _ASSEMBLY["stages"]}
    stages[id(schedule)] = schedule
    return {stage.name: stage_counters(stage) for stage in stages.values()}


# --------------------------------------------------------------------------- the pipeline


def serving_spec(args: ServerArgs) -> PipelineSpec:
    """The eight stages and their channels (see the module docstring)."""
    kwargs = {"args": msgspec.to_builtins(args)}
    here = "pipeline.serve:"
    stages = [StageSpec("ingest", here + "make_ingest", kwargs, own_thread=True)] + [
        StageSpec(name, f"{here}make_{name}", kwargs)
        for name in ("tokenize", "multimodal", "forward", "constrain", "sample", "schedule", "detokenize")]
    schedule_producers = ("multimodal.out", "sample.schedule", "constrain.schedule")
    channels = [
        ChannelSpec("tokenize", TokenizeInbox, ("ingest.out", "detokenize.abort"), "tokenize", CAPACITY),
        ChannelSpec("multimodal", MultimodalInbox, ("tokenize.out",), "multimodal", CAPACITY),
        ChannelSpec("schedule", ScheduleInbox, schedule_producers, "schedule", CAPACITY),
        ChannelSpec("forward", ForwardInbox, ("schedule.forward",), "forward", CAPACITY),
        ChannelSpec("constrain", ConstrainInbox, ("schedule.constrain", "sample.constrain"), "constrain", CAPACITY),
        ChannelSpec("sample", SampleInbox, ("forward.sample", "constrain.sample"), "sample", CAPACITY),
        ChannelSpec("detokenize", DetokenizeInbox, ("schedule.detokenize", "schedule.stats",
                                                      "tokenize.detokenize"), "detokenize", CAPACITY),
        ChannelSpec("ingest", IngestInbox, ("detokenize.out", "tokenize.errors"), "ingest", CAPACITY),
    ]
    return PipelineSpec(tuple(stages), tuple(channels))


def placement_for(args: ServerArgs, spec: PipelineSpec) -> dict[str, list[str]]:
    names = [s.name for s in spec.stages]
    if args.placement == "single":
        return {"main": names}
    return {"main": [n for n in names if n not in ENGINE_PROCESS_STAGES],
            "engine": [n for n in names if n in ENGINE_PROCESS_STAGES]}


class Server:
    """A started pipeline plus its HTTP front door (usable from tests and notebooks)."""

    def __init__(self, args: ServerArgs) -> None:
        _ASSEMBLY.clear()  # a fresh hand-off for the stages this server builds in this process
        _ASSEMBLY["stages"] = []
        self.args = args
        self.spec = serving_spec(args)
        self.pipeline = Pipeline(self.spec, placement_for(args, self.spec), record_path=args.record_path,
                                 on_failure=self.fail_requests)
        self.ingest: Any = None

    def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> "Server":
        start_s = time.perf_counter()
        self.pipeline.start()
        try:
            self.ingest = next(s for s in self.pipeline.stages if s.name == "ingest")
            self.ingest.server_info = lambda: runtime_info(self.args)
            if self.ingest.metrics is not None:
                self.ingest.metrics.pipeline.local_stages = lambda: list(self.pipeline.stages)
            self._wait_ready(ready_timeout_s)
        except BaseException:
            self.pipeline.stop(timeout=5.0)
            raise
        self._log_started(time.perf_counter() - start_s)
        return self

    def _wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            server = self.ingest.server
            if server is not None and server.ready.wait(0.1):
                if server.error is not None:
                    raise RuntimeError(f"the HTTP server failed to start: {server.error}") from server.error
                return
            if self.ingest.failure is not None:
                raise RuntimeError("the ingest stage failed") from self.ingest.failure
        raise TimeoutError(f"the server was not ready within {timeout_s} s")

    @property
    def port(self) -> int:
        return self.ingest.server.bound_port

    def _log_started(self, elapsed_s: float) -> None:
        deadline = time.monotonic() + 3.0
        while self.ingest.engine_stats is None and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = self.ingest.engine_stats
        kv_tokens = stats.max_total_num_tokens if stats is not None else "unknown"
        args = self.args
        logger.info("serving %s (%s) at http://%s:%d | dtype %s | KV capacity %s tokens | context %d | "
                    "placement %s | kernels %s | ready in %.1f s", args.served_model_name, args.model_path,
                    args.host, self.port, args.dtype, kv_tokens, args.context_length, args.placement,
                    args.kernel_backend, elapsed_s)

    def health_problem(self) -> str:
        """Why the server cannot serve any more ("" while healthy)."""
        if self.ingest.failure is not None or not self.ingest.running:
            return "the HTTP server stopped unexpectedly"
        return self.pipeline.failure or ""

    def fail_requests(self, reason: str) -> None:
        """Answer every running request with a 503 (thread-safe: runs on the HTTP loop)."""
        server = self.ingest.server if self.ingest is not None else None
        if server is not None and server.loop is not None and not server.loop.is_closed():
            server.loop.call_soon_threadsafe(self.ingest.fail_all, reason)

    def shutdown(self, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> bool:
        """Stop listening, let running requests end, stop the pipeline; True if all drained."""
        stop_timeout_s = 2.0 if self.pipeline.failure else 30.0  # a dead process will never drain
        if self.ingest is None:
            return self.pipeline.stop(timeout=stop_timeout_s)
        self.ingest.begin_drain()
        deadline = time.monotonic() + drain_timeout_s
        while self.ingest.streams and time.monotonic() < deadline:
            time.sleep(0.02)
        answered = not self.ingest.streams
        if not answered:
            logger.warning("%d requests still running after %.0f s; stopping anyway", len(self.ingest.streams),
                           drain_timeout_s)
        return self.pipeline.stop(timeout=stop_timeout_s) and answered


def runtime_info(args: ServerArgs) -> dict[str, Any]:
    """Versions and device for /get_server_info (benchmarks store them with their numbers)."""
    import torch
    import triton

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    return {"torch_version": torch.__version__, "triton_version": triton.__version__, "device_name": device_name}


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as error:
        print(f"stagewise serve: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop_requested = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop_requested.set())
    try:
        server = Server(args).start()
    except Exception as error:
        logger.error("could not start the server: %s", error)
        return 1
    problem = ""
    while not stop_requested.wait(0.5):
        problem = server.health_problem()
        if problem:
            logger.error("%s; answering every running request with 503 and stopping", problem)
            server.fail_requests(problem)
            break
    logger.info("shutting down: no new requests; waiting for %d running ones", len(server.ingest.streams))
    clean = server.shutdown()
    logger.info("stopped%s", "" if clean else " (not everything drained)")
    return 0 if clean and not problem else 1


if __name__ == "__main__":
    sys.exit(main())
