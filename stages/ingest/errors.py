"""OpenAI-shaped errors: every failure an HTTP client sees is one of these.

Body: ``{"error": {"message", "type", "param", "code"}}`` with the HTTP status
in ``code``. A client's mistake is a 400 naming the field; a missing or wrong
API key a 401; an overloaded server a 503; only our own bugs are 500.
"""
from __future__ import annotations

import re

import msgspec
from aiohttp import web

from pipeline.messages import ErrorOutput, SamplingParamsError


class ApiError(Exception):
    """An error to answer with; raised anywhere in a route and turned into JSON by the app."""

    def __init__(self, status: int, message: str, error_type: str = "invalid_request_error",
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type
        self.param = param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.error_type, "param": self.param,
                          "code": self.status}}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def bad_request(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, "invalid_request_error", param)


def from_error_output(error: ErrorOutput) -> ApiError:
    return ApiError(error.status_code, error.message, error.error_type, error.param)


def from_sampling_error(error: SamplingParamsError, names: dict[str, str] | None = None) -> ApiError:
    """A SamplingParams rule broken; ``names`` maps SGLang field names back to the API's."""
    param = (names or {}).get(error.field, error.field)
    return bad_request(f"invalid parameter {param}={error.value!r}: {error.rule}", param)


_PATH = re.compile(r"at `\$\.?([^`]*)`")
_UNKNOWN_FIELD = re.compile(r"unknown field `([^`]*)`")


def from_decode_error(error: msgspec.MsgspecError) -> ApiError:
    """msgspec's message names the JSON path (``at `$.max_tokens```); keep it as ``param``."""
    text = str(error)
    if isinstance(error, msgspec.DecodeError) and not isinstance(error, msgspec.ValidationError):
        return bad_request(f"request body is not valid JSON: {text}")
    match = _PATH.search(text)
    param = match.group(1) if match else None
    unknown = _UNKNOWN_FIELD.search(text)
    if unknown is not None:  # a parameter this server does not serve: name it, never ignore it
        name = f"{param}.{unknown.group(1)}" if param else unknown.group(1)
        return bad_request(f"unsupported parameter {name}: this server does not serve it", name)
    return bad_request(f"invalid request body: {text}", param or None)
