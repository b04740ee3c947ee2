"""CORS: which web pages may call this server from a browser.

A browser asks before a cross-origin request that is not "simple" (a JSON
POST, an ``Authorization`` header): it sends ``OPTIONS`` with ``Origin`` and
``Access-Control-Request-Method`` (a *preflight*). ``cors_middleware``
answers those itself, before the API key check (browsers never send
credentials on a preflight): 200 with the ``Access-Control-Allow-*``
headers when the origin, the method and every requested header are allowed,
else 400 saying which one is not. An ``OPTIONS`` that is not a preflight goes
on to the routes (405, as for any method a route does not serve).

``add_cors_headers`` runs on every response just before its headers go out
(aiohttp's ``on_response_prepare``, so streamed responses and error bodies
get them too): a request with an allowed ``Origin`` gets
``Access-Control-Allow-Origin`` (``*`` when every origin is allowed and
credentials are off, else the origin itself with ``Vary: Origin``), so the
page may read the answer. A disallowed origin gets no header: the browser
hides the answer from the page.

The flags are vLLM's: ``--allowed-origins``, ``--allowed-methods``,
``--allowed-headers`` (comma-separated or a JSON list; ``*`` allows any) and
``--allow-credentials``; the defaults (everything allowed, no credentials)
are SGLang's and vLLM's. With every origin allowed, any web page the user
opens can call a server on their machine that has no API key: set a key, or
narrow ``--allowed-origins``. POST bodies must still be JSON (see app.py):
CORS decides who may read answers, not what a body may be.
"""
from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from pipeline.config import ConfigError, ServerArgs

ALL_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")
PREFLIGHT_MAX_AGE_S = 600


def parse_list(flag: str, value: str) -> tuple[str, ...]:
    """``a,b`` or ``["a", "b"]`` -> ("a", "b"); a ConfigError names the flag."""
    text = value.strip()
    if text.startswith("["):
        try:
            items = json.loads(text)
        except ValueError as error:
            raise ConfigError(f"--{flag} is not a JSON list: {error}") from None
        if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
            raise ConfigError(f"--{flag} must be a JSON list of strings")
    else:
        items = text.split(",")
    return tuple(item.strip() for item in items if item.strip())


class CorsPolicy:
    """The allowed origins, methods and headers of one server (from its ServerArgs)."""

    def __init__(self, args: ServerArgs) -> None:
        self.origins = parse_list("allowed-origins", args.allowed_origins)
        methods = parse_list("allowed-methods", args.allowed_methods)
        headers = parse_list("allowed-headers", args.allowed_headers)
        self.any_origin = "*" in self.origins
        self.any_header = "*" in headers
        self.methods = ALL_METHODS if "*" in methods else tuple(m.upper() for m in methods)
        self.headers = frozenset(h.lower() for h in headers)
        self.credentials = args.allow_credentials

    def origin_allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def allow_origin_headers(self, origin: str) -> dict[str, str]:
        """The headers that let a page from ``origin`` read a response."""
        headers: dict[str, str] = {}
        if self.any_origin and not self.credentials:
            headers["Access-Control-Allow-Origin"] = "*"
        else:
            headers["Access-Control-Allow-Origin"] = origin
            headers["Vary"] = "Origin"
        if self.credentials:
            headers["Access-Control-Allow-Credentials"] = "true"
        return headers

    def refusal(self, origin: str, method: str, requested: list[str]) -> str | None:
        """Why a preflight is refused, or None."""
        if not self.origin_allowed(origin):
            return f"origin {origin!r} is not allowed (--allowed-origins)"
        if method.upper() not in self.methods:
            return f"method {method!r} is not allowed (--allowed-methods)"
        if not self.any_header:
            extra = sorted(h for h in requested if h not in self.headers)
            if extra:
                return f"header(s) {extra} are not allowed (--allowed-headers)"
        return None

    def preflight(self, request: web.Request) -> web.Response:
        origin = request.headers["Origin"]
        method = request.headers["Access-Control-Request-Method"]
        requested = [h.strip().lower() for h in request.headers.get("Access-Control-Request-Headers", "").split(",")
                     if h.strip()]
        why = self.refusal(origin, method, requested)
        if why is not None:
            return web.json_response({"error": {"message": f"CORS preflight refused: {why}",
                                                "type": "invalid_request_error", "param": None, "code": 400}},
                                     status=400)
        headers = self.allow_origin_headers(origin)
        headers["Access-Control-Allow-Methods"] = ", ".join(self.methods)
        headers["Access-Control-Max-Age"] = str(PREFLIGHT_MAX_AGE_S)
        allowed_headers = requested if self.any_header else sorted(self.headers)
        if allowed_headers:
            headers["Access-Control-Allow-Headers"] = ", ".join(allowed_headers)
        return web.Response(status=200, headers=headers, text="OK")


CORS_POLICY = web.AppKey("cors_policy", CorsPolicy)


def is_preflight(request: web.Request) -> bool:
    return (request.method == "OPTIONS" and "Origin" in request.headers
            and "Access-Control-Request-Method" in request.headers)


def cors_middleware(policy: CorsPolicy) -> Any:
    @web.middleware
    async def answer_preflight(request: web.Request, handler: Any) -> web.StreamResponse:
        if is_preflight(request):
            return policy.preflight(request)
        return await handler(request)

    return answer_preflight


async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
    """on_response_prepare: the Access-Control-Allow-* headers of an allowed origin, on every response."""
    policy: CorsPolicy = request.app[CORS_POLICY]
    origin = request.headers.get("Origin")
    if origin is None or is_preflight(request) or not policy.origin_allowed(origin):
        return
    for name, value in policy.allow_origin_headers(origin).items():
        response.headers[name] = value


def install_cors(app: web.Application, policy: CorsPolicy) -> None:
    """Headers on every response (the middleware is added by build_app, first in the chain)."""
    app[CORS_POLICY] = policy
    app.on_response_prepare.append(add_cors_headers)
