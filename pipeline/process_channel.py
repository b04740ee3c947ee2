"""The cross-process transport: msgpack frames over a pipe, decoded against ``T``.

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
process channel; any number may produce: a process-shared write lock keeps
each frame whole, and a lock left held by a producer that died is freed by
the next writer (its pid is kept beside the lock). ``drain`` waits up to
2 ms for messages already sent but still being decoded, so a stage loop does
not spin on a message in the pipe.

Build one with ``process_channel(name, T, capacity)``; the interface and its
semantics are in ``pipeline/channel.py``.
"""
from __future__ import annotations

import asyncio
import multiprocessing
import os
import threading
import time
from typing import Any

import msgspec

from pipeline import messages
from pipeline.channel import DEFAULT_CAPACITY, Channel, ChannelFull, MessageRejected, T, type_name
from pipeline.thread_channel import ThreadChannel

_CREDIT_POLL_S = 0.05  # how often a producer blocked on credits re-checks close
_CLOSE_LOCK_WAIT_S = 2.0  # close() gives up sending the close frame past a writer stuck this long
_IN_PIPE_WAIT_S = 0.002  # drain() waits this long for messages already sent but not yet decoded


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


def process_channel(name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY,
                    context: multiprocessing.context.BaseContext | None = None) -> Channel:
    """A channel whose handle is passed to a spawn child; msgpack against ``message_type``."""
    return ProcessChannel(name, message_type, capacity, context)
