"""The aiohttp application: routes plus two middlewares.

* ``api_key_middleware`` (when ``--api-key`` is set): every route except
  ``/health*`` and ``/metrics`` needs ``Authorization: Bearer <key>`` (or an
  ``x-api-key`` header); otherwise 401.
* ``error_middleware``: every failure leaves as an OpenAI error body.
  ``ApiError`` keeps its status; aiohttp's own HTTP errors (404, 405, body
  too large) keep theirs; anything else is our bug: logged, answered 500.
"""
from __future__ import annotations

import hmac
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from stages.ingest.context import CTX, ServerContext
from stages.ingest.errors import ApiError
from stages.ingest.native_routes import add_native_routes
from stages.ingest.openai_routes import add_openai_routes

logger = logging.getLogger(__name__)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
OPEN_PATHS = ("/health", "/metrics")
MAX_BODY_BYTES = 64 * 1024 * 1024


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


def api_key_middleware(api_key: str) -> Any:
    @web.middleware
    async def check_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method == "OPTIONS" or request.path.startswith(OPEN_PATHS):
            return await handler(request)
        given = request.headers.get("Authorization", "")
        given = given[7:] if given.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            return ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')",
                            "authentication_error").response()
        return await handler(request)

    return check_key


def build_app(ctx: ServerContext) -> web.Application:
    middlewares = [error_middleware]
    if ctx.args.api_key:
        middlewares.insert(0, api_key_middleware(ctx.args.api_key))
    app = web.Application(middlewares=middlewares, client_max_size=MAX_BODY_BYTES)
    app[CTX] = ctx
    add_openai_routes(app)
    add_native_routes(app)
    return app
