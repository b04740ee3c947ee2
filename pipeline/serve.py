"""``stagewise serve``: the HTTP server, all eight stages behind OpenAI and SGLang APIs.

::

    stagewise serve                                   # the bundled demo model
    stagewise serve --model-path DIR --port 30000 --placement serving

The pipeline is the one description of ``pipeline/assembly.py``, run under
the placement ``--placement`` names:

* ``single``: every stage in this process. The ingest stage serves HTTP on
  its own thread (its asyncio loop); the other seven run as one stage loop
  on a background thread.
* ``serving``: a front-end process (this one: ingest, tokenize, detokenize)
  and an engine process (multimodal, forward, constrain, sample, schedule);
  see ``placement.serving``.

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

from pipeline.assembly import pipeline_spec
from pipeline.config import ConfigError, ServerArgs, parse_args
from pipeline.launch import Pipeline
from pipeline.placement import PLACEMENTS

logger = logging.getLogger("stagewise.serve")

DRAIN_TIMEOUT_S = 30.0
READY_TIMEOUT_S = 900.0


class Server:
    """A started pipeline plus its HTTP front door (usable from tests and notebooks)."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.spec = pipeline_spec(args)
        self.pipeline = Pipeline(self.spec, PLACEMENTS[args.placement](self.spec), record_path=args.record_path,
                                 on_failure=self.fail_requests)
        self.ingest: Any = None

    def start(self, ready_timeout_s: float = READY_TIMEOUT_S) -> "Server":
        start_s = time.perf_counter()
        self.pipeline.start()
        try:
            self.ingest = next(s for s in self.pipeline.stages if s.name == "ingest")
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
