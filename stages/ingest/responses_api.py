"""The OpenAI Responses API: ``/v1/responses`` (create, retrieve, delete, cancel).

A Responses request is a chat request in other clothes, so it is served by
turning it into a ``ChatCompletionRequest`` (``instructions`` -> a system
message, ``input`` as a string or as a list of items -> messages, flat
function tools -> chat tools, ``text.format`` -> ``response_format``) and
running it through the same conversion (``convert.chat_request``), the same
submit/collect path and the same output parsing (reasoning and tool-call
parsers) as ``/v1/chat/completions``. The model's output becomes output items:
a ``reasoning`` item (when a reasoning parser split one off), a ``message``
item with one ``output_text`` part, and one ``function_call`` item per tool call.

Streaming (``stream: true``) sends typed server-sent events
(``event: <type>`` + ``data: {...}``), each with a ``sequence_number``:
``response.created``, ``response.in_progress``, then per item
``response.output_item.added``, ``response.content_part.added``,
``response.output_text.delta`` (or ``response.reasoning_text.delta``, or
``response.function_call_arguments.delta``), the matching ``.done`` events,
``response.output_item.done``, and last ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it short). As for chat,
the stream only starts once the first output is there, so an error found by
the tokenize stage is still a plain 400.

``store`` (default true) keeps the response and its conversation in a
bounded in-memory store (the ``STORE_SIZE`` most recent): ``GET
/v1/responses/{id}`` returns it and ``previous_response_id`` continues the
conversation (the earlier input and output, never its ``instructions``).
Fields we do not serve (``background``, ``reasoning``, ``include``,
``truncation: auto``, ...) are a 400 naming them, and so is a field the
request Struct does not declare. Inside ``input``, ``text`` and ``tools``
each item's keys are checked the same way (``INPUT_KEYS``, ``PART_KEYS``,
``TOOL_KEYS``): a key outside those lists is a 400 naming its path. The keys
a client sends back with earlier output items but that have no meaning for
the next turn (``ACCEPTED_UNUSED``: an item's ``id`` and ``status``, an
output part's ``annotations`` and ``logprobs``, an image's ``detail``) are
accepted and not used, by design.
"""
from __future__ import annotations

import collections
import time
import uuid
from typing import Any

import msgspec
from aiohttp import web

from stages.ingest.context import CTX, ServerContext
from stages.ingest.convert import chat_request
from stages.ingest.errors import ApiError, bad_request
from stages.ingest.protocol import ChatCompletionRequest, ChatMessageIn, ResponseFormat
from stages.ingest.responses import SequenceResult, new_id
from stages.ingest.streaming import SseWriter, collect, merged, read_body

STORE_SIZE = 1024  # stored responses kept (oldest dropped first)


class ResponsesRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/responses (OpenAI names; top_k, min_p, repetition_penalty and seed as SGLang extensions)."""

    input: str | list[Any]
    model: str = ""
    instructions: str | None = None
    previous_response_id: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = True
    text: dict[str, Any] | None = None
    stream: bool = False
    store: bool = True
    metadata: dict[str, str] | None = None
    user: str | None = None
    service_tier: str | None = None
    truncation: str | None = None
    background: bool | None = None
    reasoning: dict[str, Any] | None = None
    include: list[str] | None = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None
    conversation: Any = None
    prompt: Any = None
    stream_options: dict[str, Any] | None = None


class StoredResponse(msgspec.Struct, kw_only=True):
    """What a stored response keeps: its body (for retrieve) and its conversation (for previous_response_id)."""

    body: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """The bounded store of finished responses, newest last."""

    def __init__(self, size: int = STORE_SIZE) -> None:
        self.size = size
        self.items: collections.OrderedDict[str, StoredResponse] = collections.OrderedDict()

    def put(self, response_id: str, stored: StoredResponse) -> None:
        self.items[response_id] = stored
        self.items.move_to_end(response_id)
        while len(self.items) > self.size:
            self.items.popitem(last=False)

    def get(self, response_id: str) -> StoredResponse:
        if response_id not in self.items:
            raise ApiError(404, f"response {response_id!r} not found", "not_found_error", "response_id")
        return self.items[response_id]


STORE = web.AppKey("responses_store", ResponseStore)


# --------------------------------------------------------------------------- request -> chat request


def check_served(body: ResponsesRequest) -> None:
    """A field we do not serve is a 400 naming it, never silently ignored."""
    refused = {"background": bool(body.background), "reasoning": bool(body.reasoning),
               "include": bool(body.include), "top_logprobs": body.top_logprobs is not None,
               "max_tool_calls": body.max_tool_calls is not None, "conversation": body.conversation is not None,
               "prompt": body.prompt is not None, "stream_options": body.stream_options is not None,
               "truncation": body.truncation not in (None, "disabled"),
               "service_tier": body.service_tier not in (None, "auto", "default")}
    for name, is_set in refused.items():
        if is_set:
            raise bad_request(f"{name} is not supported by this server", name)


# Keys read from each kind of input item / content part / tool, and the ones accepted but unused by design
# (what a client sends back with earlier output: ids, statuses, annotations and logprobs of output text).
INPUT_KEYS = {"message": {"type", "role", "content"}, "function_call": {"type", "call_id", "name", "arguments"},
              "function_call_output": {"type", "call_id", "output"},
              "reasoning": {"type", "summary", "content", "encrypted_content"}}  # reasoning: not sent back
PART_KEYS = {"input_text": {"type", "text"}, "output_text": {"type", "text"}, "text": {"type", "text"},
             "refusal": {"type", "refusal"}, "input_image": {"type", "image_url"}}
TOOL_KEYS = {"type", "name", "description", "parameters", "strict"}  # the chat tool's function keys
ACCEPTED_UNUSED = {
    "id": "an earlier item's id: the conversation is rebuilt from its content",
    "status": "an earlier item's status: only finished items can be sent back",
    "annotations": "citations attached to earlier output text; the text itself is used",
    "logprobs": "logprobs of earlier output text; the text itself is used",
    "detail": "image detail level: images are always read at the resolution the model's processor picks",
}
# where each accepted-unused key may appear: any input item, an output_text part, an input_image part
UNUSED_BY_KIND = {"item": {"id", "status"}, "output_text": {"annotations", "logprobs"}, "input_image": {"detail"}}


def check_keys(item: dict[str, Any], known: set[str], param: str, unused: set[str] | frozenset[str] = frozenset()
               ) -> None:
    """A key that is neither read nor accepted-unused here is a 400 naming it, never dropped unread."""
    for key in item:
        if key not in known and key not in unused:
            raise bad_request(f"unsupported parameter {param}.{key}: this server does not serve it",
                              f"{param}.{key}")


def _field(item: dict[str, Any], name: str, param: str, kind: type = str) -> Any:
    value = item.get(name)
    if not isinstance(value, kind):
        raise bad_request(f"{param}.{name} must be a {kind.__name__}", f"{param}.{name}")
    return value


def _content(content: Any, param: str) -> str | list[dict[str, Any]]:
    """Responses content (a string or input_text/output_text/input_image parts) -> chat content."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise bad_request(f"{param}.content must be a string or a list of content parts", f"{param}.content")
    parts = []
    for k, part in enumerate(content):
        where = f"{param}.content[{k}]"
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in PART_KEYS:
            check_keys(part, PART_KEYS[kind], where, UNUSED_BY_KIND.get(kind, set()))
        if kind in ("input_text", "output_text", "text", "refusal"):
            parts.append({"type": "text", "text": _field(part, "refusal" if kind == "refusal" else "text", where)})
        elif kind == "input_image":
            parts.append({"type": "image_url", "image_url": {"url": _field(part, "image_url", where)}})
        else:
            raise bad_request(f"unsupported content part type {kind!r}", f"{where}.type")
    return parts


def _tool_output(output: Any, param: str) -> str:
    if isinstance(output, str):
        return output
    text = _content(output, param.rpartition(".")[0] or param) if isinstance(output, list) else None
    if not isinstance(text, list):
        raise bad_request(f"{param} must be a string or a list of content parts", param)
    return "".join(part.get("text", "") for part in text)


def input_messages(input_: str | list[Any]) -> list[dict[str, Any]]:
    """``input`` -> chat message dicts; function calls join the assistant message before them."""
    if isinstance(input_, str):
        return [{"role": "user", "content": input_}]
    messages: list[dict[str, Any]] = []
    for k, item in enumerate(input_):
        param = f"input[{k}]"
        if not isinstance(item, dict):
            raise bad_request(f"{param} must be an object", param)
        kind = item.get("type", "message")
        if kind in INPUT_KEYS:
            check_keys(item, INPUT_KEYS[kind], param, UNUSED_BY_KIND["item"])
        if kind == "message":
            role = _field(item, "role", param)
            messages.append({"role": role, "content": _content(item.get("content"), param)})
        elif kind == "function_call":
            call = {"id": _field(item, "call_id", param), "type": "function", "function": {
                "name": _field(item, "name", param), "arguments": _field(item, "arguments", param)}}
            if not messages or messages[-1]["role"] != "assistant":
                messages.append({"role": "assistant", "content": None})
            messages[-1].setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            messages.append({"role": "tool", "tool_call_id": _field(item, "call_id", param),
                             "content": _tool_output(item.get("output"), f"{param}.output")})
        elif kind != "reasoning":  # earlier reasoning is not sent back to the model
            raise bad_request(f"unsupported input item type {kind!r}", f"{param}.type")
    return messages


def chat_tools(tools: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Responses' flat function tools -> chat tools ``{"type": "function", "function": {...}}``."""
    if tools is None:
        return None
    converted = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise bad_request(f"only function tools are supported (got {kind!r})", f"tools[{k}].type")
        check_keys(tool, TOOL_KEYS, f"tools[{k}]")
        function = {key: tool[key] for key in TOOL_KEYS - {"type"} if key in tool}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise bad_request('tool_choice must be "auto", "none", "required" or {"type": "function", "name": ...}',
                          "tool_choice")
    return {"type": "function", "function": {"name": choice["name"]}}


def response_format(text: dict[str, Any] | None) -> ResponseFormat | None:
    """``text.format`` (text, json_object, or json_schema with name/schema at the top) -> response_format."""
    check_keys(text or {}, {"format"}, "text")
    format_ = (text or {}).get("format")
    if format_ is None:
        return None
    try:
        if isinstance(format_, dict) and format_.get("type") == "json_schema":
            inner = {key: format_[key] for key in ("name", "description", "schema", "strict") if key in format_}
            return msgspec.convert({"type": "json_schema", "json_schema": inner}, ResponseFormat)
        return msgspec.convert(format_, ResponseFormat)
    except msgspec.ValidationError as error:
        raise bad_request(f"invalid text.format: {error}", "text.format") from error


def chat_body(body: ResponsesRequest, history: list[dict[str, Any]]) -> tuple[ChatCompletionRequest, list[dict]]:
    """The chat request this response runs as, and its conversation (history + input, no instructions)."""
    conversation = history + input_messages(body.input)
    system = [{"role": "system", "content": body.instructions}] if body.instructions else []
    try:
        messages = [msgspec.convert(m, ChatMessageIn) for m in system + conversation]
    except msgspec.ValidationError as error:
        raise bad_request(f"invalid input: {error}", "input") from error
    chat = ChatCompletionRequest(
        messages=messages, model=body.model, max_completion_tokens=body.max_output_tokens,
        temperature=body.temperature, top_p=body.top_p, top_k=body.top_k, min_p=body.min_p,
        repetition_penalty=body.repetition_penalty, seed=body.seed, tools=chat_tools(body.tools),
        tool_choice=chat_tool_choice(body.tool_choice), parallel_tool_calls=body.parallel_tool_calls,
        response_format=response_format(body.text), stream=body.stream, user=body.user)
    return chat, conversation


def _renamed(error: ApiError) -> ApiError:
    """Chat's names for the fields Responses names differently."""
    if error.param in ("max_tokens", "max_completion_tokens"):
        error.param = "max_output_tokens"
        error.message = error.message.replace("max_tokens", "max_output_tokens")
    elif error.param and error.param.startswith("messages"):
        error.param = "input"
    return error


# --------------------------------------------------------------------------- output items and bodies


def message_item(text: str, status: str, item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_id("msg"), "type": "message", "role": "assistant", "status": status,
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def reasoning_item(text: str, item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_id("rs"), "type": "reasoning", "summary": [], "status": "completed",
            "content": [{"type": "reasoning_text", "text": text}]}


def function_call_item(call_id: str, name: str, arguments: str, status: str,
                       item_id: str | None = None) -> dict[str, Any]:
    return {"id": item_id or new_id("fc"), "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def output_items(message: dict[str, Any], status: str) -> list[dict[str, Any]]:
    """A parsed chat message (content, reasoning_content, tool_calls) -> Responses output items."""
    items = [reasoning_item(message["reasoning_content"])] if message.get("reasoning_content") else []
    calls = message.get("tool_calls") or []
    if message.get("content") or not calls:
        items.append(message_item(message.get("content") or "", status))
    items += [function_call_item(c["id"], c["function"]["name"], c["function"]["arguments"], status)
              for c in calls]
    return items


def item_status(result: SequenceResult) -> str:
    return "incomplete" if result.finish_reason is not None and result.finish_reason.type == "length" else "completed"


def response_usage(ctx: ServerContext, result: SequenceResult, output: list[dict[str, Any]]) -> dict[str, Any]:
    reasoning = "".join(part["text"] for item in output if item["type"] == "reasoning" for part in item["content"])
    reasoning_tokens = len(ctx.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
    return {"input_tokens": result.prompt_tokens,
            "input_tokens_details": {"cached_tokens": result.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": result.completion_tokens, "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
            "total_tokens": result.prompt_tokens + result.completion_tokens}


def response_body(ctx: ServerContext, body: ResponsesRequest, response_id: str, created_at: int, status: str,
                  output: list[dict[str, Any]], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "completed_at": int(time.time()) if status in ("completed", "incomplete") else None,
        "model": ctx.args.served_model_name, "output": output, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {}, "parallel_tool_calls": body.parallel_tool_calls,
        "previous_response_id": body.previous_response_id, "temperature": body.temperature,
        "top_p": body.top_p, "tool_choice": body.tool_choice or "auto", "tools": body.tools or [],
        "text": body.text or {"format": {"type": "text"}}, "truncation": "disabled", "store": body.store,
        "background": False, "user": body.user, "usage": usage}


def assistant_message(output: list[dict[str, Any]]) -> dict[str, Any]:
    """The output items as one assistant chat message (for the next turn's conversation)."""
    text = "".join(p["text"] for item in output if item["type"] == "message" for p in item["content"])
    calls = [{"id": item["call_id"], "type": "function", "function": {
        "name": item["name"], "arguments": item["arguments"]}} for item in output if item["type"] == "function_call"]
    return {"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})}


# --------------------------------------------------------------------------- routes


async def create_response(request: web.Request) -> web.StreamResponse:
    ctx: ServerContext = request.app[CTX]
    store: ResponseStore = request.app[STORE]
    body: ResponsesRequest = await read_body(request, ResponsesRequest)
    check_served(body)
    history = store.get(body.previous_response_id).conversation if body.previous_response_id else []
    chat, conversation = chat_body(body, history)
    response_id = f"resp_{uuid.uuid4().hex}"
    try:
        generate_request = chat_request(chat, response_id, time.time())
    except ApiError as error:
        raise _renamed(error) from error
    turn = Turn(ctx, store, body, chat, conversation, response_id)
    [stream] = await ctx.ingest.submit(response_id, [generate_request])
    try:
        if body.stream:
            return await turn.stream(request, stream)
        [result] = await collect([stream])
        message = ctx.output_parsing(chat).whole(result.text)
        return web.json_response(turn.finish(result, output_items(message, item_status(result))))
    finally:
        await stream.close()


class Turn:
    """One response being made: what it needs to build its body, stream its events and store it."""

    def __init__(self, ctx: ServerContext, store: ResponseStore, body: ResponsesRequest,
                 chat: ChatCompletionRequest, conversation: list[dict[str, Any]], response_id: str) -> None:
        self.ctx, self.store, self.body, self.chat = ctx, store, body, chat
        self.conversation = conversation
        self.response_id = response_id
        self.created_at = int(time.time())

    def body_with(self, status: str, output: list[dict[str, Any]], usage: dict | None = None) -> dict[str, Any]:
        return response_body(self.ctx, self.body, self.response_id, self.created_at, status, output, usage)

    def finish(self, result: SequenceResult, output: list[dict[str, Any]]) -> dict[str, Any]:
        """The final body (stored when ``store`` is set)."""
        final = self.body_with(item_status(result), output, response_usage(self.ctx, result, output))
        if self.body.store:
            self.store.put(self.response_id, StoredResponse(
                body=final, conversation=self.conversation + [assistant_message(output)]))
        return final

    async def stream(self, request: web.Request, stream: Any) -> web.StreamResponse:
        events = EventWriter(SseWriter(request))
        items = StreamedItems(events)
        parser = self.ctx.output_parsing(self.chat).incremental()
        result = SequenceResult(index=0)
        try:
            async for _, output in merged([stream]):
                if events.sequence_number == 0:
                    await events.send("response.created", response=self.body_with("in_progress", []))
                    await events.send("response.in_progress", response=self.body_with("in_progress", []))
                result.add(output)
                delta = parser.feed(output.text_delta)
                if output.finish_reason is not None:
                    delta = parser.merge(delta, parser.finish())
                await items.feed(delta)
            status = item_status(result)
            if not items.done and items.open is None:  # no text at all: one empty message, as the whole body has
                await items.open_text("message", "output_text")
            await items.close(status)
            kind = "response.incomplete" if status == "incomplete" else "response.completed"
            await events.send(kind, response=self.finish(result, items.done))
        except ApiError as error:
            if events.writer.response is None:
                raise
            await events.send("error", code=error.error_type, message=error.message, param=error.param)
            failed = self.body_with("failed", items.done)
            failed["error"] = {"code": error.error_type, "message": error.message}
            await events.send("response.failed", response=failed)
        await events.writer.response.write_eof()
        return events.writer.response


class EventWriter:
    """Typed SSE events: ``event: <type>`` and ``data: {"type": ..., "sequence_number": ..., ...}``."""

    def __init__(self, writer: SseWriter) -> None:
        self.writer = writer
        self.sequence_number = 0

    async def send(self, kind: str, **fields: Any) -> None:
        if self.writer.response is None:
            await self.writer.start()
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        await self.writer.response.write(b"event: " + kind.encode() + b"\ndata: " + msgspec.json.encode(payload)
                                         + b"\n\n")


class StreamedItems:
    """Chat deltas -> output-item events. One item is open at a time; a new kind of delta closes it."""

    def __init__(self, events: EventWriter) -> None:
        self.events = events
        self.done: list[dict[str, Any]] = []  # closed items, in output order
        self.open: dict[str, Any] | None = None  # the open item
        self.open_call_index: int | None = None  # the parser's index of the open function call

    async def feed(self, delta: dict[str, Any]) -> None:
        if delta.get("reasoning_content"):
            await self._text("reasoning", delta["reasoning_content"])
        if delta.get("content"):
            await self._text("message", delta["content"])
        for call in delta.get("tool_calls") or []:
            await self._call(call)

    async def _open(self, item: dict[str, Any]) -> None:
        await self.close("completed")
        self.open = item
        await self.events.send("response.output_item.added", output_index=len(self.done), item=item)

    async def _text(self, kind: str, text: str) -> None:
        part_kind, delta_event = (("output_text", "response.output_text.delta") if kind == "message"
                                  else ("reasoning_text", "response.reasoning_text.delta"))
        if self.open is None or self.open["type"] != kind:
            await self.open_text(kind, part_kind)
        self.open["text"] += text
        extra = {"logprobs": []} if kind == "message" else {}
        await self.events.send(delta_event, item_id=self.open["id"], output_index=len(self.done), content_index=0,
                               delta=text, **extra)

    async def open_text(self, kind: str, part_kind: str) -> None:
        """Open a message or reasoning item and its one content part."""
        item = message_item("", "in_progress") if kind == "message" else reasoning_item("")
        item["content"], item["status"] = [], "in_progress"
        await self._open(item)
        part = {"type": part_kind, "text": ""} | ({"annotations": []} if kind == "message" else {})
        await self.events.send("response.content_part.added", item_id=item["id"], output_index=len(self.done),
                               content_index=0, part=part)
        item["text"] = ""

    async def _call(self, call: dict[str, Any]) -> None:
        if call.get("id") is not None and call["index"] != self.open_call_index:
            item = function_call_item(call["id"], call["function"].get("name", ""), "", "in_progress")
            await self._open(item)
            self.open_call_index = call["index"]
        arguments = call["function"].get("arguments", "")
        if arguments and self.open is not None and self.open["type"] == "function_call":
            self.open["arguments"] += arguments
            await self.events.send("response.function_call_arguments.delta", item_id=self.open["id"],
                                   output_index=len(self.done), delta=arguments)

    async def close(self, status: str) -> None:
        """Close the open item with its ``.done`` events."""
        item, self.open, self.open_call_index = self.open, None, None
        if item is None:
            return
        index, events = len(self.done), self.events
        if item["type"] == "function_call":
            item["status"] = status
            await events.send("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                              name=item["name"], arguments=item["arguments"])
        else:
            text = item.pop("text")
            final = message_item(text, status, item["id"]) if item["type"] == "message" else reasoning_item(
                text, item["id"])
            part = final["content"][0]
            if item["type"] == "message":
                await events.send("response.output_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=text, logprobs=[])
            else:
                await events.send("response.reasoning_text.done", item_id=item["id"], output_index=index,
                                  content_index=0, text=text)
            await events.send("response.content_part.done", item_id=item["id"], output_index=index,
                              content_index=0, part=part)
            item = final
        self.done.append(item)
        await events.send("response.output_item.done", output_index=index, item=item)


async def retrieve_response(request: web.Request) -> web.Response:
    """The stored body; OpenAI's query parameters (``stream``, ``starting_after``, ``include``) are not served."""
    for name in request.query:
        raise bad_request(f"unsupported query parameter {name}: this server does not serve it", name)
    return web.json_response(request.app[STORE].get(request.match_info["response_id"]).body)


async def delete_response(request: web.Request) -> web.Response:
    response_id = request.match_info["response_id"]
    store: ResponseStore = request.app[STORE]
    store.get(response_id)
    del store.items[response_id]
    return web.json_response({"id": response_id, "object": "response", "deleted": True})


async def cancel_response(request: web.Request) -> web.Response:
    request.app[STORE].get(request.match_info["response_id"])
    raise bad_request("only background responses can be cancelled, and background is not supported",
                      "response_id")


def add_responses_routes(app: web.Application) -> None:
    app[STORE] = ResponseStore()
    app.router.add_post("/v1/responses", create_response)
    app.router.add_get("/v1/responses/{response_id}", retrieve_response)
    app.router.add_delete("/v1/responses/{response_id}", delete_response)
    app.router.add_post("/v1/responses/{response_id}/cancel", cancel_response)
