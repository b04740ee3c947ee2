"""IngestStage: the request table between HTTP handlers and the pipeline.

Inbox ``IngestInbox`` (TextOutput | ErrorOutput | EngineStats |
ProcessCounters); outboxes (``IngestOutboxes``):

* ``out`` -> tokenize: ``GenerateRequest`` for each client request,
  ``Abort`` when a client goes away or asks for it, and ``FlushCache``.

Every HTTP handler ``submit``-s a GenerateRequest and gets back a
``RequestStream`` (``streams.py``). What the handlers send enters through a
side door, ``"http"``: a recording notes each such message as an input of
that door, and a replay hands it back to ``replay_input``, which sends it on
as the live stage did. The stage's ``pump`` task reads the
inbox on the event loop and routes each output by ``parent_rid``; the
handlers never touch a channel. Outputs that arrive for a request already
closed are dropped.

Request ids: the ``rid`` every message downstream carries is the server's
own (a fresh uuid per submitted batch, ``"<uuid>-<k>"`` for prompt ``k`` of a
batch; tokenize fans ``n`` out as ``"<rid>.<i>"``). A client's ``rid`` is
only a *label*: unique among live requests, checked and registered for the
whole batch in one step before anything is sent, shown back in responses,
and the key of ``/abort_request``. No client input reaches another
request's id.

Constructed with the tokenizer the assembly loaded (the server never loads
one: token strings for logprobs, ``echo``, the warm-up prompt) and the
``ServerInfo`` (versions, device) for ``/get_server_info``. ``--enable-metrics``
builds a ``ServerMetrics`` here.

State owned: the table of live requests (internal rid -> RequestStream), the
live labels (client rid -> that batch's streams), the last
EngineStats snapshot of each engine replica (by ``dp_rank``; one unless
``--dp-size`` > 1) and their sum (``engine_stats``, see
``combine_engine_stats``), the latest ``ProcessCounters`` of each process
(every stage's counters, for ``/metrics`` and ``/get_server_info``), and the
request timing that feeds ``ServerMetrics``.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from typing import Any

import msgspec

from pipeline.channel import Channel, ChannelClosed
from pipeline.config import ServerArgs, running_requests_bound
from pipeline.messages import (Abort, EngineStats, ErrorOutput, FinishReason, FlushCache, GenerateRequest,
                               IngestInbox, ProcessCounters, ServerInfo, TextOutput)
from pipeline.metrics import ServerMetrics
from pipeline.stage import Outbox, Outboxes, Stage
from stages.ingest.errors import ApiError
from stages.ingest.server import HttpServer
from stages.ingest.streams import RequestStream

logger = logging.getLogger(__name__)

HTTP_DOOR = "http"  # the side door the HTTP handlers' messages come in by (recordings, replays)


@dataclasses.dataclass(frozen=True)
class IngestOutboxes(Outboxes):
    out: Outbox[GenerateRequest | Abort | FlushCache]  # -> tokenize


class IngestStage(Stage):
    """HTTP-side request table: submit GenerateRequests, route outputs back to handlers."""

    Inbox = IngestInbox
    Outboxes = IngestOutboxes
    outboxes: IngestOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: IngestOutboxes | dict[str, Channel | None], *, tokenizer: Any,
                 server_info: ServerInfo, vocab_size: int = 0) -> None:
        """``vocab_size``: the model's (maybe padded) vocabulary; 0 means ``len(tokenizer)``."""
        super().__init__("ingest", inbox, outboxes)
        self.args = args
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size or len(tokenizer)
        self.server_info = server_info
        engines = args.pd_prefill + args.pd_decode or args.dp_size  # each reports its own EngineStats
        self.metrics = ServerMetrics(args.served_model_name, engines) if args.enable_metrics else None
        self.streams: dict[str, RequestStream] = {}  # internal rid -> stream
        self.labels: dict[str, list[RequestStream]] = {}  # client rid -> its batch's live streams
        self.engine_stats_by_rank: dict[int, EngineStats] = {}  # dp_rank -> that replica's latest snapshot
        self.engine_stats: EngineStats | None = None  # the whole server's: combine_engine_stats of the above
        self.process_counters: dict[str, ProcessCounters] = {}  # process -> its latest counters
        self.num_sequences_in_flight = 0
        self.draining = False  # shutting down: new requests get 503, running ones finish
        self.unhealthy: str | None = None  # why the pipeline cannot serve any more (a process or rank died)
        self.server: HttpServer | None = None  # while run() serves

    # -- running (own thread: the aiohttp event loop) ----------------------------
    def run(self) -> None:
        """Serve HTTP on this thread's event loop until ``stop()`` (see stages/ingest/server.py)."""
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
        running_cap = running_requests_bound(self.args) * self.args.dp_size  # every replica runs its own batch
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

    async def submit(self, label: str, requests: list[GenerateRequest]) -> list[RequestStream]:
        """Admit one client request (a batch of prompts) under ``label``, the client's rid; one stream each.

        Each request gets a server-made rid (whatever rid it came with is
        replaced). The label check, the capacity check and the table entries
        happen with no ``await`` between them, so a refused batch leaves
        nothing behind and two handlers cannot both take one label.
        """
        if label in self.labels:
            raise ApiError(400, f"a request with rid {label!r} is already running", param="rid")
        self.check_capacity(sum(request.sampling.n for request in requests))
        base = uuid.uuid4().hex
        requests = [msgspec.structs.replace(request, rid=base if len(requests) == 1 else f"{base}-{k}")
                    for k, request in enumerate(requests)]
        streams = [RequestStream(self, request, label, label if len(requests) == 1 else f"{label}-{k}")
                   for k, request in enumerate(requests)]
        self.labels[label] = list(streams)
        for stream in streams:
            self.streams[stream.rid] = stream
            self.num_sequences_in_flight += stream.num_sequences
        num_sent = 0
        try:
            for request in requests:
                await self._send(request)
                num_sent += 1
        except BaseException as error:  # channel closed, or the handler cancelled mid-send
            for stream in streams:
                self.forget(stream.rid)
            for stream in streams[:num_sent]:  # already in the pipeline: free them there
                asyncio.ensure_future(self.abort(stream.rid))
            if isinstance(error, ChannelClosed):
                raise ApiError(503, "the server is shutting down", "server_unavailable") from error
            raise
        return streams

    def forget(self, rid: str) -> None:
        """Drop a stream (by internal rid) from the table; its label is free once the batch's last one goes."""
        stream = self.streams.pop(rid, None)
        if stream is None:
            return
        self.num_sequences_in_flight -= stream.num_sequences
        group = self.labels.get(stream.label)
        if group is not None and stream in group:  # not a later batch that reused an aborted label
            group.remove(stream)
            if not group:
                del self.labels[stream.label]

    async def abort(self, rid: str) -> None:
        """Tell the pipeline to drop ``rid`` (an internal rid; a parent rid aborts all of its sequences)."""
        try:
            await self._send(Abort(rid=rid))
        except ChannelClosed:
            pass

    async def abort_by_client(self, label: str) -> bool:
        """POST /abort_request: end every stream of the batch labelled ``label`` with finish_reason abort.

        False if no live request has that label. The label is free again at
        once (a new request may reuse it while the aborted streams wind down).
        """
        streams = self.labels.pop(label, None)
        if not streams:
            return False
        for stream in streams:
            if stream.aborted:
                continue
            stream.aborted = True
            await self.abort(stream.rid)
            for index in range(stream.num_sequences):
                stream.push(_abort_output(stream.rid, index, stream.num_sequences))
        return True

    async def flush_cache(self) -> bool:
        """Send FlushCache down the request path (tokenize -> multimodal -> schedule)."""
        await self._send(FlushCache(request_id=f"flush-{time.time_ns()}"))
        return True

    async def _send(self, message: GenerateRequest | Abort | FlushCache) -> None:
        """A handler's message into the pipeline, noted as an input of the side door when recording."""
        if self.recorder is not None:
            self.recorder.record_inputs(self, [message], channel=HTTP_DOOR)
        await self.outboxes.out.aput(message)

    def replay_input(self, door: str, message: Any) -> None:
        """A replay's recorded handler message: sent on as the live stage sent it."""
        if door != HTTP_DOOR:
            super().replay_input(door, message)
            return
        self.outboxes.out.put(message)

    def stage_counters(self) -> dict[str, dict[str, float]]:
        """{stage: counters} over every process that reported (processes in name order)."""
        merged: dict[str, dict[str, float]] = {}
        for process in sorted(self.process_counters):
            merged.update(self.process_counters[process].stages)
        return merged

    # -- inbox side ---------------------------------------------------------------
    def handle(self, message: IngestInbox) -> None:
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
                self.engine_stats_by_rank[message.dp_rank] = message
                self.engine_stats = combine_engine_stats(
                    [self.engine_stats_by_rank[rank] for rank in sorted(self.engine_stats_by_rank)])
                if self.metrics is not None:
                    self.metrics.set_engine_stats(message)
            case ProcessCounters():
                self.process_counters[message.process] = message
                if self.metrics is not None:
                    self.metrics.set_process_counters(message)
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
        """Answer every live request with a 503 (the engine died or the server is stopping); /health says so."""
        self.unhealthy = message
        for rid, stream in list(self.streams.items()):
            stream.push(ErrorOutput(rid=rid, status_code=503, error_type="server_unavailable", message=message))


def combine_engine_stats(per_replica: list[EngineStats]) -> EngineStats:
    """The whole server's load from each replica's latest snapshot (one replica: its snapshot unchanged).

    Requests, KV tokens and throughput add up; ``token_usage`` is the used
    fraction of all replicas' KV tokens together; ``cache_hit_rate`` is the
    replicas' mean; ``time_s`` is the oldest snapshot's (so "newer than t"
    means every replica reported after t); ``dp_rank`` is -1 (no one replica).
    """
    if len(per_replica) == 1:
        return per_replica[0]
    max_tokens = sum(stats.max_total_num_tokens for stats in per_replica)
    used_tokens = sum(stats.token_usage * stats.max_total_num_tokens for stats in per_replica)
    return EngineStats(
        time_s=min(stats.time_s for stats in per_replica),
        num_running_reqs=sum(stats.num_running_reqs for stats in per_replica),
        num_queue_reqs=sum(stats.num_queue_reqs for stats in per_replica),
        token_usage=used_tokens / max_tokens if max_tokens else 0.0,
        cache_hit_rate=sum(stats.cache_hit_rate for stats in per_replica) / len(per_replica),
        gen_throughput=sum(stats.gen_throughput for stats in per_replica),
        max_total_num_tokens=max_tokens,
        dp_rank=-1,
    )


def _abort_output(rid: str, index: int, num_sequences: int) -> TextOutput:
    return TextOutput(rid=rid if num_sequences == 1 else f"{rid}.{index}", parent_rid=rid, index=index,
                      text_delta="", token_ids_delta=[], finish_reason=FinishReason(type="abort"),
                      prompt_tokens=0, completion_tokens=0)
