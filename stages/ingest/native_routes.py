"""SGLang-native routes: /generate, health, info, abort, cache flush and /metrics.

``/generate`` takes ``text`` or ``input_ids`` (one prompt or a batch) and
``sampling_params`` by SGLang's names, and answers ``{"text", "output_ids",
"meta_info"}`` per sequence (a list for a batch or ``n > 1``); streamed, each
event carries the text so far, as SGLang does. ``/health`` is 503 until the
warm-up request went through, then 200; ``/health_generate`` runs a one-token
generation through the whole pipeline (``/ping`` is ``/health`` for
SageMaker). ``/flush_cache`` answers POST and GET, as SGLang's does, and
takes no parameters (one given is a 400 naming it); ``/abort_request``'s
body has ``rid`` or ``abort_all`` and nothing else.
``image_data`` / ``video_data`` (vision models) are SGLang's: per prompt one
reference or a list, fetched here (``stages/ingest/media.py``) and placed at
the prompt's ``<|image_pad|>`` / ``<|video_pad|>`` placeholders by the
multimodal stage. ``/get_server_info`` (also ``/server_info``) carries SGLang's top-level
``max_total_num_tokens`` (the KV capacity the engine reported) and
``version``.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web

from pipeline.messages import GenerateRequest, SamplingParams
from stages.ingest.context import CTX, ServerContext
from stages.ingest.convert import check_vocabulary, native_requests
from stages.ingest.errors import ApiError
from stages.ingest.media import native_prompt_media
from stages.ingest.misc_routes import stagewise_version
from stages.ingest.protocol import AbortRequestBody, NativeGenerateRequest
from stages.ingest.responses import SequenceResult, native_result
from stages.ingest.streaming import SseWriter, collect, merged, read_body

HEALTH_GENERATE_TIMEOUT_S = 30.0


async def generate(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body: NativeGenerateRequest = await read_body(request, NativeGenerateRequest)
    rid = body.rid or uuid.uuid4().hex
    start_s = time.perf_counter()
    generate_requests = native_requests(body, rid, time.time())
    check_vocabulary(generate_requests, ctx.vocab_size, "input_ids")
    if body.image_data is not None or body.video_data is not None:
        generate_requests = await _with_media(ctx, body, generate_requests)
    streams = await ctx.ingest.submit(rid, generate_requests)
    try:
        if body.stream:
            return await _stream_generate(request, body, streams, start_s)
        results = await collect(streams)
        items = [native_result(_sequence_rid(s.public_rid, r.index, s.num_sequences), r,
                               time.perf_counter() - start_s, body.return_logprob, *_logprob_text(ctx, body))
                 for s, group in _grouped(streams, results) for r in group]
        single = isinstance(body.text, str) or (body.input_ids is not None and _is_flat(body.input_ids))
        return web.json_response(items[0] if single and len(items) == 1 else items)
    finally:
        for stream in streams:
            await stream.close()


async def _with_media(ctx: ServerContext, body: NativeGenerateRequest,
                      requests: list[GenerateRequest]) -> list[GenerateRequest]:
    """Each prompt's image_data / video_data fetched into its request (a 400 names the bad item)."""
    batched = isinstance(body.text, list) or (body.input_ids is not None and not _is_flat(body.input_ids))
    media = await native_prompt_media(body.image_data, body.video_data, len(requests), batched,
                                      ctx.args.allowed_local_media_path)
    return [msgspec.structs.replace(request, media=items) for request, items in zip(requests, media)]


def _logprob_text(ctx: ServerContext, body: NativeGenerateRequest) -> tuple[Any, list[int]]:
    """(token texts for logprob entries when return_text_in_logprobs, the token_ids_logprob ids)."""
    return (ctx.token_text if body.return_text_in_logprobs else None), list(body.token_ids_logprob or [])


def _is_flat(input_ids: list[Any]) -> bool:
    return not input_ids or not isinstance(input_ids[0], list)


def _grouped(streams: list, results: list[SequenceResult]) -> list[tuple[Any, list[SequenceResult]]]:
    groups, start = [], 0
    for stream in streams:
        groups.append((stream, results[start:start + stream.num_sequences]))
        start += stream.num_sequences
    return groups


def _sequence_rid(rid: str, index: int, num_sequences: int) -> str:
    return rid if num_sequences == 1 else f"{rid}.{index}"


async def _stream_generate(request: web.Request, body: NativeGenerateRequest, streams: list,
                           start_s: float) -> web.StreamResponse:
    writer = SseWriter(request)
    results: dict[tuple[int, int], SequenceResult] = {}
    try:
        async for position, output in merged(streams):
            key = (position, output.index)
            result = results.setdefault(key, SequenceResult(index=output.index))
            result.add(output)
            if not (output.text_delta or output.finish_reason or output.token_ids_delta):
                continue
            stream = streams[position]
            item = native_result(_sequence_rid(stream.public_rid, output.index, stream.num_sequences), result,
                                 time.perf_counter() - start_s, body.return_logprob,
                                 *_logprob_text(request.app[CTX], body))
            item["index"] = position * max(stream.num_sequences, 1) + output.index
            await writer.send(item)
    except ApiError as error:
        if writer.response is None:
            raise
        await writer.send_error(error)
    return await writer.finish()


# --------------------------------------------------------------------------- health and info


async def health(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    if not ctx.ready:
        return web.json_response({"status": "starting"}, status=503)
    if ctx.ingest.unhealthy is not None:  # a process or a tensor-parallel rank is down
        return web.json_response({"status": "unhealthy", "message": ctx.ingest.unhealthy}, status=503)
    return web.json_response({"status": "ok"})


async def health_generate(request: web.Request) -> web.Response:
    """Open to all (no API key), so at most one probe generation runs at a time: callers that arrive
    while one runs wait for it and share its answer."""
    ctx: ServerContext = request.app[CTX]
    if not ctx.ready:
        return web.json_response({"status": "starting"}, status=503)
    if ctx.health_probe is None or ctx.health_probe.done():
        ctx.health_probe = asyncio.ensure_future(_health_probe(ctx))
    status, body = await asyncio.shield(ctx.health_probe)  # a caller that leaves does not cancel the probe
    return web.json_response(body, status=status)


async def _health_probe(ctx: ServerContext) -> tuple[int, dict[str, str]]:
    try:
        await asyncio.wait_for(one_token_generation(ctx, f"health-{uuid.uuid4().hex}"), HEALTH_GENERATE_TIMEOUT_S)
    except (ApiError, asyncio.TimeoutError) as error:
        return 503, {"status": "unhealthy", "message": str(error)}
    return 200, {"status": "ok"}


async def one_token_generation(ctx: ServerContext, label: str) -> SequenceResult:
    """Generate one token from a one-token prompt through the whole pipeline (warm-up, health)."""
    first_id = ctx.tokenizer.bos_token_id if ctx.tokenizer.bos_token_id is not None else 0
    request = GenerateRequest(rid=label, input_ids=[first_id],
                              sampling=SamplingParams(max_new_tokens=1, temperature=0.0))
    [stream] = await ctx.ingest.submit(label, [request])
    try:
        [result] = await collect([stream])
    finally:
        await stream.close()
    return result


async def get_model_info(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    args = ctx.args
    return web.json_response({"model_path": args.model_path, "tokenizer_path": args.tokenizer_path,
                              "served_model_name": args.served_model_name, "is_generation": True,
                              "context_length": args.context_length, "vocab_size": ctx.vocab_size})


async def get_server_info(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    info: dict[str, Any] = msgspec.to_builtins(ctx.args)
    info.pop("api_key", None)  # never shown, whatever its source
    info.pop("api_key_file", None)
    info.update(ctx.server_info())
    stats = ctx.ingest.engine_stats  # the whole server's (the sum over replicas when --dp-size > 1)
    info["engine_stats"] = msgspec.to_builtins(stats) if stats is not None else None
    per_rank = ctx.ingest.engine_stats_by_rank
    info["engine_stats_per_dp_rank"] = [msgspec.to_builtins(per_rank[rank]) for rank in sorted(per_rank)]
    args = ctx.args
    if args.pd_prefill:  # each engine's role by its index (its EngineStats' dp_rank and "role")
        info["engine_roles"] = {str(rank): "prefill" if rank < args.pd_prefill else "decode"
                                for rank in range(args.pd_prefill + args.pd_decode)}
        router = ctx.ingest.stage_counters().get("router", {})  # engines that died ("decode.1": decode engine 1)
        info["engines_down"] = sorted(name.removeprefix("pd_down.") for name in router if name.startswith("pd_down."))
    configured_tokens = ctx.args.max_total_tokens or None  # until the engine reports its measured capacity
    info["max_total_num_tokens"] = stats.max_total_num_tokens if stats is not None else configured_tokens
    info["version"] = stagewise_version()
    info["num_requests_in_flight"] = len(ctx.ingest.streams)
    info["num_sequences_in_flight"] = ctx.ingest.num_sequences_in_flight
    return web.json_response(info)


# --------------------------------------------------------------------------- control


async def abort_request(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body: AbortRequestBody = await read_body(request, AbortRequestBody)
    rids = list(ctx.ingest.labels) if body.abort_all else [body.rid]
    if not body.abort_all and not body.rid:
        raise ApiError(400, "give rid or abort_all", param="rid")
    aborted = [rid for rid in rids if await ctx.ingest.abort_by_client(rid)]
    if not body.abort_all and not aborted:
        raise ApiError(404, f"no running request with rid {body.rid!r}", "not_found_error", "rid")
    return web.json_response({"aborted": aborted})


async def flush_cache(request: web.Request) -> web.Response:
    """Takes no parameters: a query parameter or a non-empty body is a 400 naming what was sent."""
    ctx: ServerContext = request.app[CTX]
    for name in request.query:
        raise ApiError(400, f"unsupported parameter {name}: /flush_cache takes none", param=name)
    if (await request.read()).strip():
        for name in await read_body(request, dict):
            raise ApiError(400, f"unsupported parameter {name}: /flush_cache takes none", param=name)
    if not await ctx.ingest.flush_cache():
        raise ApiError(503, "cache flush is not wired in this placement", "server_unavailable")
    return web.json_response({"status": "ok", "message": "cache flush requested"})


async def metrics(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    if ctx.metrics is None:
        raise ApiError(404, "metrics are off; start the server with --enable-metrics", "not_found_error")
    body, content_type = ctx.metrics.render()
    return web.Response(body=body, headers={"Content-Type": content_type})


def add_native_routes(app: web.Application) -> None:
    app.router.add_post("/generate", generate)
    app.router.add_get("/health", health)
    app.router.add_get("/health_generate", health_generate)
    app.router.add_get("/get_model_info", get_model_info)
    app.router.add_get("/get_server_info", get_server_info)
    app.router.add_get("/server_info", get_server_info)
    app.router.add_post("/abort_request", abort_request)
    app.router.add_post("/flush_cache", flush_cache)
    app.router.add_get("/flush_cache", flush_cache)  # SGLang serves both methods
    app.router.add_get("/ping", health)  # SageMaker's health check
    app.router.add_get("/metrics", metrics)
