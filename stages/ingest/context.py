"""ServerContext: what every HTTP route needs, handed over through ``app[CTX]``.

It holds the resolved ServerArgs, the ingest stage (as ``Frontend``: the
request table), the tokenizer helpers used by responses (token strings for
logprobs, prompt text for ``echo``), the metrics, and the readiness flag
behind ``/health``. The tokenizer, vocabulary size, metrics and server info
are the ingest stage's own: the HTTP side loads nothing.
"""
from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
from aiohttp import web

from pipeline.config import ServerArgs
from pipeline.messages import GenerateRequest
from pipeline.metrics import multimodal_summary
from stages.ingest.parsing import make_parsing
from stages.ingest.responses import TokenText
from stages.ingest.streams import Frontend


class ServerContext:
    """Shared, read-mostly state of one running HTTP server."""

    def __init__(self, args: ServerArgs, ingest: Frontend) -> None:
        self.args = args
        self.ingest = ingest
        self.tokenizer = ingest.tokenizer
        self.vocab_size = ingest.vocab_size
        self.token_text = TokenText(ingest.tokenizer)
        self.metrics = ingest.metrics
        self.started_s = int(time.time())
        self.ready = False  # set once warm-up finished: /health answers 200
        self.health_probe: asyncio.Future | None = None  # the one /health_generate generation running, if any

    def server_info(self) -> dict[str, Any]:
        """/get_server_info fields beyond the args: versions and device, and every stage's counters."""
        info: dict[str, Any] = msgspec.to_builtins(self.ingest.server_info)
        info["stage_counters"] = self.ingest.stage_counters()
        info["multimodal"] = multimodal_summary(info["stage_counters"])  # None for a text model
        return info

    def prompt_text(self, request: GenerateRequest) -> str:
        """The prompt as text (for echo): the text itself, or the decoded ids."""
        if request.text is not None:
            return request.text
        return self.tokenizer.decode(request.input_ids or [], skip_special_tokens=False)

    def output_parsing(self, body: Any) -> Any:
        return make_parsing(self.args.tool_call_parser, self.args.reasoning_parser, getattr(body, "tools", None),
                            getattr(body, "separate_reasoning", True), getattr(body, "tool_choice", None),
                            getattr(body, "parallel_tool_calls", None) is not False)


CTX = web.AppKey("ctx", ServerContext)  # request.app[CTX] in every route
