"""The aiohttp application: routes (OpenAI, SGLang-native, the small peer endpoints, Ollama) plus middlewares.

* ``cors_middleware`` (outermost; see cors.py): answers browsers' CORS
  preflights per ``--allowed-origins`` and friends; every response gets the
  ``Access-Control-Allow-*`` headers of an allowed origin.

* ``api_key_middleware`` (when a key is set: ``--api-key``, else the
  ``STAGEWISE_API_KEY`` environment variable, else the first line of
  ``--api-key-file``; see ``resolve_api_key``): every route except
  ``/health*`` and ``/metrics`` needs ``Authorization: Bearer <key>`` (or an
  ``x-api-key`` header); otherwise 401, also for header bytes that are not
  UTF-8. The key is never logged nor shown by ``/get_server_info``.
* ``error_middleware``: every failure leaves as an OpenAI error body.
  ``ApiError`` keeps its status; aiohttp's own HTTP errors (404, 405, body
  too large) keep theirs; anything else is our bug: logged, answered 500.
* ``json_body_middleware``: a POST body must be declared
  ``application/json`` (parameters such as ``charset`` allowed), else 415.
  A web page can send ``text/plain`` or form bodies to any address without
  a CORS preflight, so accepting those as JSON would let any site drive a
  local server. One exception: ``POST /flush_cache`` with an empty body,
  whatever its content type (SGLang's clients send it bare; aiohttp's label
  an empty POST ``application/octet-stream``); a page can cause at most a
  cache flush with it. Two: ``POST /v1/files`` is a multipart/form-data
  upload (OpenAI's clients send files so); a page can at most add a file to
  the bounded file store with it (running a batch needs a JSON POST).
* ``body_timeout_middleware``: a POST body must arrive whole within
  ``BODY_READ_TIMEOUT_S`` (else 408), so a client
  that sends headers and then trickles or withholds the body cannot hold a
  connection and a handler forever. The body is read once and cached
  (``request.read()``); handlers read it from there.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import os
from pathlib import Path
from typing import Any, Awaitable, Callable

from aiohttp import web

from pipeline.config import ConfigError, ServerArgs
from stages.ingest.batch_api import add_batch_routes
from stages.ingest.context import CTX, ServerContext
from stages.ingest.cors import CorsPolicy, cors_middleware, install_cors
from stages.ingest.errors import ApiError
from stages.ingest.misc_routes import add_misc_routes
from stages.ingest.native_routes import add_native_routes
from stages.ingest.ollama_routes import add_ollama_routes
from stages.ingest.openai_routes import add_openai_routes
from stages.ingest.responses_api import add_responses_routes

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = ("/health", "/metrics")
MAX_BODY_BYTES = 64 * 1024 * 1024
API_KEY_ENV = "STAGEWISE_API_KEY"
JSON_TYPE = "application/json"
BODY_READ_TIMEOUT_S = 30.0
BARE_POST_PATHS = ("/flush_cache",)  # may be POSTed with an empty body and any content type
FORM_POST_PATHS = ("/v1/files",)  # take multipart/form-data uploads (batch_api.py)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as error:
        return error.response()
    except web.HTTPException as error:
        if error.status < 400:
            raise
        kind = "not_found_error" if error.status == 404 else "invalid_request_error"
        return ApiError(error.status, f"{error.reason}: {request.method} {request.path}", kind).response()
    except (ConnectionResetError, BrokenPipeError):
        raise
    except Exception:
        logger.exception("internal error answering %s %s", request.method, request.path)
        return ApiError(500, "internal server error", "internal_error").response()


def resolve_api_key(args: ServerArgs) -> str:
    """The key clients must send ("" for none): --api-key, else $STAGEWISE_API_KEY, else --api-key-file.

    The environment and the file keep the key out of ``/proc/<pid>/cmdline``.
    Errors name the file, never the key.
    """
    if args.api_key:
        return args.api_key
    if os.environ.get(API_KEY_ENV):
        return os.environ[API_KEY_ENV]
    if not args.api_key_file:
        return ""
    try:
        lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeError) as error:
        raise ConfigError(f"--api-key-file {args.api_key_file!r} cannot be read: {type(error).__name__}") from None
    key = lines[0].strip() if lines else ""
    if not key:
        raise ConfigError(f"--api-key-file {args.api_key_file!r} is empty")
    return key


def _header_bytes(value: str) -> bytes:
    """A header as sent: bytes that are not UTF-8 arrive as surrogate escapes (never a 500)."""
    return value.encode("utf-8", "surrogateescape")


def _given_key(request: web.Request) -> bytes:
    authorization = request.headers.get("Authorization", "")
    if authorization.lower().startswith("bearer "):
        return _header_bytes(authorization[7:])
    return _header_bytes(request.headers.get("x-api-key", ""))


def api_key_middleware(api_key: str) -> Any:
    expected = api_key.encode("utf-8")

    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path.startswith(OPEN_PATHS):
            return await handler(request)
        try:
            given = _given_key(request)
        except UnicodeError:
            given = b""
        if not hmac.compare_digest(given, expected):
            return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                            "authentication_error").response()
        return await handler(request)

    return check_key


@web.middleware
async def json_body_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method != "POST":
        return await handler(request)
    declared = request.headers.get("Content-Type")
    if not request.body_exists and request.path in BARE_POST_PATHS:  # no body: nothing to misread
        return await handler(request)
    if request.path in FORM_POST_PATHS and request.content_type.lower() == "multipart/form-data":
        return await handler(request)
    if declared is None or request.content_type.lower() != JSON_TYPE:
        shown = "none" if declared is None else repr(declared[:100])
        raise ApiError(415, f"request body must be JSON sent with 'Content-Type: {JSON_TYPE}' (got {shown})",
                       param="Content-Type")
    return await handler(request)


@web.middleware
async def body_timeout_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.method == "POST" and request.body_exists:
        try:
            await asyncio.wait_for(request.read(), BODY_READ_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {BODY_READ_TIMEOUT_S:.0f} s",
                           "request_timeout") from None
    return await handler(request)


def build_app(ctx: ServerContext) -> web.Application:
    middlewares = [error_middleware, json_body_middleware, body_timeout_middleware]
    api_key = resolve_api_key(ctx.args)
    if api_key:
        middlewares.insert(0, api_key_middleware(api_key))
    cors = CorsPolicy(ctx.args)
    middlewares.insert(0, cors_middleware(cors))  # outermost: preflights need no key
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[CTX] = ctx
    install_cors(app, cors)
    add_openai_routes(app)
    add_responses_routes(app)
    add_batch_routes(app)
    add_native_routes(app)
    add_misc_routes(app)
    add_ollama_routes(app)
    return app
