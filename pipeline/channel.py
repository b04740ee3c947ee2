"""Channel[T]: the bounded, closable, typed queue that joins two stages.

A stage reads one inbox and writes named outboxes; every one of them is a
``Channel``. The interface is the same whatever sits underneath, so stage code
never changes when a placement moves it to another thread or process:

=================  ===============================  ===========================
transport          built by                         when full
=================  ===============================  ===========================
in-thread          ``in_thread_channel`` (a deque,  ``put`` raises ChannelFull:
                   no locks, no copies)             nobody else could empty it
cross-thread       ``thread_channel`` (deque +      ``put`` blocks (``timeout``
                   condition variables)             -> ChannelFull)
cross-process      ``process_channel`` (msgpack     ``put`` blocks on a credit
                   over a pipe, spawn-safe)         (``timeout`` -> ChannelFull)
=================  ===============================  ===========================

Semantics shared by all transports
----------------------------------
* ``close()`` ends the stream: later ``put`` raises ChannelClosed, readers
  still drain what is queued, then ``get`` raises ChannelClosed and iteration
  stops. ``get_nowait`` returns None while empty-but-open.
* ``aget``/``aput`` are coroutines that never block the event loop.
* ``wait_readable(timeout)`` blocks until a message or the close is there (an
  idle loop sleeps on it instead of spinning). ``attach_waker(event)`` lets one
  ``threading.Event`` be set by many channels, for loops that wait on several.

Where each transport lives
--------------------------
This file holds the interface, the errors and the in-thread transport;
``pipeline/thread_channel.py`` the cross-thread one (``thread_channel``) and
``pipeline/process_channel.py`` the cross-process one (``process_channel``;
the msgpack border, credit-based backpressure and close across processes are
described there). Each transport imports this file, never the other way.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import types
import typing
from typing import Any, Generic, Iterator, TypeVar

T = TypeVar("T")

DEFAULT_CAPACITY = 1024


class ChannelClosed(Exception):
    """put on a closed channel, or get on a closed and drained one."""


class ChannelFull(Exception):
    """put_nowait on a full channel (or put whose timeout ran out)."""


class MessageRejected(ValueError):
    """A message arriving over a process border did not decode as the channel's type."""

    def __init__(self, channel: str, expected: str, detail: str) -> None:
        self.channel = channel
        self.expected = expected
        self.detail = detail
        super().__init__(f"channel {channel!r} rejected a message: expected {expected}: {detail}")


def type_name(message_type: Any) -> str:
    """A readable name for a struct or a union of structs: ``TokenizedRequest | Abort``."""
    members = typing.get_args(message_type) if _is_union(message_type) else (message_type,)
    return " | ".join(getattr(m, "__name__", repr(m)) for m in members)


def _is_union(message_type: Any) -> bool:
    return typing.get_origin(message_type) in (typing.Union, types.UnionType)


def member_classes(message_type: Any) -> tuple[type, ...] | None:
    """Classes an isinstance check can use, or None when the type is too loose to check."""
    members = typing.get_args(message_type) if _is_union(message_type) else (message_type,)
    if not all(isinstance(m, type) for m in members) or object in members:
        return None
    return tuple(members)


def _wake_futures(waiters: list[asyncio.Future]) -> None:
    for future in waiters:
        if not future.done():
            future.set_result(None)


class Channel(Generic[T]):
    """The interface every transport implements (see the module docstring)."""

    transport = "abstract"

    def __init__(self, name: str, message_type: Any, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"channel {name!r}: capacity must be >= 1, got {capacity}")
        self.name = name
        self.message_type = message_type
        self.capacity = capacity
        self._accept = member_classes(message_type)

    def _check_type(self, message: Any) -> None:
        if self._accept is not None and not isinstance(message, self._accept):
            raise TypeError(f"channel {self.name!r} carries {type_name(self.message_type)}, "
                            f"got {type(message).__name__}")

    def _closed_error(self) -> ChannelClosed:
        return ChannelClosed(f"channel {self.name!r} is closed")

    def put(self, msg: T, timeout: float | None = None) -> None:
        raise NotImplementedError

    def put_nowait(self, msg: T) -> None:
        raise NotImplementedError

    def get(self, timeout: float | None = None) -> T:
        raise NotImplementedError

    def get_nowait(self) -> T | None:
        raise NotImplementedError

    def drain(self, max_messages: int) -> list[T]:
        raise NotImplementedError

    async def aget(self) -> T:
        raise NotImplementedError

    async def aput(self, msg: T) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    @property
    def closed(self) -> bool:
        raise NotImplementedError

    def __len__(self) -> int:
        raise NotImplementedError

    def wait_readable(self, timeout: float) -> bool:
        raise NotImplementedError

    def attach_waker(self, waker: threading.Event) -> None:
        """Set ``waker`` on every put and on close (no-op where no other thread can put)."""

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                yield self.get()
            except ChannelClosed:
                return

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} {self.name!r} {type_name(self.message_type)} "
                f"{len(self)}/{self.capacity}{' closed' if self.closed else ''}>")


class InThreadChannel(Channel[T]):
    """A deque used by one thread: the producer and consumer take turns in one loop.

    Nothing else can fill or empty it while this thread waits, so ``put`` on a
    full channel raises ChannelFull and ``get`` on an empty open one raises
    TimeoutError at once rather than deadlock. Coroutines in this thread may
    ``await aget()``/``aput()``: they sleep on futures woken by put/get.
    """

    transport = "in-thread"

    def __init__(self, name: str, message_type: Any, capacity: int) -> None:
        super().__init__(name, message_type, capacity)
        self._queue: collections.deque = collections.deque()
        self._closed = False
        self._getters: list[asyncio.Future] = []
        self._putters: list[asyncio.Future] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._queue)

    def put(self, msg: T, timeout: float | None = None) -> None:
        self.put_nowait(msg)

    def put_nowait(self, msg: T) -> None:
        if self._closed:
            raise self._closed_error()
        self._check_type(msg)
        if len(self._queue) >= self.capacity:
            raise ChannelFull(f"channel {self.name!r} is full ({self.capacity} messages)")
        self._queue.append(msg)
        if self._getters:
            _wake_futures(self._getters)

    def get(self, timeout: float | None = None) -> T:
        msg = self.get_nowait()
        if msg is None:
            raise TimeoutError(f"in-thread channel {self.name!r} is empty and only this thread can fill it")
        return msg

    def get_nowait(self) -> T | None:
        if self._queue:
            msg = self._queue.popleft()
            if self._putters:
                _wake_futures(self._putters)
            return msg
        if self._closed:
            raise self._closed_error()
        return None

    def drain(self, max_messages: int) -> list[T]:
        queue = self._queue
        taken = [queue.popleft() for _ in range(min(len(queue), max_messages))]
        if taken and self._putters:
            _wake_futures(self._putters)
        return taken

    async def aget(self) -> T:
        while True:
            msg = self.get_nowait()
            if msg is not None:
                return msg
            await self._sleep_on(self._getters)

    async def aput(self, msg: T) -> None:
        while True:
            try:
                return self.put_nowait(msg)
            except ChannelFull:
                await self._sleep_on(self._putters)

    @staticmethod
    async def _sleep_on(waiters: list[asyncio.Future]) -> None:
        future = asyncio.get_running_loop().create_future()
        waiters.append(future)
        try:
            await future
        finally:
            waiters.remove(future)

    def close(self) -> None:
        self._closed = True
        _wake_futures(self._getters)
        _wake_futures(self._putters)

    def wait_readable(self, timeout: float) -> bool:
        return bool(self._queue) or self._closed


def in_thread_channel(name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY) -> Channel:
    """A channel whose producer and consumer run on the same thread."""
    return InThreadChannel(name, message_type, capacity)
