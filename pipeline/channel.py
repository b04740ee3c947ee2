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

The process border
------------------
``process_channel`` returns a handle that is pickled into a
``multiprocessing`` spawn child (pass it in the ``Process`` args). The producer
encodes with ``pipeline.messages.encode`` and sends the bytes over a pipe; in
the consumer's process a reader thread decodes them against ``T``. A message
of the wrong shape becomes ``MessageRejected`` (channel name, expected type,
msgspec's field path) raised by the ``get`` that reaches it; the channel keeps
working. Backpressure is a credit scheme: a shared semaphore starts with
``capacity`` credits; ``put`` takes one before sending and the consumer gives
it back when ``get`` hands the message out, so at most ``capacity`` messages
are in the pipe or the reader's buffer at once. ``close()`` on either side
sends an empty frame after the last message; the reader sees it, lets the
consumer drain, then reports ChannelClosed. Exactly one process consumes a
process channel; any number may produce.
"""
from __future__ import annotations

import asyncio
import collections
import multiprocessing
import os
import threading
import time
import types
import typing
from typing import Any, Generic, Iterator, TypeVar

import msgspec

from pipeline import messages

T = TypeVar("T")

DEFAULT_CAPACITY = 1024
_CREDIT_POLL_S = 0.05  # how often a producer blocked on credits re-checks close
_CLOSE_LOCK_WAIT_S = 2.0  # close() gives up sending the close frame past a writer stuck this long
_IN_PIPE_WAIT_S = 0.002  # drain() waits this long for messages already sent but not yet decoded


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


def _member_classes(message_type: Any) -> tuple[type, ...] | None:
    """Classes an isinstance check can use, or None when the type is too loose to check."""
    members = typing.get_args(message_type) if _is_union(message_type) else (message_type,)
    if not all(isinstance(m, type) for m in members) or object in members:
        return None
    return tuple(members)


def _process_alive(pid: int) -> bool:
    """False once ``pid`` has exited (a zombie counts as exited)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        return True  # no procfs: trust kill()


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
        self._accept = _member_classes(message_type)

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


class ProcessChannel(Channel[T]):
    """msgpack frames over a pipe between processes, decoded against ``T`` on arrival.

    See the module docstring for the credit scheme and the close frame. The
    consumer's side lazily starts a reader thread that decodes frames into a
    local ``ThreadChannel``; every consumer method reads from that buffer and
    gives the credit back.
    """

    transport = "cross-process"

    def __init__(self, name: str, message_type: Any, capacity: int,
                 context: multiprocessing.context.BaseContext | None = None) -> None:
        super().__init__(name, message_type, capacity)
        ctx = context or multiprocessing.get_context("spawn")
        self._recv_conn, self._send_conn = ctx.Pipe(duplex=False)
        self._credits = ctx.Semaphore(capacity)
        self._write_lock = ctx.Lock()
        self._closed_flag = ctx.RawValue("b", 0)  # shared memory: reading it costs no syscall
        self._lock_owner = ctx.RawValue("q", 0)  # pid holding _write_lock, 0 when free
        self._init_local()

    def _init_local(self) -> None:
        self._inbound: ThreadChannel | None = None
        self._start_lock = threading.Lock()

    _SHARED = ("name", "message_type", "capacity", "_accept", "_recv_conn", "_send_conn",
               "_credits", "_write_lock", "_closed_flag", "_lock_owner")

    def __getstate__(self) -> dict[str, Any]:
        return {key: self.__dict__[key] for key in self._SHARED}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._init_local()

    @property
    def closed(self) -> bool:
        return bool(self._closed_flag.value)

    def __len__(self) -> int:
        """Messages sent and not yet taken by the consumer (credits in use)."""
        try:
            return self.capacity - self._credits.get_value()
        except NotImplementedError:  # macOS has no sem_getvalue
            return len(self._local())

    # -- producer side -------------------------------------------------------
    def put(self, msg: T, timeout: float | None = None) -> None:
        if self.closed:
            raise self._closed_error()
        payload = messages.encode(msg)
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self._credits.acquire(block=False) or self._credits.acquire(timeout=_CREDIT_POLL_S)):
            if self.closed:
                raise self._closed_error()
            if deadline is not None and time.monotonic() >= deadline:
                raise ChannelFull(f"channel {self.name!r} stayed full for {timeout} s")
        self._send(payload)

    def put_nowait(self, msg: T) -> None:
        if self.closed:
            raise self._closed_error()
        payload = messages.encode(msg)
        if not self._credits.acquire(block=False):
            raise ChannelFull(f"channel {self.name!r} is full ({self.capacity} messages)")
        self._send(payload)

    async def aput(self, msg: T) -> None:
        if self.closed:
            raise self._closed_error()
        payload = messages.encode(msg)
        delay_s = 0.0002
        while not self._credits.acquire(block=False):
            if self.closed:
                raise self._closed_error()
            await asyncio.sleep(delay_s)
            delay_s = min(delay_s * 2, 0.01)
        self._send(payload)

    def _send(self, payload: bytes) -> None:
        # The flag is checked under the write lock that close() also takes, so
        # no message can be sent after the close frame and be lost.
        if not self._lock(give_up=lambda: bool(self._closed_flag.value)):
            self._credits.release()
            raise self._closed_error()
        try:
            if self._closed_flag.value:
                self._credits.release()
                raise self._closed_error()
            self._send_conn.send_bytes(payload)
        finally:
            self._unlock()

    def close(self) -> None:
        deadline = time.monotonic() + _CLOSE_LOCK_WAIT_S
        if not self._lock(give_up=lambda: time.monotonic() > deadline):
            # A writer is stuck (its consumer is gone): close without the frame.
            self._closed_flag.value = 1
            if self._inbound is not None:
                self._inbound.close()
            return
        try:
            if not self._closed_flag.value:
                self._closed_flag.value = 1
                self._send_conn.send_bytes(b"")
        finally:
            self._unlock()

    def _lock(self, give_up: Any) -> bool:
        """Take the write lock (False once ``give_up()``); free it if its holder died.

        A process killed while holding the lock would otherwise block every
        other producer and close() forever. Its frame, if half written, is lost.
        """
        while not self._write_lock.acquire(timeout=_CREDIT_POLL_S):
            owner = self._lock_owner.value
            if owner and not _process_alive(owner):
                self._lock_owner.value = 0
                try:
                    self._write_lock.release()
                except ValueError:  # another waiter freed it first
                    pass
                continue
            if give_up():
                return False
        self._lock_owner.value = os.getpid()
        return True

    def _unlock(self) -> None:
        self._lock_owner.value = 0
        self._write_lock.release()

    # -- consumer side -------------------------------------------------------
    def _local(self) -> ThreadChannel:
        if self._inbound is None:
            with self._start_lock:
                if self._inbound is None:
                    inbound: ThreadChannel = ThreadChannel(self.name, object, self.capacity + 1)
                    threading.Thread(target=self._read_frames, args=(inbound,), daemon=True,
                                     name=f"channel-{self.name}-reader").start()
                    self._inbound = inbound
        return self._inbound

    def _read_frames(self, inbound: ThreadChannel) -> None:
        decode = messages.decoder(self.message_type).decode
        expected = type_name(self.message_type)
        while True:
            try:
                payload = self._recv_conn.recv_bytes()
            except (EOFError, OSError):
                break
            if not payload:  # the close frame
                break
            try:
                item: Any = decode(payload)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                item = MessageRejected(self.name, expected, str(exc))
            inbound.put(item)
        inbound.close()

    def _taken(self, item: Any) -> T:
        self._credits.release()
        if isinstance(item, MessageRejected):
            raise item
        return item

    def get(self, timeout: float | None = None) -> T:
        return self._taken(self._local().get(timeout))

    def get_nowait(self) -> T | None:
        item = self._local().get_nowait()
        return None if item is None else self._taken(item)

    def drain(self, max_messages: int) -> list[T]:
        local = self._local()
        if not len(local) and len(self):  # sent, still in the pipe: decoded within microseconds
            local.wait_readable(_IN_PIPE_WAIT_S)
        items = local._drain(max_messages, stop_before=MessageRejected)
        for _ in items:
            self._credits.release()
        if items and isinstance(items[0], MessageRejected):
            raise items[0]
        return items

    async def aget(self) -> T:
        return self._taken(await self._local().aget())

    def wait_readable(self, timeout: float) -> bool:
        return self._local().wait_readable(timeout)

    def attach_waker(self, waker: threading.Event) -> None:
        self._local().attach_waker(waker)


def in_thread_channel(name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY) -> Channel:
    """A channel whose producer and consumer run on the same thread."""
    return InThreadChannel(name, message_type, capacity)


def thread_channel(name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY) -> Channel:
    """A channel between threads of one process (asyncio-safe on either end)."""
    return ThreadChannel(name, message_type, capacity)


def process_channel(name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY,
                    context: multiprocessing.context.BaseContext | None = None) -> Channel:
    """A channel whose handle is passed to a spawn child; msgpack against ``message_type``."""
    return ProcessChannel(name, message_type, capacity, context)
