"""Ingest stage: the HTTP front door (OpenAI and SGLang-native APIs over aiohttp).

Read in this order: ``stage.py`` (the request table between handlers and the
pipeline), ``streams.py`` (what a handler holds: RequestStream), ``protocol.py`` (request bodies), ``convert.py`` (bodies ->
GenerateRequest), ``openai_routes.py`` and ``native_routes.py`` (handlers),
``responses.py`` (response bodies), ``streaming.py`` (SSE), ``errors.py``,
``app.py`` (middlewares and routes), ``server.py`` (the aiohttp server).

Imports run one way: ``stage.py`` -> ``server.py`` -> ``app.py`` -> the
routes -> ``context.py`` / ``streaming.py`` -> ``streams.py`` (whose
``Frontend`` Protocol is how everything below the stage sees it).
"""
from stages.ingest.app import build_app
from stages.ingest.context import ServerContext
from stages.ingest.errors import ApiError
from stages.ingest.stage import IngestOutboxes, IngestStage
from stages.ingest.streams import Frontend, RequestStream

__all__ = ["ApiError", "Frontend", "IngestOutboxes", "IngestStage", "RequestStream", "ServerContext", "build_app"]
