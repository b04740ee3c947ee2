"""HttpServer: the aiohttp server of the ingest stage, on the ingest thread's event loop.

Life cycle::

    bind host:port -> start the inbox pump -> warm-up (one 1-token generation
    through the whole pipeline) -> ready (/health 200) -> ... serve ...
    -> drain (serve.py): /health and new requests 503, running ones finish
    -> abort_all at --shutdown-timeout: what is left ends with finish_reason abort
    -> stop(): cancel what is left, close the server, return

Connections: one that sends no complete request within ``KEEPALIVE_TIMEOUT_S``
of opening (or of its last response) is closed (aiohttp's keep-alive timer,
which also covers half-sent headers); a request body must arrive within
``BODY_READ_TIMEOUT_S`` (``app.py``). When accept() fails (EMFILE: out of file
descriptors) asyncio retries every second; the error is logged once per
``ACCEPT_ERROR_LOG_INTERVAL_S`` with how many were suppressed.

Handlers are cancelled when their client disconnects (aiohttp's
``handler_cancellation``); the ``finally`` of every route then aborts the
request in the engine.
"""
from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Callable

from aiohttp import web

from pipeline.messages import GenerateRequest, SamplingParams
from stages.ingest.app import build_app
from stages.ingest.context import ServerContext
from stages.ingest.native_routes import one_token_generation
from stages.ingest.streaming import collect
from stages.ingest.streams import Frontend

logger = logging.getLogger(__name__)

STOP_POLL_S = 0.05
SHUTDOWN_GRACE_S = 5.0
KEEPALIVE_TIMEOUT_S = 5.0  # an idle or half-open connection is closed after this (uvicorn's default)
ACCEPT_ERROR_LOG_INTERVAL_S = 60.0
WARMUP_PROMPT_LENS = (7, 33, 130, 520, 1100, 2100, 4200, 8300)  # GPU only: prefill token counts to compile
WARMUP_NEW_TOKENS = 4


class HttpServer:
    """One aiohttp site bound to ``--host``/``--port``, serving the ingest stage's routes."""

    def __init__(self, stage: Frontend) -> None:
        self.stage = stage
        self.args = stage.args
        self.ctx = ServerContext(self.args, stage)
        self.loop: asyncio.AbstractEventLoop | None = None
        self.site: web.TCPSite | None = None
        self.ready = threading.Event()  # set after warm-up (or on failure, with .error)
        self.error: BaseException | None = None
        self.bound_port = 0

    def run_until_stopped(self, stopping: Callable[[], bool]) -> None:
        asyncio.run(self._serve(stopping))

    async def _serve(self, stopping: Callable[[], bool]) -> None:
        self.loop = asyncio.get_running_loop()
        self.loop.set_exception_handler(RateLimitedAcceptErrors())
        runner = web.AppRunner(build_app(self.ctx), handler_cancellation=True, access_log=None,
                               shutdown_timeout=SHUTDOWN_GRACE_S, keepalive_timeout=KEEPALIVE_TIMEOUT_S)
        pump = asyncio.ensure_future(self.stage.pump())
        try:
            await runner.setup()
            self.site = web.TCPSite(runner, self.args.host, self.args.port, reuse_address=True)
            await self.site.start()
            self.bound_port = self.site._server.sockets[0].getsockname()[1]  # the port when --port 0
            await self._warm_up()
            while not stopping():
                await asyncio.sleep(STOP_POLL_S)
        except BaseException as error:
            self.error = error
            self.ready.set()
            raise
        finally:
            self.stage.fail_all("the server is shutting down")
            await runner.cleanup()
            pump.cancel()

    async def _warm_up(self) -> None:
        """One generation through every stage (must succeed); on a GPU also prompts of several
        lengths, so the Triton kernels of common prefill shapes compile before the first client."""
        start_s = time.perf_counter()
        await one_token_generation(self.ctx, f"warmup-{time.time_ns()}")
        if self.args.device == "cuda":
            await self._compile_shapes()
        self.ctx.ready = True
        logger.info("warm-up generation done in %.2f s", time.perf_counter() - start_s)
        self.ready.set()

    async def _compile_shapes(self) -> None:
        """Best effort: a failure here is logged, the server still starts."""
        limit = self.args.context_length - WARMUP_NEW_TOKENS - 1
        lengths = [n for n in WARMUP_PROMPT_LENS if n <= limit]
        vocab_size = max(self.ctx.vocab_size, 2)
        requests = [GenerateRequest(
            rid=f"warmup-{n}-{time.time_ns()}", input_ids=[(i * 7919 + n) % vocab_size for i in range(n)],
            sampling=SamplingParams(max_new_tokens=WARMUP_NEW_TOKENS, temperature=0.0, ignore_eos=True))
            for n in lengths]
        try:
            for request in requests:  # one at a time: each prefill has its own token count
                [stream] = await self.stage.submit(request.rid, [request])
                try:
                    await collect([stream])
                finally:
                    await stream.close()
        except Exception as error:  # noqa: BLE001 - warm-up must not stop the server
            logger.warning("warm-up with longer prompts failed (serving anyway): %s", error)

    def abort_all_soon(self, reason: str) -> "asyncio.Future[int] | None":
        """Thread-safe: end every running request with finish_reason abort; the future gives how many."""
        if self.loop is None or self.loop.is_closed():
            return None
        return asyncio.run_coroutine_threadsafe(self._abort_all(reason), self.loop)

    async def _abort_all(self, reason: str) -> int:
        labels = list(self.stage.labels)
        for label in labels:
            await self.stage.abort_by_client(label)
        if labels:
            logger.warning("aborted %d running requests: %s", len(labels), reason)
        return len(labels)

    def stop_listening_soon(self) -> None:
        """Thread-safe: close the listening socket; open connections keep being served."""
        if self.loop is not None and self.site is not None:
            asyncio.run_coroutine_threadsafe(self._stop_listening(), self.loop)

    async def _stop_listening(self) -> None:
        server = getattr(self.site, "_server", None)
        if server is not None:
            server.close()


class RateLimitedAcceptErrors:
    """The loop's exception handler: accept() failures (EMFILE...) logged once per interval, not per retry."""

    def __init__(self, interval_s: float = ACCEPT_ERROR_LOG_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.last_log_s = -float("inf")
        self.num_suppressed = 0

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict) -> None:
        if "accept" not in str(context.get("message", "")):
            loop.default_exception_handler(context)
            return
        now = time.monotonic()
        if now - self.last_log_s < self.interval_s:
            self.num_suppressed += 1
            return
        suppressed = f" ({self.num_suppressed} more since the last report)" if self.num_suppressed else ""
        logger.error("cannot accept connections: %s%s", context.get("exception") or context.get("message"),
                     suppressed)
        self.last_log_s = now
        self.num_suppressed = 0
