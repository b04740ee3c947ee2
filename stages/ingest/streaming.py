"""Server-sent events and the handler-side plumbing every route shares.

``read_body`` decodes a JSON body into a protocol Struct: a 400 on bad JSON
(naming NaN/Infinity and unpaired surrogate escapes, which Python's json
module writes but JSON forbids), a wrong type, bytes that are not UTF-8, or
nesting deeper than ``MAX_BODY_DEPTH`` (checked on the raw bytes before decoding,
so the answer does not depend on how deep a given msgspec and Python recurse).
``collect`` gathers whole results; ``merged`` interleaves the outputs of several
streams (a batch of prompts); ``SseWriter`` writes
``data: {...}\\n\\n`` events and the final ``data: [DONE]``.

A streamed response is only started (status 200 and headers sent) once the
first output is there, so an error found by the tokenize stage (prompt too
long, bad template) is still answered as a plain 400, not inside a stream.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any, AsyncIterator

import msgspec
import numpy as np
from aiohttp import web

from pipeline.messages import TextOutput
from stages.ingest.errors import ApiError, from_decode_error
from stages.ingest.protocol import decode_body
from stages.ingest.responses import SequenceResult
from stages.ingest.streams import RequestStream


MAX_BODY_DEPTH = 512  # JSON nesting a body may have (the decoder recurses once per level)


async def read_body(request: web.Request, body_type: type) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise ApiError(400, "request body is empty; send a JSON object")
    if json_depth_exceeds(raw, MAX_BODY_DEPTH):
        raise ApiError(400, f"request body is nested too deeply (more than {MAX_BODY_DEPTH} levels)")
    try:
        return decode_body(raw, body_type)
    except msgspec.MsgspecError as error:
        hint = _json_hint(raw) if isinstance(error, msgspec.DecodeError) else None
        if hint is not None and not isinstance(error, msgspec.ValidationError):
            raise ApiError(400, f"request body is not valid JSON: {hint} ({error})") from error
        raise from_decode_error(error) from error
    except UnicodeDecodeError as error:  # bytes that are not UTF-8 inside a JSON string
        raise ApiError(400, f"request body is not valid UTF-8: {error}") from error
    except RecursionError as error:
        raise ApiError(400, "request body is nested too deeply") from error


_NOT_A_BRACKET = bytes(b for b in range(256) if b not in b"[]{}")
_BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x02\x02\x00\x00")  # step + 1: opener 2, closer 0
_DEPTH_CHUNK = 1 << 20


def json_depth_exceeds(raw: bytes, limit: int) -> bool:
    """Whether arrays and objects in the JSON text ``raw`` nest more than ``limit`` deep.

    String contents are dropped first: escaped backslashes and quotes are removed (left to
    right, as JSON pairs them), then every other piece of a split on the quote is a string.
    What is left are the brackets, whose running sum is the depth (bytes methods and numpy,
    no Python loop per byte; a chunk at a time to bound memory).
    """
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    brackets = b"".join(unescaped.split(b'"')[::2]).translate(None, _NOT_A_BRACKET)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return False
    level = 0
    for start in range(0, len(brackets), _DEPTH_CHUNK):
        steps = np.frombuffer(brackets[start:start + _DEPTH_CHUNK].translate(_BRACKET_STEPS), dtype=np.uint8)
        levels = np.cumsum(steps.astype(np.int64) - 1) + level
        if int(levels.max()) > limit:
            return True
        level = int(levels[-1])
    return False


_NON_JSON_NUMBER = re.compile(rb"[:\[,]\s*-?(NaN|Infinity)\b")
_LONE_SURROGATE = re.compile(rb"\\u[dD][89abAB][0-9a-fA-F]{2}(?!\\u[dD][c-fC-F])|(?<![0-9a-fA-F]{4})\\u[dD][c-fC-F]")


def _json_hint(raw: bytes) -> str | None:
    """Name two mistakes that Python's json module lets through but JSON forbids (msgspec's text is vague)."""
    if _NON_JSON_NUMBER.search(raw):
        return "NaN and Infinity are not JSON numbers"
    if _LONE_SURROGATE.search(raw):
        return "a string holds an unpaired UTF-16 surrogate escape (\\ud800-\\udfff)"
    return None


async def collect(streams: list[RequestStream]) -> list[SequenceResult]:
    """Whole results of every sequence of every stream, in (stream, index) order."""

    async def one(stream: RequestStream) -> list[SequenceResult]:
        results = [SequenceResult(index=i) for i in range(stream.num_sequences)]
        async for output in stream:
            results[output.index].add(output)
        return results

    tasks = [asyncio.ensure_future(one(stream)) for stream in streams]
    try:
        per_stream = await asyncio.gather(*tasks)
    finally:  # one stream failed (or the handler was cancelled): end the others' tasks, not leave them pending
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return [result for results in per_stream for result in results]


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, TextOutput]]:
    """(stream position, output) pairs from several streams as they arrive."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, TextOutput | BaseException | None]] = asyncio.Queue()

    async def forward(position: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((position, output))
            queue.put_nowait((position, None))
        except BaseException as error:  # an ApiError from one stream ends the whole response
            queue.put_nowait((position, error))

    tasks = [asyncio.ensure_future(forward(p, s)) for p, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            position, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield position, item
    finally:
        for task in tasks:
            task.cancel()


class SseWriter:
    """Writes one SSE response; ``start`` only when the first event is ready."""

    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response: web.StreamResponse | None = None

    async def start(self) -> None:
        self.response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                    "Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        await self.response.prepare(self.request)

    async def send(self, payload: Any) -> None:
        if self.response is None:
            await self.start()
        await self.response.write(b"data: " + msgspec.json.encode(payload) + b"\n\n")

    async def send_error(self, error: ApiError) -> None:
        await self.send(error.body())

    async def finish(self) -> web.StreamResponse:
        if self.response is None:
            await self.start()
        await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response
