"""HTTP request bodies as msgspec Structs (OpenAI and SGLang-native names).

Decoding a body against these types is the first validation: a wrong type
fails with msgspec's message, which names the JSON path
(``Expected `float`, got `str` - at `$.temperature```), and becomes a 400 whose
``param`` is that path. A top-level field these Structs do not declare is a
400 naming it (``forbid_unknown_fields``): a parameter we do not serve is
never silently ignored. Declared fields are either honoured or refused with a
400 by ``stages/ingest/convert.py`` (e.g. ``store: true``, ``modalities`` other
than text); ``tests/server/test_request_fields.py`` walks every field.
Range checks happen when the fields become ``SamplingParams``.

msgspec allows one array type per union, so fields that OpenAI lets be
"a string, a list of strings, a list of ids or a list of id lists"
(``prompt``) are decoded as ``str | list[Any]`` and checked by hand.
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JsonSchemaFormat(msgspec.Struct, kw_only=True):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = msgspec.field(default=None, name="schema")
    strict: bool | None = None


class ResponseFormat(msgspec.Struct, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's ``structured_outputs``: one of json (a schema), regex, choice, grammar (EBNF), json_object."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields shared by /v1/completions and /v1/chat/completions (SGLang extensions included)."""

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    n: int = 1
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    regex: str | None = None
    json_schema: str | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    rid: str | None = None
    prompt_logprobs: int | None = None  # vLLM: logprobs of the prompt's tokens, with this many alternatives
    # SGLang and vLLM extensions
    stop_regex: str | list[str] | None = None
    ebnf: str | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    truncate_prompt_tokens: int | None = None
    return_token_ids: bool | None = None
    # OpenAI fields served only at their default value (anything else is a 400)
    service_tier: str | None = None
    store: bool | None = None
    metadata: dict[str, Any] | None = None
    # OpenAI hints with nothing to do here: accepted, they do not change the output
    prompt_cache_key: str | None = None  # prefix caching is automatic (radix cache)
    safety_identifier: str | None = None  # an end-user id, like ``user``


class CompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/completions."""

    prompt: str | list[Any]
    echo: bool = False
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None


class ContentPart(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: str
    text: str | None = None
    image_url: dict[str, Any] | None = None
    video_url: dict[str, Any] | None = None  # {"url": ...}: a video file
    video: list[str] | None = None  # {"type": "video", "video": [frame URL, ...]}: a video as frames


class FunctionCallIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    arguments: str | dict[str, Any] = "{}"
    # accepted and not read: the openai client's parse() helpers add the arguments decoded, which
    # ``arguments`` already carries
    parsed_arguments: Any = None


class ToolCallIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    id: str = ""
    type: str = "function"
    function: FunctionCallIn
    index: int | None = None  # accepted and not read: a streamed call's position, which the list order gives


class ChatMessageIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One chat turn. Keys clients send back with an earlier answer but that have no meaning for the
    prompt (``MESSAGE_KEYS_UNUSED``) are declared, accepted and not read; any other undeclared key is a
    400 naming it. vLLM's ``reasoning`` is read as ``reasoning_content``."""

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    function_call: FunctionCallIn | None = None  # legacy form of one tool call
    reasoning: str | None = None  # vLLM's name for reasoning_content (our answers carry both)
    # accepted and not read, by design (see MESSAGE_KEYS_UNUSED)
    refusal: Any = None
    annotations: Any = None
    audio: Any = None

    def __post_init__(self) -> None:
        if self.reasoning_content is None:
            self.reasoning_content = self.reasoning
        if self.function_call is not None and not self.tool_calls:
            self.tool_calls = [ToolCallIn(function=self.function_call)]


# ChatMessageIn keys accepted and not read, and why: an OpenAI client sends an earlier answer's message back
# as it received it (``message.model_dump()``), and these keys say nothing the prompt can use.
MESSAGE_KEYS_UNUSED = {
    "refusal": "the model's refusal text of an earlier answer; this server never writes one (always null)",
    "annotations": "URL citations of an earlier answer's web search, which this server does not run",
    "audio": "an earlier answer's audio output; this server answers with text only (always null)",
}


class FunctionDef(msgspec.Struct, kw_only=True):
    """A legacy ``functions`` entry (OpenAI's pre-tools API)."""

    name: str
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ChatCompletionRequest(SamplingFields, kw_only=True):
    """POST /v1/chat/completions."""

    messages: list[ChatMessageIn]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # None: true, unless continue_final_message
    continue_final_message: bool = False
    separate_reasoning: bool = True
    functions: list[FunctionDef] | None = None  # legacy: becomes tools
    function_call: str | dict[str, Any] | None = None  # legacy: becomes tool_choice
    modalities: list[str] | None = None  # only ["text"]

    def __post_init__(self) -> None:
        """The legacy ``functions`` / ``function_call`` become ``tools`` / ``tool_choice``."""
        if self.functions is not None:
            if self.tools is not None:
                raise ValueError("give tools or the legacy functions, not both")
            self.tools = [{"type": "function", "function": {k: v for k, v in msgspec.structs.asdict(function).items()
                                                             if v is not None}} for function in self.functions]
        if self.function_call is not None:
            if self.tool_choice is not None:
                raise ValueError("give tool_choice or the legacy function_call, not both")
            call = self.function_call
            self.tool_choice = call if isinstance(call, str) else {"type": "function", "function": dict(call)}


class NativeGenerateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /generate (SGLang native): text or input_ids, sampling_params by SGLang's names."""

    text: str | list[str] | None = None
    input_ids: list[Any] | None = None
    sampling_params: dict[str, Any] | None = None
    stream: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    logprob_start_len: int = -1
    return_text_in_logprobs: bool = False
    token_ids_logprob: list[int] | None = None
    rid: str | None = None
    # vision models: per prompt one reference or a list (URL, data URL, base64, allowed local path);
    # a video is a file reference or a list of frame references (stages/ingest/media.py)
    image_data: Any = None
    video_data: Any = None


class AbortRequestBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /abort_request: one rid, or every request with abort_all."""

    rid: str = ""
    abort_all: bool = False


def decode_body(raw: bytes, body_type: type) -> Any:
    """Decode a JSON body against ``body_type`` (raises msgspec errors, mapped to 400 by the caller)."""
    return msgspec.json.decode(raw, type=body_type)
