"""The cross-host transport: msgpack frames over TCP, for pipelines split over several machines.

Prefill/decode disaggregation on several hosts (``stagewise serve
--disaggregation-mode prefill|decode`` and ``stagewise router``) runs the
same pipeline description as ``--placement pd``, each process on its own
host. A channel whose two ends are in different hosts is carried here:

* ``ChannelHub(host, port)``: one listening socket per process (the
  engines' ``--disaggregation-bootstrap-port``). Each inbox of the process
  that has a producer elsewhere is ``hub.inbox(name, T)``: a plain
  ``ThreadChannel`` that the hub's reader threads fill. A producer's
  connection starts with the channel's name; every frame after it is one
  message, decoded against ``T`` on arrival (a malformed frame is logged
  with the channel's name and msgspec's reason, and dropped).
* ``TcpProducer(name, T, address)``: the producer's end. It connects on the
  first put (retrying until ``connect_timeout_s``; past that, a clear
  ``ConnectionError`` naming the channel and address) and sends frames.
  Backpressure is TCP's own: a consumer that stops reading fills the
  socket buffers and the producer's ``put`` blocks. A consumer whose
  connection closes (its process ended) closes the channel: the next
  ``put`` raises ``ChannelClosed``.

``reachable(address, timeout_s)`` is the check a command runs before it
starts, so an unreachable engine is an error at start-up, not a hang.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import struct
import threading
import time
from typing import Any

from pipeline import messages
from pipeline.channel import DEFAULT_CAPACITY, Channel, ChannelClosed, MessageRejected, T
from pipeline.thread_channel import ThreadChannel

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")  # every frame: its byte length, then the bytes
CONNECT_RETRY_S = 0.2


def split_address(address: str) -> tuple[str, int]:
    """"host:port" (or "http://host:port/...") -> (host, port)."""
    rest = address.split("://", 1)[-1].split("/", 1)[0]
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"address {address!r} is not host:port")
    return host.strip("[]"), int(port)


def reachable(address: str, timeout_s: float) -> str:
    """"" when something listens at ``address`` within ``timeout_s``; else why not."""
    host, port = split_address(address)
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, timeout_s))):
                return ""
        except OSError as error:
            if time.monotonic() >= deadline:
                return f"cannot reach {host}:{port}: {error}"
            time.sleep(CONNECT_RETRY_S)


def _recv_exact(sock: socket.socket, size: int) -> bytes | None:
    chunks, left = [], size
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv_frame(sock: socket.socket) -> bytes | None:
    header = _recv_exact(sock, _LENGTH.size)
    if header is None:
        return None
    return _recv_exact(sock, _LENGTH.unpack(header)[0])


def _send_frame(sock: socket.socket, payload: bytes) -> None:
    sock.sendall(_LENGTH.pack(len(payload)) + payload)


class ChannelHub:
    """One process's listening socket; fills the inboxes registered with ``inbox()``."""

    def __init__(self, host: str, port: int) -> None:
        self._server = socket.create_server((host, port), reuse_port=False)
        self.port = self._server.getsockname()[1]
        self._inboxes: dict[str, tuple[ThreadChannel, Any]] = {}
        self._lock = threading.Lock()
        self._registered = threading.Condition(self._lock)
        self._closed = False
        threading.Thread(target=self._accept, name=f"hub-{self.port}", daemon=True).start()

    def inbox(self, name: str, message_type: Any, capacity: int = DEFAULT_CAPACITY) -> ThreadChannel:
        """The local channel that producers elsewhere fill by sending to this hub under ``name``."""
        with self._lock:
            if name not in self._inboxes:
                channel = ThreadChannel(name, message_type, capacity)
                self._inboxes[name] = (channel, messages.decoder(message_type))
                self._registered.notify_all()
            return self._inboxes[name][0]

    def _accept(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._read, args=(conn,), name=f"hub-{self.port}-reader", daemon=True).start()

    def _read(self, conn: socket.socket) -> None:
        with conn:
            hello = _recv_frame(conn)
            if hello is None:
                return
            name = hello.decode()
            with self._lock:  # a producer may connect before this process registered the inbox
                while name not in self._inboxes and not self._closed:
                    self._registered.wait(1.0)
                if self._closed:
                    return
                channel, decode = self._inboxes[name]
            while (frame := _recv_frame(conn)) is not None:
                try:
                    message = decode.decode(frame)
                except Exception as error:  # msgspec.ValidationError / DecodeError
                    logger.error("%s", MessageRejected(name, str(channel.message_type), str(error)))
                    continue
                try:
                    channel.put(message)
                except ChannelClosed:
                    return

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._registered.notify_all()
        self._server.close()


class TcpProducer(Channel[T]):
    """The producing end of a channel whose consumer is in another host's hub."""

    transport = "cross-host"

    def __init__(self, name: str, message_type: Any, address: str, connect_timeout_s: float = 60.0) -> None:
        super().__init__(name, message_type, DEFAULT_CAPACITY)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return 0  # what was sent is the other host's to count

    def _connect(self) -> socket.socket:
        problem = reachable(self.address, self.connect_timeout_s)
        if problem:
            raise ConnectionError(f"channel {self.name!r}: {problem}")
        sock = socket.create_connection(split_address(self.address))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send_frame(sock, self.name.encode())
        return sock

    def put(self, msg: T, timeout: float | None = None) -> None:
        self._check_type(msg)
        payload = messages.encode(msg)
        with self._lock:
            if self._closed:
                raise self._closed_error()
            if self._sock is None:
                self._sock = self._connect()
            try:
                _send_frame(self._sock, payload)
            except OSError as error:  # the consumer's host went away: this channel is over
                self._closed = True
                self._sock.close()
                raise ChannelClosed(f"channel {self.name!r}: {self.address} closed the connection ({error})") \
                    from None

    def put_nowait(self, msg: T) -> None:
        self.put(msg)

    async def aput(self, msg: T) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.put, msg)

    def get(self, timeout: float | None = None) -> T:
        raise TypeError(f"channel {self.name!r} is consumed on another host")

    def get_nowait(self) -> T | None:
        raise TypeError(f"channel {self.name!r} is consumed on another host")

    def drain(self, max_messages: int) -> list[T]:
        raise TypeError(f"channel {self.name!r} is consumed on another host")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            if self._sock is not None:
                self._sock.close()
                self._sock = None
