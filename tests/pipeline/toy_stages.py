"""Toy stages and process bodies for the fabric tests (importable by spawn children)."""
from __future__ import annotations

import dataclasses
import time

import msgspec

from pipeline.channel import Channel, ChannelClosed, MessageRejected
from pipeline.config import ServerArgs
from pipeline.messages import ErrorOutput
from pipeline.stage import Outbox, Outboxes, Stage


class Item(msgspec.Struct, frozen=True, tag=True):
    """A toy message: ``key`` identifies it, ``value`` is what stages change, ``hops`` counts loops."""

    key: str
    value: int
    hops: int = 0


@dataclasses.dataclass(frozen=True)
class ItemOutboxes(Outboxes):
    """The toy stages' doors; both optional, so a toy stage can be built unwired."""

    out: Outbox[Item] | None = None
    again: Outbox[Item] | None = None


class Forward(Stage):
    """Passes every Item to "out" unchanged."""

    Inbox = Item
    Outboxes = ItemOutboxes

    def __init__(self, name: str, inbox: Channel | None, outboxes: dict[str, Channel]) -> None:
        super().__init__(name, inbox, outboxes)

    def handle(self, message: Item) -> None:
        self.outboxes.out.put(message)


class AddAndHold(Stage):
    """Adds ``amount`` to each Item and holds it ``hold_steps`` steps before emitting.

    Items with fewer than ``loops`` hops go to "again" (back upstream) with hops+1;
    the others go to "out". Holding makes work that only ticks finish.
    """

    Inbox = Item
    Outboxes = ItemOutboxes

    def __init__(self, name: str, inbox: Channel | None, outboxes: dict[str, Channel],
                 amount: int = 1, hold_steps: int = 2, loops: int = 0, sleep_s: float = 0.0) -> None:
        super().__init__(name, inbox, outboxes)
        self.sleep_s = sleep_s  # a slow step: shutdown must wait for it
        self.amount = amount
        self.hold_steps = hold_steps
        self.loops = loops
        self.held: list[tuple[int, Item]] = []

    def handle(self, message: Item) -> None:
        time.sleep(self.sleep_s)
        self.held.append((self.hold_steps, self.transform(message)))

    def transform(self, message: Item) -> Item:
        return Item(key=message.key, value=message.value + self.amount, hops=message.hops)

    def tick(self) -> None:
        still_held = []
        for steps_left, item in self.held:
            if steps_left > 0:
                still_held.append((steps_left - 1, item))
            elif item.hops < self.loops:
                self.outboxes.again.put(Item(key=item.key, value=item.value, hops=item.hops + 1))
            else:
                self.outboxes.out.put(item)
        self.held = still_held

    def has_work(self) -> bool:
        return super().has_work() or bool(self.held)


class BrokenAddAndHold(AddAndHold):
    """AddAndHold with a bug: a key ending in "7" gets one too many."""

    def transform(self, message: Item) -> Item:
        extra = 1 if message.key.endswith("7") else 0
        return Item(key=message.key, value=message.value + self.amount + extra, hops=message.hops)


def echo_process(inbox: Channel, outbox: Channel) -> None:
    """Child body: put back everything received (a rejection as an ErrorOutput with its text).

    Closes the outbox when the inbox closes; returns when the outbox is closed under it.
    """
    while True:
        try:
            message = inbox.get()
        except ChannelClosed:
            break
        except MessageRejected as exc:
            message = ErrorOutput(rid="rejected", status_code=400, message=str(exc))
        try:
            outbox.put(message)
        except ChannelClosed:
            return
    outbox.close()


def put_then_close(outbox: Channel, messages: list) -> None:
    """Child body: put each message (no type check on this side), then close."""
    for message in messages:
        outbox.put(message)
    outbox.close()




TOY = "tests.pipeline.toy_stages:"


def toy_spec(loops: int = 2, work_capacity: int = 8, sink_thread: bool = False, sleep_s: float = 0.0):
    """entry -> source -> front -> worker (+10 per pass, held 3 steps) -> sink -> exit, with worker -> front
    looping each item ``loops`` more times: a cycle, held work, and a narrow channel."""
    from pipeline.placement import ChannelSpec, PipelineSpec, StageSpec

    return PipelineSpec(
        stages=(StageSpec("source", TOY + "Forward"), StageSpec("front", TOY + "Forward"),
                StageSpec("worker", TOY + "AddAndHold",
                          {"amount": 10, "hold_steps": 3, "loops": loops, "sleep_s": sleep_s}),
                StageSpec("sink", TOY + "Forward", own_thread=sink_thread)),
        channels=(ChannelSpec("requests", Item, (), "source"),
                  ChannelSpec("front_in", Item, ("source.out", "worker.again"), "front"),
                  ChannelSpec("work", Item, ("front.out",), "worker", capacity=work_capacity),
                  ChannelSpec("done", Item, ("worker.out",), "sink"),
                  ChannelSpec("results", Item, ("sink.out",), None)))


TOY_SERVING = {"main": ["source", "front", "sink"], "engine": ["worker"]}


class Configured(Forward):
    """Forward that keeps the ServerArgs it was built with (kwargs arrive as JSON data)."""

    def __init__(self, args: ServerArgs, inbox: Channel | None, outboxes: dict[str, Channel]) -> None:
        super().__init__("configured", inbox, outboxes)
        self.args = args
