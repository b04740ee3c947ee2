"""RequestStream and ``Frontend``: what an HTTP handler holds and what it may call.

Every HTTP handler ``submit``-s a GenerateRequest to the ingest stage and
gets back a ``RequestStream``: an async iterator of that request's
TextOutputs (all of its ``n`` sequences) that ends after each sequence's
final output, or raises ``ApiError`` on an ErrorOutput. If a handler ends
before its request does (the client disconnected, or a stream was cut
short), ``RequestStream.close`` sends an ``Abort`` so the engine frees the
request's KV at once.

With ``--log-requests`` every sequence that ends (finished, aborted or
failed) writes one INFO line, ``request_log_line``: the client's rid (for
``n > 1`` or a batch, the rid responses show for that sequence), prompt and
completion tokens, time to first token and latency (seconds, from
``submit``), and the finish reason.

``Frontend`` is the part of the ingest stage that the streams, the routes
and the server use, as a Protocol: those modules depend on this file, not
on ``stage.py``, and ``stage.py`` (which starts the server) sits on top of
them all, so the package imports form no cycle.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, AsyncIterator, Protocol

from pipeline.config import ServerArgs
from pipeline.messages import EngineStats, ErrorOutput, GenerateRequest, ServerInfo, TextOutput
from stages.ingest.errors import from_error_output

logger = logging.getLogger(__name__)


class Frontend(Protocol):
    """The ingest stage as the HTTP side sees it (``stages.ingest.stage.IngestStage`` implements it)."""

    args: ServerArgs
    tokenizer: Any
    vocab_size: int
    server_info: ServerInfo
    metrics: Any  # pipeline.metrics.ServerMetrics, or None when --enable-metrics is off
    streams: dict[str, RequestStream]  # internal rid -> stream
    labels: dict[str, list[RequestStream]]  # client rid -> the live streams of its batch
    num_sequences_in_flight: int
    engine_stats: EngineStats | None  # the whole server's (summed over data-parallel replicas)
    engine_stats_by_rank: dict[int, EngineStats]  # dp_rank -> that replica's latest snapshot
    unhealthy: str | None  # why the pipeline cannot serve any more (/health answers 503 with it)

    def check_capacity(self, num_sequences: int) -> None: ...

    async def submit(self, label: str, requests: list[GenerateRequest]) -> list[RequestStream]: ...

    def forget(self, rid: str) -> None: ...

    async def abort(self, rid: str) -> None: ...

    async def abort_by_client(self, label: str) -> bool: ...

    async def flush_cache(self) -> bool: ...

    def stage_counters(self) -> dict[str, dict[str, float]]: ...

    async def pump(self) -> None: ...

    def fail_all(self, message: str) -> None: ...


class RequestStream:
    """Outputs of one GenerateRequest (n sequences), consumed by one HTTP handler.

    ``rid`` is the server's id (the pipeline's key); ``label`` the client's
    rid for the whole batch; ``public_rid`` what responses show for this
    prompt (the label, or ``f"{label}-{k}"`` for prompt ``k`` of a batch).
    """

    def __init__(self, stage: Frontend, request: GenerateRequest, label: str, public_rid: str) -> None:
        self.stage = stage
        self.rid = request.rid
        self.label = label
        self.public_rid = public_rid
        self.num_sequences = request.sampling.n
        self.arrival_s = time.perf_counter()
        self.queue: asyncio.Queue[TextOutput | ErrorOutput] = asyncio.Queue()
        self.num_finished = 0
        self.finished = False  # every sequence ended or the request failed
        self.aborted = False  # an Abort for it went to the engine
        self.failed = False  # ended by an ErrorOutput
        self.first_token_s: list[float | None] = [None] * self.num_sequences
        self.last_token_s: list[float | None] = [None] * self.num_sequences
        self.num_prompt_tokens = len(request.input_ids or ())  # replaced by what the outputs report
        self.num_completion_tokens = [0] * self.num_sequences
        self.sequence_done = [False] * self.num_sequences

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
        self.num_prompt_tokens = output.prompt_tokens or self.num_prompt_tokens
        self.num_completion_tokens[index] = max(self.num_completion_tokens[index], output.completion_tokens)
        if output.finish_reason is not None:
            self._log_finished(index, output.finish_reason.type, now_s)
        if metrics is not None:
            metrics.count_tokens(0, num_new)
            if output.finish_reason is not None:
                first_s = self.first_token_s[index]
                metrics.observe_finished(output.finish_reason.type, output.prompt_tokens, now_s - self.arrival_s,
                                         None if first_s is None else first_s - self.arrival_s,
                                         self.num_completion_tokens[index])
                if output.spec_verify_ct:
                    metrics.observe_spec_accept_length(output.spec_verify_ct, output.spec_accepted_tokens)

    async def close(self) -> None:
        """End the request: unless every sequence finished, abort it in the engine (frees its KV)."""
        if not self.finished:
            self.finished = True
            self.stage.forget(self.rid)
        if self.num_finished < self.num_sequences and not self.aborted:
            self.aborted = True
            reason = "error" if self.failed else "abort"  # sequences that never finished: client gone, or failed
            now_s = time.perf_counter()
            for index in range(self.num_sequences):
                self._log_finished(index, reason, now_s)
            if self.stage.metrics is not None:
                for _ in range(self.num_sequences - self.num_finished):
                    self.stage.metrics.observe_finished(reason, 0, now_s - self.arrival_s)
            await self.stage.abort(self.rid)

    def _log_finished(self, index: int, finish_reason: str, now_s: float) -> None:
        """The --log-requests line of sequence ``index``, once (the first end it sees)."""
        if self.sequence_done[index]:
            return
        self.sequence_done[index] = True
        if not self.stage.args.log_requests:
            return
        first_s = self.first_token_s[index]
        rid = self.public_rid if self.num_sequences == 1 else f"{self.public_rid}.{index}"
        logger.info(request_log_line(rid, self.num_prompt_tokens, self.num_completion_tokens[index],
                                     None if first_s is None else first_s - self.arrival_s,
                                     now_s - self.arrival_s, finish_reason))


def request_log_line(rid: str, prompt_tokens: int, completion_tokens: int, ttft_s: float | None,
                     latency_s: float, finish_reason: str) -> str:
    """One finished request as ``key=value`` fields (``ttft_s=none``: it ended before its first token)."""
    ttft = "none" if ttft_s is None else f"{ttft_s:.4f}"
    return (f"Finished request rid={rid} prompt_tokens={prompt_tokens} completion_tokens={completion_tokens} "
            f"ttft_s={ttft} latency_s={latency_s:.4f} finish_reason={finish_reason}")
