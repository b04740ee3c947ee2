"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

Each handler: decode the body (protocol Structs), convert it to one or more
GenerateRequests (convert.py), submit them to the IngestStage, then either
collect whole results or stream SSE chunks. ``finally`` closes every stream:
a request still running when the handler ends (client gone, error) is aborted
in the engine, so its KV is freed.
"""
from __future__ import annotations

import time
from typing import Any

import msgspec
from aiohttp import web

from stages.ingest.context import CTX, ServerContext
from stages.ingest.convert import chat_request, check_vocabulary, completion_requests
from stages.ingest.errors import ApiError
from stages.ingest.media import chat_media
from stages.ingest.protocol import ChatCompletionRequest, CompletionRequest
from stages.ingest.responses import (SequenceResult, chat_logprobs, chat_response, completion_logprobs,
                                     completion_response, new_id, openai_finish_reason, usage,
                                     vllm_prompt_logprobs, with_reasoning, add_token_ids)
from stages.ingest.streaming import SseWriter, collect, merged, read_body


def model_card(ctx: ServerContext) -> dict[str, Any]:
    """The served model as OpenAI's Model object (plus SGLang's and vLLM's root and max_model_len)."""
    args = ctx.args
    return {"id": args.served_model_name, "object": "model", "created": ctx.started_s, "owned_by": "stagewise",
            "root": args.model_path, "max_model_len": args.context_length}


async def list_models(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    return web.json_response({"object": "list", "data": [model_card(ctx)]})


# --------------------------------------------------------------------------- /v1/completions


async def completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body: CompletionRequest = await read_body(request, CompletionRequest)
    rid = body.rid or new_id("cmpl")
    generate_requests = completion_requests(body, rid, time.time())
    check_vocabulary(generate_requests, ctx.vocab_size, "prompt")
    echo_prompts = [ctx.prompt_text(r) for r in generate_requests] if body.echo else []
    streams = await ctx.ingest.submit(rid, generate_requests)
    try:
        if body.stream:
            return await _stream_completion(ctx, request, body, rid, streams, echo_prompts)
        results = await collect(streams)
        response = completion_response(rid, ctx.args.served_model_name, results, len(generate_requests),
                                       ctx.token_text, body.logprobs is not None, echo_prompts,
                                       body.prompt_logprobs is not None)
        return web.json_response(add_token_ids(response, results, chat=False) if body.return_token_ids
                                 else response)
    finally:
        for stream in streams:
            await stream.close()


async def _stream_completion(ctx: ServerContext, request: web.Request, body: CompletionRequest, rid: str,
                             streams: list, echo_prompts: list[str]) -> web.StreamResponse:
    writer, n = SseWriter(request), body.n
    results: dict[int, SequenceResult] = {}
    try:
        async for position, output in merged(streams):
            index = position * n + output.index
            result = results.setdefault(index, SequenceResult(index=index))
            prefix = echo_prompts[position] if echo_prompts and not result.text and not result.token_ids else ""
            result.add(output)
            if not (output.text_delta or output.finish_reason or prefix or output.token_logprobs
                    or output.prompt_logprobs):
                continue
            choice: dict[str, Any] = {"index": index, "text": prefix + output.text_delta, "logprobs": None,
                                      "finish_reason": openai_finish_reason(output.finish_reason)}
            if body.logprobs is not None:
                choice["logprobs"] = completion_logprobs(ctx.token_text, output, output.token_ids_delta,
                                                         echo=body.echo)
            if body.return_token_ids:
                choice.update(_streamed_token_ids(output))
            await writer.send(_chunk(rid, "text_completion", ctx, [choice], _running_usage(body, results)))
        if body.stream_options is not None and body.stream_options.include_usage:
            ordered = [results[i] for i in sorted(results)]
            await writer.send(_chunk(rid, "text_completion", ctx, [], usage(ordered, len(streams))))
    except ApiError as error:
        if writer.response is None:
            raise
        await writer.send_error(error)
    return await writer.finish()


def _streamed_token_ids(output: Any) -> dict[str, Any]:
    """return_token_ids in a stream: the chunk's token ids, and the prompt's with a sequence's first chunk."""
    ids: dict[str, Any] = {"token_ids": list(output.token_ids_delta)}
    if output.prompt_token_ids:
        ids["prompt_token_ids"] = list(output.prompt_token_ids)
    return ids


def _running_usage(body: Any, results: dict[int, SequenceResult]) -> dict | None:
    """Usage so far, on every chunk, when stream_options asks for it with both include_usage and
    continuous_usage_stats (vLLM's rule: no usage at all without include_usage)."""
    options = body.stream_options
    if options is None or not (options.include_usage and options.continuous_usage_stats):
        return None
    return usage([results[i] for i in sorted(results)])


def _chunk(rid: str, kind: str, ctx: ServerContext, choices: list, usage_body: dict | None = None) -> dict:
    chunk = {"id": rid, "object": kind, "created": int(time.time()), "model": ctx.args.served_model_name,
             "choices": choices}
    if usage_body is not None:
        chunk["usage"] = usage_body
    return chunk


# --------------------------------------------------------------------------- /v1/chat/completions


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body: ChatCompletionRequest = await read_body(request, ChatCompletionRequest)
    rid = body.rid or new_id("chatcmpl")
    generate_request = chat_request(body, rid, time.time())
    if generate_request.image_urls:  # images and videos: fetched here, decoded by the multimodal stage
        media = await chat_media(body.messages, ctx.args.allowed_local_media_path)
        generate_request = msgspec.structs.replace(generate_request, media=media, image_urls=[])
    [stream] = await ctx.ingest.submit(rid, [generate_request])
    try:
        if body.stream:
            return await _stream_chat(ctx, request, body, rid, stream)
        results = await collect([stream])
        parse = ctx.output_parsing(body)
        messages = [parse.whole(result.text) for result in results]
        response = chat_response(rid, ctx.args.served_model_name, results, ctx.token_text, body.logprobs, messages)
        if body.prompt_logprobs is not None:  # vLLM: one prompt per chat request, so at the top level
            response["prompt_logprobs"] = vllm_prompt_logprobs(ctx.token_text, results[0].prompt_logprobs)
        if body.return_token_ids:
            add_token_ids(response, results, chat=True)
        return web.json_response(response)
    finally:
        await stream.close()


async def _stream_chat(ctx: ServerContext, request: web.Request, body: ChatCompletionRequest, rid: str,
                       stream: Any) -> web.StreamResponse:
    writer = SseWriter(request)
    results: dict[int, SequenceResult] = {}
    parsers: dict[int, Any] = {}
    try:
        async for _, output in merged([stream]):
            index = output.index
            if index not in results:
                results[index] = SequenceResult(index=index)
                parsers[index] = ctx.output_parsing(body).incremental()
                await writer.send(_chunk(rid, "chat.completion.chunk", ctx, [
                    {"index": index, "delta": with_reasoning({"role": "assistant", "content": ""}), "logprobs": None,
                     "finish_reason": None}]))
            results[index].add(output)
            await _send_chat_delta(ctx, writer, body, rid, output, parsers[index], results)
        if body.stream_options is not None and body.stream_options.include_usage:
            ordered = [results[i] for i in sorted(results)]
            await writer.send(_chunk(rid, "chat.completion.chunk", ctx, [], usage(ordered)))
    except ApiError as error:
        if writer.response is None:
            raise
        await writer.send_error(error)
    return await writer.finish()


async def _send_chat_delta(ctx: ServerContext, writer: SseWriter, body: ChatCompletionRequest, rid: str,
                           output: Any, parser: Any, results: dict[int, SequenceResult]) -> None:
    delta = parser.feed(output.text_delta)
    if output.finish_reason is not None:
        delta = parser.merge(delta, parser.finish())
    logprobs = chat_logprobs(ctx.token_text, output, output.token_ids_delta) if body.logprobs else None
    ids = _streamed_token_ids(output) if body.return_token_ids else {}
    if delta or (logprobs and logprobs["content"]) or ids.get("token_ids"):
        await writer.send(_chunk(rid, "chat.completion.chunk", ctx, [
            {"index": output.index, "delta": with_reasoning(delta), "logprobs": logprobs, "finish_reason": None,
             **ids}], _running_usage(body, results)))
    if output.finish_reason is not None:
        finish = openai_finish_reason(output.finish_reason)
        if parser.made_tool_calls and finish == "stop":
            finish = "tool_calls"
        await writer.send(_chunk(rid, "chat.completion.chunk", ctx, [
            {"index": output.index, "delta": with_reasoning({}), "logprobs": None, "finish_reason": finish,
             "matched_stop": output.finish_reason.matched}]))


def add_openai_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/chat/completions", chat_completions)
