"""Multimodal stage: where images would become pixels and placeholder tokens.

Inbox ``MultimodalInbox`` (TokenizedRequest | Abort | FlushCache); outboxes:

* ``"out"`` -> schedule: the same messages, in order.

Requests with image URLs are refused earlier, by the tokenize stage (400),
since no supported model reads images yet.

For a text model this stage is a pass-through: it exists so the pipeline has
one place where image decoding, resizing, normalisation and placeholder
expansion go (off the event loop, like tokenization), and so a vision model
changes one stage, not the tokenizer or the scheduler.

State owned: none.
"""
from __future__ import annotations

from typing import Any

from pipeline.config import ServerArgs
from pipeline.messages import Abort, FlushCache, TokenizedRequest
from pipeline.stage import Stage


class MultimodalStage(Stage):
    """TokenizedRequest -> TokenizedRequest (text passes through); Abort and FlushCache pass through."""

    def __init__(self, args: ServerArgs, inbox: Any, outboxes: dict[str, Any]) -> None:
        super().__init__("multimodal", inbox, outboxes)

    def handle(self, message: TokenizedRequest | Abort | FlushCache) -> None:
        match message:
            case TokenizedRequest() | Abort() | FlushCache():
                self.emit("out", message)
            case _:
                raise TypeError(f"multimodal stage got an unexpected {type(message).__name__}")
