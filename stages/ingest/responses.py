"""Response bodies: OpenAI completions/chat (whole and as SSE chunks) and SGLang's /generate.

A ``SequenceResult`` accumulates one sequence's TextOutputs; the builders below
turn results into the JSON shapes clients expect. Token strings for logprobs
come from ``TokenText`` (one decode per token id, cached).
"""
from __future__ import annotations

import functools
import json
import time
import uuid
from typing import Any

import msgspec

from pipeline.messages import FinishReason, PromptLogprobs, TextOutput


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class TokenText:
    """The text of single token ids (for logprob entries), cached per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.text = functools.lru_cache(maxsize=65536)(self._decode)

    def _decode(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)


class SequenceResult(msgspec.Struct, kw_only=True):
    """Everything one sequence produced so far."""

    index: int
    text: str = ""
    token_ids: list[int] = []
    token_logprobs: list[float] = []
    top_token_ids: list[list[int]] = []
    top_logprobs: list[list[float]] = []
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    prompt_token_ids: list[int] = []  # return_token_ids: the first output brings them
    prompt_logprobs: PromptLogprobs | None = None
    ids_logprobs: list[list[float]] = []
    spec_verify_ct: int = 0  # speculative decoding: verify steps and accepted drafts
    spec_accepted_tokens: int = 0

    def add(self, output: TextOutput) -> None:
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        self.ids_logprobs.extend(output.ids_logprobs)
        self.text += output.text_delta
        self.token_ids.extend(output.token_ids_delta)
        if output.prompt_token_ids:
            self.prompt_token_ids = list(output.prompt_token_ids)
        self.token_logprobs.extend(output.token_logprobs)
        self.top_token_ids.extend(output.top_token_ids)
        self.top_logprobs.extend(output.top_logprobs)
        self.prompt_tokens = output.prompt_tokens or self.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, output.completion_tokens)
        self.cached_tokens = max(self.cached_tokens, output.cached_tokens)
        self.spec_verify_ct = max(self.spec_verify_ct, output.spec_verify_ct)
        self.spec_accepted_tokens = max(self.spec_accepted_tokens, output.spec_accepted_tokens)
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason


def add_token_ids(response: dict[str, Any], results: list[SequenceResult], chat: bool) -> dict[str, Any]:
    """vLLM's return_token_ids: each choice's ``token_ids``, and the prompt's ``prompt_token_ids`` (per choice
    for completions, once at the top for chat, which has one prompt)."""
    for choice, result in zip(response["choices"], results):
        choice["token_ids"] = list(result.token_ids)
        if not chat:
            choice["prompt_token_ids"] = list(result.prompt_token_ids)
    if chat:
        response["prompt_token_ids"] = list(results[0].prompt_token_ids) if results else []
    return response


def openai_finish_reason(finish: FinishReason | None) -> str | None:
    return None if finish is None else finish.type


def usage(results: list[SequenceResult], num_prompts: int = 1) -> dict[str, Any]:
    """Prompt tokens once per prompt (not per sample), completion tokens summed."""
    per_prompt = len(results) // max(num_prompts, 1) or 1
    prompt_tokens = sum(r.prompt_tokens for r in results[::per_prompt])
    completion_tokens = sum(r.completion_tokens for r in results)
    cached_tokens = sum(r.cached_tokens for r in results[::per_prompt])
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


# --------------------------------------------------------------------------- logprobs


def completion_logprobs(texts: TokenText, output: TextOutput | SequenceResult, token_ids: list[int],
                        text_start: int = 0, echo: bool = False) -> dict[str, Any]:
    """OpenAI /v1/completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.

    Each top_logprobs entry holds the chosen token and the top-n (n may be 0:
    then just the chosen token, as vLLM answers ``logprobs: 0``). With
    ``echo``, the prompt's tokens come first (the first one's entries null),
    when the output carries them.
    """
    prompt = output.prompt_logprobs if echo else None
    token_ids = (list(prompt.token_ids) if prompt is not None else []) + list(token_ids)
    tokens = [texts.text(t) for t in token_ids]
    offsets, position = [], text_start if prompt is None else 0
    for token in tokens:
        offsets.append(position)
        position += len(token)
    logprobs: list[float | None] = list(prompt.logprobs) if prompt is not None else []
    tops: list[dict[str, float] | None] = []
    if prompt is not None:
        tops = [_top_dict(texts, t, lp, ids, lps) if lp is not None else None for t, lp, ids, lps in
                zip(prompt.token_ids, prompt.logprobs, prompt.top_token_ids, prompt.top_logprobs)]
    output_ids = token_ids[len(logprobs):]
    tops += [_top_dict(texts, t, lp, ids, lps) for t, lp, ids, lps in
             zip(output_ids, output.token_logprobs, _padded(output.top_token_ids, len(output_ids)),
                 _padded(output.top_logprobs, len(output_ids)))]
    logprobs += list(output.token_logprobs)
    return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}


def _top_dict(texts: TokenText, token_id: int, logprob: float, ids: list[int], lps: list[float]
              ) -> dict[str, float]:
    top = {texts.text(token_id): logprob}
    top.update((texts.text(t), lp) for t, lp in zip(ids, lps))
    return top


def _padded(rows: list[list], length: int) -> list[list]:
    return list(rows) + [[]] * (length - len(rows))


def vllm_prompt_logprobs(texts: TokenText, prompt: PromptLogprobs | None) -> list[dict[str, Any] | None] | None:
    """vLLM's prompt_logprobs: per prompt token None (the first) or {token id: {logprob, rank,
    decoded_token}} for the token itself and the top-n."""
    if prompt is None:
        return None
    out: list[dict[str, Any] | None] = []
    for token_id, logprob, rank, ids, lps in zip(prompt.token_ids, prompt.logprobs, prompt.ranks,
                                                 prompt.top_token_ids, prompt.top_logprobs):
        if logprob is None:
            out.append(None)
            continue
        entry = {str(token_id): {"logprob": logprob, "rank": rank, "decoded_token": texts.text(token_id)}}
        for position, (top_id, top_lp) in enumerate(zip(ids, lps)):
            entry.setdefault(str(top_id), {"logprob": top_lp, "rank": position + 1,
                                           "decoded_token": texts.text(top_id)})
        out.append(entry)
    return out


def chat_logprobs(texts: TokenText, output: TextOutput | SequenceResult, token_ids: list[int]) -> dict[str, Any]:
    """OpenAI chat logprobs: {"content": [{token, logprob, bytes, top_logprobs}]}."""
    content = []
    for position, (token_id, logprob) in enumerate(zip(token_ids, output.token_logprobs)):
        token = texts.text(token_id)
        top = []
        if position < len(output.top_token_ids):
            top = [{"token": texts.text(t), "logprob": lp, "bytes": list(texts.text(t).encode())}
                   for t, lp in zip(output.top_token_ids[position], output.top_logprobs[position])]
        content.append({"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": top})
    return {"content": content}


# --------------------------------------------------------------------------- whole responses


def completion_response(rid: str, model: str, results: list[SequenceResult], num_prompts: int,
                        texts: TokenText, want_logprobs: bool, echo_prompts: list[str],
                        prompt_logprobs: bool = False) -> dict[str, Any]:
    choices = []
    per_prompt = len(results) // max(num_prompts, 1) or 1
    for i, result in enumerate(results):
        prefix = echo_prompts[i // per_prompt] if echo_prompts else ""
        choice = {"index": i, "text": prefix + result.text, "logprobs": None,
                  "finish_reason": openai_finish_reason(result.finish_reason),
                  "matched_stop": result.finish_reason.matched if result.finish_reason else None}
        if want_logprobs:
            choice["logprobs"] = completion_logprobs(texts, result, result.token_ids, len(prefix),
                                                     echo=bool(echo_prompts))
        if prompt_logprobs:
            choice["prompt_logprobs"] = vllm_prompt_logprobs(texts, result.prompt_logprobs)
        choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, num_prompts)}


def with_reasoning(fields: dict[str, Any]) -> dict[str, Any]:
    """A message or delta with ``reasoning_content`` always present (null when none) and vLLM's ``reasoning``.

    Clients read ``message.reasoning_content`` / ``delta.reasoning_content``
    as attributes, which fails when the key is missing; vLLM clients read
    ``reasoning``. Both carry the same text.
    """
    reasoning = fields.get("reasoning_content")
    return {**fields, "reasoning_content": reasoning, "reasoning": reasoning}


def drop_unfinished_calls(message: dict[str, Any]) -> dict[str, Any]:
    """A message cut by max_tokens: tool calls whose arguments are not complete JSON are dropped.

    A call the model never finished is not a call (OpenAI and vLLM return
    ``tool_calls: []`` and empty content then); complete calls before it stay.
    """
    calls = message.get("tool_calls")
    if not calls:
        return message
    kept = [call for call in calls if _is_json(call["function"]["arguments"])]
    if len(kept) == len(calls):
        return message
    return {**message, "tool_calls": kept, "content": message.get("content") or ""}


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def chat_response(rid: str, model: str, results: list[SequenceResult], texts: TokenText, want_logprobs: bool,
                  messages: list[dict[str, Any]]) -> dict[str, Any]:
    choices = []
    for result, message in zip(results, messages):
        finish = openai_finish_reason(result.finish_reason)
        message = with_reasoning(drop_unfinished_calls(message) if finish == "length" else message)
        if message.get("tool_calls") and finish == "stop":
            finish = "tool_calls"
        choices.append({"index": result.index, "message": message,
                        "logprobs": chat_logprobs(texts, result, result.token_ids) if want_logprobs else None,
                        "finish_reason": finish,
                        "matched_stop": result.finish_reason.matched if result.finish_reason else None})
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results)}


def native_finish_reason(finish: FinishReason | None, completion_tokens: int) -> dict[str, Any] | None:
    if finish is None:
        return None
    if finish.type == "length":
        return {"type": "length", "length": completion_tokens}
    body: dict[str, Any] = {"type": finish.type}
    if finish.matched is not None:
        body["matched"] = finish.matched
    if finish.message:
        body["message"] = finish.message
    return body


def native_logprobs(result: SequenceResult, texts: TokenText | None, token_ids_logprob: list[int]
                    ) -> dict[str, Any]:
    """SGLang's logprob fields of meta_info: [logprob, token id, text] triples (text only with
    ``texts``, i.e. return_text_in_logprobs); prompt token 0's entries are None."""
    def triple(logprob: float | None, token_id: int) -> list:
        return [logprob, token_id, texts.text(token_id) if texts is not None else None]

    def tops(ids: list[int], lps: list[float]) -> list:
        return [triple(lp, t) for t, lp in zip(ids, lps)]

    def by_id(values: list[float]) -> list:
        return [triple(lp, t) for t, lp in zip(token_ids_logprob, values)]

    prompt = result.prompt_logprobs or PromptLogprobs()
    first = [lp is None for lp in prompt.logprobs]
    fields = {
        "input_token_logprobs": [triple(lp, t) for lp, t in zip(prompt.logprobs, prompt.token_ids)],
        "output_token_logprobs": [triple(lp, t) for lp, t in zip(result.token_logprobs, result.token_ids)],
        "input_top_logprobs": [None if none else tops(ids, lps) for none, ids, lps in
                               zip(first, prompt.top_token_ids, prompt.top_logprobs)],
        "output_top_logprobs": [tops(ids, lps) for ids, lps in zip(result.top_token_ids, result.top_logprobs)],
    }
    if token_ids_logprob:
        fields["input_token_ids_logprobs"] = [None if none else by_id(values) for none, values in
                                              zip(first, prompt.ids_logprobs)]
        fields["output_token_ids_logprobs"] = [by_id(values) for values in result.ids_logprobs]
    return fields


def native_result(rid: str, result: SequenceResult, e2e_latency_s: float, return_logprob: bool,
                  texts: TokenText | None = None, token_ids_logprob: list[int] | None = None) -> dict[str, Any]:
    """SGLang's /generate item: text, output_ids and meta_info."""
    meta: dict[str, Any] = {
        "id": rid, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "finish_reason": native_finish_reason(result.finish_reason, result.completion_tokens),
        "e2e_latency": e2e_latency_s,
    }
    if result.spec_verify_ct:  # SGLang's name; accepted drafts beside it
        meta.update(spec_verify_ct=result.spec_verify_ct, spec_accepted_tokens=result.spec_accepted_tokens)
    if return_logprob:
        meta.update(native_logprobs(result, texts, token_ids_logprob or []))
    return {"text": result.text, "output_ids": list(result.token_ids), "meta_info": meta}
