"""Ingest stage: the HTTP front door (OpenAI and SGLang-native APIs over aiohttp).

Read in this order: ``stage.py`` (the request table between handlers and the
pipeline), ``protocol.py`` (request bodies), ``convert.py`` (bodies ->
GenerateRequest), ``openai_routes.py`` and ``native_routes.py`` (handlers),
``responses.py`` (response bodies), ``streaming.py`` (SSE), ``errors.py``,
``app.py`` (middlewares and routes).
"""
from stages.ingest.app import build_app
from stages.ingest.context import ServerContext
from stages.ingest.errors import ApiError
from stages.ingest.stage import IngestStage, RequestStream

__all__ = ["ApiError", "IngestStage", "RequestStream", "ServerContext", "build_app"]
