"""The OpenAI Batch API: ``/v1/files`` and ``/v1/batches`` (JSONL in, JSONL out).

Files. ``POST /v1/files`` takes a multipart upload (``file`` and ``purpose``,
which must be ``batch``) and keeps it on disk in a temporary directory that
the server owns and removes when it stops (``FileStore``). The store is
bounded: uploads and batch results together hold at most
``--file-store-max-mb``; an upload past that is a 413. Files can be listed,
described, read back (``/content``) and deleted.

Batches. ``POST /v1/batches`` names an uploaded file and an endpoint. The
batch is ``validating`` while its lines are read, ``in_progress`` while they
run, ``finalizing`` while the results are written and then ``completed``;
``POST /v1/batches/{id}/cancel`` makes it ``cancelling`` (its running
requests are aborted in the engine) and then ``cancelled``, keeping what had
finished. A file that cannot be read as a batch at all (no requests, too
many lines) makes it ``failed``, with the reason in ``errors``.

Each input line is ``{"custom_id", "method": "POST", "url", "body"}``.
``/v1/chat/completions`` and ``/v1/completions`` lines run through the same
conversion, submit/collect and response builders as those routes (at most
``LINE_CONCURRENCY`` at a time). The output file has one line per success,
``{"id", "custom_id", "response": {"status_code": 200, "request_id",
"body"}, "error": null}``, in input order; every other line (not JSON, a
missing field, a duplicate ``custom_id``, a URL other than the batch's, an
endpoint this server does not batch such as ``/v1/embeddings``, a request the
server refuses) becomes a line of the error file with ``error: {"code",
"message"}`` (and ``response`` with the HTTP status and error body, when the
request itself was answered with an error). ``request_counts`` says how many
lines there were, how many succeeded and how many failed.

Nothing is silently ignored: a key of the create body, of an input line or of
a line's ``body`` that its Struct does not declare, an upload's form field
other than ``file`` and ``purpose``, and a list query parameter other than
``purpose``/``order``/``after``/``limit`` (files) or ``after``/``limit``
(batches) is a 400 (or, for a line, an error record) naming it. ``metadata``
is kept and shown on the batch.
"""
from __future__ import annotations

import asyncio
import email.parser
import email.policy
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import msgspec
from aiohttp import web

from stages.ingest.context import CTX, ServerContext
from stages.ingest.convert import chat_request, check_vocabulary, completion_requests
from stages.ingest.errors import ApiError, bad_request, from_decode_error
from stages.ingest.protocol import ChatCompletionRequest, CompletionRequest
from stages.ingest.responses import chat_response, completion_response, new_id
from stages.ingest.streaming import collect, read_body

CHAT_URL, COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
SERVED_URLS = (CHAT_URL, COMPLETIONS_URL)
KNOWN_ENDPOINTS = SERVED_URLS + ("/v1/embeddings", "/v1/responses")  # OpenAI's batch endpoints we know
LINE_CONCURRENCY = 32  # batch lines in flight at once (the rest wait, so the engine queue stays short)
MAX_LINES = 50_000  # OpenAI's limit per batch
COMPLETION_WINDOW_S = 24 * 3600


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# --------------------------------------------------------------------------- files


class FileRecord(msgspec.Struct, kw_only=True):
    """One stored file (its bytes are at ``path``)."""

    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    path: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "object": "file", "bytes": self.bytes, "created_at": self.created_at,
                "filename": self.filename, "purpose": self.purpose, "status": "processed",
                "expires_at": None, "status_details": None}


class FileStore:
    """Files in a temporary directory of the server's own, at most ``max_bytes`` in all."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.directory = Path(tempfile.mkdtemp(prefix="stagewise-files-"))
        self.files: dict[str, FileRecord] = {}

    @property
    def used_bytes(self) -> int:
        return sum(record.bytes for record in self.files.values())

    async def add(self, data: bytes, filename: str, purpose: str) -> FileRecord:
        if self.used_bytes + len(data) > self.max_bytes:
            raise ApiError(413, f"the file store is full: {len(data)} more bytes would exceed its "
                                f"{self.max_bytes} bytes (--file-store-max-mb); delete files first", param="file")
        file_id = _id("file")
        path = self.directory / file_id
        await asyncio.to_thread(path.write_bytes, data)
        record = FileRecord(id=file_id, bytes=len(data), created_at=int(time.time()), filename=filename,
                            purpose=purpose, path=str(path))
        self.files[file_id] = record
        return record

    def get(self, file_id: str) -> FileRecord:
        if file_id not in self.files:
            raise ApiError(404, f"file {file_id!r} not found", "not_found_error", "file_id")
        return self.files[file_id]

    async def read(self, file_id: str) -> bytes:
        return await asyncio.to_thread(Path(self.get(file_id).path).read_bytes)

    def delete(self, file_id: str) -> None:
        record = self.get(file_id)
        del self.files[file_id]
        Path(record.path).unlink(missing_ok=True)

    def close(self) -> None:
        self.files.clear()
        shutil.rmtree(self.directory, ignore_errors=True)


def form_parts(raw: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """A multipart/form-data body -> {field name: (filename, bytes)}."""
    parsed = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + raw)
    if not parsed.is_multipart():
        raise bad_request("the upload must be multipart/form-data with a file and a purpose", "file")
    parts = {}
    for part in parsed.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if isinstance(name, str):
            parts[name] = (part.get_filename(), part.get_payload(decode=True) or b"")
    return parts


FORM_FIELDS = ("file", "purpose")  # an upload's form fields (OpenAI's expires_after is not served)
FILE_QUERY = ("purpose", "order", "after", "limit")  # GET /v1/files
BATCH_QUERY = ("after", "limit")  # GET /v1/batches


def check_names(given: Any, served: tuple[str, ...], what: str) -> None:
    """A form field or query parameter we do not serve is a 400 naming it, never ignored."""
    for name in given:
        if name not in served:
            raise bad_request(f"unsupported {what} {name}: this server does not serve it (served: "
                              f"{', '.join(served)})", name)


async def upload_file(request: web.Request) -> web.Response:
    if request.content_type.lower() != "multipart/form-data":
        raise ApiError(415, "a file upload must be sent as multipart/form-data", param="Content-Type")
    check_names(request.query, (), "query parameter")
    parts = form_parts(await request.read(), request.headers.get("Content-Type", ""))
    check_names(parts, FORM_FIELDS, "form field")
    if "file" not in parts:
        raise bad_request("the upload has no file field", "file")
    purpose = parts.get("purpose", (None, b""))[1].decode("utf-8", "replace")
    if purpose != "batch":
        raise bad_request(f"purpose {purpose!r} is not supported (only 'batch')", "purpose")
    filename, data = parts["file"]
    record = await request.app[BATCHES].files.add(data, filename or "upload.jsonl", purpose)
    return web.json_response(record.to_json())


async def list_files(request: web.Request) -> web.Response:
    """``purpose`` filters; ``order`` (desc by default, as OpenAI), ``after`` and ``limit`` page."""
    check_names(request.query, FILE_QUERY, "query parameter")
    purpose = request.query.get("purpose")
    records = [r for r in request.app[BATCHES].files.files.values() if purpose in (None, r.purpose)]
    order = request.query.get("order", "desc")
    if order not in ("asc", "desc"):
        raise bad_request("order must be 'asc' or 'desc'", "order")
    if order == "desc":  # the dict keeps upload order
        records.reverse()
    return web.json_response(page_of(records, request, default_limit=10_000, max_limit=10_000))


def page_of(items: list[Any], request: web.Request, default_limit: int, max_limit: int) -> dict[str, Any]:
    """One page of a list response: items after the ``after`` id, at most ``limit`` of them."""
    after = request.query.get("after")
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    try:
        limit = int(request.query.get("limit", str(default_limit)))
    except ValueError:
        raise bad_request("limit must be an integer", "limit") from None
    if not 1 <= limit <= max_limit:
        raise bad_request(f"limit must be between 1 and {max_limit}", "limit")
    page = items[:limit]
    return {"object": "list", "data": [item.to_json() for item in page],
            "first_id": page[0].id if page else None, "last_id": page[-1].id if page else None,
            "has_more": len(items) > limit}


async def retrieve_file(request: web.Request) -> web.Response:
    return web.json_response(request.app[BATCHES].files.get(request.match_info["file_id"]).to_json())


async def file_content(request: web.Request) -> web.Response:
    data = await request.app[BATCHES].files.read(request.match_info["file_id"])
    return web.Response(body=data, content_type="application/octet-stream")


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    request.app[BATCHES].files.delete(file_id)
    return web.json_response({"id": file_id, "object": "file", "deleted": True})


# --------------------------------------------------------------------------- batches


class BatchCreate(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """POST /v1/batches."""

    input_file_id: str
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, str] | None = None
    output_expires_after: Any = None


class BatchLine(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One input line."""

    custom_id: str
    url: str
    body: dict[str, Any]
    method: str = "POST"


class Batch:
    """One batch's state, changed only by its own task and by cancel (this module's, never a message)."""

    def __init__(self, body: BatchCreate) -> None:
        self.id = _id("batch")
        self.body = body
        self.created_at = int(time.time())
        self.status = "validating"
        self.times: dict[str, int] = {}  # "in_progress_at", "completed_at", ... -> unix time
        self.counts = {"total": 0, "completed": 0, "failed": 0}
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.output_file_id: str | None = None
        self.error_file_id: str | None = None
        self.errors: list[dict[str, Any]] = []
        self.task: asyncio.Task | None = None

    def move_to(self, status: str) -> None:
        self.status = status
        self.times[f"{status}_at"] = int(time.time())

    def to_json(self) -> dict[str, Any]:
        usage = dict(self.usage, total_tokens=self.usage["input_tokens"] + self.usage["output_tokens"],
                     input_tokens_details={"cached_tokens": 0}, output_tokens_details={"reasoning_tokens": 0})
        body: dict[str, Any] = {
            "id": self.id, "object": "batch", "endpoint": self.body.endpoint, "input_file_id": self.body.input_file_id,
            "completion_window": self.body.completion_window, "status": self.status, "created_at": self.created_at,
            "expires_at": self.created_at + COMPLETION_WINDOW_S, "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id, "request_counts": dict(self.counts),
            "metadata": self.body.metadata, "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "usage": usage}
        for name in ("in_progress_at", "finalizing_at", "completed_at", "failed_at", "cancelling_at", "cancelled_at",
                     "expired_at"):
            body[name] = self.times.get(name)
        return body


class BatchService:
    """The file store and the batches of one server (``app[BATCHES]``)."""

    def __init__(self, max_bytes: int) -> None:
        self.files = FileStore(max_bytes)
        self.batches: dict[str, Batch] = {}

    def get(self, batch_id: str) -> Batch:
        if batch_id not in self.batches:
            raise ApiError(404, f"batch {batch_id!r} not found", "not_found_error", "batch_id")
        return self.batches[batch_id]

    async def stop(self) -> None:
        """Cancel every running batch (server shutdown)."""
        tasks = [b.task for b in self.batches.values() if b.task is not None and not b.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


BATCHES = web.AppKey("batches", BatchService)


def parse_lines(data: bytes) -> list[BatchLine | dict[str, Any]]:
    """Each non-blank line -> a BatchLine, or the error record that stands for it in the error file."""
    lines: list[BatchLine | dict[str, Any]] = []
    seen: set[str] = set()
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            line = msgspec.json.decode(raw, type=BatchLine)
        except (msgspec.MsgspecError, UnicodeDecodeError) as error:
            custom_id = _custom_id(raw)
            lines.append(error_record(custom_id, "invalid_request", f"line {number}: {error}"))
            continue
        if line.custom_id in seen:
            lines.append(error_record(line.custom_id, "duplicate_custom_id",
                                      f"line {number}: custom_id {line.custom_id!r} was used by an earlier line"))
            continue
        seen.add(line.custom_id)
        lines.append(line)
    return lines


def _custom_id(raw: bytes) -> str | None:
    try:
        value = msgspec.json.decode(raw)
    except (msgspec.MsgspecError, UnicodeDecodeError):
        return None
    custom_id = value.get("custom_id") if isinstance(value, dict) else None
    return custom_id if isinstance(custom_id, str) else None


def error_record(custom_id: str | None, code: str, message: str, error: ApiError | None = None,
                 request_id: str | None = None) -> dict[str, Any]:
    response = None if error is None else {"status_code": error.status, "request_id": request_id,
                                           "body": error.body()}
    return {"id": _id("batch_req"), "custom_id": custom_id, "response": response,
            "error": {"code": code, "message": message}}


async def run_chat(ctx: ServerContext, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A /v1/chat/completions body, answered whole as that route answers it."""
    request = _convert(body, ChatCompletionRequest)
    rid = new_id("chatcmpl")
    [stream] = await ctx.ingest.submit(rid, [chat_request(request, rid, time.time())])
    try:
        results = await collect([stream])
    finally:
        await stream.close()
    messages = [ctx.output_parsing(request).whole(result.text) for result in results]
    return rid, chat_response(rid, ctx.args.served_model_name, results, ctx.token_text, request.logprobs, messages)


async def run_completion(ctx: ServerContext, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A /v1/completions body, answered whole as that route answers it."""
    request = _convert(body, CompletionRequest)
    rid = new_id("cmpl")
    generate_requests = completion_requests(request, rid, time.time())
    check_vocabulary(generate_requests, ctx.vocab_size, "prompt")
    echo_prompts = [ctx.prompt_text(r) for r in generate_requests] if request.echo else []
    streams = await ctx.ingest.submit(rid, generate_requests)
    try:
        results = await collect(streams)
    finally:
        for stream in streams:
            await stream.close()
    return rid, completion_response(rid, ctx.args.served_model_name, results, len(generate_requests),
                                    ctx.token_text, request.logprobs is not None, echo_prompts)


def _convert(body: dict[str, Any], body_type: type) -> Any:
    if body.get("stream"):
        raise bad_request("stream is not supported in a batch", "stream")
    try:
        return msgspec.convert(body, body_type)
    except msgspec.MsgspecError as error:
        raise from_decode_error(error) from error


async def run_line(ctx: ServerContext, batch: Batch, line: BatchLine) -> tuple[bool, dict[str, Any]]:
    """(succeeded, output record) of one line."""
    if line.url in SERVED_URLS and line.url != batch.body.endpoint:
        return False, error_record(line.custom_id, "invalid_url",
                                   f"url {line.url!r} differs from the batch's endpoint {batch.body.endpoint!r}")
    if line.url not in SERVED_URLS or line.method != "POST":
        return False, error_record(line.custom_id, "unsupported_endpoint",
                                   f"{line.method} {line.url} is not supported in a batch by this server "
                                   f"(supported: POST {', '.join(SERVED_URLS)})")
    try:
        runner = run_chat if line.url == CHAT_URL else run_completion
        rid, response = await runner(ctx, line.body)
    except ApiError as error:
        return False, error_record(line.custom_id, error.error_type, error.message, error)
    batch.usage["input_tokens"] += response["usage"]["prompt_tokens"]
    batch.usage["output_tokens"] += response["usage"]["completion_tokens"]
    return True, {"id": _id("batch_req"), "custom_id": line.custom_id,
                  "response": {"status_code": 200, "request_id": rid, "body": response}, "error": None}


async def run_batch(ctx: ServerContext, service: BatchService, batch: Batch) -> None:
    """The batch's task: validate, run every line, write the output and error files."""
    records: list[tuple[bool, dict[str, Any]] | None] = []
    try:
        lines = parse_lines(await service.files.read(batch.body.input_file_id))
        if not lines or len(lines) > MAX_LINES:
            reason = "has no requests" if not lines else f"has {len(lines)} requests (at most {MAX_LINES})"
            batch.errors.append({"code": "invalid_file", "message": f"the input file {reason}", "line": None,
                                 "param": "input_file_id"})
            batch.move_to("failed")
            return
        batch.counts["total"] = len(lines)
        batch.move_to("in_progress")
        records = [None] * len(lines)
        await _run_lines(ctx, batch, lines, records)
    except asyncio.CancelledError:
        if batch.status != "cancelling":
            raise
    except ApiError as error:  # the input file went away
        batch.errors.append({"code": error.error_type, "message": error.message, "line": None, "param": error.param})
        batch.move_to("failed")
        return
    await _finalize(service, batch, [r for r in records if r is not None])


async def _run_lines(ctx: ServerContext, batch: Batch, lines: list[Any], records: list[Any]) -> None:
    gate = asyncio.Semaphore(LINE_CONCURRENCY)

    async def one(position: int, line: BatchLine | dict[str, Any]) -> None:
        if isinstance(line, dict):
            records[position] = (False, line)
        else:
            async with gate:
                records[position] = await run_line(ctx, batch, line)
        batch.counts["completed" if records[position][0] else "failed"] += 1

    await asyncio.gather(*(one(position, line) for position, line in enumerate(lines)))


async def _finalize(service: BatchService, batch: Batch, records: list[tuple[bool, dict[str, Any]]]) -> None:
    cancelled = batch.status == "cancelling"
    if not cancelled:
        batch.move_to("finalizing")
    try:
        for succeeded, attribute in ((True, "output_file_id"), (False, "error_file_id")):
            chosen = [record for ok, record in records if ok == succeeded]
            if chosen:
                data = b"".join(msgspec.json.encode(record) + b"\n" for record in chosen)
                name = f"{batch.id}_{'output' if succeeded else 'error'}.jsonl"
                setattr(batch, attribute, (await service.files.add(data, name, "batch_output")).id)
    except ApiError as error:
        batch.errors.append({"code": "file_store_full", "message": error.message, "line": None, "param": None})
        batch.move_to("failed")
        return
    batch.move_to("cancelled" if cancelled else "completed")


async def create_batch(request: web.Request) -> web.Response:
    ctx: ServerContext = request.app[CTX]
    service: BatchService = request.app[BATCHES]
    body: BatchCreate = await read_body(request, BatchCreate)
    if body.endpoint not in KNOWN_ENDPOINTS:
        raise bad_request(f"endpoint {body.endpoint!r} is not supported (one of {list(KNOWN_ENDPOINTS)})",
                          "endpoint")
    if body.completion_window != "24h":
        raise bad_request("completion_window must be '24h'", "completion_window")
    if body.output_expires_after is not None:
        raise bad_request("output_expires_after is not supported by this server", "output_expires_after")
    if service.files.get(body.input_file_id).purpose != "batch":
        raise bad_request("the input file's purpose must be 'batch'", "input_file_id")
    batch = Batch(body)
    service.batches[batch.id] = batch
    batch.task = asyncio.ensure_future(run_batch(ctx, service, batch))
    return web.json_response(batch.to_json())


async def retrieve_batch(request: web.Request) -> web.Response:
    return web.json_response(request.app[BATCHES].get(request.match_info["batch_id"]).to_json())


async def list_batches(request: web.Request) -> web.Response:
    """Newest first; ``after`` (a batch id) and ``limit`` page through them."""
    check_names(request.query, BATCH_QUERY, "query parameter")
    batches = list(reversed(request.app[BATCHES].batches.values()))  # the dict keeps creation order
    return web.json_response(page_of(batches, request, default_limit=20, max_limit=100))


async def cancel_batch(request: web.Request) -> web.Response:
    batch = request.app[BATCHES].get(request.match_info["batch_id"])
    if batch.status not in ("validating", "in_progress"):
        raise bad_request(f"a batch that is {batch.status} cannot be cancelled", "batch_id")
    batch.move_to("cancelling")
    if batch.task is not None:
        batch.task.cancel()
    return web.json_response(batch.to_json())


def add_batch_routes(app: web.Application) -> None:
    """The routes, plus the service in ``app[BATCHES]``: its batches stop and its files go with the app."""
    ctx: ServerContext = app[CTX]
    service = BatchService(ctx.args.file_store_max_mb * 1024 * 1024)
    app[BATCHES] = service

    async def stop(_: web.Application) -> None:
        await service.stop()

    async def cleanup(_: web.Application) -> None:
        service.files.close()

    app.on_shutdown.append(stop)
    app.on_cleanup.append(cleanup)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", retrieve_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)
