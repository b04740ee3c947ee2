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
  ``put`` raises ``ChannelClosed`` or, with ``drop_when_closed``, is
  dropped (logged once): a pipeline that lives on without a dead peer
  must not fail the stage that happened to send to it before the death
  was noticed. ``connect()`` opens the connection at once (start-up), and
  ``abandon()`` ends it from any thread, even while a ``put`` is blocked
  on a peer whose host vanished.
* Liveness: ``Heartbeat(name, address)`` sends an empty frame under
  ``name`` every second; the receiving hub's ``watch(name, timeout_s,
  on_lost)`` calls ``on_lost(reason)`` once when that connection closes (a
  process that ends, however it ends, has its sockets closed by the
  kernel: noticed at once), stays silent for ``timeout_s`` (a host that
  vanished or a network cut, where no close ever arrives), or never
  connects within ``timeout_s`` of the ``watch`` (a peer that died before
  its first heartbeat).

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
from typing import Any, Callable

from pipeline import messages
from pipeline.channel import DEFAULT_CAPACITY, Channel, ChannelClosed, MessageRejected, T
from pipeline.thread_channel import ThreadChannel

logger = logging.getLogger(__name__)

_LENGTH = struct.Struct("!I")  # every frame: its byte length, then the bytes
CONNECT_RETRY_S = 0.2
HEARTBEAT_INTERVAL_S = 1.0


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
        self._watches: dict[str, tuple[float, Callable[[str], None]]] = {}
        self._heard: set[str] = set()  # watched names whose heartbeat connection arrived
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

    def watch(self, name: str, timeout_s: float, on_lost: Callable[[str], None]) -> None:
        """Call ``on_lost(reason)`` once when the ``Heartbeat`` sending under ``name`` stops: its connection
        closes, no frame comes for ``timeout_s``, or it never connects within ``timeout_s`` of this call
        (a peer that died before its first heartbeat)."""
        once = _Once(on_lost)
        with self._lock:
            self._watches[name] = (timeout_s, once)
            self._registered.notify_all()
        timer = threading.Timer(timeout_s, self._first_contact_due, args=(name, timeout_s, once))
        timer.daemon = True
        timer.start()

    def _first_contact_due(self, name: str, timeout_s: float, on_lost: Callable[[str], None]) -> None:
        with self._lock:
            heard = name in self._heard
        if not heard and not self._closed:
            on_lost(f"no heartbeat connection within {timeout_s:g} s")

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
                while name not in self._inboxes and name not in self._watches and not self._closed:
                    self._registered.wait(1.0)
                if self._closed:
                    return
                watch = self._watches.get(name)
                if watch is None:
                    channel, decode = self._inboxes[name]
            if watch is not None:
                with self._lock:
                    self._heard.add(name)
                self._follow_heartbeats(conn, *watch)
                return
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

    def _follow_heartbeats(self, conn: socket.socket, timeout_s: float, on_lost: Callable[[str], None]) -> None:
        conn.settimeout(timeout_s)
        try:
            while _recv_frame(conn) is not None:
                pass
            reason = "its connection closed"
        except TimeoutError:
            reason = f"no heartbeat for {timeout_s:g} s"
        except OSError as error:
            reason = f"its connection failed ({error})"
        if not self._closed:
            on_lost(reason)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            self._registered.notify_all()
        self._server.close()


class _Once:
    """Calls the wrapped callback the first time only (a lost peer is reported once)."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        self.callback = callback
        self._called = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, reason: str) -> None:
        with self._lock:
            if self._called.is_set():
                return
            self._called.set()
        self.callback(reason)


class Heartbeat:
    """Sends an empty frame under ``name`` to the hub at ``address`` every ``interval_s``, until ``close()``.

    The receiving hub ``watch``es it. Its own failures are only logged:
    a peer that went away is noticed by the heartbeats going the other way.
    """

    def __init__(self, name: str, address: str, interval_s: float = HEARTBEAT_INTERVAL_S,
                 connect_timeout_s: float = 60.0) -> None:
        self.name = name
        self.address = address
        self.interval_s = interval_s
        self.connect_timeout_s = connect_timeout_s
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{name}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            sock = _open(self.name, self.address, self.connect_timeout_s)
        except (ConnectionError, OSError) as error:
            logger.error("heartbeat %r: %s", self.name, error)
            return
        with sock:
            while not self._stopped.wait(self.interval_s):
                try:
                    _send_frame(sock, b"")
                except OSError:
                    return

    def close(self) -> None:
        self._stopped.set()
        self._thread.join(self.interval_s + 1.0)


def _open(name: str, address: str, connect_timeout_s: float) -> socket.socket:
    """A connection to the hub at ``address`` for the channel ``name`` (retried until ``connect_timeout_s``)."""
    problem = reachable(address, connect_timeout_s)
    if problem:
        raise ConnectionError(f"channel {name!r}: {problem}")
    sock = socket.create_connection(split_address(address))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    _send_frame(sock, name.encode())
    return sock


class TcpProducer(Channel[T]):
    """The producing end of a channel whose consumer is in another host's hub."""

    transport = "cross-host"

    def __init__(self, name: str, message_type: Any, address: str, connect_timeout_s: float = 60.0,
                 drop_when_closed: bool = False) -> None:
        super().__init__(name, message_type, DEFAULT_CAPACITY)
        self.address = address
        self.connect_timeout_s = connect_timeout_s
        self.drop_when_closed = drop_when_closed
        self.dropped = 0  # messages dropped since the consumer went away (drop_when_closed)
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    def __len__(self) -> int:
        return 0  # what was sent is the other host's to count

    def connect(self) -> "TcpProducer[T]":
        """Open the connection now (else the first ``put`` does); a ``ConnectionError`` names what failed."""
        with self._lock:
            if self._sock is None and not self._closed:
                self._sock = _open(self.name, self.address, self.connect_timeout_s)
        return self

    def put(self, msg: T, timeout: float | None = None) -> None:
        self._check_type(msg)
        payload = messages.encode(msg)
        with self._lock:
            if self._closed:
                if self.drop_when_closed:
                    self.dropped += 1
                    return
                raise self._closed_error()
            if self._sock is None:
                self._sock = _open(self.name, self.address, self.connect_timeout_s)
            try:
                _send_frame(self._sock, payload)
            except OSError as error:  # the consumer's host went away: this channel is over
                self._closed = True
                self._sock.close()
                problem = f"channel {self.name!r}: {self.address} closed the connection ({error})"
                if not self.drop_when_closed:
                    raise ChannelClosed(problem) from None
                logger.warning("%s; what is sent to it from now on is dropped", problem)
                self.dropped += 1

    def abandon(self) -> None:
        """The consumer is known to be gone: drop what is sent from now on (when ``drop_when_closed``)
        and end the connection, unblocking a ``put`` stuck on a peer that no longer reads."""
        self._closed = True
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

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
