"""Request bodies -> SamplingParams and GenerateRequest messages.

OpenAI names map onto SGLang's (``max_tokens`` -> ``max_new_tokens``,
``min_tokens`` -> ``min_new_tokens``, ``logprobs``/``top_logprobs`` ->
``return_logprob``/``top_logprobs_num``, ``response_format`` ->
``json_schema``); every range rule lives in ``SamplingParams.validate`` and a
broken one becomes a 400 that names the field by the API's name. JSON ints
are unbounded, so ints that do not fit the engine's 64 bits are refused here
(``check_int64``), as are tools that are not function tools with a name. Things we do
not implement (``suffix``, ``best_of`` > n, images) are refused
with a 400 rather than silently ignored.

The same holds for every declared request field (``refuse_unserved``): OpenAI
fields served only at their default (``store``, ``service_tier``,
``metadata``, ``modalities``), the legacy ``functions``/``function_call``
(mapped onto ``tools``/``tool_choice``), and the SGLang/vLLM extensions:
``stop_regex``, ``ebnf``, vLLM's ``structured_outputs`` and ``guided_*``
(onto json_schema / regex / choices / ebnf), ``truncate_prompt_tokens``,
``return_token_ids``, ``continue_final_message``. ``logit_bias`` keys are
token ids as strings, values clamped to [-100, 100] (OpenAI's range).
"""
from __future__ import annotations

import json
import math
from typing import Any

import msgspec

from pipeline.messages import (MAX_TOP_LOGPROBS, ChatMessage, FunctionCall, GenerateRequest, SamplingParams,
                               SamplingParamsError, ToolCall)
from stages.ingest.errors import ApiError, bad_request, from_sampling_error
from stages.ingest.protocol import (ChatCompletionRequest, ChatMessageIn, CompletionRequest, NativeGenerateRequest,
                                    SamplingFields)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
CHAT_DEFAULT_MAX_TOKENS = None  # OpenAI: no max_tokens means up to the context length
OPENAI_NAMES = {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "top_logprobs_num": "logprobs"}
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
SAMPLING_FIELD_NAMES = frozenset(f.name for f in msgspec.structs.fields(SamplingParams))
# /generate's sampling_params: SGLang's names (prompt and output ids are in every /generate answer already)
NATIVE_SAMPLING_NAMES = SAMPLING_FIELD_NAMES - {"return_token_ids"}


def _common_sampling(body: SamplingFields, max_new_tokens: int) -> dict[str, Any]:
    refuse_unserved(body)
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    params: dict[str, Any] = {
        "max_new_tokens": max_new_tokens, "min_new_tokens": body.min_tokens, "n": body.n, "seed": body.seed,
        "stop": [body.stop] if isinstance(body.stop, str) else list(body.stop or []),
        "stop_token_ids": list(body.stop_token_ids or []), "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens, "no_stop_trim": body.no_stop_trim,
        "spaces_between_special_tokens": body.spaces_between_special_tokens,
    }
    for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        if getattr(body, name) is not None:
            params[name] = getattr(body, name)
    if body.top_k is not None:
        params["top_k"] = -1 if body.top_k == 0 else body.top_k  # 0 means "off" for OpenAI-style clients
    params.update(_grammar(body))
    params.update(_extensions(body))
    return params


SERVICE_TIERS = (None, "auto", "default")


def refuse_unserved(body: SamplingFields) -> None:
    """OpenAI fields this server serves only at their default value: anything else is a 400 naming it."""
    if body.store:
        raise bad_request("store is not supported: this server keeps no completions", "store")
    if body.metadata is not None:
        raise bad_request("metadata is not supported: it only tags stored completions, and this server "
                          "stores none", "metadata")
    if body.service_tier not in SERVICE_TIERS:
        raise bad_request(f"service_tier {body.service_tier!r} is not supported (only 'auto' or 'default')",
                          "service_tier")


def logit_bias(raw: dict[str, float]) -> dict[int, float]:
    """OpenAI's logit_bias: token ids as decimal strings, biases clamped to [-100, 100]."""
    out = {}
    for key, value in raw.items():
        if not key.strip().isdigit():
            raise bad_request(f"logit_bias keys must be token ids (decimal strings), got {key!r}", "logit_bias")
        if not math.isfinite(value):
            raise bad_request(f"logit_bias values must be finite numbers, got {value!r}", "logit_bias")
        out[int(key)] = min(100.0, max(-100.0, value))
    return out


def _extensions(body: SamplingFields) -> dict[str, Any]:
    """logit_bias and the SGLang/vLLM sampling extensions that map one to one."""
    params: dict[str, Any] = {}
    if body.logit_bias:
        params["logit_bias"] = logit_bias(body.logit_bias)
    if body.stop_regex is not None:
        params["stop_regex"] = [body.stop_regex] if isinstance(body.stop_regex, str) else list(body.stop_regex)
    if body.truncate_prompt_tokens is not None:
        params["truncate_prompt_tokens"] = body.truncate_prompt_tokens
    if body.return_token_ids:
        params["return_token_ids"] = True
    return params


def _grammar(body: SamplingFields) -> dict[str, Any]:
    """Every way a client asks for structured output -> at most one SamplingParams grammar field."""
    grammars = [(name, grammar) for name, grammar in _grammar_requests(body) if grammar]
    if len(grammars) > 1:
        raise bad_request(f"at most one structured output constraint may be given, got "
                          f"{[name for name, _ in grammars]}", grammars[1][0])
    return grammars[0][1] if grammars else {}


def _grammar_requests(body: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    return [("regex", {"regex": body.regex} if body.regex is not None else {}),
            ("json_schema", {"json_schema": body.json_schema} if body.json_schema is not None else {}),
            ("ebnf", {"ebnf": body.ebnf} if body.ebnf is not None else {}),
            ("response_format", _response_format(body)),
            ("structured_outputs", _structured_outputs(body)),
            *_guided(body)]


def _schema_text(schema: str | dict[str, Any]) -> str:
    return schema if isinstance(schema, str) else json.dumps(schema)


def _structured_outputs(body: SamplingFields) -> dict[str, Any]:
    """vLLM's structured_outputs {json, regex, choice, grammar, json_object}: exactly one of them."""
    spec = body.structured_outputs
    if spec is None:
        return {}
    given = {name: value for name, value in (
        ("json", spec.json), ("regex", spec.regex), ("choice", spec.choice), ("grammar", spec.grammar),
        ("json_object", spec.json_object or None)) if value is not None}
    if len(given) != 1:
        raise bad_request(f"structured_outputs needs exactly one of json, regex, choice, grammar, json_object "
                          f"(got {sorted(given)})", "structured_outputs")
    [(name, value)] = given.items()
    return {"json": lambda: {"json_schema": _schema_text(value)}, "regex": lambda: {"regex": value},
            "choice": lambda: {"choices": list(value)}, "grammar": lambda: {"ebnf": value},
            "json_object": lambda: {"json_schema": json.dumps({"type": "object"})}}[name]()


def _guided(body: SamplingFields) -> list[tuple[str, dict[str, Any]]]:
    """vLLM's older guided_json / guided_regex / guided_choice / guided_grammar."""
    return [("guided_json", {"json_schema": _schema_text(body.guided_json)} if body.guided_json is not None else {}),
            ("guided_regex", {"regex": body.guided_regex} if body.guided_regex is not None else {}),
            ("guided_choice", {"choices": list(body.guided_choice)} if body.guided_choice is not None else {}),
            ("guided_grammar", {"ebnf": body.guided_grammar} if body.guided_grammar is not None else {})]


def _response_format(body: SamplingFields) -> dict[str, Any]:
    grammar: dict[str, Any] = {}
    format_ = body.response_format
    if format_ is None or format_.type == "text":
        return grammar
    if format_.type == "json_object":
        grammar["json_schema"] = json.dumps({"type": "object"})
    else:
        if format_.json_schema is None or format_.json_schema.schema_ is None:
            raise bad_request("response_format of type json_schema needs json_schema.schema",
                              "response_format.json_schema")
        grammar["json_schema"] = json.dumps(format_.json_schema.schema_)
    return grammar


def make_sampling(params: dict[str, Any], names: dict[str, str] | None = None) -> SamplingParams:
    names = names if names is not None else OPENAI_NAMES
    try:
        sampling = SamplingParams(**params)
    except SamplingParamsError as error:
        raise from_sampling_error(error, names) from error
    check_int64(sampling, names)
    return sampling


def check_int64(sampling: SamplingParams, names: dict[str, str] | None = None) -> None:
    """JSON ints are unbounded, the engine's are 64-bit: a larger value is a 400, never an overflow later."""
    for name in ("max_new_tokens", "min_new_tokens", "top_k", "n", "seed", "top_logprobs_num"):
        value = getattr(sampling, name)
        if value is not None and not INT64_MIN <= value <= INT64_MAX:
            raise from_sampling_error(SamplingParamsError(name, "must fit in a signed 64-bit integer", value), names)
    if any(not INT64_MIN <= token_id <= INT64_MAX for token_id in sampling.stop_token_ids):
        raise from_sampling_error(SamplingParamsError("stop_token_ids", "token ids must fit in a signed 64-bit "
                                                      "integer", sampling.stop_token_ids), names)


def _max_tokens(*values: int | None, default: int | None) -> int | None:
    for value in values:
        if value is not None:
            return value
    return default


# --------------------------------------------------------------------------- /v1/completions


def completion_prompts(prompt: str | list[Any]) -> list[dict[str, Any]]:
    """OpenAI's prompt forms as GenerateRequest kwargs: one dict per prompt of a batch."""
    if isinstance(prompt, str):
        return [{"text": prompt}]
    if not prompt:
        raise bad_request("prompt must not be empty", "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [{"text": p} for p in prompt]
    if all(_is_token_id(p) for p in prompt):
        return [{"input_ids": list(prompt)}]
    if all(isinstance(p, list) and all(_is_token_id(t) for t in p) for p in prompt):
        return [{"input_ids": list(p)} for p in prompt]
    raise bad_request("prompt must be a string, a list of strings, a list of token ids or a list of "
                      "token id lists (token ids are integers in [0, 2**63))", "prompt")


def check_vocabulary(requests: list[GenerateRequest], vocab_size: int, param: str) -> None:
    """Token-id prompts hold only ids the model has: checked before anything decodes them (echo) or sends them."""
    for k, request in enumerate(requests):
        for position, token_id in enumerate(request.input_ids or []):
            if not 0 <= token_id < vocab_size:
                where = f"[{position}]" if len(requests) == 1 else f"[{k}][{position}]"
                raise bad_request(f"{param}{where}={token_id} is outside the vocabulary [0, {vocab_size})", param)


def _is_token_id(value: Any) -> bool:
    """An int that fits the engine's 64-bit ids (whether it is in the vocabulary is tokenize's check)."""
    return isinstance(value, int) and not isinstance(value, bool) and INT64_MIN <= value <= INT64_MAX


def completion_requests(body: CompletionRequest, rid: str, arrival_time_s: float) -> list[GenerateRequest]:
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of different from n is not supported", "best_of")
    params = _common_sampling(body, _max_tokens(body.max_tokens, default=COMPLETION_DEFAULT_MAX_TOKENS))
    if body.logprobs is not None:
        params.update(return_logprob=True, top_logprobs_num=body.logprobs)
        if body.echo:  # the prompt's tokens are part of the echoed text: their logprobs too
            params.update(logprob_start_len=0, prompt_top_logprobs_num=body.logprobs)
    params.update(_prompt_logprobs(body, params))
    sampling = make_sampling(params)
    prompts = completion_prompts(body.prompt)
    return [GenerateRequest(rid=rid if len(prompts) == 1 else f"{rid}-{k}", sampling=sampling, stream=body.stream,
                            arrival_time_s=arrival_time_s, **prompt) for k, prompt in enumerate(prompts)]


# --------------------------------------------------------------------------- /v1/chat/completions


def chat_message(message: ChatMessageIn, position: int) -> tuple[ChatMessage, list[str]]:
    """One OpenAI chat message -> ChatMessage (text parts joined) and its image URLs."""
    content, images = message.content, []
    if content is None and message.role != "assistant":
        raise bad_request(f"a message with role {message.role!r} needs content", f"messages[{position}].content")
    if message.role == "tool" and not message.tool_call_id:
        raise bad_request("a message with role 'tool' needs tool_call_id", f"messages[{position}].tool_call_id")
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type == "text":
                if part.text is None:
                    raise bad_request("a content part of type text needs a text field",
                                      f"messages[{position}].content")
                texts.append(part.text)
            elif part.type in ("image_url", "video_url", "video"):  # fetched by stages/ingest/media.py
                images.append(str((part.image_url or part.video_url or {}).get("url", part.video)))
            else:
                raise bad_request(f"unsupported content part type {part.type!r}", f"messages[{position}].content")
        content = "".join(texts)
    tool_calls = None
    if message.tool_calls:
        tool_calls = [ToolCall(id=call.id or f"call_{position}_{i}", function=FunctionCall(
            name=call.function.name, arguments=call.function.arguments if isinstance(call.function.arguments, str)
            else json.dumps(call.function.arguments))) for i, call in enumerate(message.tool_calls)]
    role = "system" if message.role == "developer" else message.role
    return ChatMessage(role=role, content=content, name=message.name, tool_calls=tool_calls,
                       tool_call_id=message.tool_call_id, reasoning_content=message.reasoning_content,
                       content_parts=_content_parts(message.content) if images else None), images


def _content_parts(parts: list[Any]) -> list[dict[str, str]]:
    """Text, image and video parts in order, as a vision model's chat template reads them."""
    kinds = {"image_url": "image", "video_url": "video", "video": "video"}
    return [{"type": "text", "text": part.text or ""} if part.type == "text" else {"type": kinds[part.type]}
            for part in parts]


def chat_request(body: ChatCompletionRequest, rid: str, arrival_time_s: float) -> GenerateRequest:
    if not body.messages:
        raise bad_request("messages must not be empty", "messages")
    params = _common_sampling(body, _max_tokens(body.max_completion_tokens, body.max_tokens,
                                                default=CHAT_DEFAULT_MAX_TOKENS))
    if body.logprobs:
        params.update(return_logprob=True, top_logprobs_num=body.top_logprobs or 0)
    elif body.top_logprobs:
        raise bad_request("top_logprobs needs logprobs set to true", "top_logprobs")
    check_tools(body.tools or [])
    params.update(_prompt_logprobs(body, params))
    params.update(_forced_tool_grammar(body, params))
    params.update(_grammar_after_reasoning(body, params))
    names = dict(OPENAI_NAMES, top_logprobs_num="top_logprobs")
    sampling = make_sampling(params, names)
    converted = [chat_message(m, i) for i, m in enumerate(body.messages)]
    tools = body.tools if body.tool_choice != "none" else None
    kwargs = template_kwargs(body.chat_template_kwargs)
    return GenerateRequest(rid=rid, messages=[m for m, _ in converted], sampling=sampling, stream=body.stream,
                           add_generation_prompt=_add_generation_prompt(body), tools=tools,
                           chat_template_kwargs=kwargs, image_urls=[url for _, urls in converted for url in urls],
                           arrival_time_s=arrival_time_s, continue_final_message=body.continue_final_message)


def _refuse_unserved_chat(body: ChatCompletionRequest) -> None:
    """Chat fields served only at their default value."""
    if body.modalities is not None and body.modalities != ["text"]:
        raise bad_request(f"modalities {body.modalities} are not supported: this server answers with text only",
                          "modalities")


def _add_generation_prompt(body: ChatCompletionRequest) -> bool:
    """True unless the last turn is to be continued (both at once is a 400, as in vLLM)."""
    _refuse_unserved_chat(body)
    if body.continue_final_message and body.add_generation_prompt:
        raise bad_request("continue_final_message and add_generation_prompt cannot both be true",
                          "continue_final_message")
    return not body.continue_final_message if body.add_generation_prompt is None else body.add_generation_prompt


def _prompt_logprobs(body: SamplingFields, params: dict[str, Any]) -> dict[str, Any]:
    """vLLM's prompt_logprobs: every prompt token's logprob with that many alternatives."""
    if body.prompt_logprobs is None:
        return {}
    if not 0 <= body.prompt_logprobs <= MAX_TOP_LOGPROBS:
        raise bad_request(f"prompt_logprobs must be in [0, {MAX_TOP_LOGPROBS}]", "prompt_logprobs")
    if body.stream:
        raise bad_request("prompt_logprobs is not supported with stream", "prompt_logprobs")
    top = max(body.prompt_logprobs, params.get("prompt_top_logprobs_num", 0))
    return {"return_logprob": True, "logprob_start_len": 0, "prompt_top_logprobs_num": top}


# chat_template_kwargs keys that are the template call's own arguments (given by the request's other fields)
TEMPLATE_CALL_ARGUMENTS = ("messages", "conversation", "tools", "documents", "add_generation_prompt",
                           "continue_final_message", "tokenize", "return_dict")


def template_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """Every key is a template variable, passed as given; one of the call's own arguments is a 400 naming it."""
    for key in kwargs or {}:
        if key in TEMPLATE_CALL_ARGUMENTS:
            raise bad_request(f"chat_template_kwargs.{key} is set by the request itself, not a template variable",
                              f"chat_template_kwargs.{key}")
    return dict(kwargs or {})


MAX_SCHEMA_DEPTH = 64  # tool parameter schemas nest this deep at most (grammar compilers recurse)


def _depth(value: Any) -> int:
    """How deeply objects and arrays nest in a decoded JSON value (without recursion)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is None:
            continue
        deepest = max(deepest, depth)
        pending.extend((child, depth + 1) for child in children)
    return deepest


def check_tools(tools: list[dict[str, Any]]) -> None:
    """Each tool is ``{"type": "function", "function": {"name": str, "parameters"?: object}}``, the
    parameters nested at most ``MAX_SCHEMA_DEPTH`` deep."""
    for position, tool in enumerate(tools):
        param = f"tools[{position}]"
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise bad_request('each tool must be {"type": "function", "function": {...}}', param)
        if not isinstance(function.get("name"), str) or not function["name"]:
            raise bad_request("a tool's function needs a non-empty string name", f"{param}.function.name")
        if function.get("parameters") is not None and not isinstance(function["parameters"], dict):
            raise bad_request("a tool's function parameters must be a JSON schema object",
                              f"{param}.function.parameters")
        if _depth(function.get("parameters")) > MAX_SCHEMA_DEPTH:
            raise bad_request(f"a tool's function parameters are nested more than {MAX_SCHEMA_DEPTH} deep",
                              f"{param}.function.parameters")


def _forced_tool_grammar(body: ChatCompletionRequest, params: dict[str, Any]) -> dict[str, Any]:
    """tool_choice "required" or a named function: constrain the output to the call's JSON."""
    from stages.parsers.tool_calls import ToolParserError, tool_choice_to_json_schema

    try:
        schema = tool_choice_to_json_schema(body.tools, body.tool_choice, body.parallel_tool_calls is not False) \
            if body.tools else None
    except ToolParserError as error:  # e.g. two tools defining one $defs name differently: param "tools"
        raise bad_request(str(error), error.param) from error
    if body.tool_choice not in (None, "auto", "none") and not body.tools:
        raise bad_request("tool_choice needs tools", "tool_choice")
    if schema is None:
        return {}
    if any(params.get(name) is not None for name in ("json_schema", "regex")):
        raise bad_request("tool_choice cannot be combined with response_format or regex", "tool_choice")
    return {"json_schema": schema}


def _grammar_after_reasoning(body: ChatCompletionRequest, params: dict[str, Any]) -> dict[str, Any]:
    """A grammar (forced tool call, response_format, regex) waits for the end of the think block
    (with --reasoning-parser; the constrain stage decides) unless reasoning is not separated or the
    client turned thinking off (``enable_thinking``/``thinking`` false in chat_template_kwargs)."""
    if not any(params.get(name) is not None for name in ("json_schema", "regex", "choices", "ebnf")):
        return {}
    kwargs = body.chat_template_kwargs or {}
    thinking_off = kwargs.get("enable_thinking") is False or kwargs.get("thinking") is False
    return {"grammar_after_reasoning": body.separate_reasoning and not thinking_off}


# --------------------------------------------------------------------------- /generate


def native_requests(body: NativeGenerateRequest, rid: str, arrival_time_s: float) -> list[GenerateRequest]:
    """SGLang's /generate: sampling_params by SGLang names (unknown names are a 400)."""
    raw = dict(body.sampling_params or {})
    unknown = sorted(set(raw) - NATIVE_SAMPLING_NAMES)
    if unknown:
        raise bad_request(f"unknown sampling_params field(s) {unknown}", f"sampling_params.{unknown[0]}")
    if isinstance(raw.get("logit_bias"), dict):  # token ids arrive as JSON object keys (strings)
        try:
            raw["logit_bias"] = {str(k): float(v) for k, v in raw["logit_bias"].items()}
        except (TypeError, ValueError) as error:
            raise bad_request("sampling_params.logit_bias values must be numbers",
                              "sampling_params.logit_bias") from error
        raw["logit_bias"] = logit_bias(raw["logit_bias"])
    if body.return_logprob:
        logprob_options = dict(return_logprob=True, top_logprobs_num=body.top_logprobs_num,
                               logprob_start_len=body.logprob_start_len,
                               prompt_top_logprobs_num=body.top_logprobs_num,
                               token_ids_logprob=list(body.token_ids_logprob or []))
        make_sampling(logprob_options, {"prompt_top_logprobs_num": "top_logprobs_num"})  # 400s name top-level fields
        raw.update(logprob_options)
    try:
        sampling = msgspec.convert(raw, SamplingParams)
    except msgspec.ValidationError as error:
        raise bad_request(f"invalid sampling_params: {error}", "sampling_params") from error
    check_int64(sampling, {name: f"sampling_params.{name}" for name in SAMPLING_FIELD_NAMES})
    prompts = _native_prompts(body)
    return [GenerateRequest(rid=rid if len(prompts) == 1 else f"{rid}-{k}", sampling=sampling, stream=body.stream,
                            arrival_time_s=arrival_time_s, **prompt) for k, prompt in enumerate(prompts)]


def _native_prompts(body: NativeGenerateRequest) -> list[dict[str, Any]]:
    if (body.text is None) == (body.input_ids is None):
        raise bad_request("exactly one of text and input_ids must be given", "text")
    if body.text is not None:
        texts = [body.text] if isinstance(body.text, str) else body.text
        if not texts:
            raise bad_request("text must not be empty", "text")
        for position, text in enumerate(texts):
            if not text:
                param = "text" if isinstance(body.text, str) else f"text[{position}]"
                raise bad_request("text must not be empty", param)
        return [{"text": t} for t in texts]
    ids = body.input_ids or []
    if not ids:
        raise bad_request("input_ids must not be empty", "input_ids")
    if any(isinstance(item, str) for item in ids):
        raise bad_request("input_ids must be a list of token ids or a list of such lists", "input_ids")
    try:
        return completion_prompts(ids)
    except ApiError as error:
        raise bad_request("input_ids must be a list of token ids or a list of such lists (token ids are "
                          "integers in [0, 2**63))", "input_ids") from error
