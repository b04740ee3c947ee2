"""Tokenize stage: turn a client's request into the token ids of each sequence to generate.

Inbox ``TokenizeInbox`` (GenerateRequest | Abort | FlushCache); outboxes
(``TokenizeOutboxes``):

* ``out`` -> multimodal: one ``TokenizedRequest`` per sequence, and the
  ``Abort`` and ``FlushCache`` messages, passed through in order;
* ``errors`` -> ingest: an ``ErrorOutput`` (HTTP 400) when the request is
  empty, has no chat template, holds ids outside the vocabulary, or asks for
  more tokens than the context length holds;
* ``detokenize`` -> detokenize: a copy of each ``TokenizedRequest`` so the
  detokenize stage learns the sequence's stop strings and decoding options
  before its first token arrives.

Constructed with the tokenizer and the vocabulary size (the model's, which
may be padded past the tokenizer's) that the assembly loaded once.

What it does, per request:

1. **prompt -> ids.** Exactly one of ``text`` (encoded with the tokenizer's
   special tokens, e.g. BOS), ``messages`` (rendered with the chat template
   from the tokenizer config, ``add_generation_prompt`` and ``tools`` passed
   through, then encoded without adding specials, since templates write their
   own BOS) or ``input_ids`` (checked against the vocabulary).
   ``truncate_prompt_tokens`` keeps only the prompt's last tokens; a
   ``continue_final_message`` chat leaves its last (assistant) turn open.
2. **length check.** ``prompt_tokens + max_new_tokens <= context_length``,
   else a 400 that gives the three numbers; ``max_new_tokens=None`` (a chat
   request without ``max_tokens``) becomes whatever room the context leaves.
   A prompt whose size alone proves it too long is refused the same way
   before it is encoded (``early_length_error``): ``input_ids`` by their
   count, a text prompt (or the user turns of a chat) by its UTF-8 bytes,
   since no token covers more than ``max_bytes_per_token(tokenizer)`` bytes.
3. **media.** Images and videos (``GenerateRequest.media``, fetched by
   ingest) are served only when the model's config.json has a
   ``vision_config``; a chat turn's ``content_parts`` go to the template, which
   writes one placeholder per picture. The media ride on each
   ``TokenizedRequest`` to the multimodal stage, which expands the
   placeholders and checks the expanded length (so a chat without
   ``max_tokens`` keeps ``max_new_tokens=None`` until then).
4. **n fan-out.** ``n > 1`` becomes ``n`` sequences ``f"{rid}.{i}"`` with
   ``parent_rid=rid`` and ``index=i`` (a given seed becomes ``seed + i`` so the
   samples differ yet stay reproducible); ``n == 1`` keeps ``rid``.

Tokenization runs on a small thread pool, never on the caller's loop: a 100k
token prompt takes tens of milliseconds to encode, and the front end's event
loop keeps streaming other requests meanwhile. ``handle`` submits the work,
``tick`` emits each result as soon as it is ready: a two-token request is
not held behind a 20 MB prompt that arrived first. Order is kept per
request only (its sequences, then its abort). An ``Abort`` for a request
still being tokenized waits until that request has been emitted, so the
schedule stage always sees a request before its abort. A replay tokenizes
inline, in arrival order, so it compares outputs per request
(``ordered_per_request``).

A chat template sent by the client (``chat_template_kwargs.chat_template``,
accepted only with ``--allow-request-chat-template``) is a program from the
outside: it renders in ``stages.template_sandbox`` worker processes, under a
time limit, a memory cap and a cap on the rendered length
(``TEMPLATE_CHARS_PER_TOKEN`` per context token), and such a request runs on
the sandbox's own threads, so a template that loops or balloons answers its
own client with a 400 and holds up nobody else. The tokenizer's template
renders in-process.

State owned: the list of requests in flight in the pool (and the template sandbox). It never loads
the tokenizer, and never touches KV memory, sampling or detokenization.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, ChatMessage, ErrorOutput, FlushCache, GenerateRequest, TokenizedRequest,
                               TokenizeInbox)
from pipeline.stage import Outbox, Outboxes
from stages.pooled import PooledStage
from stages.template_sandbox import TemplateRenderError, TemplateSandbox
from stages.tokenizer import max_bytes_per_token

logger = logging.getLogger(__name__)

TEMPLATE_CHARS_PER_TOKEN = 64  # a client template's text may be this many characters per context token


class RequestError(ValueError):
    """The request cannot be tokenized as given; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


# --------------------------------------------------------------------------- prompt -> ids


def chat_message_dicts(messages: list[ChatMessage]) -> list[dict[str, Any]]:
    """Chat turns as the Jinja templates expect them: no None fields, tool arguments as dicts."""
    turns = []
    for message in messages:
        turn = {k: v for k, v in msgspec.structs.asdict(message).items() if v is not None}
        turn.setdefault("content", "")
        if message.content_parts is not None:  # images or videos: the template places their placeholders
            turn["content"] = turn.pop("content_parts")
        if message.tool_calls:
            turn["tool_calls"] = [_tool_call_dict(call) for call in message.tool_calls]
        turns.append(turn)
    return turns


def _tool_call_dict(call: Any) -> dict[str, Any]:
    try:
        arguments: Any = json.loads(call.function.arguments)
    except ValueError:
        arguments = call.function.arguments
    return {"id": call.id, "type": call.type, "function": {"name": call.function.name, "arguments": arguments}}


CLIENT_TEMPLATE_PARAM = "chat_template_kwargs.chat_template"


def client_template(tokenizer: Any, request: GenerateRequest) -> str | None:
    """The template text a client sent, or None (none sent, or the name of one of the tokenizer's own)."""
    template = request.chat_template_kwargs.get("chat_template")
    if template is None or (isinstance(tokenizer.chat_template, dict) and template in tokenizer.chat_template):
        return None
    if not isinstance(template, str):
        raise RequestError("chat_template must be a string (a Jinja template)", CLIENT_TEMPLATE_PARAM)
    return template


def render_client_template(sandbox: TemplateSandbox, request: GenerateRequest, template: str) -> str:
    """A client's template, rendered in the sandbox (its time, memory and length limits)."""
    kwargs = {k: v for k, v in request.chat_template_kwargs.items() if k != "chat_template"}
    try:
        return sandbox.render(chat_message_dicts(request.messages or []), template, tools=request.tools,
                              add_generation_prompt=request.add_generation_prompt,
                              continue_final_message=request.continue_final_message, template_kwargs=kwargs)
    except TemplateRenderError as error:
        raise RequestError(str(error), CLIENT_TEMPLATE_PARAM) from error


def render_chat(tokenizer: Any, request: GenerateRequest, sandbox: TemplateSandbox | None = None) -> str:
    """The chat template applied to the request's messages (raises RequestError on a template error).

    The tokenizer's template renders here; a client's renders in ``sandbox`` (refused without one).
    """
    template = client_template(tokenizer, request)
    if template is not None:
        if sandbox is None:
            raise RequestError("a chat template sent by the client is not rendered on this server; start it with "
                               "--allow-request-chat-template to accept one", CLIENT_TEMPLATE_PARAM)
        return render_client_template(sandbox, request, template)
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model has no chat template; use /v1/completions with a plain prompt",
                           "messages")
    try:
        return tokenizer.apply_chat_template(
            chat_message_dicts(request.messages or []), tools=request.tools, tokenize=False,
            add_generation_prompt=request.add_generation_prompt,
            continue_final_message=request.continue_final_message, **request.chat_template_kwargs)
    except Exception as error:  # jinja raise_exception(...) in templates, bad kwargs
        raise RequestError(f"chat template failed: {error}", "messages") from error


def is_vision_model(model_dir: Path) -> bool:
    """Whether the model reads images (its config.json has a vision_config, as Qwen-VL's)."""
    path = model_dir / "config.json"
    try:
        return isinstance(json.loads(path.read_text()).get("vision_config"), dict)
    except (OSError, ValueError, AttributeError):
        return False


def check_media(request: GenerateRequest, accepts_media: bool) -> None:
    """Images and videos only for a vision model; every URL must have been fetched by ingest."""
    if not (request.media or request.image_urls):
        return
    param = request.media[0].param if request.media and request.media[0].param else "messages"
    if not accepts_media:
        raise RequestError("this model does not accept image or video inputs", param)
    if request.image_urls:
        raise RequestError("image URLs must be fetched before tokenization (send the request through the "
                           "HTTP API, or pass the image bytes)", "messages")


def prompt_ids(tokenizer: Any, request: GenerateRequest, vocab_size: int,
               sandbox: TemplateSandbox | None = None) -> list[int]:
    """Token ids of the request's prompt; exactly one of text / messages / input_ids must be set."""
    given = [name for name in ("text", "messages", "input_ids") if getattr(request, name) is not None]
    if len(given) != 1:
        raise RequestError(f"exactly one of text, messages, input_ids must be given (got {given or 'none'})")
    if request.text is not None:
        if not request.text:
            raise RequestError("prompt must not be empty", "prompt")
        return tokenizer.encode(request.text, add_special_tokens=True)
    if request.messages is not None:
        if not request.messages:
            raise RequestError("messages must not be empty", "messages")
        return tokenizer.encode(render_chat(tokenizer, request, sandbox), add_special_tokens=False)
    return checked_input_ids(request.input_ids or [], vocab_size)


def checked_input_ids(input_ids: list[int], vocab_size: int) -> list[int]:
    if not input_ids:
        raise RequestError("input_ids must not be empty", "input_ids")
    for position, token_id in enumerate(input_ids):
        if not 0 <= token_id < vocab_size:
            raise RequestError(f"input_ids[{position}]={token_id} is outside the vocabulary [0, {vocab_size})",
                               "input_ids")
    return list(input_ids)


def truncated(input_ids: list[int], keep: int | None, context_length: int) -> list[int]:
    """vLLM's truncate_prompt_tokens: keep the last ``keep`` prompt tokens (-1: the context length)."""
    if keep is None:
        return input_ids
    keep = context_length if keep == -1 else keep
    if keep > context_length:
        raise RequestError(f"truncate_prompt_tokens={keep} is more than the model's context length of "
                           f"{context_length} tokens", "truncate_prompt_tokens")
    return input_ids[-keep:]


def check_logit_bias(logit_bias: dict[int, float], vocab_size: int) -> None:
    for token_id in logit_bias:
        if not 0 <= token_id < vocab_size:
            raise RequestError(f"logit_bias token id {token_id} is outside the vocabulary [0, {vocab_size})",
                               "logit_bias")


def check_length(num_prompt_tokens: int, max_new_tokens: int | None, context_length: int) -> None:
    """Prompt plus the tokens to generate must fit in the context window (None: whatever fits)."""
    if num_prompt_tokens >= context_length:
        raise RequestError(f"the prompt has {num_prompt_tokens} tokens, which is not less than the model's "
                           f"context length of {context_length} tokens", "messages_or_prompt")
    if max_new_tokens is not None and num_prompt_tokens + max_new_tokens > context_length:
        raise RequestError(f"requested {num_prompt_tokens} prompt tokens + {max_new_tokens} max_tokens = "
                           f"{num_prompt_tokens + max_new_tokens} tokens, more than the model's context length "
                           f"of {context_length} tokens; shorten the prompt or lower max_tokens", "max_tokens")


def prompt_num_bytes(request: GenerateRequest) -> int | None:
    """UTF-8 bytes the encoded text surely holds: the text prompt, or a chat's user turns (None: no bound).

    A chat template may drop or rewrite earlier assistant turns, never a
    user's words; a client-sent template may do anything, so it gets no bound.
    """
    if request.text is not None:
        return len(request.text) if request.text.isascii() else len(request.text.encode("utf-8", "surrogatepass"))
    if request.messages is None or "chat_template" in request.chat_template_kwargs:
        return None
    return sum(len(m.content.encode("utf-8", "surrogatepass")) for m in request.messages
               if m.role == "user" and m.content)


def early_length_error(request: GenerateRequest, bytes_per_token: int | None,
                       context_length: int) -> RequestError | None:
    """The length check's 400 when the prompt's size alone proves it too long, before any encoding.

    ``input_ids`` are counted as they are; a text needs at least
    ceil(bytes / bytes_per_token) tokens (``stages.tokenizer.max_bytes_per_token``).
    """
    if getattr(request.sampling, "truncate_prompt_tokens", None) is not None:
        return None  # only the prompt's last tokens will be kept: its size proves nothing
    max_new_tokens = request.sampling.max_new_tokens
    if request.input_ids is not None and request.text is None and request.messages is None:
        try:
            check_length(len(request.input_ids), max_new_tokens, context_length)
        except RequestError as error:
            return error
        return None
    num_bytes = prompt_num_bytes(request)
    if bytes_per_token is None or num_bytes is None:
        return None
    at_least = -(-num_bytes // bytes_per_token)
    why = f"at least {at_least} tokens (its {num_bytes} bytes, and no token covers more than {bytes_per_token})"
    if at_least >= context_length:
        return RequestError(f"the prompt has {why}, which is not less than the model's context length of "
                            f"{context_length} tokens", "messages_or_prompt")
    if max_new_tokens is not None and at_least + max_new_tokens > context_length:
        return RequestError(f"the prompt has {why}; with {max_new_tokens} max_tokens that is more than the "
                            f"model's context length of {context_length} tokens; shorten the prompt or lower "
                            "max_tokens", "max_tokens")
    return None


def fan_out(request: GenerateRequest, input_ids: list[int]) -> list[TokenizedRequest]:
    """One TokenizedRequest per sample: rid itself when n == 1, f"{rid}.{i}" otherwise."""
    n = request.sampling.n
    sequences = []
    for index in range(n):
        seed = request.sampling.seed
        sampling = msgspec.structs.replace(request.sampling, n=1,
                                           seed=None if seed is None else seed + index)
        sequences.append(TokenizedRequest(
            rid=request.rid if n == 1 else f"{request.rid}.{index}", parent_rid=request.rid, index=index,
            input_ids=input_ids, sampling=sampling, stream=request.stream,
            arrival_time_s=request.arrival_time_s, media=request.media))
    return sequences


def tokenize_request(tokenizer: Any, request: GenerateRequest, context_length: int, vocab_size: int,
                     sandbox: TemplateSandbox | None = None, accepts_media: bool = False) -> list[TokenizedRequest]:
    """The whole job for one request (pure; runs on a worker thread). Raises RequestError.

    With media, ``max_new_tokens=None`` stays None: the multimodal stage resolves it once the
    images' pad tokens are counted.
    """
    check_media(request, accepts_media)
    input_ids = truncated(prompt_ids(tokenizer, request, vocab_size, sandbox),
                          request.sampling.truncate_prompt_tokens, context_length)
    check_logit_bias(request.sampling.logit_bias, vocab_size)
    check_length(len(input_ids), request.sampling.max_new_tokens, context_length)
    if request.sampling.max_new_tokens is None and not request.media:  # OpenAI's "no max_tokens": up to the context
        room = context_length - len(input_ids)
        if request.sampling.min_new_tokens > room:
            raise RequestError(f"min_tokens={request.sampling.min_new_tokens} is more than the {room} tokens the "
                               f"context length of {context_length} leaves after the prompt", "min_tokens")
        sampling = msgspec.structs.replace(request.sampling, max_new_tokens=room)
        request = msgspec.structs.replace(request, sampling=sampling)
    return fan_out(request, input_ids)


# --------------------------------------------------------------------------- the stage


@dataclasses.dataclass(frozen=True)
class TokenizeOutboxes(Outboxes):
    out: Outbox[TokenizedRequest | Abort | FlushCache]  # -> multimodal
    errors: Outbox[ErrorOutput]  # -> ingest
    detokenize: Outbox[TokenizedRequest]  # -> detokenize: stop strings and decoding options


class TokenizeStage(PooledStage[GenerateRequest]):
    """GenerateRequest -> TokenizedRequest(s) on a worker pool; Abort passes through in order."""

    Inbox = TokenizeInbox
    Outboxes = TokenizeOutboxes
    outboxes: TokenizeOutboxes
    ordered_per_request = True  # results leave as they finish: a replay compares them request by request

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: TokenizeOutboxes | dict[str, Channel | None], *, tokenizer: Any, vocab_size: int,
                 num_workers: int = 2) -> None:
        """``num_workers=0`` tokenizes inline (deterministic stepping in the harness and replays)."""
        super().__init__("tokenize", inbox, outboxes, num_workers=num_workers)
        self.tokenizer = tokenizer
        self.context_length = args.context_length
        self.allow_request_chat_template = args.allow_request_chat_template
        self.vocab_size = vocab_size
        self.accepts_media = is_vision_model(args.model_dir)
        self.bytes_per_token = max_bytes_per_token(tokenizer)  # None: no early length check by bytes
        self.template_sandbox: TemplateSandbox | None = None  # started by the first client template
        self.template_max_chars = max(1 << 20, TEMPLATE_CHARS_PER_TOKEN * args.context_length)

    def handle(self, message: TokenizeInbox) -> None:
        match message:
            case GenerateRequest():
                self._submit(message)
            case FlushCache():
                self.outboxes.out.put(message)
            case Abort():
                self.pass_abort(message)
            case _:
                raise TypeError(f"tokenize stage got an unexpected {type(message).__name__}")

    def _sandbox_for(self, request: GenerateRequest) -> TemplateSandbox | None:
        """The template sandbox when the request brings a template of its own and the server accepts one."""
        try:
            if not self.allow_request_chat_template or client_template(self.tokenizer, request) is None:
                return None
        except RequestError:  # not a string: refused when the request is tokenized
            return None
        if self.template_sandbox is None:
            self.template_sandbox = TemplateSandbox(self.tokenizer.special_tokens_map,
                                                    max_chars=self.template_max_chars)
        return self.template_sandbox

    def _submit(self, request: GenerateRequest) -> None:
        """Tokenize on the pool (a client template on the sandbox's own threads: a slow one holds no
        tokenize thread); a request refused before encoding is answered in order with the rest."""
        if "chat_template" in request.chat_template_kwargs and not self.allow_request_chat_template:
            self.refuse(request, RequestError(
                "a chat template sent by the client is not rendered on this server (it would run unbounded "
                "in the server process); start it with --allow-request-chat-template to accept one",
                "chat_template_kwargs.chat_template"))
        elif (too_long := early_length_error(request, self.bytes_per_token, self.context_length)) is not None:
            self.refuse(request, too_long)  # before a long encode
        else:
            sandbox = self._sandbox_for(request)
            self.submit(request, tokenize_request, self.tokenizer, request, self.context_length, self.vocab_size,
                        sandbox, self.accepts_media, pool=None if sandbox is None else sandbox.render_pool)

    def is_in_flight(self, rid: str) -> bool:
        return any(rid == request.rid or rid.startswith(request.rid + ".") for request, _ in self.in_flight)

    def emit_result(self, request: GenerateRequest, future: Future) -> None:
        try:
            sequences = future.result()
        except RequestError as error:
            self.outboxes.errors.put(ErrorOutput(rid=request.rid, status_code=400, message=error.message,
                                                 param=error.param))
            return
        except Exception as error:  # a tokenizer bug must still answer the client
            logger.exception("tokenizing request %s failed", request.rid)
            self.outboxes.errors.put(ErrorOutput(rid=request.rid, status_code=500, error_type="internal_error",
                                                 message=f"tokenization failed: {error}"))
            return
        for sequence in sequences:
            self.outboxes.detokenize.put(msgspec.structs.replace(sequence, media=[]) if sequence.media else sequence)
            self.outboxes.out.put(sequence)

    def close(self) -> None:
        super().close()
        if self.template_sandbox is not None:
            self.template_sandbox.close()
