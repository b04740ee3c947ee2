"""Every message that crosses a stage boundary, in pipeline order.

This file is the contract between the eight stages; read it first. Each
message is a frozen ``msgspec.Struct`` with a one-line "producer -> consumer"
docstring. Stages build new messages and never edit received ones.

::

    HTTP -> ingest -> tokenize -> multimodal -> schedule -> forward -> sample -> schedule
              ^                                  |   ^                  ^  |
              +---------- detokenize <-----------+   +--- constrain ----+--+

Conventions
-----------
* ``rid`` is the request id, one name everywhere. A request with ``n > 1`` is
  fanned out by the tokenize stage into ``n`` sequences ``f"{parent_rid}.{i}"``,
  each carrying ``parent_rid`` and ``index``; the front end gathers them.
* Token lists are plain ``list[int]`` so every message can be encoded.
* Fields typed ``torch.Tensor`` are **process-local**: they only travel on
  in-process channels (schedule/forward/sample/constrain share the engine
  process). The codec below can still encode them (dtype + shape + bytes), so
  a recording of a live run holds them too.
* Each channel carries one struct or one tagged union (the ``*Inbox`` aliases
  at the bottom), so a stage's dispatch is an exhaustive ``match``.
* Units are in names: ``_s`` seconds, ``_tokens`` counts of tokens.
"""
from __future__ import annotations

import math
import re
from typing import Any, Literal, Union

import msgspec
import torch

# --------------------------------------------------------------------------
# Errors and limits
# --------------------------------------------------------------------------

MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_TOP_LOGPROBS = 20
MAX_TOKEN_IDS_LOGPROB = 64
MAX_N = 128


class SamplingParamsError(ValueError):
    """A sampling parameter broke its rule; ``field`` names it, ``rule`` says why."""

    def __init__(self, field: str, rule: str, value: Any = None) -> None:
        self.field = field
        self.rule = rule
        self.value = value
        super().__init__(f"invalid sampling parameter {field}={value!r}: {rule}")


class Message(msgspec.Struct, frozen=True, kw_only=True, tag=True, tag_field="type"):
    """Base of every message: frozen, keyword-only, tagged by class name."""


# --------------------------------------------------------------------------
# Request side: ingest -> tokenize -> multimodal -> schedule
# --------------------------------------------------------------------------


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True):
    """How to pick tokens and when to stop (SGLang's names and ranges).

    Validates itself on construction and on decode; a broken rule raises
    ``SamplingParamsError`` naming the field (``msgspec.ValidationError`` when
    decoding, with the same text).
    """

    max_new_tokens: int | None = 128  # None: as many as the context window leaves room for
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    stop: list[str] = []
    stop_token_ids: list[int] = []
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    n: int = 1
    seed: int | None = None
    return_logprob: bool = False
    top_logprobs_num: int = 0
    # Structured output: at most one of these (compiled by the constrain stage).
    json_schema: str | None = None
    regex: str | None = None
    choices: list[str] | None = None
    # Added per token id to the logits before sampling (OpenAI's logit_bias, values in [-100, 100]).
    logit_bias: dict[int, float] = {}
    # Regular expressions matched on the decoded output, like stop strings (SGLang's stop_regex).
    stop_regex: list[str] = []
    # Keep only the last k prompt tokens (vLLM's truncate_prompt_tokens; -1: the context length).
    truncate_prompt_tokens: int | None = None
    # Send the prompt's and the output's token ids back (vLLM's return_token_ids).
    return_token_ids: bool = False
    # Prompt logprobs: from this prompt position on (-1: none; needs return_logprob), with the
    # top prompt_top_logprobs_num alternatives per position.
    logprob_start_len: int = -1
    prompt_top_logprobs_num: int = 0
    # Also report the logprobs of these token ids at every position (SGLang's token_ids_logprob).
    token_ids_logprob: list[int] = []
    # With --reasoning-parser: the grammar above applies only once the model's think block has
    # ended (set for chat requests that separate reasoning and did not turn thinking off).
    grammar_after_reasoning: bool = False
    ebnf: str | None = None  # structured output as an EBNF grammar (one of json_schema, regex, choices, ebnf)

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field against its rule; raise SamplingParamsError on the first break."""
        _check(self.max_new_tokens is None or self.max_new_tokens >= 0, "max_new_tokens",
               "must be >= 0 (or null: up to the context length)", self.max_new_tokens)
        limit = self.max_new_tokens if self.max_new_tokens is not None else self.min_new_tokens
        _check(0 <= self.min_new_tokens <= max(limit, 0), "min_new_tokens",
               "must be >= 0 and <= max_new_tokens", self.min_new_tokens)
        _check(_finite(self.temperature) and self.temperature >= 0.0, "temperature",
               "must be a finite number >= 0", self.temperature)
        _check(_finite(self.top_p) and 0.0 < self.top_p <= 1.0, "top_p", "must be in (0, 1]", self.top_p)
        _check(self.top_k == -1 or self.top_k >= 1, "top_k", "must be -1 (disabled) or >= 1", self.top_k)
        _check(_finite(self.min_p) and 0.0 <= self.min_p <= 1.0, "min_p", "must be in [0, 1]", self.min_p)
        _check(_finite(self.repetition_penalty) and 0.0 < self.repetition_penalty <= 2.0,
               "repetition_penalty", "must be in (0, 2]", self.repetition_penalty)
        _check(_finite(self.frequency_penalty) and -2.0 <= self.frequency_penalty <= 2.0,
               "frequency_penalty", "must be in [-2, 2]", self.frequency_penalty)
        _check(_finite(self.presence_penalty) and -2.0 <= self.presence_penalty <= 2.0,
               "presence_penalty", "must be in [-2, 2]", self.presence_penalty)
        _check(1 <= self.n <= MAX_N, "n", f"must be in [1, {MAX_N}]", self.n)
        _check(0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS, "top_logprobs_num",
               f"must be in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs_num)
        self._validate_stops()
        self._validate_grammar()
        self._validate_extras()
        self._validate_logprob_options()

    def _validate_stops(self) -> None:
        _check(len(self.stop) <= MAX_STOP_STRINGS, "stop",
               f"at most {MAX_STOP_STRINGS} stop strings", len(self.stop))
        for text in self.stop:
            _check(0 < len(text) <= MAX_STOP_STRING_CHARS, "stop",
                   f"each stop string must have 1 to {MAX_STOP_STRING_CHARS} characters", text)
        _check(len(self.stop_token_ids) <= MAX_STOP_TOKEN_IDS, "stop_token_ids",
               f"at most {MAX_STOP_TOKEN_IDS} stop token ids", len(self.stop_token_ids))
        for token_id in self.stop_token_ids:
            _check(token_id >= 0, "stop_token_ids", "token ids must be >= 0", token_id)

    def _validate_grammar(self) -> None:
        given = [name for name in ("json_schema", "regex", "choices", "ebnf") if getattr(self, name) is not None]
        _check(len(given) <= 1, given[-1] if given else "json_schema",
               "at most one of json_schema, regex, choices, ebnf may be set", given)
        if self.choices is not None:
            _check(len(self.choices) > 0 and all(self.choices), "choices",
                   "must be a non-empty list of non-empty strings", self.choices)

    def _validate_extras(self) -> None:
        for token_id, bias in self.logit_bias.items():
            _check(token_id >= 0, "logit_bias", "token ids must be >= 0", token_id)
            _check(_finite(bias) and -100.0 <= bias <= 100.0, "logit_bias", "biases must be in [-100, 100]", bias)
        _check(len(self.stop_regex) <= MAX_STOP_STRINGS, "stop_regex",
               f"at most {MAX_STOP_STRINGS} stop regexes", len(self.stop_regex))
        for pattern in self.stop_regex:
            _check(0 < len(pattern) <= MAX_STOP_STRING_CHARS, "stop_regex",
                   f"each stop regex must have 1 to {MAX_STOP_STRING_CHARS} characters", pattern)
            _check(_compiles(pattern), "stop_regex", "must be a valid regular expression", pattern)
        _check(self.truncate_prompt_tokens is None or self.truncate_prompt_tokens == -1
               or self.truncate_prompt_tokens >= 1, "truncate_prompt_tokens", "must be -1 or >= 1",
               self.truncate_prompt_tokens)

    def _validate_logprob_options(self) -> None:
        _check(self.logprob_start_len >= -1, "logprob_start_len", "must be -1 (none) or >= 0",
               self.logprob_start_len)
        _check(0 <= self.prompt_top_logprobs_num <= MAX_TOP_LOGPROBS, "prompt_top_logprobs_num",
               f"must be in [0, {MAX_TOP_LOGPROBS}]", self.prompt_top_logprobs_num)
        _check(len(self.token_ids_logprob) <= MAX_TOKEN_IDS_LOGPROB, "token_ids_logprob",
               f"at most {MAX_TOKEN_IDS_LOGPROB} token ids", len(self.token_ids_logprob))
        for token_id in self.token_ids_logprob:
            _check(token_id >= 0, "token_ids_logprob", "token ids must be >= 0", token_id)

    @property
    def wants_prompt_logprobs(self) -> bool:
        return self.return_logprob and self.logprob_start_len >= 0


def _compiles(pattern: str) -> bool:
    try:
        re.compile(pattern)
    except re.error:
        return False
    return True


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _check(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise SamplingParamsError(field, rule, value)


class FunctionCall(msgspec.Struct, frozen=True, kw_only=True):
    """A function call inside a tool call: name and JSON-encoded arguments."""

    name: str
    arguments: str


class ToolCall(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call made by the assistant (OpenAI shape)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One chat turn as the chat template sees it (content parts already joined)."""

    role: str
    content: str | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    # A turn with images or videos: its content as ordered parts, {"type": "text", "text": ...},
    # {"type": "image"} or {"type": "video"}, which a vision model's chat template renders
    # into its placeholders (``content`` keeps the text parts joined).
    content_parts: list[dict[str, str]] | None = None


class GenerateRequest(Message, frozen=True, kw_only=True):
    """ingest -> tokenize: one client request, exactly one of text/messages/input_ids set."""

    rid: str
    text: str | None = None
    messages: list[ChatMessage] | None = None
    input_ids: list[int] | None = None
    sampling: SamplingParams = SamplingParams()
    stream: bool = False
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] = {}
    image_urls: list[str] = []
    arrival_time_s: float = 0.0
    continue_final_message: bool = False  # render the last (assistant) turn open, to be continued
    # Images and videos as the client sent them, already fetched (in the order their
    # placeholders appear in the prompt); ``image_urls`` above is what ingest still has to fetch.
    media: list[MediaInput] = []


class MediaInput(msgspec.Struct, frozen=True, kw_only=True):
    """One image or video as the client sent it, as bytes (ingest -> tokenize -> multimodal).

    ``data`` is one encoded file (PNG/JPEG/WebP/GIF for an image; a video
    container, read with PyAV, for a video); a video sent as a list of
    pictures has ``frames`` (each an encoded image) and empty ``data``.
    ``param`` names where it came from in the request (``messages[0].content[1]``,
    ``image_data[0]``), so a 400 about it can say so. ``fps``: for a video,
    the rate its ``frames`` were taken at (None: the processor's default).
    """

    modality: Literal["image", "video"]
    data: bytes = b""
    frames: list[bytes] = []
    param: str = ""
    fps: float | None = None


class ImageInput(msgspec.Struct, frozen=True, kw_only=True):
    """Decoded pixels of one image: dtype, shape and raw bytes (encodable)."""

    dtype: str
    shape: list[int]
    data: bytes


class MultimodalItem(msgspec.Struct, frozen=True, kw_only=True):
    """One preprocessed image or video of a request (multimodal -> schedule -> forward).

    * ``modality``: "image" or "video".
    * ``content_hash``: hex SHA-256 of ``pixel_values.data`` (plus ``grid_thw``): two
      items with the same hash give the same vision embeddings (the mm cache's key).
    * ``pixel_values``: float32 ``[num_patches, C * temporal_patch * patch * patch]``,
      patchified exactly as Hugging Face's Qwen2-VL image / Qwen3-VL video processor
      emits ``pixel_values`` / ``pixel_values_videos``; ``num_patches = t * h * w``.
    * ``grid_thw``: ``[t, h, w]`` in patches, before the 2x2 (``merge_size``) merge.
    * ``offset``: index in ``TokenizedRequest.input_ids`` of the item's first pad token;
      ``length``: how many pad tokens it has, ``t * h * w // merge_size**2``.
      The vision encoder's output rows ``0..length-1`` replace the token embeddings at
      ``input_ids[offset : offset + length]``.
    * ``pad_token_id``: the real pad id (``<|image_pad|>`` or ``<|video_pad|>``);
      ``input_ids`` holds this id at every pad position, so every prompt token stays
      in the vocabulary (the embedding lookup, logprobs and penalties need no change).
      ``pad_value``: an id derived from ``content_hash`` (``MM_PAD_VALUE_BASE`` plus
      30 bits of the hash, SGLang's pad_value): a prefix cache keys the pad positions
      by it, so prompts with different images never share a cached prefix.
    * Video only: ``second_per_grid_t`` is the seconds one temporal grid step spans
      (Qwen2.5-VL's ``second_per_grid_ts``); ``timestamps_s`` the time of each temporal
      grid step (Qwen3-VL writes them into the prompt as ``<t seconds>``).
    """

    modality: Literal["image", "video"]
    content_hash: str
    pixel_values: ImageInput
    grid_thw: list[int]
    offset: int
    length: int
    pad_token_id: int
    pad_value: int
    second_per_grid_t: float = 0.0
    timestamps_s: list[float] = []


MM_PAD_VALUE_BASE = 1 << 30  # MultimodalItem.pad_value >= this: never a real token id


class TokenizedRequest(Message, frozen=True, kw_only=True):
    """tokenize -> multimodal -> schedule: one sequence to generate."""

    rid: str
    parent_rid: str
    index: int = 0
    input_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    images: list[ImageInput] = []
    arrival_time_s: float = 0.0
    # Multimodal: ``media`` (raw, from tokenize) is what the multimodal stage turns into
    # ``mm_items`` (it sends the request on with ``media`` empty). ``mrope_positions`` is
    # None for a text-only prompt, else M-RoPE's three rows (temporal, height, width),
    # each ``len(input_ids)`` long, as Hugging Face's ``get_rope_index`` computes them;
    # a token generated at sequence index ``i >= len(input_ids)`` has position
    # ``i + mrope_position_delta`` in all three rows.
    media: list[MediaInput] = []
    mm_items: list[MultimodalItem] = []
    mrope_positions: list[list[int]] | None = None
    mrope_position_delta: int = 0


class Abort(Message, frozen=True, kw_only=True):
    """ingest/detokenize -> (tokenize ->) schedule: stop this request now and free its KV.

    ``rid`` may be a parent rid; every sequence of it is aborted.
    """

    rid: str
    reason: str = "abort"


class FlushCache(Message, frozen=True, kw_only=True):
    """ingest -> tokenize -> multimodal -> schedule: drop every unlocked radix-cache entry.

    It travels the request path (like Abort) so the front end has one door
    into the engine under every placement.
    """

    request_id: str


# --------------------------------------------------------------------------
# Engine side: schedule -> forward -> sample -> schedule, and constrain
# --------------------------------------------------------------------------


class RowWrite(msgspec.Struct, frozen=True, kw_only=True):
    """Slots to write into ``req_to_token[row, start:start+len(slots)]`` (cached prefixes)."""

    row: int
    start: int
    slots: list[int]


class SamplingBatch(msgspec.Struct, frozen=True, kw_only=True):
    """Per-request sampling parameters of one batch, one entry per request row."""

    temperatures: list[float]
    top_ps: list[float]
    top_ks: list[int]
    min_ps: list[float]
    repetition_penalties: list[float]
    frequency_penalties: list[float]
    presence_penalties: list[float]
    seeds: list[int]
    steps: list[int]  # tokens generated so far: the RNG counter for seeded sampling
    need_sample: list[bool]  # False for a prefill chunk that is not the prompt's last
    first_step: list[bool]  # True on the request's first sample: reset its penalty counts
    return_logprob: list[bool]
    top_logprobs_nums: list[int]
    constrained: list[bool]
    # Per row, token ids that must not be picked this step (stop ids while a
    # request is still under min_new_tokens); empty when no row bans anything.
    banned_token_ids: list[list[int]] = []
    # Per row, token id -> bias added to the logits (logit_bias); empty when no row has one.
    logit_biases: list[dict[int, float]] = []
    # Prompt logprobs (empty when no row wants any this step). Row b's entry lists the
    # prompt tokens whose logprobs this chunk computes: the next token of each of the
    # chunk's last len(...) positions, counted back from the chunk's last token (when the
    # row does not sample) or from the one before it (when it samples: the last position
    # predicts the first output token). The forward stage returns logits for those rows.
    prompt_logprob_ids: list[list[int]] = []
    prompt_top_logprobs_nums: list[int] = []
    # Per row, token ids whose logprobs are reported at every position (token_ids_logprob).
    token_ids_logprobs: list[list[int]] = []
    # Speculative decoding (empty when no row drafts): per row, the draft tokens fed after
    # the row's last token (a chain); the row is verified instead of sampled once.
    draft_ids: list[list[int]] = []
    # Draft trees (--speculative-eagle-topk > 1; empty: every row is a chain): per row, the
    # parent of each node (node 0 the row's last token, parent -1; node i the draft
    # draft_ids[i - 1]); an empty entry is a chain (stages/speculative/tree.py).
    draft_parents: list[list[int]] = []


class KeptPath(msgspec.Struct, frozen=True, kw_only=True):
    """A verified draft tree's accepted path, whose K/V moves to the sequence's positions.

    The verify step wrote node ``i``'s K/V at ``req_to_token[row, start + i]``; the accepted
    draft ``nodes[k]`` belongs at ``start + k + 1``. The forward stage copies them before the
    next batch writes anything (stages/forward/speculative.py).
    """

    row: int
    rid: str
    start: int  # the root's position
    nodes: list[int]  # accepted node ids, root excluded, in path order


class ForwardBatch(Message, frozen=True, kw_only=True):
    """schedule -> forward (and constrain): one model step, plain ints, no request objects.

    ``mode`` is ``extend`` for any batch with a prefill chunk (decodes riding
    along have extend_len 1) and ``decode`` when every request adds one token.
    Request b owns q rows ``extend_start_loc[b] : +extend_lens[b]``; its new
    tokens go to ``out_cache_loc`` at positions ``prefix_lens[b]..seq_lens[b]-1``
    of ``req_to_token[req_pool_indices[b]]``. The model returns the logits of
    each request's last new token.
    """

    batch_id: int
    mode: Literal["extend", "decode"]
    rids: list[str]
    input_ids: list[int]
    positions: list[int]
    out_cache_loc: list[int]
    req_pool_indices: list[int]
    prefix_lens: list[int]
    extend_lens: list[int]
    seq_lens: list[int]
    row_writes: list[RowWrite] = []
    sampling: SamplingBatch
    # Overlap scheduling: the sample stage keeps this batch's tokens on the device
    # (by row) for the batch planned before they reach the host, and may report them
    # one step late. ``future_input``: some input_ids are ``-row``, that row's token
    # from the batch before (resolved on the device; triton_kernels/future.py).
    overlap: bool = False
    future_input: bool = False
    # Vision-language models: what this batch needs besides token ids (None: text only).
    mm: "MultimodalBatch | None" = None
    # Draft trees verified since the last batch whose accepted path is not a chain prefix.
    spec_kept: list[KeptPath] = []


class MultimodalSlice(msgspec.Struct, frozen=True, kw_only=True):
    """Pad rows of one image/video that fall in one prefill chunk (inside a MultimodalBatch).

    The vision embeddings ``item_start .. item_start + count - 1`` of ``item``
    replace the token embeddings of batch q rows ``batch_row .. batch_row + count - 1``.
    ``last``: the chunk reaches the item's end, so the forward stage may stop
    keeping its embeddings for ``rid``.
    """

    rid: str
    item: MultimodalItem
    batch_row: int
    item_start: int
    count: int
    last: bool


class MultimodalBatch(msgspec.Struct, frozen=True, kw_only=True):
    """schedule -> forward: vision inputs and M-RoPE positions of one ForwardBatch.

    ``mrope_positions``: three rows (time, height, width), one entry per batch
    token, for an extend batch; None for a decode batch (its ``positions``
    already hold ``seq_len + mrope_position_delta``). ``released``: rids whose
    per-request embeddings the forward stage may drop (finished or aborted
    while an image was only partly prefilled).
    """

    mrope_positions: list[list[int]] | None = None
    slices: list[MultimodalSlice] = []
    released: list[str] = []


class Logits(Message, frozen=True, kw_only=True):
    """forward -> sample: next-token logits, one row per request (process-local tensor)."""

    batch_id: int
    rids: list[str]
    logits: torch.Tensor  # [num_reqs, vocab] float32
    sampling: SamplingBatch
    # An overlap batch: store each row's token at future_tokens[future_rows[b]].
    future_tokens: torch.Tensor | None = None  # [rows] int64, the forward stage's buffer
    future_rows: torch.Tensor | None = None  # [num_reqs] int64, the batch's req_pool_indices
    # Logits of the prompt positions sampling.prompt_logprob_ids asks for, row by row.
    prompt_logits: torch.Tensor | None = None  # [sum of their lengths, vocab] float32
    # Logits of the positions before each draft token (sampling.draft_ids), row by row.
    draft_logits: torch.Tensor | None = None  # [sum of the draft lengths, vocab] float32


class GrammarCompile(Message, frozen=True, kw_only=True):
    """schedule -> constrain: compile this request's grammar (off the engine loop)."""

    rid: str
    kind: Literal["json_schema", "regex", "choices", "ebnf"]
    spec: str  # schema JSON, regex, JSON list of choices, or EBNF grammar
    # SamplingParams.grammar_after_reasoning, and the prompt's last token ids (whether the chat
    # template already opened or closed the think block).
    after_reasoning: bool = False
    prompt_tail_ids: list[int] = []
    # tokens generated before the grammar reached this engine (a decode engine takes over a request
    # after its prefill engine sampled them): the compiled grammar is advanced by these first
    replay_ids: list[int] = []


class GrammarReady(Message, frozen=True, kw_only=True):
    """constrain -> schedule: the grammar compiled (or failed: ``error`` says why)."""

    rid: str
    error: str | None = None


class GrammarRelease(Message, frozen=True, kw_only=True):
    """schedule -> constrain: the request finished or was aborted; drop its state."""

    rid: str


class TokenMask(Message, frozen=True, kw_only=True):
    """constrain -> sample: packed allowed-token bitmask of a batch's constrained rows.

    ``bitmask[i]`` (int32 words, bit j of word w allows token 32*w+j) applies to
    logits row ``row_indices[i]``; ``bitmask`` is None when no row is constrained.
    """

    batch_id: int
    row_indices: list[int]
    bitmask: torch.Tensor | None  # [len(row_indices), ceil(vocab/32)] int32, process-local


class SampledTokens(Message, frozen=True, kw_only=True):
    """sample -> schedule (and constrain): the token picked for each request of a batch.

    Rows with ``need_sample`` False carry token -1. Logprob lists are empty
    unless some request asked for them (then one entry per row).
    """

    batch_id: int
    rids: list[str]
    token_ids: list[int]
    token_logprobs: list[float] = []
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    # Per row (empty when no row wants them): this chunk's prompt logprobs (None for a row without).
    prompt_logprobs: list[PromptLogprobs | None] = []
    # Per row (empty when no row asks): logprobs of the row's token_ids_logprob at the sampled position.
    ids_logprobs: list[list[float]] = []
    # Per row (empty when no row drafted): the tokens a verified row emits (accepted drafts, then
    # the target's own token); token_ids holds their first. Empty list: the row emits token_ids[b].
    spec_token_ids: list[list[int]] = []
    # Per row (empty when no row verified a tree): the tree node ids of the accepted drafts.
    spec_accepted_nodes: list[list[int]] = []


class PromptLogprobs(msgspec.Struct, frozen=True, kw_only=True):
    """Logprobs of prompt tokens ``start, start+1, ...`` (sample -> schedule -> detokenize -> ingest).

    Entry i is about prompt token ``start + i``: how likely the model found it
    after the tokens before it. Prompt token 0 has no logprob (nothing comes
    before it): its entries are None / empty lists.
    """

    start: int = 0
    token_ids: list[int] = []
    logprobs: list[float | None] = []
    ranks: list[int | None] = []  # 1 + how many tokens were more likely (vLLM's rank)
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    ids_logprobs: list[list[float]] = []  # the request's token_ids_logprob, in its order


# --------------------------------------------------------------------------
# Result side: schedule -> detokenize -> ingest
# --------------------------------------------------------------------------


class FinishReason(msgspec.Struct, frozen=True, kw_only=True):
    """Why a sequence ended: OpenAI's finish_reason plus what matched."""

    type: Literal["stop", "length", "abort", "error"]
    matched: int | str | None = None
    message: str | None = None


class TokenOutput(msgspec.Struct, frozen=True, kw_only=True):
    """New tokens of one sequence in one step (inside a TokenOutputBatch)."""

    rid: str
    parent_rid: str
    index: int = 0
    new_token_ids: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    token_logprobs: list[float] = []
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    prompt_logprobs: PromptLogprobs | None = None  # all of them, on the sequence's first output
    ids_logprobs: list[list[float]] = []  # per new token: the request's token_ids_logprob
    spec_verify_ct: int = 0  # speculative verify steps of the sequence so far (SGLang's meta_info name)
    spec_accepted_tokens: int = 0  # draft tokens accepted so far


class TokenOutputBatch(Message, frozen=True, kw_only=True):
    """schedule -> detokenize: every sequence that made progress (or ended) this step."""

    outputs: list[TokenOutput]


class TextOutput(Message, frozen=True, kw_only=True):
    """detokenize -> ingest: the text delta of one sequence (final one has finish_reason)."""

    rid: str
    parent_rid: str
    index: int = 0
    text_delta: str
    token_ids_delta: list[int]
    finish_reason: FinishReason | None = None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    token_logprobs: list[float] = []
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    prompt_token_ids: list[int] = []  # on a sequence's first output, when return_token_ids asks for them
    prompt_logprobs: PromptLogprobs | None = None  # on a sequence's first output, when asked for
    ids_logprobs: list[list[float]] = []  # per new token: the request's token_ids_logprob
    spec_verify_ct: int = 0  # speculative verify steps of the sequence so far
    spec_accepted_tokens: int = 0  # draft tokens accepted so far


class ErrorOutput(Message, frozen=True, kw_only=True):
    """any stage -> ingest: the request failed; ingest answers with an OpenAI error body."""

    rid: str
    status_code: int  # 400 client mistake, 503 overloaded, 500 our fault
    message: str
    error_type: str = "invalid_request_error"
    param: str | None = None


class EngineStats(Message, frozen=True, kw_only=True):
    """schedule -> (router ->) detokenize -> ingest: a periodic snapshot for /metrics and /get_server_info."""

    time_s: float
    num_running_reqs: int
    num_queue_reqs: int
    token_usage: float
    cache_hit_rate: float
    gen_throughput: float
    max_total_num_tokens: int
    dp_rank: int = 0  # which data-parallel engine replica took this snapshot
    # prefill/decode disaggregation (stages/schedule/disagg.py); "" and zeros on an ordinary engine
    role: Literal["", "prefill", "decode"] = ""
    num_generated_tokens: int = 0  # tokens sampled on this engine so far
    pd_handoffs: int = 0  # prefill: requests handed to a decode engine; decode: requests taken over (KV arrived)
    pd_queue_reqs: int = 0  # prefill: handoffs not yet accepted; decode: handoffs waiting for room or grammar
    pd_transfer_reqs: int = 0  # KV transfers in flight
    pd_transfers: int = 0  # KV transfers ended (sends on a prefill engine, receives on a decode engine)
    pd_transfer_failures: int = 0
    pd_transfer_bytes: int = 0
    pd_transfer_seconds: float = 0.0
    pd_transport: str = ""  # the KV transport of this engine's transfers ("shm", "cuda-ipc", "gloo", "nccl")


class ProcessCounters(Message, frozen=True, kw_only=True):
    """process runner -> detokenize -> ingest: what each stage of one process has done so far (/metrics)."""

    process: str
    time_s: float
    stages: dict[str, dict[str, float]]  # stage name -> StageCounters fields


# --------------------------------------------------------------------------
# Construction records: what the assembly hands to stage constructors
# --------------------------------------------------------------------------


class ModelInfo(msgspec.Struct, frozen=True, kw_only=True):
    """forward -> (at construction) schedule, constrain: the model and its KV pool as loaded.

    The forward stage measures the pool after loading the weights; the
    assembly passes this record to the stages built after it in the same
    process. It is data, so a recording can rebuild those stages.
    """

    num_slots: int  # KV pool slots, page 0 (the padding page) included
    num_rows: int  # rows of req_to_token, row 0 (dummy) included
    context_len: int  # longest sequence (prompt + output) a request may reach
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # model config + generation_config eos ids


class ServerInfo(msgspec.Struct, frozen=True, kw_only=True):
    """assembly -> ingest (at construction): versions and device for /get_server_info."""

    torch_version: str
    triton_version: str
    device_name: str


# --------------------------------------------------------------------------
# What each channel carries
# --------------------------------------------------------------------------

TokenizeInbox = Union[GenerateRequest, Abort, FlushCache]
# The data-parallel router (``--dp-size N``) sits between tokenize and the N engine
# replicas; each replica's schedule stage reports its load to it.
RouterInbox = Union[TokenizedRequest, Abort, FlushCache, EngineStats]
MultimodalInbox = Union[TokenizedRequest, Abort, FlushCache]
ScheduleInbox = Union[TokenizedRequest, Abort, FlushCache, SampledTokens, GrammarReady]
ForwardInbox = ForwardBatch
ConstrainInbox = Union[GrammarCompile, GrammarRelease, ForwardBatch, SampledTokens, FlushCache]
SampleInbox = Union[Logits, TokenMask]
# Detokenize also sees each TokenizedRequest (from tokenize: its stop strings and
# decoding options) and relays the schedule stage's EngineStats and every process
# runner's ProcessCounters to ingest.
DetokenizeInbox = Union[TokenOutputBatch, ErrorOutput, TokenizedRequest, EngineStats, ProcessCounters]
IngestInbox = Union[TextOutput, ErrorOutput, EngineStats, ProcessCounters]

ALL_MESSAGE_TYPES: tuple[type[Message], ...] = (
    GenerateRequest, TokenizedRequest, Abort, FlushCache, ForwardBatch, Logits,
    GrammarCompile, GrammarReady, GrammarRelease, TokenMask, SampledTokens,
    TokenOutputBatch, TextOutput, ErrorOutput, EngineStats, ProcessCounters,
)
AnyMessage = Union[ALL_MESSAGE_TYPES]  # any message, told apart by its "type" tag


# --------------------------------------------------------------------------
# Codec: msgpack against a declared type; tensors as dtype + shape + bytes
# --------------------------------------------------------------------------


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        cpu = obj.detach().contiguous().cpu()
        raw = cpu.view(torch.uint8) if cpu.numel() else cpu
        return {"dtype": str(cpu.dtype).removeprefix("torch."), "shape": list(cpu.shape),
                "data": raw.numpy().tobytes()}
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(expected: type, obj: Any) -> Any:
    if expected is torch.Tensor:
        dtype = getattr(torch, obj["dtype"])
        data = bytearray(obj["data"])
        if not data:
            return torch.empty(obj["shape"], dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(obj["shape"])
    raise NotImplementedError(f"cannot decode {expected}")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def encode(message: Any) -> bytes:
    """Encode any message (tensors included) to msgpack bytes."""
    return _ENCODER.encode(message)


def decoder(message_type: Any) -> msgspec.msgpack.Decoder:
    """A decoder that accepts exactly ``message_type`` (a struct or tagged union)."""
    return msgspec.msgpack.Decoder(message_type, dec_hook=_dec_hook)


# --------------------------------------------------------------------------
# Prefill/decode disaggregation (``--pd-prefill N --pd-decode M``; pipeline/disagg.py)
# --------------------------------------------------------------------------


class KVHandoff(Message, frozen=True, kw_only=True):
    """prefill schedule -> decode schedule: a prefilled request, its first token sampled, to continue.

    From this message on the decode engine answers for the request: it emits
    ``first`` (the prefill's first output: token, logprobs, prompt logprobs)
    once the KV has arrived, then the rest.
    """

    rid: str
    parent_rid: str
    index: int = 0
    input_ids: list[int]
    sampling: SamplingParams
    max_new_tokens: int  # clipped to the context length already
    seed: int  # the sampler's seed (drawn by the prefill engine when the request had none)
    # None: handed off early, while its prompt is still prefilling (it comes later in KVFirst); the KV
    # then moves in segments of ``segment_tokens`` as the prefill computes them (0: one segment)
    first: TokenOutput | None
    prefill_engine: int  # which prefill engine holds the KV (its accept door and transport rank)
    segment_tokens: int = 0


KV_MAX_SEGMENTS = 1 << 6  # segments of one KV transfer at most (the sender picks segment_tokens to fit)


def kv_segments(start: int, end: int, segment_tokens: int) -> list[tuple[int, int]]:
    """[start, end) cut into KV transfer segments of ``segment_tokens`` (0: one); sender and receiver cut alike."""
    if segment_tokens <= 0 or end - start <= segment_tokens:
        return [(start, end)]
    return [(a, min(a + segment_tokens, end)) for a in range(start, end, segment_tokens)]


class KVFirst(Message, frozen=True, kw_only=True):
    """prefill schedule -> decode schedule: the first output of a request handed off early (its prefill
    ended). It may be final (the request ended at its first token): the decode engine then only emits it."""

    rid: str
    first: TokenOutput


class KVAccept(Message, frozen=True, kw_only=True):
    """decode schedule -> prefill schedule: pages are allocated; send the prompt's KV from ``skip`` on."""

    rid: str
    transfer_id: int
    decode_rank: int  # the decode engine's transport rank
    skip: int = 0  # leading prompt tokens the decode engine had cached already


class KVSend(Message, frozen=True, kw_only=True):
    """prefill schedule -> transfer: send these slots' K and V, every layer, to ``peer`` (one segment)."""

    rid: str
    transfer_id: int
    peer: int
    slots: list[int]
    segment: int = 0


class KVRecv(Message, frozen=True, kw_only=True):
    """decode schedule -> transfer: receive ``len(slots)`` tokens' K and V from ``peer`` into these slots,
    in segments of ``segment_tokens`` (0: one), each sent on its own."""

    rid: str
    transfer_id: int
    peer: int
    slots: list[int]
    segment_tokens: int = 0


class KVTransferDone(Message, frozen=True, kw_only=True):
    """transfer -> schedule: a send or receive ended (``ok``, or ``error`` says why not)."""

    rid: str
    transfer_id: int
    direction: Literal["send", "recv"]
    ok: bool
    error: str = ""
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str = ""  # what moved it: "shm", "cuda-ipc", "gloo", "nccl"


class EngineDown(Message, frozen=True, kw_only=True):
    """launcher -> router -> the surviving engines' schedules: an engine process of the pd topology died.

    The router stops routing to it and fails the requests that were on it;
    a prefill engine stops handing off to a dead decode engine; a decode
    engine ends the handoffs still waiting on a dead prefill engine; each
    tells its transfer stage, which fails every transfer with that peer.
    """

    role: Literal["prefill", "decode"]
    index: int  # within its role: prefill k (0..N-1) or decode j (0..M-1)
    rank: int  # its KV transport rank (prefill engines first: k, or N + j)
    reason: str


class HandedOff(Message, frozen=True, kw_only=True):
    """prefill schedule -> router: a request now lives on decode engine ``decode`` (where it fails if that dies)."""

    rid: str
    parent_rid: str
    decode: int  # decode engine index j (0..M-1)


class PDTopology(Message, frozen=True, kw_only=True):
    """router command -> each engine command (``pipeline/pd_hosts.py``): who it is and where everyone listens."""

    role: Literal["prefill", "decode"]
    index: int  # within its role
    num_prefill: int
    num_decode: int
    addresses: dict[str, str]  # process name ("main", "engine_prefill0", ...) -> "host:port" of its channel hub
    dist_init_addr: str  # host:port of the KV transfer group's rendezvous


PrefillScheduleInbox = Union[TokenizedRequest, Abort, FlushCache, SampledTokens, GrammarReady, KVAccept,
                             KVTransferDone, EngineDown]
DecodeScheduleInbox = Union[Abort, FlushCache, SampledTokens, GrammarReady, KVHandoff, KVFirst, KVTransferDone,
                            EngineDown]
TransferInbox = Union[KVSend, KVRecv, EngineDown]
PDRouterInbox = Union[TokenizedRequest, Abort, FlushCache, EngineStats, EngineDown, HandedOff]
ALL_MESSAGE_TYPES = ALL_MESSAGE_TYPES + (KVHandoff, KVFirst, KVAccept, KVSend, KVRecv, KVTransferDone, EngineDown,
                                         HandedOff)
AnyMessage = Union[ALL_MESSAGE_TYPES]  # noqa: F811 -- the disaggregation messages included
