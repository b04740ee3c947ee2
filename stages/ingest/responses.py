"""Response bodies: OpenAI completions/chat (whole and as SSE chunks) and SGLang's /generate.

A ``SequenceResult`` accumulates one sequence's TextOutputs; the builders below
turn results into the JSON shapes clients expect. Token strings for logprobs
come from ``TokenText`` (one decode per token id, cached).
"""
from __future__ import annotations

import functools
import time
import uuid
from typing import Any

import msgspec

from pipeline.messages import FinishReason, TextOutput


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

    def add(self, output: TextOutput) -> None:
        self.text += output.text_delta
        self.token_ids.extend(output.token_ids_delta)
        self.token_logprobs.extend(output.token_logprobs)
        self.top_token_ids.extend(output.top_token_ids)
        self.top_logprobs.extend(output.top_logprobs)
        self.prompt_tokens = output.prompt_tokens or self.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, output.completion_tokens)
        self.cached_tokens = max(self.cached_tokens, output.cached_tokens)
        if output.finish_reason is not None:
            self.finish_reason = output.finish_reason


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
                        text_start: int = 0) -> dict[str, Any]:
    """OpenAI /v1/completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens = [texts.text(t) for t in token_ids]
    offsets, position = [], text_start
    for token in tokens:
        offsets.append(position)
        position += len(token)
    tops = [{texts.text(t): lp for t, lp in zip(ids, lps)} for ids, lps in zip(output.top_token_ids,
                                                                              output.top_logprobs)]
    return {"tokens": tokens, "token_logprobs": list(output.token_logprobs),
            "top_logprobs": tops or None, "text_offset": offsets}


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
                        texts: TokenText, want_logprobs: bool, echo_prompts: list[str]) -> dict[str, Any]:
    choices = []
    per_prompt = len(results) // max(num_prompts, 1) or 1
    for i, result in enumerate(results):
        prefix = echo_prompts[i // per_prompt] if echo_prompts else ""
        choice = {"index": i, "text": prefix + result.text, "logprobs": None,
                  "finish_reason": openai_finish_reason(result.finish_reason),
                  "matched_stop": result.finish_reason.matched if result.finish_reason else None}
        if want_logprobs:
            choice["logprobs"] = completion_logprobs(texts, result, result.token_ids, len(prefix))
        choices.append(choice)
    return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": choices, "usage": usage(results, num_prompts)}


def chat_response(rid: str, model: str, results: list[SequenceResult], texts: TokenText, want_logprobs: bool,
                  messages: list[dict[str, Any]]) -> dict[str, Any]:
    choices = []
    for result, message in zip(results, messages):
        finish = openai_finish_reason(result.finish_reason)
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


def native_result(rid: str, result: SequenceResult, e2e_latency_s: float, return_logprob: bool,
                  texts: TokenText | None = None) -> dict[str, Any]:
    """SGLang's /generate item: text, output_ids and meta_info."""
    meta: dict[str, Any] = {
        "id": rid, "prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
        "cached_tokens": result.cached_tokens,
        "finish_reason": native_finish_reason(result.finish_reason, result.completion_tokens),
        "e2e_latency": e2e_latency_s,
    }
    if return_logprob:
        meta["output_token_logprobs"] = [[lp, t, None] for lp, t in zip(result.token_logprobs, result.token_ids)]
        meta["output_top_logprobs"] = [[[lp, t, None] for t, lp in zip(ids, lps)]
                                       for ids, lps in zip(result.top_token_ids, result.top_logprobs)]
    return {"text": result.text, "output_ids": list(result.token_ids), "meta_info": meta}
