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
until a warm-up generation went through. Before anything starts, a port
already in use, a kernel backend that cannot run on this machine and a low
soft file-descriptor limit (raised to the hard one) are dealt with.

SIGTERM/SIGINT drain: from the first moment ``/health`` and new requests
answer 503 (the socket stays open, so a load balancer sees the 503); running
requests get up to ``--shutdown-timeout`` seconds, then what is left ends
with finish_reason abort; the pipeline stops (a grammar compile in progress
is killed, not waited for) and the process exits 0 a few seconds later.

Watchdog (``--watchdog-timeout``): while requests run, the engine must show
progress (a new ``EngineStats`` or moving counters of an engine stage); after
the timeout without any, ``/health`` answers 503 and the stall is logged;
progress makes it healthy again. A dead process is a failure of its own:
every running request gets a 503 and the server exits 1.
"""
from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from pipeline.assembly import pipeline_spec
from pipeline.config import ConfigError, ServerArgs, parse_args
from pipeline.launch import Pipeline
from pipeline.placement import FRONT_END_STAGES, PLACEMENTS  # front-end stages are not the engine (watchdog)

logger = logging.getLogger("stagewise.serve")

READY_TIMEOUT_S = 900.0
ABORT_GRACE_S = 2.0  # after aborting at the shutdown deadline: time for the aborted streams to end
STOP_TIMEOUT_S = 5.0  # then: time for the pipeline to go idle before its processes are stopped anyway
SHUTTING_DOWN = "the server is shutting down"


class Server:
    """A started pipeline plus its HTTP front door (usable from tests and notebooks)."""

    def __init__(self, args: ServerArgs) -> None:
        self.args = args
        self.spec = pipeline_spec(args)
        self.pipeline = Pipeline(self.spec, PLACEMENTS[args.placement](self.spec), record_path=args.record_path,
                                 on_failure=self.fail_requests)
        self.ingest: Any = None
        self._progress: tuple = ()  # the watchdog's last view of engine progress
        self._progress_at_s = time.monotonic()
        self._stalled: str | None = None  # the watchdog's complaint while it is on /health

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

    def check_progress(self) -> None:
        """Watchdog tick: /health 503 when requests run and the engine showed no progress for
        ``--watchdog-timeout`` seconds; healthy again once it moves."""
        now_s = time.monotonic()
        progress = self._engine_progress()
        if progress != self._progress or not self.ingest.streams:
            self._progress, self._progress_at_s = progress, now_s
            if self._stalled is not None:
                logger.warning("watchdog: the engine is making progress again")
                if self.ingest.unhealthy == self._stalled:
                    self.ingest.unhealthy = None
                self._stalled = None
            return
        stalled_s = now_s - self._progress_at_s
        if self._stalled is None and stalled_s > self.args.watchdog_timeout and self.ingest.unhealthy is None:
            self._stalled = (f"watchdog: the engine made no progress for {stalled_s:.0f} s with "
                             f"{len(self.ingest.streams)} requests running (--watchdog-timeout "
                             f"{self.args.watchdog_timeout:g})")
            logger.error("%s; /health answers 503", self._stalled)
            self.ingest.unhealthy = self._stalled

    def _engine_progress(self) -> tuple:
        """What changes while the engine works: its last EngineStats and its stages' counters."""
        stats = self.ingest.engine_stats
        counters = sorted((name, c.get("steps", 0), c.get("messages_in", 0), c.get("messages_out", 0))
                          for name, c in self.ingest.stage_counters().items() if name not in FRONT_END_STAGES)
        return (stats.time_s if stats is not None else None, tuple(counters))

    def begin_drain(self) -> None:
        """/health and new requests answer 503 from now on; the socket stays open so clients see it."""
        self.ingest.draining = True
        if self.ingest.unhealthy is None or self.ingest.unhealthy == self._stalled:
            self.ingest.unhealthy = SHUTTING_DOWN

    def shutdown(self, drain_timeout_s: float | None = None) -> bool:
        """Drain (see the module docstring), then stop the pipeline; True if the pipeline stopped cleanly.

        Requests still running at the deadline are aborted, which is part of
        a clean shutdown, not a failure."""
        if drain_timeout_s is None:
            drain_timeout_s = self.args.shutdown_timeout
        if self.ingest is None:
            return self.pipeline.stop(timeout=STOP_TIMEOUT_S)
        self.begin_drain()
        if not self.pipeline.failure:  # a dead process will never drain
            self._wait_streams(time.monotonic() + drain_timeout_s)
            if self.ingest.streams:
                self._abort_running(drain_timeout_s)
        stop_timeout_s = 1.0 if self.pipeline.failure else STOP_TIMEOUT_S
        return self.pipeline.stop(timeout=stop_timeout_s)

    def _wait_streams(self, deadline_s: float) -> None:
        while self.ingest.streams and time.monotonic() < deadline_s:
            time.sleep(0.02)

    def _abort_running(self, drain_timeout_s: float) -> None:
        logger.warning("%d requests still running after --shutdown-timeout %g s; aborting them",
                       len(self.ingest.streams), drain_timeout_s)
        server = self.ingest.server
        if server is None or server.abort_all_soon(f"{SHUTTING_DOWN} (--shutdown-timeout)") is None:
            return
        self._wait_streams(time.monotonic() + ABORT_GRACE_S)


def kernel_backend_problem(args: ServerArgs) -> str:
    """Why ``--kernel-backend`` cannot run on this machine ("" if it can)."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if args.kernel_backend == "triton" and args.device != "cuda" and not interpreted:
        return (f"--kernel-backend triton cannot run here: no CUDA device (device {args.device}) and "
                "TRITON_INTERPRET is not set; use --kernel-backend reference, or TRITON_INTERPRET=1 (slow)")
    return ""


def port_in_use(host: str, port: int) -> bool:
    """True if ``host:port`` cannot be bound now (bound the way aiohttp binds: SO_REUSEADDR)."""
    if port == 0:
        return False
    try:
        infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror:
        return False  # the server's own bind reports a bad host
    for family, kind, proto, _, address in infos:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    return True
    return False


def _caused_by_port_in_use(error: BaseException | None) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
            return True
        error = error.__cause__ or error.__context__
    return False


def raise_fd_limit() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit: every client connection holds a descriptor."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            logger.info("raised the open-file limit from %d to %d", soft, hard)
    except (ImportError, ValueError, OSError) as error:
        logger.warning("could not raise the open-file limit: %s", error)


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except ConfigError as error:
        print(f"stagewise serve: error: {error}", file=sys.stderr)
        return 2
    if args.disaggregation_mode != "null":  # one prefill or decode engine, joined by `stagewise router`
        from pipeline.pd_hosts import engine_main

        return engine_main(args)
    problem = kernel_backend_problem(args)
    if problem:
        print(f"stagewise serve: error: {problem}", file=sys.stderr)
        return 2
    if port_in_use(args.host, args.port):
        print(f"port {args.port} is already in use", file=sys.stderr)
        return 1
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    raise_fd_limit()
    try:
        server = Server(args)
    except Exception as error:
        logger.error("could not start the server: %s", error)
        return 1
    stop_requested = drain_on_signals(server)
    try:
        server.start()
    except Exception as error:
        if _caused_by_port_in_use(error):  # taken between the check and the bind
            print(f"port {args.port} is already in use", file=sys.stderr)
            return 1
        logger.error("could not start the server: %s", error)
        return 1
    problem = serve_until_stopped(server, stop_requested)
    logger.info("shutting down: /health and new requests 503; %d requests running, up to %g s to finish",
                len(server.ingest.streams), args.shutdown_timeout)
    clean = server.shutdown()
    logger.info("stopped%s", "" if clean else " (the pipeline did not stop cleanly)")
    return 0 if clean and not problem else 1


def drain_on_signals(server: Server) -> threading.Event:
    """SIGTERM / SIGINT set the returned event and start the drain (it shows on /health at once, even
    while start-up finishes)."""
    stop_requested = threading.Event()

    def on_signal(*_: Any) -> None:
        stop_requested.set()
        if server.ingest is not None:
            server.begin_drain()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, on_signal)
    return stop_requested


def serve_until_stopped(server: Server, stop_requested: threading.Event) -> str:
    """Watch the server until a signal ("") or a failure (its description)."""
    while not stop_requested.wait(0.5):
        problem = server.health_problem()
        if problem:
            logger.error("%s; answering every running request with 503 and stopping", problem)
            server.fail_requests(problem)
            return problem
        server.check_progress()
    return ""


if __name__ == "__main__":
    sys.exit(main())
