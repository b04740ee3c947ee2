"""ServerContext: what every HTTP route needs, handed over through ``app[CTX]``.

It holds the resolved ServerArgs, the IngestStage (request table), the
tokenizer helpers used by responses (token strings for logprobs, prompt text
for ``echo``), the metrics, and the readiness flag behind ``/health``.
"""
from __future__ import annotations

import time
from typing import Any, Callable

from aiohttp import web

from pipeline.config import ServerArgs
from pipeline.messages import GenerateRequest
from stages.ingest.parsing import make_parsing
from stages.ingest.responses import TokenText
from stages.ingest.stage import IngestStage


class ServerContext:
    """Shared, read-mostly state of one running HTTP server."""

    def __init__(self, args: ServerArgs, ingest: IngestStage, tokenizer: Any, metrics: Any = None) -> None:
        self.args = args
        self.ingest = ingest
        self.tokenizer = tokenizer
        self.token_text = TokenText(tokenizer)
        self.metrics = metrics
        self.started_s = int(time.time())
        self.ready = False  # set once warm-up finished: /health answers 200

    def server_info(self) -> dict[str, Any]:
        """Extra /get_server_info fields the process that runs the server provides (versions, device)."""
        provide: Callable[[], dict[str, Any]] | None = getattr(self.ingest, "server_info", None)
        return provide() if provide is not None else {}

    def vocab_size(self) -> int:
        from stages.tokenize import model_vocab_size

        return max(len(self.tokenizer), model_vocab_size(self.args.model_path))

    def prompt_text(self, request: GenerateRequest) -> str:
        """The prompt as text (for echo): the text itself, or the decoded ids."""
        if request.text is not None:
            return request.text
        return self.tokenizer.decode(request.input_ids or [], skip_special_tokens=False)

    def output_parsing(self, body: Any) -> Any:
        return make_parsing(self.args.tool_call_parser, self.args.reasoning_parser, getattr(body, "tools", None),
                            getattr(body, "separate_reasoning", True), getattr(body, "tool_choice", None))


CTX = web.AppKey("ctx", ServerContext)  # request.app[CTX] in every route
