"""Channel transports: ordering, backpressure, close semantics, async use, the process border."""
from __future__ import annotations

import asyncio
import subprocess
import multiprocessing
import threading
import time
from typing import Iterator, Union

import pytest

import torch

from pipeline.channel import Channel, ChannelClosed, ChannelFull, MessageRejected, in_thread_channel
from pipeline.process_channel import process_channel
from pipeline.thread_channel import thread_channel
from pipeline.messages import (ALL_MESSAGE_TYPES, Abort, ErrorOutput, FlushCache, SamplingParams, ScheduleInbox,
                               TokenizedRequest, encode)
from tests.pipeline.sample_messages import every_message
from tests.pipeline import toy_stages
from tests.pipeline.toy_stages import Item

LOCAL_TRANSPORTS = {"in-thread": in_thread_channel, "cross-thread": thread_channel, "cross-process": process_channel}


def items(count: int) -> list[Item]:
    return [Item(key=str(i), value=i) for i in range(count)]


def take(channel, count: int) -> list[Item]:
    """``count`` messages via drain (a process channel's drain may return what has been decoded so far)."""
    got: list[Item] = []
    deadline = time.monotonic() + 5.0
    while len(got) < count and time.monotonic() < deadline:
        got += channel.drain(count - len(got))
    return got


@pytest.mark.parametrize("transport", LOCAL_TRANSPORTS)
def test_fifo_and_close_semantics_within_one_thread(transport: str) -> None:
    channel = LOCAL_TRANSPORTS[transport]("c", Item, 8)
    assert channel.get_nowait() is None
    for item in items(5):
        channel.put(item)
    assert len(channel) == 5
    assert channel.get() == Item(key="0", value=0)
    assert take(channel, 2) == items(3)[1:]
    channel.close()
    assert channel.closed
    with pytest.raises(ChannelClosed):
        channel.put(Item(key="late", value=0))
    assert list(channel) == items(5)[3:]  # what was queued before close is still delivered
    with pytest.raises(ChannelClosed):
        channel.get(timeout=1.0)
    with pytest.raises(ChannelClosed):
        channel.get_nowait()
    assert channel.drain(10) == []
    assert channel.wait_readable(0.0)


@pytest.mark.parametrize("transport", LOCAL_TRANSPORTS)
def test_full_channel_refuses_put_nowait_and_frees_a_slot_per_get(transport: str) -> None:
    channel = LOCAL_TRANSPORTS[transport]("c", Item, 3)
    for item in items(3):
        channel.put_nowait(item)
    with pytest.raises(ChannelFull, match="'c'"):
        channel.put_nowait(Item(key="x", value=9))
    assert channel.get(timeout=1.0) == Item(key="0", value=0)
    channel.put_nowait(Item(key="x", value=9))
    assert [m.key for m in take(channel, 3)] == ["1", "2", "x"]


def test_in_thread_put_on_full_raises_and_get_on_empty_does_not_hang() -> None:
    channel = in_thread_channel("c", Item, 1)
    channel.put(Item(key="a", value=1))
    with pytest.raises(ChannelFull):
        channel.put(Item(key="b", value=2))
    channel.get()
    with pytest.raises(TimeoutError):
        channel.get()


def test_in_thread_and_cross_thread_check_the_message_type() -> None:
    for build in (in_thread_channel, thread_channel):
        channel = build("schedule_in", ScheduleInbox, 4)
        channel.put(Abort(rid="a"))
        with pytest.raises(TypeError, match="schedule_in.*TokenizedRequest \\| Abort.*got Item"):
            channel.put(Item(key="a", value=1))


@pytest.mark.parametrize("transport", ["cross-thread", "cross-process"])
def test_blocking_put_waits_for_room_and_keeps_order(transport: str) -> None:
    channel = LOCAL_TRANSPORTS[transport]("c", Item, 4)
    with pytest.raises(ChannelFull, match="stayed full"):
        for item in items(5):
            channel.put(item, timeout=0.2)
    received = [channel.get(timeout=5.0) for _ in range(4)]
    producer = threading.Thread(target=lambda: [channel.put(i) for i in items(200)[4:]] and channel.close())
    producer.start()
    received += list(channel)
    producer.join(5)
    assert [m.value for m in received] == list(range(200))


@pytest.mark.parametrize("transport", ["cross-thread", "cross-process"])
def test_close_wakes_blocked_getter_and_putter(transport: str) -> None:
    channel = LOCAL_TRANSPORTS[transport]("c", Item, 1)
    outcome: dict[str, str] = {}

    def get_blocked() -> None:
        try:
            channel.get(timeout=10.0)
        except ChannelClosed:
            outcome["get"] = "closed"

    getter = threading.Thread(target=get_blocked)
    getter.start()
    time.sleep(0.1)
    channel.close()
    getter.join(5)
    assert outcome == {"get": "closed"}

    full = LOCAL_TRANSPORTS[transport]("d", Item, 1)
    full.put(Item(key="a", value=1))

    def put_blocked() -> None:
        try:
            full.put(Item(key="b", value=2), timeout=10.0)
        except ChannelClosed:
            outcome["put"] = "closed"

    putter = threading.Thread(target=put_blocked)
    putter.start()
    time.sleep(0.1)
    full.close()
    putter.join(5)
    assert outcome["put"] == "closed"


def test_wait_readable_blocks_until_a_message_arrives() -> None:
    channel = thread_channel("c", Item, 4)
    start_s = time.monotonic()
    assert not channel.wait_readable(0.05)
    assert time.monotonic() - start_s >= 0.04
    threading.Timer(0.05, lambda: channel.put(Item(key="a", value=1))).start()
    assert channel.wait_readable(5.0)
    waker = threading.Event()
    channel.attach_waker(waker)
    assert waker.is_set()  # already readable
    waker.clear()
    channel.get()
    channel.put(Item(key="b", value=2))
    assert waker.is_set()


@pytest.mark.parametrize("transport", LOCAL_TRANSPORTS)
def test_aget_and_aput_never_block_the_event_loop(transport: str) -> None:
    channel = LOCAL_TRANSPORTS[transport]("c", Item, 2)

    async def scenario() -> tuple[list[int], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        async def producer() -> None:
            for item in items(20):
                await channel.aput(item)  # the channel holds 2: this waits on the consumer
            channel.close()

        tasks = [asyncio.create_task(ticker()), asyncio.create_task(producer())]
        received = []
        await asyncio.sleep(0.05)  # producer is now parked on a full channel
        while True:
            try:
                received.append((await channel.aget()).value)
            except ChannelClosed:
                break
            await asyncio.sleep(0.002)
        stop.set()
        await asyncio.gather(*tasks)
        return received, ticks

    received, ticks = asyncio.run(scenario())
    assert received == list(range(20))
    assert ticks > 20  # the loop kept running while the coroutines waited


def test_cross_thread_aget_is_woken_by_another_thread() -> None:
    channel = thread_channel("c", Item, 4)

    async def consume() -> list[int]:
        threading.Timer(0.05, lambda: [channel.put(i) for i in items(3)] and channel.close()).start()
        out = []
        while True:
            try:
                out.append((await asyncio.wait_for(channel.aget(), 5.0)).value)
            except ChannelClosed:
                return out

    assert asyncio.run(consume()) == [0, 1, 2]


def test_process_channel_rejects_garbage_bytes_and_unknown_tags() -> None:
    channel = process_channel("c", Union[Abort, FlushCache], 4)
    channel.put(Item(key="not an Abort", value=1))  # encodes fine, wrong tag for this channel
    with pytest.raises(MessageRejected, match="'c'.*Abort \\| FlushCache.*Invalid value 'Item' - at `\\$.type`"):
        channel.get(timeout=5.0)
    assert len(channel) == 0  # the rejected message gave its credit back


# -- across a real process boundary: one spawned echo child for the tests below, in file order --

AnyMessage = Union[tuple(ALL_MESSAGE_TYPES)]


@pytest.fixture(scope="module")
def echo() -> Iterator[tuple[Channel, Channel, multiprocessing.process.BaseProcess]]:
    """(to_child, from_child, child): the child puts back whatever it receives."""
    to_child = process_channel("to_child", AnyMessage, 4)
    from_child = process_channel("from_child", AnyMessage, 4)
    child = multiprocessing.get_context("spawn").Process(
        target=toy_stages.echo_process, args=(to_child, from_child), daemon=True)
    child.start()
    yield to_child, from_child, child
    to_child.close()
    from_child.close()
    child.join(10)
    if child.is_alive():
        child.kill()


def test_every_message_type_round_trips_across_processes(echo) -> None:
    to_child, from_child, _ = echo
    for original in every_message():
        to_child.put(original)
        back = from_child.get(timeout=60.0)
        assert type(back) is type(original)
        assert encode(back) == encode(original)  # field by field, tensor bytes included
        for name in ("logits", "bitmask"):
            if hasattr(original, name):
                sent, got = getattr(original, name), getattr(back, name)
                assert got.dtype == sent.dtype and got.shape == sent.shape and torch.equal(got, sent)


def test_wrong_shape_is_rejected_at_the_receiving_border(echo) -> None:
    """The child's border rejects a TokenizedRequest whose input_ids hold a string, naming channel, type, field."""
    to_child, from_child, _ = echo
    bad = TokenizedRequest(rid="r1", parent_rid="r1", input_ids=[1, "two", 3], sampling=SamplingParams())
    to_child.put(bad)  # the producer does not check: msgspec structs are not validated on construction
    to_child.put(Abort(rid="r1"))
    report = from_child.get(timeout=30.0)
    assert isinstance(report, ErrorOutput) and report.rid == "rejected"
    assert "channel 'to_child' rejected a message" in report.message
    assert "GenerateRequest | TokenizedRequest | Abort" in report.message
    assert "Expected `int`, got `str` - at `$.input_ids[1]`" in report.message
    assert from_child.get(timeout=10.0) == Abort(rid="r1")  # and the channel keeps working


def test_order_and_backpressure_across_processes(echo) -> None:
    to_child, from_child, _ = echo
    sent = [Abort(rid=str(i)) for i in range(300)]
    producer = threading.Thread(target=lambda: [to_child.put(m) for m in sent])
    producer.start()
    time.sleep(0.3)  # nobody reads from_child: both channels fill to capacity and the producer blocks
    assert producer.is_alive()
    assert len(to_child) == 4 and len(from_child) == 4
    received = [from_child.get(timeout=10.0) for _ in sent]
    producer.join(10)
    assert received == sent


def test_consumer_close_releases_a_blocked_producer_in_another_process(echo) -> None:
    to_child, from_child, child = echo
    for i in range(5):  # four fit in from_child; the child blocks putting the fifth
        to_child.put(Abort(rid=str(i)))
    time.sleep(0.3)
    assert child.is_alive() and len(from_child) == 4
    from_child.close()  # the child's blocked put raises ChannelClosed and the child returns
    child.join(10)
    assert child.exitcode == 0
    assert [m.rid for m in from_child] == ["0", "1", "2", "3"]  # queued before close: still delivered


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="'c'.*capacity"):
        thread_channel("c", Item, 0)


def test_a_write_lock_left_held_by_a_dead_process_is_freed() -> None:
    """A producer killed mid-send must not block the other producers or close() forever."""
    channel = process_channel("c", Item, 4)
    dead = subprocess.Popen(["true"])
    dead.wait()
    channel._write_lock.acquire()  # as the dead process would have left it
    channel._lock_owner.value = dead.pid
    channel.put(Item(key="a", value=1), timeout=5.0)
    assert channel.get(timeout=5.0) == Item(key="a", value=1)
    channel.close()
    assert list(channel) == []
