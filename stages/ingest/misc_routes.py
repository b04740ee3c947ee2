"""The small endpoints SGLang's and vLLM's clients call besides generation.

* ``GET /v1/models/{model}``: one model card (OpenAI's ``models.retrieve``);
  404 with ``param: "model"`` for a name this server does not serve.
* ``POST /tokenize`` (and ``/v1/tokenize``): one body serves both peers'
  shapes. ``prompt`` is a string or (SGLang) a list of strings, encoded with
  special tokens unless ``add_special_tokens`` is false; ``messages``
  (vLLM) are rendered with the chat template as a chat request would be
  (``add_generation_prompt``, ``continue_final_message``, ``tools``,
  ``chat_template_kwargs``) and encoded without adding special tokens unless
  asked. The answer is ``{"tokens", "count", "max_model_len"}`` (lists for
  a list of prompts, as SGLang answers), plus vLLM's ``token_strs`` when
  ``return_token_strs`` is true. ``max_model_len`` is the server's context
  length.
* ``POST /detokenize`` (and ``/v1/detokenize``): ``tokens`` (ids, or SGLang's
  list of id lists) -> ``{"prompt", "text"}``: vLLM reads ``prompt``, SGLang
  ``text``; both carry the same string (a list for lists).
  ``skip_special_tokens`` defaults to false, so the text round-trips.
* ``GET /version``: ``{"version"}`` (vLLM's route; SGLang shows the same
  field in ``/get_server_info``).
* ``GET /get_load`` (SGLang): one entry per data-parallel replica,
  ``{"dp_rank", "num_reqs", "num_waiting_reqs", "num_tokens"}`` from its latest
  EngineStats (running plus waiting requests, waiting ones, KV tokens in use).
  ``GET /load`` (vLLM): ``{"server_load"}``, the client requests in flight.
* ``POST /invocations`` (SageMaker): a body with ``messages`` is a chat
  completion, one with ``prompt`` a completion (vLLM's rule; SGLang takes only
  chat); neither is a 400. ``GET /ping`` answers as ``/health`` does.

Every body is checked by its msgspec Struct: a wrong type, a field the
Struct does not declare or a token id outside the vocabulary is a 400 naming
the field. ``model`` is accepted and not checked, as on the generation routes
(one model is served).
"""
from __future__ import annotations

import time
from importlib import metadata
from typing import Any

import msgspec
from aiohttp import web

from stages.ingest.context import CTX, ServerContext
from stages.ingest.convert import chat_request
from stages.ingest.errors import ApiError, bad_request
from stages.ingest.openai_routes import chat_completions, completions, model_card
from stages.ingest.protocol import ChatCompletionRequest, ChatMessageIn
from stages.ingest.streaming import read_body

UNKNOWN_VERSION = "0+unknown"


def stagewise_version() -> str:
    """The installed package's version (a source tree that was never installed says so)."""
    try:
        return metadata.version("stagewise")
    except metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


class TokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /tokenize: SGLang's (prompt, a string or a list) or vLLM's (prompt or messages) body."""

    model: str = ""
    prompt: str | list[str] | None = None
    messages: list[ChatMessageIn] | None = None
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (templates add them)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /detokenize: ``tokens`` as ids or a list of id lists."""

    model: str = ""
    tokens: list[Any]  # checked by hand: msgspec takes one array type per union
    skip_special_tokens: bool = False


# --------------------------------------------------------------------------- /v1/models/{model}


async def retrieve_model(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    name = request.match_info["model"]
    if name != ctx.args.served_model_name:
        raise ApiError(404, f"the model {name!r} does not exist (this server serves "
                            f"{ctx.args.served_model_name!r})", "not_found_error", "model")
    return web.json_response(model_card(ctx))


# --------------------------------------------------------------------------- tokenize / detokenize


async def tokenize(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body: TokenizeBody = await read_body(request, TokenizeBody)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give exactly one of prompt and messages", "prompt")
    if body.messages is not None:
        ids = [_chat_ids(ctx, body)]
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        ids = [ctx.tokenizer.encode(text, add_special_tokens=special) for text in prompts]
    single = not isinstance(body.prompt, list)
    answer: dict[str, Any] = {"tokens": ids[0] if single else ids,
                              "count": len(ids[0]) if single else [len(i) for i in ids],
                              "max_model_len": ctx.args.context_length}
    if body.return_token_strs:
        strs = [ctx.tokenizer.convert_ids_to_tokens(i) for i in ids]
        answer["token_strs"] = strs[0] if single else strs
    return web.json_response(answer)


def _chat_ids(ctx: ServerContext, body: TokenizeBody) -> list[int]:
    """The ids a chat request with these messages would be prompted with."""
    chat = ChatCompletionRequest(messages=body.messages or [], tools=body.tools,
                                 chat_template_kwargs=body.chat_template_kwargs,
                                 add_generation_prompt=body.add_generation_prompt and not body.continue_final_message,
                                 continue_final_message=body.continue_final_message)
    generate = chat_request(chat, "tokenize", time.time())
    if "chat_template" in generate.chat_template_kwargs and not ctx.args.allow_request_chat_template:
        raise bad_request("a client chat template needs the server flag --allow-request-chat-template",
                          "chat_template_kwargs.chat_template")
    if not getattr(ctx.tokenizer, "chat_template", None):
        raise bad_request("this model has no chat template; tokenize a prompt instead", "messages")
    try:
        text = ctx.tokenizer.apply_chat_template(
            [_turn(message) for message in generate.messages or []], tools=generate.tools, tokenize=False,
            add_generation_prompt=generate.add_generation_prompt,
            continue_final_message=body.continue_final_message, **generate.chat_template_kwargs)
    except Exception as error:  # a template's raise_exception(...), bad kwargs
        raise bad_request(f"chat template failed: {error}", "messages") from error
    return ctx.tokenizer.encode(text, add_special_tokens=bool(body.add_special_tokens))


def _turn(message: Any) -> dict[str, Any]:
    """A ChatMessage as chat templates read it (the tokenize stage renders turns the same way)."""
    turn = {k: v for k, v in msgspec.structs.asdict(message).items() if v is not None}
    turn.setdefault("content", "")
    if message.tool_calls:
        turn["tool_calls"] = [{"id": call.id, "type": call.type, "function": {
            "name": call.function.name, "arguments": _json_or_text(call.function.arguments)}}
            for call in message.tool_calls]
    return turn


def _json_or_text(text: str) -> Any:
    try:
        return msgspec.json.decode(text)
    except msgspec.DecodeError:
        return text


async def detokenize(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body: DetokenizeBody = await read_body(request, DetokenizeBody)
    nested = bool(body.tokens) and isinstance(body.tokens[0], list)
    lists: list[list[Any]] = body.tokens if nested else [body.tokens]
    for ids in lists:
        _check_ids(ids, ctx.vocab_size)
    texts = [ctx.tokenizer.decode(ids, skip_special_tokens=body.skip_special_tokens) for ids in lists]
    text: str | list[str] = texts if nested else texts[0]
    return web.json_response({"prompt": text, "text": text})


def _check_ids(ids: Any, vocab_size: int) -> None:
    """A list of ids in the vocabulary (a 400 naming ``tokens`` otherwise)."""
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad_request("tokens must be a list of token ids or a list of such lists", "tokens")
    for position, token_id in enumerate(ids):
        if not 0 <= token_id < vocab_size:
            raise bad_request(f"tokens: {token_id} (at {position}) is outside the vocabulary [0, {vocab_size})",
                              "tokens")


# --------------------------------------------------------------------------- version, load


async def version(request: web.Request) -> web.Response:
    return web.json_response({"version": stagewise_version()})


async def get_load(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    loads = []
    for rank in range(ctx.args.dp_size):
        stats = ctx.ingest.engine_stats_by_rank.get(rank)
        if stats is None:  # no snapshot from this replica yet
            loads.append({"dp_rank": rank, "num_reqs": 0, "num_waiting_reqs": 0, "num_tokens": 0})
            continue
        loads.append({"dp_rank": rank, "num_reqs": stats.num_running_reqs + stats.num_queue_reqs,
                      "num_waiting_reqs": stats.num_queue_reqs,
                      "num_tokens": round(stats.token_usage * stats.max_total_num_tokens)})
    return web.json_response(loads)


async def load(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    return web.json_response({"server_load": len(ctx.ingest.labels)})


# --------------------------------------------------------------------------- SageMaker


async def invocations(request: web.Request) -> web.StreamResponse:
    body = await read_body(request, dict)
    if "messages" in body:
        return await chat_completions(request)
    if "prompt" in body:
        return await completions(request)
    raise bad_request("an invocation body needs messages (a chat completion) or prompt (a completion)", "messages")


def add_misc_routes(app: web.Application) -> None:
    app.router.add_get("/v1/models/{model:.+}", retrieve_model)
    for prefix in ("", "/v1"):
        app.router.add_post(prefix + "/tokenize", tokenize)
        app.router.add_post(prefix + "/detokenize", detokenize)
    app.router.add_get("/version", version)
    app.router.add_get("/get_load", get_load)
    app.router.add_get("/load", load)
    app.router.add_post("/invocations", invocations)

