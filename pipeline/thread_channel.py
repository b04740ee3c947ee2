"""The cross-thread transport: a deque behind one lock, asyncio-safe on either end.

Used between a stage loop and a stage on its own thread (an asyncio HTTP
server), between a caller's thread and a pipeline, and as the consumer-side
buffer of a process channel. The interface and its semantics are in
``pipeline/channel.py``; build one with ``thread_channel(name, T, capacity)``.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from typing import Any

from pipeline.channel import DEFAULT_CAPACITY, Channel, ChannelFull, T


class ThreadChannel(Channel[T]):
    """A deque behind one lock, for a producer and a consumer on different threads.

    Blocking callers wait on condition variables; coroutines (``aget``/``aput``)
    park a future that the other side resolves with ``call_soon_threadsafe``,
    so an asyncio loop never blocks on this channel.
    """

    transport = "cross-thread"

    def __init__(self, name: str, message_type: Any, capacity: int) -> None:
        super().__init__(name, message_type, capacity)
        self._queue: collections.deque = collections.deque()
        self._closed = False
        self._lock = threading.Lock()
        self._not_empty = threading.Condition(self._lock)
        self._not_full = threading.Condition(self._lock)
        self._async_getters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._async_putters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._wakers: list[threading.Event] = []

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return len(self._queue)

    def attach_waker(self, waker: threading.Event) -> None:
        with self._lock:
            self._wakers.append(waker)
            if self._queue or self._closed:
                waker.set()

    # -- producer side -------------------------------------------------------
    def put(self, msg: T, timeout: float | None = None) -> None:
        self._check_type(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._closed and len(self._queue) >= self.capacity:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise ChannelFull(f"channel {self.name!r} stayed full for {timeout} s")
                self._not_full.wait(remaining)
            self._append_locked(msg)
        self._after_put()

    def put_nowait(self, msg: T) -> None:
        self._check_type(msg)
        with self._lock:
            if not self._closed and len(self._queue) >= self.capacity:
                raise ChannelFull(f"channel {self.name!r} is full ({self.capacity} messages)")
            self._append_locked(msg)
        self._after_put()

    def _append_locked(self, msg: T) -> None:
        if self._closed:
            raise self._closed_error()
        self._queue.append(msg)
        self._not_empty.notify()

    def _after_put(self) -> None:
        if self._async_getters:
            self._wake_async(self._async_getters)
        for waker in self._wakers:
            waker.set()

    async def aput(self, msg: T) -> None:
        while True:
            try:
                return self.put_nowait(msg)
            except ChannelFull:
                await self._sleep_on(self._async_putters, lambda: len(self._queue) < self.capacity)

    # -- consumer side -------------------------------------------------------
    def get(self, timeout: float | None = None) -> T:
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while not self._queue:
                if self._closed:
                    raise self._closed_error()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"channel {self.name!r}: no message within {timeout} s")
                self._not_empty.wait(remaining)
            msg = self._queue.popleft()
            self._not_full.notify()
        self._after_get()
        return msg

    def get_nowait(self) -> T | None:
        with self._lock:
            if not self._queue:
                if self._closed:
                    raise self._closed_error()
                return None
            msg = self._queue.popleft()
            self._not_full.notify()
        self._after_get()
        return msg

    def drain(self, max_messages: int) -> list[T]:
        return self._drain(max_messages)

    def _drain(self, max_messages: int, stop_before: type | None = None) -> list[T]:
        """Take up to ``max_messages``; an item of type ``stop_before`` is only ever taken alone."""
        if not self._queue:
            return []
        taken: list[T] = []
        with self._lock:
            queue = self._queue
            while queue and len(taken) < max_messages:
                if stop_before is not None and isinstance(queue[0], stop_before):
                    if not taken:
                        taken.append(queue.popleft())
                    break
                taken.append(queue.popleft())
            self._not_full.notify(len(taken))
        if taken:
            self._after_get()
        return taken

    def _after_get(self) -> None:
        if self._async_putters:
            self._wake_async(self._async_putters)

    async def aget(self) -> T:
        while True:
            msg = self.get_nowait()
            if msg is not None:
                return msg
            await self._sleep_on(self._async_getters, lambda: bool(self._queue))

    def wait_readable(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            while not self._queue and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._not_empty.wait(remaining)
            return True

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._not_empty.notify_all()
            self._not_full.notify_all()
        self._wake_async(self._async_getters)
        self._wake_async(self._async_putters)
        for waker in self._wakers:
            waker.set()

    # -- async plumbing ------------------------------------------------------
    async def _sleep_on(self, waiters: list, ready: Any) -> None:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        entry = (loop, future)
        with self._lock:
            if ready() or self._closed:  # re-check under the lock: no lost wake-up
                return
            waiters.append(entry)
        try:
            await future
        finally:
            with self._lock:
                if entry in waiters:
                    waiters.remove(entry)

    def _wake_async(self, waiters: list) -> None:
        with self._lock:
            woken = list(waiters)
            waiters.clear()
        for loop, future in woken:
            if not loop.is_closed():
                loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future) -> None:
    if not future.done():
        future.set_result(None)


def thread_channel(name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY) -> Channel:
    """A channel between threads of one process (asyncio-safe on either end)."""
    return ThreadChannel(name, message_type, capacity)
