"""IngestStage: the request table between HTTP handlers and the pipeline.

Inbox ``IngestInbox`` (TextOutput | ErrorOutput | EngineStats); outboxes:

* ``"out"`` -> tokenize: ``GenerateRequest`` for each client request,
  ``Abort`` when a client goes away or asks for it, and ``FlushCache``.

Every HTTP handler ``submit``-s a GenerateRequest and gets back a
``RequestStream``: an async iterator of that request's TextOutputs (all of
its ``n`` sequences) that ends after each sequence's final output, or raises
``ApiError`` on an ErrorOutput. The stage's ``pump`` task reads the inbox on
the event loop and routes each output by ``parent_rid``; the handlers never
touch a channel. If a handler ends before its request does (the client
disconnected, or a stream was cut short), ``RequestStream.close`` sends an
``Abort`` so the engine frees the request's KV at once; outputs that arrive
later for it are dropped.

State owned: the table of live requests (rid -> RequestStream), the last
EngineStats snapshot, and the request timing that feeds ``ServerMetrics``.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator

from pipeline.channel import ChannelClosed
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, EngineStats, ErrorOutput, FinishReason, FlushCache, GenerateRequest,
                               TextOutput)
from pipeline.stage import Stage
from stages.ingest.errors import ApiError, from_error_output

logger = logging.getLogger(__name__)


class RequestStream:
    """Outputs of one GenerateRequest (n sequences), consumed by one HTTP handler."""

    def __init__(self, stage: "IngestStage", request: GenerateRequest) -> None:
        self.stage = stage
        self.rid = request.rid
        self.num_sequences = request.sampling.n
        self.arrival_s = time.perf_counter()
        self.queue: asyncio.Queue[TextOutput | ErrorOutput] = asyncio.Queue()
        self.num_finished = 0
        self.finished = False  # every sequence ended or the request failed
        self.aborted = False  # an Abort for it went to the engine
        self.failed = False  # ended by an ErrorOutput
        self.first_token_s: list[float | None] = [None] * self.num_sequences
        self.last_token_s: list[float | None] = [None] * self.num_sequences

    def push(self, message: TextOutput | ErrorOutput) -> None:
        self.queue.put_nowait(message)

    def __aiter__(self) -> AsyncIterator[TextOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[TextOutput]:
        while not self.finished:
            message = await self.queue.get()
            if isinstance(message, ErrorOutput):
                self.failed = True
                self.finished = True
                self.stage.forget(self.rid)
                raise from_error_output(message)
            self._observe(message)
            if message.finish_reason is not None:
                self.num_finished += 1
                if self.num_finished == self.num_sequences:
                    self.finished = True
                    self.stage.forget(self.rid)
            yield message

    def _observe(self, output: TextOutput) -> None:
        """Per-sequence timing for TTFT / inter-token latency / e2e (in the handler's task)."""
        metrics = self.stage.metrics
        now_s = time.perf_counter()
        index = min(output.index, self.num_sequences - 1)
        num_new = len(output.token_ids_delta)
        if num_new and self.first_token_s[index] is None:
            self.first_token_s[index] = now_s
            if metrics is not None:
                metrics.observe_first_token(now_s - self.arrival_s)
        elif num_new and metrics is not None and self.last_token_s[index] is not None:
            metrics.observe_inter_token((now_s - self.last_token_s[index]) / num_new)
        if num_new:
            self.last_token_s[index] = now_s
        if metrics is not None:
            metrics.count_tokens(0, num_new)
            if output.finish_reason is not None:
                metrics.observe_finished(output.finish_reason.type, output.prompt_tokens, now_s - self.arrival_s)

    async def close(self) -> None:
        """End the request: unless every sequence finished, abort it in the engine (frees its KV)."""
        if not self.finished:
            self.finished = True
            self.stage.forget(self.rid)
        if self.num_finished < self.num_sequences and not self.aborted:
            self.aborted = True
            if self.stage.metrics is not None:  # sequences that never finished: client gone, or failed
                reason = "error" if self.failed else "abort"
                for _ in range(self.num_sequences - self.num_finished):
                    self.stage.metrics.observe_finished(reason, 0, time.perf_counter() - self.arrival_s)
            await self.stage.abort(self.rid)


class IngestStage(Stage):
    """HTTP-side request table: submit GenerateRequests, route outputs back to handlers."""

    def __init__(self, args: ServerArgs, inbox: Any, outboxes: dict[str, Any], metrics: Any = None,
                 tokenizer: Any = None) -> None:
        super().__init__("ingest", inbox, outboxes)
        self.args = args
        if metrics is None and args.enable_metrics:
            from pipeline.metrics import ServerMetrics

            metrics = ServerMetrics(args.served_model_name)
        self.metrics = metrics
        self.tokenizer = tokenizer  # None: the HTTP server loads it from --tokenizer-path
        self.server_info: Any = None  # optional () -> dict merged into /get_server_info
        self.streams: dict[str, RequestStream] = {}
        self.engine_stats: EngineStats | None = None
        self.num_sequences_in_flight = 0
        self.draining = False  # shutting down: new requests get 503, running ones finish
        self.server: Any = None  # stages.ingest.server.HttpServer while run() serves

    # -- running (own thread: the aiohttp event loop) ----------------------------
    def run(self) -> None:
        """Serve HTTP on this thread's event loop until ``stop()`` (see stages/ingest/server.py)."""
        from stages.ingest.server import HttpServer

        self.server = HttpServer(self)
        self.server.run_until_stopped(lambda: self.stopping)

    def begin_drain(self) -> None:
        """Stop taking new requests (thread-safe); running requests go on to their end."""
        self.draining = True
        if self.server is not None:
            self.server.stop_listening_soon()

    # -- handler side -----------------------------------------------------------
    def check_capacity(self, num_sequences: int) -> None:
        """503 while draining, or when the engine's waiting queue would pass --max-queued-requests;
        400 for a request with more sequences than running and queued requests together allow."""
        if self.draining:
            raise ApiError(503, "the server is shutting down", "server_unavailable")
        running_cap = self.args.max_running_requests
        most = running_cap + self.args.max_queued_requests
        if num_sequences > most:  # never fits, even on an idle server: the client's mistake, not a retry
            raise ApiError(400, f"the request asks for {num_sequences} sequences (prompts x n); this server takes at "
                                f"most {most} at once; lower n or split the batch", param="n")
        waiting = max(self.num_sequences_in_flight + num_sequences - running_cap,
                      self.engine_stats.num_queue_reqs if self.engine_stats else 0)
        if waiting > self.args.max_queued_requests:
            raise ApiError(503, f"the server is overloaded: {waiting} requests would be waiting, more than "
                                f"--max-queued-requests={self.args.max_queued_requests}; retry later",
                           "server_overloaded")

    async def submit(self, request: GenerateRequest) -> RequestStream:
        if request.rid in self.streams:
            raise ApiError(400, f"a request with rid {request.rid!r} is already running", param="rid")
        stream = RequestStream(self, request)
        self.streams[request.rid] = stream
        self.num_sequences_in_flight += stream.num_sequences
        try:
            await self.aemit("out", request)
        except ChannelClosed as error:
            self.forget(request.rid)
            raise ApiError(503, "the server is shutting down", "server_unavailable") from error
        return stream

    def forget(self, rid: str) -> None:
        stream = self.streams.pop(rid, None)
        if stream is not None:
            self.num_sequences_in_flight -= stream.num_sequences

    async def abort(self, rid: str) -> None:
        """Tell the pipeline to drop ``rid`` (a parent rid aborts all of its sequences)."""
        try:
            await self.aemit("out", Abort(rid=rid))
        except ChannelClosed:
            pass

    async def abort_by_client(self, rid: str) -> bool:
        """POST /abort_request: end the stream with finish_reason abort; False if unknown or already aborted."""
        stream = self.streams.get(rid)
        if stream is None or stream.aborted:
            return False
        stream.aborted = True  # a second abort (concurrent, or before the handler saw the first) is a 404
        await self.abort(rid)
        for index in range(stream.num_sequences):
            stream.push(_abort_output(rid, index, stream.num_sequences))
        return True

    async def flush_cache(self) -> bool:
        """Send FlushCache down the request path (tokenize -> multimodal -> schedule)."""
        await self.aemit("out", FlushCache(request_id=f"flush-{time.time_ns()}"))
        return True

    async def aemit(self, outbox: str, message: Any) -> None:
        """``emit`` for the event loop: never blocks it (recorded like any stage output)."""
        channel = self.outboxes[outbox]
        if self.recorder is not None:
            self.recorder.record_output(self, outbox, channel.name, message)
        await channel.aput(message)
        self.counters.messages_out += 1

    # -- inbox side ---------------------------------------------------------------
    def handle(self, message: TextOutput | ErrorOutput | EngineStats) -> None:
        match message:
            case TextOutput():
                stream = self.streams.get(message.parent_rid)
                if stream is not None:
                    stream.push(message)
            case ErrorOutput():
                stream = self.streams.get(message.rid) or self.streams.get(message.rid.rsplit(".", 1)[0])
                if stream is not None:
                    stream.push(message)
            case EngineStats():
                self.engine_stats = message
                if self.metrics is not None:
                    self.metrics.set_engine_stats(message)
            case _:
                raise TypeError(f"ingest stage got an unexpected {type(message).__name__}")

    async def pump(self) -> None:
        """Read the inbox on the event loop until it closes, routing each message."""
        assert self.inbox is not None, "ingest needs an inbox to pump"
        while True:
            try:
                message = await self.inbox.aget()
            except ChannelClosed:
                return
            start_s = time.perf_counter()
            batch = [message] + self.inbox.drain(255)
            if self.recorder is not None:
                self.recorder.record_inputs(self, batch)
            for item in batch:
                self.handle(item)
            self.counters.messages_in += len(batch)
            self.counters.steps += 1
            self.counters.busy_s += time.perf_counter() - start_s

    def fail_all(self, message: str) -> None:
        """Answer every live request with a 503 (the engine died or the server is stopping)."""
        for rid, stream in list(self.streams.items()):
            stream.push(ErrorOutput(rid=rid, status_code=503, error_type="server_unavailable", message=message))


def _abort_output(rid: str, index: int, num_sequences: int) -> TextOutput:
    return TextOutput(rid=rid if num_sequences == 1 else f"{rid}.{index}", parent_rid=rid, index=index,
                      text_delta="", token_ids_delta=[], finish_reason=FinishReason(type="abort"),
                      prompt_tokens=0, completion_tokens=0)
