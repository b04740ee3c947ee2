"""Ollama's API, so the ``ollama`` CLI and Python library (and apps built on them) can use this server.

Routes (Ollama's shapes and field names):

* ``GET /api/tags``: the served model, ``{"models": [{"name", "model",
  "modified_at", "size", "digest", "details"}]}``; ``GET /api/version``:
  ``{"version"}``; ``GET|HEAD /``: ``Ollama is running`` (the CLI's probe).
* ``POST /api/show``: ``details``, ``model_info`` (architecture, context
  length), ``parameters``, ``template`` (the chat template) and
  ``capabilities`` of the served model; another name is a 404.
* ``POST /api/generate``: ``prompt`` (+ ``system``), rendered with the chat
  template as one user turn as Ollama does, or sent as is with ``raw: true``
  (also when the model has no chat template). An empty prompt only "loads"
  the model: one ``done`` answer with ``done_reason: "load"``.
* ``POST /api/chat``: ``messages`` (``system``/``user``/``assistant``/``tool``
  turns; assistant ``tool_calls`` with object arguments) -> one
  ``message`` from the assistant.

``stream`` defaults to true, as Ollama's does: the answer is NDJSON
(``application/x-ndjson``), one object per line: text deltas with ``done:
false``, then one ``done: true`` object with ``done_reason`` (``stop`` or
``length``) and the counters ``prompt_eval_count``, ``eval_count`` and the
durations in nanoseconds (``total_duration``, ``load_duration`` (0, the model
is always loaded), ``prompt_eval_duration`` (to the first token) and
``eval_duration`` (first to last token)). With ``stream: false`` that final
object also carries the whole text.

``options`` maps onto SamplingParams: ``temperature``, ``top_p``, ``top_k``,
``min_p``, ``seed``, ``stop``, ``num_predict`` (-1 or -2: up to the context),
``presence_penalty``, ``frequency_penalty`` and ``repeat_penalty``
(repetition penalty). ``format`` is ``"json"`` (any JSON object) or a JSON
schema, enforced by the grammar stage. ``images`` (base64, on /api/generate
and on /api/chat messages) go before the turn's text for a vision-language
model, and are a 400 naming them for a text model. Any other option, and
``suffix``, ``template``, ``context``, ``think``, ``logprobs``, non-empty
``tools``, is a 400 naming it, and so is a body or message key these
Structs do not declare. ``keep_alive`` (how long the model stays loaded
after the request) is honoured as Ollama reads it: this server keeps its one
model loaded for as long as it runs, so every positive duration and every
negative one ("forever") is met; ``0`` asks for an unload now, which this
server cannot do, so it is a 400 naming ``keep_alive`` (that is what
``ollama stop`` sends). The model name is not checked by generate/chat, as
on the OpenAI routes (one model is served).

Errors are Ollama's body, ``{"error": "<message>"}`` with the HTTP status (a
failure after the stream started is one last ``{"error"}`` line), which the
ollama client raises as ``ResponseError``.
"""
from __future__ import annotations

import functools
import json
import re
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Awaitable, Callable, Literal

import msgspec
from aiohttp import web

from pipeline.messages import GenerateRequest, MediaInput
from stages.ingest.context import CTX, ServerContext
from stages.ingest.convert import chat_message, make_sampling
from stages.ingest.errors import ApiError, bad_request
from stages.ingest.media import base64_media
from stages.ingest.misc_routes import stagewise_version
from stages.ingest.protocol import ChatMessageIn, ContentPart, FunctionCallIn, ToolCallIn
from stages.ingest.responses import SequenceResult
from stages.ingest.streaming import read_body

NDJSON_TYPE = "application/x-ndjson"
_NUMBER = re.compile(r"-?\d+(\.\d*)?")  # keep_alive in seconds
_GO_DURATION = re.compile(r"-?(\d+(\.\d*)?(ns|us|µs|ms|s|m|h))+")  # keep_alive as Go writes durations
OPTION_NAMES = {  # Ollama option -> SamplingParams field
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p", "seed": "seed",
    "stop": "stop", "num_predict": "max_new_tokens", "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty", "repeat_penalty": "repetition_penalty",
}
ERROR_NAMES = {field: f"options.{name}" for name, field in OPTION_NAMES.items()}


class OllamaOptions(msgspec.Struct, kw_only=True):
    """The ``options`` we serve, typed (unknown names are refused before this)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    stop: list[str] | None = None
    num_predict: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repeat_penalty: float | None = None


class OllamaToolCall(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    function: FunctionCallIn


class OllamaMessage(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[OllamaToolCall] | None = None
    tool_name: str | None = None
    thinking: str | None = None


class OllamaBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by /api/generate and /api/chat (and the ones refused when given)."""

    model: str
    stream: bool = True
    format: str | dict[str, Any] | None = None
    options: dict[str, Any] | None = None
    keep_alive: float | str | None = None
    think: bool | str | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None


class OllamaGenerateBody(OllamaBody, kw_only=True):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None
    images: list[str] | None = None


class OllamaChatBody(OllamaBody, kw_only=True):
    messages: list[OllamaMessage] = []
    tools: list[dict[str, Any]] | None = None


class OllamaShowBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ollama_errors(handler: Handler) -> Handler:
    """Errors in Ollama's shape, ``{"error": "<message>"}``, keeping the status."""

    @functools.wraps(handler)
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as error:
            return web.json_response({"error": error.message}, status=error.status)

    return wrapped


def timestamp() -> str:
    """Ollama's created_at: UTC, RFC 3339 with nanosecond-free fraction."""
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- request -> GenerateRequest


def check_unserved(body: OllamaBody, extra: dict[str, Any]) -> None:
    """A field we do not serve, when given, is a 400 naming it."""
    check_keep_alive(body.keep_alive)
    given = {"think": body.think, "logprobs": body.logprobs or None, "top_logprobs": body.top_logprobs, **extra}
    for name, value in given.items():
        if value not in (None, False, "", [], {}):
            raise bad_request(f"{name} is not supported by this server", name)


def check_keep_alive(keep_alive: float | str | None) -> None:
    """The model is always loaded, which meets any keep_alive except 0 (unload now): that one is a 400."""
    if keep_alive is None:
        return
    text = str(keep_alive).strip()
    if not (_NUMBER.fullmatch(text) or _GO_DURATION.fullmatch(text)):
        raise bad_request(f"keep_alive {keep_alive!r} is not a duration (e.g. 300, \"5m\", \"1h30m\", -1)",
                          "keep_alive")
    if all(float(number) == 0 for number in re.findall(r"\d+(?:\.\d*)?", text)):
        raise bad_request("keep_alive 0 (unload the model now) is not supported: this server keeps its model "
                          "loaded while it runs", "keep_alive")


def sampling_params(body: OllamaBody) -> dict[str, Any]:
    """Ollama's options and format as SamplingParams keyword arguments."""
    options = dict(body.options or {})
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise bad_request(f"option {unknown[0]!r} is not supported (served: {sorted(OPTION_NAMES)})",
                          f"options.{unknown[0]}")
    try:
        typed = msgspec.convert(options, OllamaOptions)
    except msgspec.ValidationError as error:
        raise bad_request(f"invalid options: {error}", "options") from error
    params: dict[str, Any] = {}
    for name, field in OPTION_NAMES.items():
        value = getattr(typed, name)
        if value is not None:
            params[field] = value
    if params.get("max_new_tokens") is not None and params["max_new_tokens"] < 0:
        params["max_new_tokens"] = None  # -1 (forever) and -2 (fill the context): up to the context length
    if params.get("top_k") == 0:
        params["top_k"] = -1  # 0 means "off" in Ollama
    params.setdefault("max_new_tokens", None)
    params.update(_format_grammar(body.format))
    return params


def _format_grammar(format_: str | dict[str, Any] | None) -> dict[str, Any]:
    if format_ in (None, ""):
        return {}
    if format_ == "json":
        return {"json_schema": json.dumps({"type": "object"})}
    if isinstance(format_, dict):
        return {"json_schema": json.dumps(format_)}
    raise bad_request('format must be "json" or a JSON schema object', "format")


def generate_request(ctx: ServerContext, body: OllamaGenerateBody, rid: str) -> GenerateRequest:
    check_unserved(body, {"suffix": body.suffix, "template": body.template, "context": body.context})
    images = _images(ctx, [("images", body.images)])
    sampling = make_sampling(sampling_params(body), ERROR_NAMES)
    if body.raw or not getattr(ctx.tokenizer, "chat_template", None):  # raw: the prompt holds the placeholders
        text = f"{body.system}\n\n{body.prompt}" if body.system else body.prompt
        return GenerateRequest(rid=rid, text=text, sampling=sampling, stream=body.stream,
                               arrival_time_s=time.time(), media=images)
    turns = ([OllamaMessage(role="system", content=body.system)] if body.system else []) + [
        OllamaMessage(role="user", content=body.prompt, images=body.images)]
    return _chat_generate_request(turns, sampling, body.stream, rid, images)


def chat_generate_request(body: OllamaChatBody, rid: str, ctx: ServerContext | None = None) -> GenerateRequest:
    check_unserved(body, {"tools": body.tools})
    if not body.messages:
        raise bad_request("messages must not be empty", "messages")
    images = _images(ctx, [(f"messages[{i}].images", m.images) for i, m in enumerate(body.messages)])
    sampling = make_sampling(sampling_params(body), ERROR_NAMES)
    return _chat_generate_request(body.messages, sampling, body.stream, rid, images)


def _images(ctx: ServerContext | None, lists: list[tuple[str, list[str] | None]]) -> list[MediaInput]:
    """Ollama's base64 ``images`` lists, in prompt order; a 400 naming the field for a text model."""
    given = [(name, images) for name, images in lists if images]
    if given and not accepts_images(ctx):
        raise bad_request(f"{given[0][0]}: images are not supported by this model (it has no vision encoder)",
                          given[0][0])
    return [base64_media(image, f"{name}[{k}]") for name, images in given for k, image in enumerate(images)]


def accepts_images(ctx: ServerContext | None) -> bool:
    """A vision-language model: its config.json has a vision_config."""
    if ctx is None:
        return False
    try:
        return isinstance(json.loads((ctx.args.model_dir / "config.json").read_text()).get("vision_config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def _chat_generate_request(messages: list[OllamaMessage], sampling: Any, stream: bool, rid: str,
                           images: list[MediaInput]) -> GenerateRequest:
    converted = [chat_message(_openai_message(m, i), i)[0] for i, m in enumerate(messages)]
    return GenerateRequest(rid=rid, messages=converted, sampling=sampling, stream=stream, arrival_time_s=time.time(),
                           media=images)


def _openai_message(message: OllamaMessage, position: int) -> ChatMessageIn:
    """An Ollama turn as an OpenAI one; its images go before its text, one image part each."""
    calls = [ToolCallIn(id=f"call_{position}_{i}", function=call.function)
             for i, call in enumerate(message.tool_calls or [])]
    tool_call_id = (message.tool_name or "tool") if message.role == "tool" else None
    content: str | list[ContentPart] = message.content
    if message.images:
        content = [ContentPart(type="image_url", image_url={"url": f"images[{k}]"}) for k in range(len(message.images))]
        content.append(ContentPart(type="text", text=message.content))
    return ChatMessageIn(role=message.role, content=content, tool_calls=calls or None,
                         tool_call_id=tool_call_id, name=message.tool_name, reasoning_content=message.thinking)


# --------------------------------------------------------------------------- answers


class Timing:
    """Nanosecond clocks of one request: start, first token, end."""

    def __init__(self) -> None:
        self.start_ns = time.perf_counter_ns()
        self.first_ns: int | None = None

    def saw_tokens(self) -> None:
        if self.first_ns is None:
            self.first_ns = time.perf_counter_ns()

    def final_fields(self, result: SequenceResult) -> dict[str, Any]:
        end_ns = time.perf_counter_ns()
        first_ns = self.first_ns if self.first_ns is not None else end_ns
        finish = result.finish_reason.type if result.finish_reason is not None else "stop"
        return {"done": True, "done_reason": finish, "total_duration": end_ns - self.start_ns, "load_duration": 0,
                "prompt_eval_count": result.prompt_tokens, "prompt_eval_duration": first_ns - self.start_ns,
                "eval_count": result.completion_tokens, "eval_duration": end_ns - first_ns}


class NdjsonWriter:
    """One NDJSON response, started with the first line (so an early error is still a plain HTTP error)."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def send(self, payload: dict[str, Any]) -> None:
        if self.response is None:
            self.response = web.StreamResponse(headers={"Content-Type": NDJSON_TYPE, "Cache-Control": "no-cache"})
            await self.response.prepare(self.request)
        await self.response.write(msgspec.json.encode(payload) + b"\n")

    async def finish(self) -> web.StreamResponse:
        assert self.response is not None, "finish() after at least one line"
        await self.response.write_eof()
        return self.response


async def run_request(request: web.Request, ctx: ServerContext, generate: GenerateRequest,
                      shape: Callable[[str], dict[str, Any]]) -> web.StreamResponse:
    """Submit ``generate`` and answer whole or as NDJSON; ``shape(text)`` builds a line's payload."""
    timing = Timing()
    [stream] = await ctx.ingest.submit(generate.rid, [generate])
    try:
        if generate.stream:
            return await _stream(request, stream, timing, shape)
        result = SequenceResult(index=0)
        async for output in stream:
            result.add(output)
            if output.token_ids_delta:
                timing.saw_tokens()
        return web.json_response({**shape(result.text), **timing.final_fields(result)})
    finally:
        await stream.close()


async def _stream(request: web.Request, stream: Any, timing: Timing,
                  shape: Callable[[str], dict[str, Any]]) -> web.StreamResponse:
    writer, result = NdjsonWriter(request), SequenceResult(index=0)
    try:
        async for output in stream:
            result.add(output)
            if output.token_ids_delta:
                timing.saw_tokens()
            if output.text_delta:
                await writer.send({**shape(output.text_delta), "done": False})
        await writer.send({**shape(""), **timing.final_fields(result)})
    except ApiError as error:
        if writer.response is None:
            raise
        await writer.send({"error": error.message})
    return await writer.finish()


# --------------------------------------------------------------------------- routes


@ollama_errors
async def api_generate(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body: OllamaGenerateBody = await read_body(request, OllamaGenerateBody)
    if not body.prompt and not body.system:  # Ollama's "load the model" call
        check_unserved(body, {"suffix": body.suffix, "template": body.template, "context": body.context})
        _images(ctx, [("images", body.images)])
        sampling_params(body)  # options and format are checked even when nothing is generated
        loaded = {"model": body.model, "created_at": timestamp(), "response": "", "done": True,
                  "done_reason": "load"}
        return web.json_response(loaded) if not body.stream else await _one_line(request, loaded)
    generate = generate_request(ctx, body, f"ollama-{uuid.uuid4().hex}")
    return await run_request(request, ctx, generate,
                             lambda text: {"model": body.model, "created_at": timestamp(), "response": text})


async def _one_line(request: web.Request, payload: dict[str, Any]) -> web.StreamResponse:
    writer = NdjsonWriter(request)
    await writer.send(payload)
    return await writer.finish()


@ollama_errors
async def api_chat(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    body: OllamaChatBody = await read_body(request, OllamaChatBody)
    generate = chat_generate_request(body, f"ollama-{uuid.uuid4().hex}", ctx)
    return await run_request(request, ctx, generate, lambda text: {
        "model": body.model, "created_at": timestamp(), "message": {"role": "assistant", "content": text}})


def model_family(ctx: ServerContext) -> str:
    """The architecture family (config.json's model_type, e.g. "llama"), or the served name."""
    try:
        config = json.loads((ctx.args.model_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return str(config.get("model_type") or ctx.args.served_model_name)


def model_details(ctx: ServerContext) -> dict[str, Any]:
    family = model_family(ctx)
    return {"parent_model": "", "format": "safetensors", "family": family, "families": [family],
            "parameter_size": "", "quantization_level": ctx.args.dtype}


@ollama_errors
async def api_tags(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    name = ctx.args.served_model_name
    modified = datetime.fromtimestamp(ctx.started_s, timezone.utc).isoformat().replace("+00:00", "Z")
    return web.json_response({"models": [{"name": name, "model": name, "modified_at": modified, "size": 0,
                                          "digest": "", "details": model_details(ctx)}]})


@ollama_errors
async def api_show(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    body: OllamaShowBody = await read_body(request, OllamaShowBody)
    name = ctx.args.served_model_name
    if body.model not in (name, f"{name}:latest"):
        raise ApiError(404, f"model '{body.model}' not found (this server serves '{name}')", "not_found_error",
                       "model")
    details = model_details(ctx)
    template = getattr(ctx.tokenizer, "chat_template", None) or ""
    capabilities = ["completion"] + (["chat"] if template else [])
    return web.json_response({
        "modelfile": f"FROM {ctx.args.model_path}\n", "parameters": f"num_ctx {ctx.args.context_length}",
        "template": template if isinstance(template, str) else "", "details": details,
        "model_info": {"general.architecture": details["family"], "general.name": name,
                       f"{details['family']}.context_length": ctx.args.context_length},
        "capabilities": capabilities, "modified_at": timestamp()})


async def api_version(request: web.Request) -> web.Response:
    return web.json_response({"version": stagewise_version()})


async def ollama_root(request: web.Request) -> web.Response:
    return web.Response(text="Ollama is running")


def add_ollama_routes(app: web.Application) -> None:
    app.router.add_get("/api/tags", api_tags)
    app.router.add_get("/api/version", api_version)
    app.router.add_post("/api/show", api_show)
    app.router.add_post("/api/generate", api_generate)
    app.router.add_post("/api/chat", api_chat)
    app.router.add_get("/", ollama_root)  # also answers HEAD
