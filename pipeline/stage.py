"""Stage: one door in, typed doors out, and a ``step()`` that moves messages through.

A stage owns its state and nothing else. It reads messages from one inbox
channel and writes to its outboxes; it never holds a reference to another
stage (the assembly wires the channels). A stage class declares its doors:

* ``Inbox``: the union its ``handle`` takes (an alias from ``pipeline.messages``);
* ``Outboxes``: a small frozen record, one ``Outbox[T]`` field per door out,
  e.g. ``out: Outbox[TokenizedRequest | Abort | FlushCache]``. A door whose
  field defaults to ``None`` is optional.

A door checks every message against its declared type before it reaches the
channel, so a stage that emits the wrong message fails at once, under the
harness as in a live run. A subclass writes two methods:

* ``handle(message)``: one inbox message, dispatched with an exhaustive
  ``match`` on the inbox union; results go out with
  ``self.outboxes.<door>.put(message)``.
* ``tick()`` (optional): work after the inbox is handled, e.g. the scheduler
  forming the next batch. ``has_work()`` says whether more ticks are needed
  without new messages (e.g. requests still running).

``step()`` is the heartbeat: drain up to ``max_messages`` from the inbox
without blocking, handle each, tick once; the time spent is counted in
``counters.busy_s``. A ``StageLoop`` (end of this file) steps the stages of
one process in pipeline order and sleeps when none has work; a stage whose
worker thread finishes something for ``tick()`` calls ``wake()``. A stage
that needs its own thread (an asyncio HTTP server) is ``start()``-ed instead
and runs ``run()`` until ``stop()``.

Backpressure: a put on a cross-thread or cross-process outbox blocks while
it is full. An in-thread outbox cannot be emptied while this thread waits, so
``step`` takes at most as many messages as the fullest in-thread outbox has
free slots (its consumer steps later in the same loop); a stage that emits
several messages per input, or emits from ``tick()``, needs in-thread
capacity for that fan-out. A message rejected at a process border is logged
and counted in ``counters.messages_rejected``; the stage keeps running.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
import types
import typing
from typing import Any, ClassVar, Generic, Mapping, TypeVar

from pipeline.channel import Channel, MessageRejected, in_thread_channel, member_classes, type_name

T = TypeVar("T")

logger = logging.getLogger(__name__)

UNWIRED_CAPACITY = 1 << 20  # a door wired to None gets an in-thread channel this big (the harness)
IDLE_WAIT_S = 0.05  # a threaded stage with nothing to do re-checks stop this often


@dataclasses.dataclass
class StageCounters:
    """What a stage has done so far (read by metrics and EngineStats)."""

    messages_in: int = 0
    messages_out: int = 0
    busy_s: float = 0.0
    messages_rejected: int = 0
    steps: int = 0

    def as_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in dataclasses.asdict(self).items()}


class Outbox(Generic[T]):
    """One typed door out of a stage: checks the type, records, counts, puts on the channel."""

    def __init__(self, name: str, message_type: Any, channel: Channel) -> None:
        self.name = name
        self.message_type = message_type
        self.channel = channel
        self.owner: Stage | None = None  # set by the stage that owns this door
        accept = member_classes(message_type)
        if accept is None:
            raise TypeError(f"an outbox carries classes or a union of classes, not {message_type!r}")
        self._accept = accept

    def _admit(self, message: Any) -> Stage | None:
        if not isinstance(message, self._accept):
            owner = self.owner.name if self.owner is not None else "?"
            raise TypeError(f"stage {owner!r} put a {type(message).__name__} on its outbox {self.name!r}, "
                            f"which carries {type_name(self.message_type)}")
        owner = self.owner
        if owner is not None and owner.recorder is not None:
            owner.recorder.record_output(owner, self.name, self.channel.name, message)
        return owner

    def put(self, message: T) -> None:
        """Send ``message`` (blocks while a cross-thread or cross-process channel is full)."""
        owner = self._admit(message)
        self.channel.put(message)
        if owner is not None:
            owner.counters.messages_out += 1

    async def aput(self, message: T) -> None:
        """``put`` for an event loop: waits for room without blocking the loop."""
        owner = self._admit(message)
        await self.channel.aput(message)
        if owner is not None:
            owner.counters.messages_out += 1

    def __repr__(self) -> str:
        return f"<Outbox {self.name!r} {type_name(self.message_type)} -> {self.channel.name!r}>"


@dataclasses.dataclass(frozen=True)
class Outboxes:
    """Base of a stage's record of doors out.

    Each field is an ``Outbox[T]`` (``Outbox[T] | None = None`` if optional),
    or ``tuple[Outbox[T], ...]``: a family of doors, one per replica, wired
    from door names ``"<field>.0"``, ``"<field>.1"``, ... (the router's door
    to each data-parallel engine).
    """

    def doors(self) -> dict[str, Outbox]:
        """The wired doors by name (optional doors left unwired are absent; a family's as ``field.k``)."""
        found: dict[str, Outbox] = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, tuple):
                found.update({door.name: door for door in value})
            elif value is not None:
                found[field.name] = value
        return found

    @classmethod
    def declared(cls) -> dict[str, tuple[Any, bool, bool]]:
        """field name -> (message type, required, a family of doors)."""
        hints = typing.get_type_hints(cls)
        declared: dict[str, tuple[Any, bool, bool]] = {}
        for field in dataclasses.fields(cls):
            message_type, family = _outbox_message_type(cls, field.name, hints[field.name])
            declared[field.name] = (message_type, field.default is dataclasses.MISSING and not family, family)
        return declared

    @classmethod
    def wire(cls, channels: Mapping[str, Channel | None]) -> "Outboxes":
        """The record whose doors put on ``channels`` (door name -> channel; None: a new in-thread one)."""
        declared = cls.declared()
        fields: dict[str, Any] = {}
        for door, channel in channels.items():
            field, _, index = door.partition(".")
            if field not in declared or declared[field][2] != bool(index) or (index and not index.isdigit()):
                raise ValueError(f"{cls.__name__} has no door {door!r} (it has {sorted(declared)})")
            outbox = Outbox(door, declared[field][0], channel if channel is not None
                            else in_thread_channel(door, declared[field][0], UNWIRED_CAPACITY))
            if index:
                fields.setdefault(field, {})[int(index)] = outbox
            else:
                fields[field] = outbox
        missing = [name for name, (_, required, _) in declared.items() if required and name not in fields]
        if missing:
            raise ValueError(f"{cls.__name__}: door {missing[0]!r} is not wired")
        for name, (_, _, family) in declared.items():
            if family:
                members = fields.get(name, {})
                if sorted(members) != list(range(len(members))):
                    raise ValueError(f"{cls.__name__}: doors {name}.0 .. {name}.{len(members) - 1} must all be wired")
                fields[name] = tuple(members[i] for i in range(len(members)))
        return cls(**fields)


def _outbox_message_type(record: type, name: str, hint: Any) -> tuple[Any, bool]:
    """``Outbox[X]``, ``Outbox[X] | None`` -> (X, False); ``tuple[Outbox[X], ...]`` -> (X, True)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next((h for h in typing.get_args(hint) if h is not type(None)), hint)
    family = typing.get_origin(hint) is tuple
    if family:
        hint = typing.get_args(hint)[0]
    if typing.get_origin(hint) is not Outbox:
        raise TypeError(f"{record.__name__}.{name} must be annotated Outbox[T] or tuple[Outbox[T], ...], "
                        f"not {hint!r}")
    return typing.get_args(hint)[0], family


@dataclasses.dataclass(frozen=True)
class NoOutboxes(Outboxes):
    """The record of a stage that only consumes."""


class Stage:
    """Base class of the eight stages (see the module docstring)."""

    Inbox: ClassVar[Any] = object  # the union handle() takes
    Outboxes: ClassVar[type[Outboxes]] = NoOutboxes  # the record of doors out

    def __init__(self, name: str, inbox: Channel | None, outboxes: Outboxes | Mapping[str, Channel]) -> None:
        self.name = name
        self.inbox = inbox
        if not isinstance(outboxes, Outboxes):
            outboxes = self.Outboxes.wire(outboxes)
        self.outboxes = outboxes
        self.doors: dict[str, Outbox] = outboxes.doors()
        for door in self.doors.values():
            door.owner = self
        self.counters = StageCounters()
        self.failure: BaseException | None = None  # what ended run(), if it raised
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._waker = threading.Event()
        self._stepping = False
        self.recorder: Any = None  # a pipeline.harness.Recorder while a run is recorded

    # -- what a subclass writes -----------------------------------------------
    def handle(self, message: Any) -> None:
        """Handle one inbox message (subclass; exhaustive match on the inbox type)."""
        raise NotImplementedError(f"{type(self).__name__} must implement handle()")

    def tick(self) -> None:
        """Work after the inbox is handled this step (subclass, optional)."""

    def has_work(self) -> bool:
        """True while stepping would make progress; subclasses add their own pending work."""
        return self.inbox is not None and len(self.inbox) > 0

    def close(self) -> None:
        """Release resources (subclass, optional); called once the stage has stopped."""

    def telemetry(self) -> dict[str, float]:
        """Counters of the stage's own work beyond ``counters`` (subclass, optional): published with them
        in ProcessCounters, so they reach /metrics and /get_server_info (e.g. the forward stage's
        vision-encoder and multimodal-cache counts)."""
        return {}

    def replay_input(self, door: str, message: Any) -> None:
        """Take a recorded message that came in through a side door (not the inbox) during a replay.

        Only a stage with such a door (the ingest stage's HTTP clients) overrides this.
        """
        raise TypeError(f"stage {self.name!r} has no side door {door!r} to replay")

    def wake(self) -> None:
        """Wake the loop that runs this stage (call from a worker thread whose result tick() emits)."""
        self._waker.set()

    def bind_waker(self, waker: threading.Event) -> None:
        """Share the waker of the loop that steps this stage, and have the inbox set it."""
        self._waker = waker
        if self.inbox is not None:
            self.inbox.attach_waker(waker)

    @property
    def busy(self) -> bool:
        """Inside step() or has work: what shutdown waits on."""
        return self._stepping or self.has_work()

    # -- what the base provides -----------------------------------------------
    def step(self, max_messages: int = 256) -> int:
        """Drain up to ``max_messages`` from the inbox, handle each, tick; returns how many."""
        start_s = time.perf_counter()
        self._stepping = True
        try:
            batch = self._take_inbox(max_messages)
            if self.recorder is not None:
                self.recorder.record_inputs(self, batch)
            for message in batch:
                self.handle(message)
            self.counters.messages_in += len(batch)
            self.tick()
        finally:
            self.counters.steps += 1
            self.counters.busy_s += time.perf_counter() - start_s
            self._stepping = False
        return len(batch)

    def _take_inbox(self, max_messages: int) -> list[Any]:
        if self.inbox is None:
            return []
        max_messages = min(max_messages, self._outbox_room())
        if max_messages <= 0:
            return []
        try:
            return self.inbox.drain(max_messages)
        except MessageRejected as exc:
            self.counters.messages_rejected += 1
            logger.error("stage %s dropped a malformed message: %s", self.name, exc)
            return []

    def _outbox_room(self) -> int:
        """Free slots of the fullest in-thread outbox (those cannot block; see the module docstring)."""
        room = 1 << 30
        for door in self.doors.values():
            channel = door.channel
            if channel.transport == "in-thread":
                room = min(room, channel.capacity - len(channel))
        return room

    # -- running on its own thread ---------------------------------------------
    def start(self) -> None:
        """Run ``run()`` on a daemon thread named after the stage."""
        if self._thread is not None:
            raise RuntimeError(f"stage {self.name!r} is already started")
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run_guarded, name=f"stage-{self.name}", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Thread body: step until stopped (or the inbox is closed) and idle.

        Sleeps on the inbox when there is nothing to do, so an idle stage does
        not spin. Override for a stage with its own event loop; it must return
        once ``stopping`` is true and its work is done.
        """
        self.bind_waker(self._waker)
        while True:
            self._waker.clear()
            self.step()
            if self.has_work():
                continue
            if self.stopping or (self.inbox is not None and self.inbox.closed and len(self.inbox) == 0):
                return
            self._waker.wait(IDLE_WAIT_S)

    @property
    def stopping(self) -> bool:
        """True once ``stop()`` was asked for: finish the work in hand, then return from run()."""
        return self._stopping.is_set()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:  # kept for stop() to re-raise; the thread must not die silently
            self.failure = exc
            logger.exception("stage %s failed", self.name)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until this (threaded) stage has no work left; False if the timeout ran out."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.has_work() and self.failure is None:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(0.001)
        return True

    def stop(self, timeout: float | None = None) -> None:
        """Finish the work in hand, end the thread, re-raise what ended it if it failed."""
        self._stopping.set()
        self._waker.set()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"stage {self.name!r} did not stop within {timeout} s")
            self._thread = None
        if self.failure is not None:
            raise RuntimeError(f"stage {self.name!r} failed") from self.failure

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name!r} in={self.counters.messages_in} out={self.counters.messages_out}>"


class StageLoop:
    """Several stages stepped in pipeline order on one thread, as one loop of ticks.

    Each round steps every stage once; the loop keeps going while any stage
    has work and otherwise sleeps on one waker shared by every inbox (and set
    by ``Stage.wake()``), so an idle process does not spin. ``poll`` runs once
    per round and per wake-up (control messages, parent-death checks).
    ``idle`` is true only while the loop sleeps with every stage idle.
    """

    def __init__(self, stages: list[Stage], poll: Any = None, idle_wait_s: float = IDLE_WAIT_S) -> None:
        self.stages = list(stages)
        self.poll = poll
        self.idle_wait_s = idle_wait_s
        self.waker = threading.Event()
        self.idle = False
        self.rounds = 0
        self.failure: BaseException | None = None
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        for stage in self.stages:
            stage.bind_waker(self.waker)

    def watch(self, channel: Channel) -> None:
        """Also wake the loop when ``channel`` gets a message (e.g. a control inbox)."""
        channel.attach_waker(self.waker)

    def run(self) -> None:
        """Step until stop() is called; sleeps on the waker when every stage is idle."""
        waker, stages = self.waker, self.stages
        while not self._stopping.is_set():
            waker.clear()
            for stage in stages:
                stage.step()
            self.rounds += 1
            if self.poll is not None:
                self.poll()
            if any(stage.has_work() for stage in stages):
                continue
            self.idle = True
            waker.wait(self.idle_wait_s)
            self.idle = False

    def start(self, name: str = "stage-loop") -> None:
        """Run the loop on a daemon thread."""
        self._thread = threading.Thread(target=self._run_guarded, name=name, daemon=True)
        self._thread.start()

    def _run_guarded(self) -> None:
        try:
            self.run()
        except BaseException as exc:
            self.failure = exc
            self.idle = True
            logger.exception("stage loop failed")

    def stop(self, timeout: float | None = None) -> None:
        """End the loop after its current round (and join its thread if it has one)."""
        self._stopping.set()
        self.waker.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"stage loop did not stop within {timeout} s")

    @property
    def busy(self) -> bool:
        """True unless the loop is asleep with every stage idle."""
        return not self.idle or any(stage.busy for stage in self.stages)

    def totals(self) -> tuple[int, int]:
        """(messages in, messages out) over the loop's stages."""
        return (sum(s.counters.messages_in for s in self.stages),
                sum(s.counters.messages_out for s in self.stages))

