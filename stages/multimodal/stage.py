"""Multimodal stage: images and videos become pixel patches, pad tokens and M-RoPE positions.

Inbox ``MultimodalInbox`` (TokenizedRequest | Abort | FlushCache); outboxes
(``MultimodalOutboxes``):

* ``out`` -> schedule: every request, with its ``media`` turned into
  ``mm_items`` (``prepare.py``), and the Abort and FlushCache messages;
* ``errors`` -> detokenize (which relays it to ingest): an ``ErrorOutput``
  (HTTP 400) when a picture cannot be decoded, is empty or too large, the
  prompt's placeholders do not match the images, or the images do not fit in
  the context. The stage runs beside the engine; detokenize is the channel
  back to the front end the schedule stage uses for its errors too.

The model is read once at construction: a model whose config.json has a
``vision_config`` gets its placeholder ids and preprocessing rules
(``VisionModel``); any other model refuses media with a 400. A request
without media passes straight through, in order with the rest.

Decoding and resizing take milliseconds to seconds per picture, so they run
on a small thread pool, never on the loop that also steps the engine:
``handle`` submits, ``tick`` emits each result once ready (like the tokenize
stage). An Abort for a request still being prepared waits until that request
has been emitted, so the schedule stage always sees a request before its
abort. The ``n`` sequences of one request each prepare their own copy (the
same pictures give the same items); only the first reports an error, so the
client gets one.

State owned: the requests in flight on the pool and the aborts held for them.
It encodes with the tokenizer only the timestamp text of a Qwen3-VL video; it
never touches KV memory or the vision encoder (the model's).
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import Future
from typing import Any

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import Abort, ErrorOutput, FlushCache, MultimodalInbox, TokenizedRequest
from pipeline.stage import Outbox, Outboxes
from stages.multimodal.prepare import TextCodec, VisionModel, load_vision_model, prepare
from stages.multimodal.processor import MediaError
from stages.pooled import PooledStage

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class MultimodalOutboxes(Outboxes):
    out: Outbox[TokenizedRequest | Abort | FlushCache]  # -> schedule
    errors: Outbox[ErrorOutput]  # -> detokenize -> ingest


class MultimodalStage(PooledStage[TokenizedRequest]):
    """TokenizedRequest (+ media) -> TokenizedRequest (+ mm_items) on a worker pool; the rest passes through."""

    Inbox = MultimodalInbox
    Outboxes = MultimodalOutboxes
    outboxes: MultimodalOutboxes
    ordered_per_request = True  # a request with pictures may leave after a later text-only one

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: MultimodalOutboxes | dict[str, Channel | None], *,
                 vision: VisionModel | None = None, tokenizer: Any = None, num_workers: int = 2) -> None:
        """``vision`` defaults to what ``args.model_dir`` holds; ``num_workers=0`` prepares inline;
        ``tokenizer`` (the assembly's) writes Qwen3-VL video timestamps."""
        super().__init__("multimodal", inbox, outboxes, num_workers=num_workers)
        self.vision = vision if vision is not None else load_vision_model(args.model_dir)
        self.context_length = args.context_length
        self.codec = TextCodec.of(tokenizer) if tokenizer is not None else None

    def handle(self, message: MultimodalInbox) -> None:
        match message:
            case TokenizedRequest() if message.media:
                self.submit(message, prepare, message, self.vision, self.context_length, self.codec)
            case TokenizedRequest() | FlushCache():
                self.outboxes.out.put(message)
            case Abort():
                self.pass_abort(message)
            case _:
                raise TypeError(f"multimodal stage got an unexpected {type(message).__name__}")

    def is_in_flight(self, rid: str) -> bool:
        return any(rid in (request.rid, request.parent_rid) for request, _ in self.in_flight)

    def emit_result(self, request: TokenizedRequest, future: Future) -> None:
        try:
            self.outboxes.out.put(future.result())
        except MediaError as error:
            self._error(request, ErrorOutput(rid=request.parent_rid, status_code=400, message=error.message,
                                             param=error.param))
        except Exception as error:  # a decoder bug must still answer the client
            logger.exception("preparing the images of request %s failed", request.rid)
            self._error(request, ErrorOutput(rid=request.parent_rid, status_code=500, error_type="internal_error",
                                             message=f"image preprocessing failed: {error}"))

    def _error(self, request: TokenizedRequest, error: ErrorOutput) -> None:
        if request.index == 0:
            self.outboxes.errors.put(error)
