"""The stage harness: drive one stage by hand, record a live run, replay a recording.

Driving (tests, notebooks, debugging)::

    stage = TokenizeStage(args, *wiring(TokenizeInbox, "out", "errors", "detokenize"),
                          tokenizer=tokenizer, vocab_size=len(tokenizer), num_workers=0)
    outputs = drive(stage, request).run_until_idle()     # {"out": [...], "errors": [...]}

``drive`` feeds messages into the stage's inbox, steps it, and collects what
each door put on its channel, in order. Doors wired to ``None`` get an
in-thread channel; every door checks its declared message type.

Recording: a pipeline started with a ``record_path`` (``--record-path``)
writes a header (every channel's message type, every stage's factory and its
inbox and doors) and then, from each process: once a stage is built, the
snapshot of the context it was built from (``BuiltRecord``: server args, the
model info the forward stage measured, ...); for every step of every stage,
what it took and what it put out, each with the stage's step number, a
timestamp and the message bytes (``pipeline.messages.encode``; tensors
included). Messages a stage takes through a side door (the ingest stage's
HTTP clients) are recorded as inputs of that door. Records are
length-prefixed msgpack frames appended with one ``write`` each, so several
processes can share the file.

Replaying::

    stagewise replay run.rec --stage schedule [--factory mod:callable]
    python -m pipeline.harness info run.rec

rebuilds the stage from its recorded factory and context (with
``replay=True``: no worker threads, so steps are deterministic), feeds it the
recorded inputs step by step, and compares what it puts out with what was
recorded: exit 0 when equal, else the first difference (channel, message
index, field path) and exit 1. Wall-clock telemetry (``EngineStats``,
``ProcessCounters``) is left out of the comparison.
"""
from __future__ import annotations

import argparse
import os
import struct
import sys
import threading
import time
from typing import Any, Iterator, Literal

import msgspec

from pipeline import messages
from pipeline.channel import Channel, in_thread_channel
from pipeline.placement import (CALLER, PipelineSpec, StageSpec, build_stage, object_path, process_of, resolve_object,
                                resolve_type)
from pipeline.stage import Stage

HARNESS_CAPACITY = 1 << 20
REPLAY_TAIL_STEPS = 1000  # most extra steps a replay takes to let a busy stage finish


# -- driving one stage ----------------------------------------------------------------


def wiring(inbox_type: Any, *outbox_names: str,
           capacity: int = HARNESS_CAPACITY) -> tuple[Channel, dict[str, Channel]]:
    """(inbox, outboxes) of in-thread channels, for constructing a stage under the harness."""
    inbox = in_thread_channel("inbox", inbox_type, capacity)
    return inbox, {name: in_thread_channel(name, object, capacity) for name in outbox_names}


class StageDriver:
    """Feeds, steps and collects one stage; ``outputs[outbox]`` holds everything emitted so far."""

    def __init__(self, stage: Stage) -> None:
        self.stage = stage
        if stage.inbox is None:
            stage.inbox = in_thread_channel(f"{stage.name}.inbox", object, HARNESS_CAPACITY)
        self.outputs: dict[str, list[Any]] = {name: [] for name in stage.doors}

    def feed(self, *messages_in: Any) -> StageDriver:
        for message in messages_in:
            self.stage.inbox.put(message)
        return self

    def step(self, num_steps: int = 1, max_messages: int = 256) -> dict[str, list[Any]]:
        """Step ``num_steps`` times; returns what each outbox got during these steps."""
        new: dict[str, list[Any]] = {name: [] for name in self.stage.doors}
        for _ in range(num_steps):
            self.stage.step(max_messages)
            self._collect(new)
        return new

    def run_until_idle(self, max_steps: int = 10_000, timeout_s: float = 30.0) -> dict[str, list[Any]]:
        """Step until ``has_work()`` is false; returns what each outbox got meanwhile."""
        new: dict[str, list[Any]] = {name: [] for name in self.stage.doors}
        deadline = time.monotonic() + timeout_s
        for _ in range(max_steps):
            self.stage.step()
            self._collect(new)
            if not self.stage.has_work():
                return new
            if time.monotonic() > deadline:
                break
            time.sleep(0)  # let worker threads (if any) run
        raise TimeoutError(f"stage {self.stage.name!r} still has work after {max_steps} steps / {timeout_s} s")

    def take(self, outbox: str) -> list[Any]:
        """Everything collected on ``outbox`` so far, removed from ``outputs``."""
        taken, self.outputs[outbox] = self.outputs[outbox], []
        return taken

    def _collect(self, new: dict[str, list[Any]]) -> None:
        for name, door in self.stage.doors.items():
            got = door.channel.drain(HARNESS_CAPACITY)
            new.setdefault(name, []).extend(got)
            self.outputs.setdefault(name, []).extend(got)


def drive(stage: Stage, *messages_in: Any) -> StageDriver:
    """A driver for ``stage``, already fed with ``messages_in``."""
    return StageDriver(stage).feed(*messages_in)


# -- the recording format ------------------------------------------------------------


class ChannelRecord(msgspec.Struct, frozen=True, tag="channel"):
    name: str
    message_types: list[str]  # "module:Name" of each union member
    producers: list[str]
    consumer: str | None


class StageRecord(msgspec.Struct, frozen=True, tag="stage"):
    name: str
    process: str
    factory: str
    kwargs_json: bytes | None  # None when the kwargs are not JSON data
    kwargs_error: str | None
    inbox: str | None
    outboxes: dict[str, str]  # outbox -> channel name
    context: str | None = None  # "module:callable" of the spec's per-process context


class BuiltRecord(msgspec.Struct, frozen=True, tag="built"):
    """Written by a stage's process once the stage is built: the context it was built from."""

    stage: str
    process: str
    context_json: bytes | None  # the context's snapshot(); None when the spec has no context


class TrafficRecord(msgspec.Struct, frozen=True, tag="msg"):
    time_s: float
    stage: str
    step: int
    direction: Literal["in", "out"]
    channel: str
    outbox: str
    payload: bytes


Record = ChannelRecord | StageRecord | BuiltRecord | TrafficRecord
_FRAME = struct.Struct("<I")
_ENCODER = msgspec.msgpack.Encoder()
_DECODER = msgspec.msgpack.Decoder(Record)


def _frame(record: Any) -> bytes:
    body = _ENCODER.encode(record)
    return _FRAME.pack(len(body)) + body


def read_records(path: str) -> Iterator[Record]:
    with open(path, "rb") as file:
        data = file.read()
    offset = 0
    while offset + _FRAME.size <= len(data):
        (size,) = _FRAME.unpack_from(data, offset)
        offset += _FRAME.size
        yield _DECODER.decode(data[offset:offset + size])
        offset += size


def type_paths(message_type: Any) -> list[str]:
    resolved = resolve_type(message_type)
    members = resolved.__args__ if hasattr(resolved, "__args__") else (resolved,)
    return [object_path(m) for m in members]


def write_header(path: str, spec: PipelineSpec, placement: dict[str, list[str]]) -> None:
    """Start a recording: truncate ``path`` and describe every channel and every stage we build."""
    where = process_of(placement)
    frames = [_frame(ChannelRecord(name=c.name, message_types=type_paths(c.message_type),
                                   producers=list(c.producers), consumer=c.consumer)) for c in spec.channels]
    for stage in spec.stages:
        if where[stage.name] == CALLER:
            continue  # the caller plays it: no stage of ours to rebuild
        factory = stage.factory if isinstance(stage.factory, str) else object_path(stage.factory)
        try:
            kwargs_json, kwargs_error = msgspec.json.encode(stage.kwargs), None
        except (TypeError, msgspec.EncodeError) as exc:
            kwargs_json, kwargs_error = None, f"kwargs are not JSON data: {exc}"
        if hasattr(stage.factory, "__self__") or "<" in factory:
            kwargs_error = (f"its factory {factory} is a bound method or a local function, which cannot be "
                            f"imported by path; replay it with --factory module:callable")
        frames.append(_frame(StageRecord(
            name=stage.name, process=where[stage.name], factory=factory, kwargs_json=kwargs_json,
            kwargs_error=kwargs_error,
            inbox=next((c.name for c in spec.channels if c.consumer == stage.name), None),
            outboxes={p.partition(".")[2]: c.name for c in spec.channels for p in c.producers
                      if p.partition(".")[0] == stage.name},
            context=spec.context)))
    with open(path, "wb") as file:
        file.write(b"".join(frames))


class Recorder:
    """Appends what each stage takes and emits to the recording (thread- and process-safe)."""

    def __init__(self, path: str, process: str = "main") -> None:
        self.path = path
        self.process = process
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self._lock = threading.Lock()

    def stage_built(self, stage: Stage, context: Any) -> None:
        """Note the context ``stage`` was built from (``context.snapshot()``: JSON data)."""
        snapshot = msgspec.json.encode(context.snapshot()) if context is not None else None
        self._write(_frame(BuiltRecord(stage=stage.name, process=self.process, context_json=snapshot)))

    def record_inputs(self, stage: Stage, batch: list[Any], channel: str | None = None) -> None:
        """What ``stage`` took this step (``channel``: a side door other than its inbox)."""
        if batch:
            channel = channel or (stage.inbox.name if stage.inbox is not None else "")
            self._write(b"".join(self._traffic(stage, "in", channel, "", m) for m in batch))

    def record_output(self, stage: Stage, outbox: str, channel: str, message: Any) -> None:
        self._write(self._traffic(stage, "out", channel, outbox, message))

    def _traffic(self, stage: Stage, direction: Literal["in", "out"], channel: str, outbox: str,
                 message: Any) -> bytes:
        return _frame(TrafficRecord(time_s=time.time(), stage=stage.name, step=stage.counters.steps,
                                    direction=direction, channel=channel, outbox=outbox,
                                    payload=messages.encode(message)))

    def _write(self, data: bytes) -> None:
        with self._lock:
            if self._fd >= 0:
                os.write(self._fd, data)

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


class Capture:
    """A recorder kept in memory: what a replayed stage emits, per channel, with its step."""

    def __init__(self) -> None:
        self.outputs: dict[str, list[tuple[int, bytes]]] = {}

    def record_inputs(self, stage: Stage, batch: list[Any], channel: str | None = None) -> None:
        pass

    def record_output(self, stage: Stage, outbox: str, channel: str, message: Any) -> None:
        self.outputs.setdefault(channel, []).append((stage.counters.steps, messages.encode(message)))


# -- replay ---------------------------------------------------------------------------


class Difference(msgspec.Struct, frozen=True):
    """Where a replay first disagreed with the recording."""

    channel: str
    index: int  # message index on that channel (among this stage's outputs)
    field: str  # "$.input_ids[2]"; "$" when a message is missing or of another type
    recorded: Any
    replayed: Any

    def __str__(self) -> str:
        return (f"channel {self.channel!r} message {self.index} field {self.field}: "
                f"recorded {self.recorded!r}, replayed {self.replayed!r}")


class Recording:
    """A recording file, indexed by stage."""

    def __init__(self, path: str) -> None:
        self.channels: dict[str, ChannelRecord] = {}
        self.stages: dict[str, StageRecord] = {}
        self.built: dict[str, BuiltRecord] = {}
        self.traffic: list[TrafficRecord] = []
        for record in read_records(path):
            match record:
                case ChannelRecord():
                    self.channels[record.name] = record
                case StageRecord():
                    self.stages[record.name] = record
                case BuiltRecord():
                    self.built[record.stage] = record
                case TrafficRecord():
                    self.traffic.append(record)

    def message_type(self, channel: str) -> Any:
        return resolve_type(self.channels[channel].message_types)

    def context(self, stage: str) -> Any:
        """The stage's context rebuilt from its snapshot, for a replay (None if the spec had none)."""
        record = self.stages[stage]
        if record.context is None:
            return None
        built = self.built.get(stage)
        if built is None or built.context_json is None:
            raise ValueError(f"stage {stage!r} was never built in the recorded run (no context to rebuild it from)")
        return resolve_object(record.context)(**msgspec.json.decode(built.context_json), replay=True)

    def build(self, stage: str, factory: str | None = None) -> Stage:
        """A fresh instance of the recorded stage, wired to in-thread channels of the recorded types."""
        record = self.stages[stage]
        if record.kwargs_error is not None and (record.kwargs_json is None or factory is None):
            raise ValueError(f"stage {stage!r} cannot be rebuilt: {record.kwargs_error}")
        kwargs = msgspec.json.decode(record.kwargs_json)
        inbox = (in_thread_channel(record.inbox, self.message_type(record.inbox), HARNESS_CAPACITY)
                 if record.inbox else None)
        outboxes = {name: in_thread_channel(channel, self.message_type(channel), HARNESS_CAPACITY)
                    for name, channel in record.outboxes.items()}
        return build_stage(StageSpec(stage, factory or record.factory, kwargs), inbox, outboxes,
                           self.context(stage))


# Wall-clock snapshots: what they hold depends on when they were taken, not on a stage's inputs.
TELEMETRY = (messages.EngineStats, messages.ProcessCounters)


def replay(path: str, stage_name: str, factory: str | None = None) -> Difference | None:
    """Feed a recorded stage's inputs into a fresh one; the first difference, or None.

    Inputs go in at the step they were taken in the recorded run; inputs that
    came through a side door (not the inbox, e.g. the ingest stage's HTTP
    clients) go to ``stage.replay_input(channel, message)``. Telemetry
    (``TELEMETRY``) is left out of the comparison. A stage whose class sets
    ``ordered_per_request`` (tokenize: each request leaves when it is ready)
    is compared request by request, in order within each request.
    """
    recording = Recording(path)
    if stage_name not in recording.stages:
        raise KeyError(f"no stage {stage_name!r} in {path} (stages: {sorted(recording.stages)})")
    try:
        stage = recording.build(stage_name, factory)
    except ValueError:
        raise
    except Exception as exc:  # the factory itself failed: say which stage and why
        raise ValueError(f"cannot build stage {stage_name!r}: {type(exc).__name__}: {exc}") from exc
    capture = Capture()
    stage.recorder = capture
    mine = [t for t in recording.traffic if t.stage == stage_name]
    inputs: dict[int, list[TrafficRecord]] = {}
    recorded: dict[str, list[tuple[int, bytes]]] = {}
    for traffic in mine:
        if traffic.direction == "in":
            inputs.setdefault(traffic.step, []).append(traffic)
        else:
            recorded.setdefault(traffic.channel, []).append((traffic.step, traffic.payload))
    inbox_name = stage.inbox.name if stage.inbox is not None else None
    decoders: dict[str, Any] = {}
    last_step = max((t.step for t in mine), default=-1)
    step = 0
    try:
        # The recorded steps, then a bounded tail while the fresh stage still has work in hand
        # (a stage that finishes work between steps may trail the recording by a step or two).
        while step <= last_step or (step <= last_step + REPLAY_TAIL_STEPS and stage.has_work()):
            taken = 0
            for traffic in inputs.get(step, []):
                message = _decode(recording, decoders, traffic)
                if traffic.channel == inbox_name:
                    stage.inbox.put(message)
                    taken += 1
                else:
                    stage.replay_input(traffic.channel, message)
            stage.step(max_messages=taken)
            for door in stage.doors.values():
                door.channel.drain(HARNESS_CAPACITY)
            step += 1
    finally:
        stage.close()
    recorded, replayed = _without_telemetry(recorded), _without_telemetry(capture.outputs)
    if getattr(stage, "ordered_per_request", False):  # its contract orders outputs within a request only
        recorded, replayed = _by_request(recorded), _by_request(replayed)
    return first_difference(recorded, replayed)


def _decode(recording: Recording, decoders: dict[str, Any], traffic: TrafficRecord) -> Any:
    if traffic.channel not in decoders:
        message_type = (recording.message_type(traffic.channel) if traffic.channel in recording.channels
                        else messages.AnyMessage)
        decoders[traffic.channel] = messages.decoder(message_type)
    return decoders[traffic.channel].decode(traffic.payload)


def _without_telemetry(outputs: dict[str, list[tuple[int, bytes]]]) -> dict[str, list[tuple[int, bytes]]]:
    names = {t.__name__ for t in TELEMETRY}
    kept = {}
    for channel, items in outputs.items():
        kept[channel] = [(step, payload) for step, payload in items
                         if _type_tag(payload) not in names]
    return kept


def _by_request(outputs: dict[str, list[tuple[int, bytes]]]) -> dict[str, list[tuple[int, bytes]]]:
    """Each channel's messages grouped by request (parent rid, else rid), in order within a request."""
    return {channel: sorted(items, key=lambda item: _request_key(item[1])) for channel, items in outputs.items()}


def _request_key(payload: bytes) -> str:
    value = msgspec.msgpack.decode(payload)
    if not isinstance(value, dict):
        return ""
    return str(value.get("parent_rid") or value.get("rid") or "")


def _type_tag(payload: bytes) -> str | None:
    value = msgspec.msgpack.decode(payload)
    return value.get("type") if isinstance(value, dict) else None


def first_difference(recorded: dict[str, list[tuple[int, bytes]]],
                     replayed: dict[str, list[tuple[int, bytes]]]) -> Difference | None:
    """The earliest (by step) disagreement over all channels; inputs are (step, payload) lists."""
    candidates: list[tuple[int, str, Difference]] = []
    for channel in set(recorded) | set(replayed):
        old, new = recorded.get(channel, []), replayed.get(channel, [])
        for index in range(max(len(old), len(new))):
            if index < len(old) and index < len(new) and old[index][1] == new[index][1]:
                continue
            step = min(msgs[index][0] for msgs in (old, new) if index < len(msgs))
            candidates.append((step, channel, _describe(channel, index, old, new)))
            break
    return min(candidates, key=lambda c: (c[0], c[1]))[2] if candidates else None


def _describe(channel: str, index: int, old: list[tuple[int, bytes]], new: list[tuple[int, bytes]]) -> Difference:
    if index >= len(old) or index >= len(new):
        present = [_summary(msgs[index][1]) if index < len(msgs) else "no message" for msgs in (old, new)]
        return Difference(channel, index, "$", present[0], present[1])
    path, a, b = _field_difference(msgspec.msgpack.decode(old[index][1]), msgspec.msgpack.decode(new[index][1]), "$")
    return Difference(channel, index, path, a, b)


def _summary(payload: bytes) -> str:
    value = msgspec.msgpack.decode(payload)
    return f"a {value.get('type', 'message')}" if isinstance(value, dict) else repr(value)


def _field_difference(a: Any, b: Any, path: str) -> tuple[str, Any, Any]:
    """The path of the first place where two decoded messages differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in list(a) + [k for k in b if k not in a]:
            if a.get(key) != b.get(key):
                return _field_difference(a.get(key), b.get(key), f"{path}.{key}")
    if isinstance(a, list) and isinstance(b, list):
        for index, (x, y) in enumerate(zip(a, b)):
            if x != y:
                return _field_difference(x, y, f"{path}[{index}]")
        if len(a) != len(b):
            return f"{path} (length)", len(a), len(b)
    return path, a, b


# -- command line ---------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.harness", description="Replay recorded stage traffic.")
    commands = parser.add_subparsers(dest="command", required=True)
    replay_parser = commands.add_parser("replay", help="replay one stage of a recording; exit 1 on a difference")
    replay_parser.add_argument("file")
    replay_parser.add_argument("--stage", required=True)
    replay_parser.add_argument("--factory", default=None, help="module:callable to build instead of the recorded one")
    info_parser = commands.add_parser("info", help="list the channels, stages and message counts of a recording")
    info_parser.add_argument("file")
    args = parser.parse_args(argv)
    if args.command == "info":
        return _info(args.file)
    try:
        difference = replay(args.file, args.stage, args.factory)
    except (KeyError, ValueError, OSError, ImportError, AttributeError) as exc:
        print(f"replay failed: {exc}", file=sys.stderr)
        return 2
    if difference is None:
        print(f"stage {args.stage!r}: replay matches the recording")
        return 0
    print(f"stage {args.stage!r}: first difference: {difference}")
    return 1


def replay_main(argv: list[str]) -> int:
    """``stagewise replay FILE --stage NAME [--factory module:callable]``."""
    return main(["replay", *argv])


def _info(path: str) -> int:
    recording = Recording(path)
    for name, stage in recording.stages.items():
        taken = sum(1 for t in recording.traffic if t.stage == name and t.direction == "in")
        emitted = sum(1 for t in recording.traffic if t.stage == name and t.direction == "out")
        print(f"stage {name} [{stage.process}] {stage.factory}: {taken} in, {emitted} out")
    for name, channel in recording.channels.items():
        print(f"channel {name}: {' | '.join(channel.message_types)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
