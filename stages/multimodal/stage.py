"""Multimodal stage: where images would become pixels and placeholder tokens.

Inbox ``MultimodalInbox`` (TokenizedRequest | Abort | FlushCache); outboxes
(``MultimodalOutboxes``):

* ``out`` -> schedule: the same messages, in order.

Requests with image URLs are refused earlier, by the tokenize stage (400),
since no supported model reads images yet.

For a text model this stage is a pass-through: it exists so the pipeline has
one place where image decoding, resizing, normalisation and placeholder
expansion go (off the event loop, like tokenization), and so a vision model
changes one stage, not the tokenizer or the scheduler.

State owned: none.
"""
from __future__ import annotations

import dataclasses

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import Abort, FlushCache, MultimodalInbox, TokenizedRequest
from pipeline.stage import Outbox, Outboxes, Stage


@dataclasses.dataclass(frozen=True)
class MultimodalOutboxes(Outboxes):
    out: Outbox[TokenizedRequest | Abort | FlushCache]  # -> schedule


class MultimodalStage(Stage):
    """TokenizedRequest -> TokenizedRequest (text passes through); Abort and FlushCache pass through."""

    Inbox = MultimodalInbox
    Outboxes = MultimodalOutboxes
    outboxes: MultimodalOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: MultimodalOutboxes | dict[str, Channel | None]) -> None:
        super().__init__("multimodal", inbox, outboxes)

    def handle(self, message: MultimodalInbox) -> None:
        match message:
            case TokenizedRequest() | Abort() | FlushCache():
                self.outboxes.out.put(message)
            case _:
                raise TypeError(f"multimodal stage got an unexpected {type(message).__name__}")
