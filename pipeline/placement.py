"""Placement: one description of the pipeline, run in one process or split over several.

The description says *what* exists; the placement says *where* it runs:

* ``StageSpec(name, factory, kwargs, own_thread)``: how to build a stage.
  ``factory`` is ``"module:callable"`` (or the callable); it is called as
  ``factory(inbox=..., outboxes=..., **kwargs)``, plus ``name=`` and
  ``context=`` if it takes them. ``kwargs`` should be JSON data so a
  recording can rebuild the stage; a dict given for a parameter annotated
  with a msgspec Struct (``args: ServerArgs``) is converted to that Struct.
* ``ChannelSpec(name, message_type, producers, consumer, capacity, counters)``:
  ``producers`` are ``"stage.outbox"`` strings; no producers makes an *entry*
  the caller puts into; ``consumer`` None makes an *exit* the caller reads.
  ``counters=True`` marks the one channel where every process's runner also
  puts its ``ProcessCounters``.
* ``PipelineSpec(stages, channels, context, context_kwargs)``: ``context``
  (``"module:callable"``) is called once in every process with
  ``context_kwargs`` (JSON data); each factory that takes ``context`` gets
  that object. It holds what several stages of one process share (a
  tokenizer loaded once, the model info the forward stage measured), and
  ``snapshot()`` returns it as JSON data for a recording.
  ``on_process_exit`` (``"module:callable"``, optional) decides whether the
  pipeline lives on when a child process dies: it is called in the main
  process as ``hook(spec, process, lost, channels)`` (``lost``: every child
  process dead so far, this one included; ``channels``: the main process's
  channels, to tell a stage) and returns "" to carry on without it, or why
  the pipeline fails. Without it any child's death fails the pipeline.
* A placement maps process names to stage names. ``"main"`` is the calling
  process; ``"caller"`` lists stages the caller plays itself (the offline
  Engine plays ingest: it puts into ingest's outbox channels and reads its
  inbox); every other process is a ``multiprocessing`` spawn child.

From that, each channel gets the cheapest transport that is correct: in-thread
when its ends share one stage loop, cross-thread when an end is the caller or
a stage on its own thread, cross-process when its ends are in different
processes. Inside a process the stages run as one ``StageLoop``.

Running a description under a placement is ``pipeline/launch.py``
(``Pipeline``: start, drain-then-stop, child processes).
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import typing
from typing import Any, Callable

import msgspec

from pipeline.channel import DEFAULT_CAPACITY, Channel, in_thread_channel
from pipeline.process_channel import process_channel
from pipeline.stage import Stage
from pipeline.thread_channel import thread_channel

MAIN = "main"
CALLER = "caller"  # stages the caller plays itself: their channels are its entries and exits
# The serving front end: HTTP, text in, text out. Multimodal stays with the engine so that
# the schedule inbox has producers in the engine process only (its hot path stays in-thread).
FRONT_END_STAGES = ("ingest", "tokenize", "router", "detokenize")


class PlacementError(ValueError):
    """The description or placement is inconsistent; the message names the stage or channel."""


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    factory: str | Callable[..., Stage]
    kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    own_thread: bool = False  # run() on its own thread instead of the process's stage loop
    own_process: str | None = None  # every placement runs it in a process of this name (a TP rank)


@dataclasses.dataclass(frozen=True)
class ChannelSpec:
    name: str
    message_type: Any  # a type, a Union, or "module:Name"
    producers: tuple[str, ...] = ()  # "stage.outbox"; empty: an entry the caller puts into
    consumer: str | None = None  # the stage whose inbox this is; None: an exit the caller reads
    capacity: int = DEFAULT_CAPACITY
    counters: bool = False  # every process's runner also puts its ProcessCounters here


@dataclasses.dataclass(frozen=True)
class PipelineSpec:
    stages: tuple[StageSpec, ...]
    channels: tuple[ChannelSpec, ...]
    context: str | None = None  # "module:callable" building each process's shared context
    context_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
    on_process_exit: str | None = None  # "module:callable": may the pipeline live on without a dead child?

    def stage(self, name: str) -> StageSpec:
        for spec in self.stages:
            if spec.name == name:
                return spec
        raise PlacementError(f"no stage named {name!r}")

    def validate(self) -> None:
        """Raise PlacementError unless names are unique and every end names a real stage."""
        names = [s.name for s in self.stages]
        _unique(names, "stage")
        _unique([c.name for c in self.channels], "channel")
        _unique([c.consumer for c in self.channels if c.consumer is not None], "inbox of stage")
        _unique([p for c in self.channels for p in c.producers], "outbox")
        if sum(c.counters for c in self.channels) > 1:
            raise PlacementError("only one channel may carry the runners' counters")
        for channel in self.channels:
            ends = [p.partition(".")[0] for p in channel.producers] + [channel.consumer]
            for stage in ends:
                if stage is not None and stage not in names:
                    raise PlacementError(f"channel {channel.name!r} names unknown stage {stage!r}")
            for producer in channel.producers:
                if "." not in producer:
                    raise PlacementError(f"channel {channel.name!r}: producer {producer!r} must be 'stage.outbox'")


def _unique(names: list[Any], what: str) -> None:
    seen = set()
    for name in names:
        if name in seen:
            raise PlacementError(f"{what} {name!r} is declared twice")
        seen.add(name)


# -- placements ---------------------------------------------------------------------


def single(spec: PipelineSpec) -> dict[str, list[str]]:
    """Everything in the calling process (tests, CPU demo, notebooks), but stages that need their own."""
    return _with_own_processes(spec, {MAIN: [s.name for s in spec.stages if s.own_process is None]})


def serving(spec: PipelineSpec, front_end: tuple[str, ...] = FRONT_END_STAGES) -> dict[str, list[str]]:
    """Front-end stages in the calling process, every other stage in one engine process."""
    placed = [s for s in spec.stages if s.own_process is None]
    return _with_own_processes(spec, {MAIN: [s.name for s in placed if s.name in front_end],
                                      "engine": [s.name for s in placed if s.name not in front_end]})


def _with_own_processes(spec: PipelineSpec, placement: dict[str, list[str]]) -> dict[str, list[str]]:
    """Add each ``own_process`` stage in its process, after the others (it is stopped after them)."""
    for stage in spec.stages:
        if stage.own_process is not None:
            placement.setdefault(stage.own_process, []).append(stage.name)
    return {process: names for process, names in placement.items() if names or process == MAIN}


def played_by_caller(placement: dict[str, list[str]], *stage_names: str) -> dict[str, list[str]]:
    """``placement`` with ``stage_names`` taken out of their processes and played by the caller."""
    moved = {process: [n for n in names if n not in stage_names] for process, names in placement.items()}
    moved[CALLER] = list(stage_names)
    return moved


# "pd": the front end here, each prefill and decode engine in the process its stages name (own_process)
PLACEMENTS: dict[str, Callable[[PipelineSpec], dict[str, list[str]]]] = {"single": single, "serving": serving,
                                                                         "pd": single}


def process_of(placement: dict[str, list[str]]) -> dict[str, str]:
    """stage name -> process name (each stage placed exactly once)."""
    where: dict[str, str] = {}
    for process, stage_names in placement.items():
        for name in stage_names:
            if name in where:
                raise PlacementError(f"stage {name!r} is placed in both {where[name]!r} and {process!r}")
            where[name] = process
    return where


def ends_of(channel: ChannelSpec, where: dict[str, str]) -> tuple[set[str], bool]:
    """(processes with an end of this channel, whether the caller holds an end)."""
    stage_ends = [p.partition(".")[0] for p in channel.producers]
    if channel.consumer is not None:
        stage_ends.append(channel.consumer)
    processes = {where[s] for s in stage_ends}
    if channel.counters:  # every process's runner produces (the caller runs none)
        processes |= set(where.values()) - {CALLER}
    caller = not channel.producers or channel.consumer is None or CALLER in processes
    processes.discard(CALLER)
    if caller:
        processes.add(MAIN)
    return processes, caller


def transport_of(channel: ChannelSpec, spec: PipelineSpec, where: dict[str, str]) -> str:
    """'in-thread', 'cross-thread' or 'cross-process' for this channel under this placement."""
    processes, caller = ends_of(channel, where)
    if len(processes) > 1:
        return "cross-process"
    stage_ends = [p.partition(".")[0] for p in channel.producers] + [channel.consumer]
    threaded = any(s is not None and where.get(s) != CALLER and spec.stage(s).own_thread for s in stage_ends)
    if caller or threaded:
        return "cross-thread"
    return "in-thread"


def make_channel(channel: ChannelSpec, transport: str) -> Channel:
    message_type = resolve_type(channel.message_type)
    build = {"in-thread": in_thread_channel, "cross-thread": thread_channel,
             "cross-process": process_channel}[transport]
    return build(channel.name, message_type, channel.capacity)


# -- building stages ----------------------------------------------------------------


def resolve_object(path: str | Any) -> Any:
    """``"package.module:attr.sub"`` -> the object (objects pass through)."""
    if not isinstance(path, str):
        return path
    module_name, _, attr = path.partition(":")
    if not attr:
        raise PlacementError(f"{path!r} is not 'module:name'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def resolve_type(message_type: Any) -> Any:
    """A type, a Union, a "module:Name" path, or a list of paths (a union) -> the type."""
    if isinstance(message_type, (list, tuple)):
        members = tuple(resolve_type(m) for m in message_type)
        return members[0] if len(members) == 1 else typing.Union[members]
    return resolve_object(message_type)


def object_path(obj: Any) -> str:
    """The "module:qualname" of a class or function."""
    return f"{obj.__module__}:{obj.__qualname__}"


def build_context(spec: PipelineSpec) -> Any:
    """The shared context of one process's stages (None when the spec declares none)."""
    return resolve_object(spec.context)(**spec.context_kwargs) if spec.context else None


def build_stage(spec: StageSpec, inbox: Channel | None, outboxes: dict[str, Channel], context: Any = None) -> Stage:
    """Call the spec's factory with its wiring and kwargs; the stage takes the spec's name."""
    factory = resolve_object(spec.factory)
    call_kwargs = dict(_typed_kwargs(factory, spec.kwargs), inbox=inbox, outboxes=outboxes)
    parameters = _parameters(factory)
    if "name" in parameters:
        call_kwargs["name"] = spec.name
    if "context" in parameters:
        call_kwargs["context"] = context
    stage = factory(**call_kwargs)
    if not isinstance(stage, Stage):
        raise PlacementError(f"factory of stage {spec.name!r} returned {type(stage).__name__}, not a Stage")
    stage.name = spec.name
    return stage


def _parameters(factory: Any) -> dict[str, inspect.Parameter]:
    try:
        return dict(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return {}


def _typed_kwargs(factory: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Turn dict values into the msgspec Struct their parameter is annotated with."""
    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # unresolvable annotations: pass values as they are
        hints = {}
    typed = dict(kwargs)
    for key, value in kwargs.items():
        hint = hints.get(key)
        if isinstance(value, dict) and isinstance(hint, type) and issubclass(hint, msgspec.Struct):
            typed[key] = msgspec.convert(value, hint)
    return typed


def wire_process(spec: PipelineSpec, placement: dict[str, list[str]], process: str,
                 channels: dict[str, Channel], on_built: Callable[[Stage, Any], None] | None = None) -> list[Stage]:
    """Build this process's stages in declaration order; make its local channels (``channels`` gains them).

    ``on_built(stage, context)`` runs after each stage is built (a recording
    notes the context it was built from).
    """
    where = process_of(placement)
    for channel in spec.channels:
        if channel.name not in channels and touches(channel, process, where):
            channels[channel.name] = make_channel(channel, transport_of(channel, spec, where))
    names = placement.get(process, [])
    context = build_context(spec) if names else None
    stages = []
    for stage_spec in spec.stages:
        if stage_spec.name not in names:
            continue
        inbox, outboxes = doors_of(spec, stage_spec.name, channels)
        stage = build_stage(stage_spec, inbox, outboxes, context)
        if on_built is not None:
            on_built(stage, context)
        stages.append(stage)
    return stages


def doors_of(spec: PipelineSpec, stage: str, channels: dict[str, Channel]) -> tuple[Channel | None, dict[str, Channel]]:
    """(inbox, {door: channel}) of a stage, from the channels built so far."""
    inbox = next((channels[c.name] for c in spec.channels if c.consumer == stage), None)
    outboxes = {p.partition(".")[2]: channels[c.name]
                for c in spec.channels for p in c.producers if p.partition(".")[0] == stage}
    return inbox, outboxes


def touches(channel: ChannelSpec, process: str, where: dict[str, str]) -> bool:
    """Whether ``process`` holds an end of ``channel`` (the caller's ends live in main)."""
    return process in ends_of(channel, where)[0]
