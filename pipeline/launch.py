"""Launch: run a pipeline description under a placement, and stop it without loss.

``Pipeline(spec, placement).start()`` builds the stages of the calling
process (``"main"``) and spawns one ``multiprocessing`` child per other
process name; each process runs its stages as one ``StageLoop`` plus a thread
per ``own_thread`` stage (``ProcessRunner``). The caller puts into the entry
channels and reads the exit channels.

Shutdown never loses a message: ``stop()`` closes the entries, then probes
every process until, twice in a row, all stages are idle, every
cross-process channel is empty and no counter moved; only then are the loops
stopped and the channels closed. Children are daemons, die with the parent
(PR_SET_PDEATHSIG plus a thread polling the parent pid) and are joined,
then terminated if they hang; a watchdog reports a child that dies while the
pipeline runs (``on_failure``). ``Pipeline`` is the running object.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
import traceback
import typing
from typing import Any, Callable

import msgspec

from pipeline.channel import Channel, ChannelClosed, ChannelFull
from pipeline.harness import Recorder, write_header
from pipeline.lifetime import die_with_parent
from pipeline.messages import ProcessCounters
from pipeline.placement import (CALLER, MAIN, ChannelSpec, PipelineSpec, PlacementError, make_channel, process_of,
                                resolve_object, touches, transport_of, wire_process)
from pipeline.process_channel import process_channel
from pipeline.stage import Stage, StageLoop

logger = logging.getLogger(__name__)

WATCH_INTERVAL_S = 0.2  # how often a running pipeline checks that its children are alive
COUNTERS_INTERVAL_S = 1.0  # how often each process's runner publishes its stages' counters


# -- child processes ----------------------------------------------------------------


class Probe(msgspec.Struct, frozen=True, tag=True):
    """main -> child: report whether you are idle (shutdown's quiescence check)."""

    seq: int


class Shutdown(msgspec.Struct, frozen=True, tag=True):
    """main -> child: the pipeline is drained; stop your loop and exit."""


class Report(msgspec.Struct, frozen=True, tag=True):
    """child -> main: ready (seq 0), a Probe's answer, or why the process failed."""

    process: str
    seq: int
    idle: bool
    messages_in: int = 0
    messages_out: int = 0
    error: str | None = None


ControlInbox = typing.Union[Probe, Shutdown]


def child_main(process: str, spec: PipelineSpec, placement: dict[str, list[str]],
               channels: dict[str, Channel], control_in: Channel, control_out: Channel,
               parent_pid: int, record_path: str, use_death_signal: bool = True) -> None:
    """Entry point of a spawned process: build its stages, run its loop, answer probes."""
    die_with_parent(parent_pid, use_death_signal)
    logging.basicConfig(level=logging.INFO, format=f"[{process}] %(levelname)s %(name)s: %(message)s")
    stages: list[Stage] = []
    try:
        recorder = Recorder(record_path, process) if record_path else None
        stages = wire_process(spec, placement, process, dict(channels),
                              on_built=recorder.stage_built if recorder else None)
        runner = ProcessRunner(process, stages, recorder, _own_thread(spec), _counters_channel(spec, channels))

        def poll() -> None:
            _answer_control(runner, control_in, control_out, parent_pid)
            runner.publish_counters()

        runner.loop.poll = poll
        runner.loop.watch(control_in)
        runner.start_threads()
        control_out.put(Report(process=process, seq=0, idle=True))
        runner.loop.run()
        runner.stop_threads()
    except BaseException:
        control_out.put(Report(process=process, seq=-1, idle=True, error=traceback.format_exc()))
        raise
    finally:
        for stage in stages:
            stage.close()
    # Everything is sent and closed: skip interpreter teardown (torch's takes ~1 s).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _answer_control(runner: ProcessRunner, control_in: Channel, control_out: Channel, parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        runner.loop.stop()
        return
    while True:
        try:
            message = control_in.get_nowait()
        except ChannelClosed:
            message = Shutdown()
        match message:
            case None:
                return
            case Probe(seq=seq):
                messages_in, messages_out = runner.totals()
                control_out.put(Report(process=runner.process, seq=seq, idle=not runner.busy(in_loop=True),
                                       messages_in=messages_in, messages_out=messages_out))
            case Shutdown():
                runner.loop.stop()
                return


class ProcessRunner:
    """The stages of one process: a StageLoop for most, a thread each for ``own_thread`` ones.

    The runner owns its stages, so it is the one that reports what they did:
    every ``COUNTERS_INTERVAL_S`` (from the loop's poll) it puts one
    ``ProcessCounters`` on the spec's counters channel, if there is one.
    """

    def __init__(self, process: str, stages: list[Stage], recorder: Recorder | None = None,
                 own_thread: frozenset[str] = frozenset(), counters: Channel | None = None) -> None:
        self.process = process
        self.stages = stages
        self.threaded = [s for s in stages if s.name in own_thread]
        self.loop = StageLoop([s for s in stages if s not in self.threaded])
        self.recorder = recorder
        self.counters = counters
        self._counters_at_s = 0.0
        for stage in stages:
            stage.recorder = recorder

    def publish_counters(self, force: bool = False) -> None:
        """Put this process's stage counters on the counters channel (at most once a second)."""
        now = time.monotonic()
        if self.counters is None or (not force and now - self._counters_at_s < COUNTERS_INTERVAL_S):
            return
        self._counters_at_s = now
        report = ProcessCounters(process=self.process, time_s=time.time(),
                                 stages={s.name: {**s.counters.as_dict(), **s.telemetry()} for s in self.stages})
        try:
            self.counters.put_nowait(report)
        except (ChannelFull, ChannelClosed):
            pass  # a snapshot: the next one replaces it

    def start_threads(self) -> None:
        for stage in self.threaded:
            stage.start()

    def stop_threads(self, timeout: float = 10.0) -> None:
        for stage in self.threaded:
            stage.stop(timeout)
        if self.recorder is not None:
            self.recorder.close()

    def busy(self, in_loop: bool) -> bool:
        """Any stage mid-step or with work (``in_loop``: asked between rounds of this loop)."""
        if not in_loop and self.loop.stages and not self.loop.idle:
            return True
        return any(s.busy for s in self.stages)

    def totals(self) -> tuple[int, int]:
        return (sum(s.counters.messages_in for s in self.stages),
                sum(s.counters.messages_out for s in self.stages))


def _own_thread(spec: PipelineSpec) -> frozenset[str]:
    return frozenset(s.name for s in spec.stages if s.own_thread)


def _counters_channel(spec: PipelineSpec, channels: dict[str, Channel]) -> Channel | None:
    return next((channels[c.name] for c in spec.channels if c.counters and c.name in channels), None)


# -- the running pipeline ------------------------------------------------------------


class Pipeline:
    """A pipeline started under a placement: entries to put into, exits to read from.

    ``with Pipeline(spec, single(spec)) as pipe: pipe.entry("in").put(...)``.
    Read the exits while stopping (or give them room): a stage blocked on a
    full exit is not idle, and ``stop()`` waits for idle.
    """

    def __init__(self, spec: PipelineSpec, placement: dict[str, list[str]], record_path: str = "",
                 start_timeout_s: float = 600.0, on_failure: Callable[[str], None] | None = None) -> None:
        spec.validate()
        where = process_of(placement)
        missing = [s.name for s in spec.stages if s.name not in where]
        if missing:
            raise PlacementError(f"stages {missing} are not placed in any process")
        self.spec = spec
        self.placement = placement
        self.record_path = record_path
        self.start_timeout_s = start_timeout_s
        self.channels: dict[str, Channel] = {}
        self.children: dict[str, multiprocessing.process.BaseProcess] = {}
        self._control: dict[str, tuple[Channel, Channel]] = {}
        self._runner: ProcessRunner | None = None
        self._seq = 0
        self.started = False
        self.on_failure = on_failure  # called once, from a watchdog thread, if a child or loop dies
        self.failure: str | None = None
        self.lost: set[str] = set()  # children that died while the pipeline lives on (spec.on_process_exit)

    def entry(self, name: str) -> Channel:
        """The channel named ``name`` that the caller puts into (no producer stage, or one the caller plays)."""
        played = set(self.placement.get(CALLER, ()))
        return self._endpoint(name, lambda c: not c.producers or any(p.partition(".")[0] in played
                                                                      for p in c.producers), "an entry")

    def exit(self, name: str) -> Channel:
        """The channel named ``name`` that the caller reads (no consumer stage, or one the caller plays)."""
        played = set(self.placement.get(CALLER, ()))
        return self._endpoint(name, lambda c: c.consumer is None or c.consumer in played, "an exit")

    def _endpoint(self, name: str, test: Callable[[ChannelSpec], bool], what: str) -> Channel:
        matches = [c for c in self.spec.channels if c.name == name and test(c)]
        if not matches:
            raise PlacementError(f"channel {name!r} is not {what} of this pipeline")
        return self.channels[name]

    @property
    def stages(self) -> list[Stage]:
        """The stages living in this process."""
        return self._runner.stages if self._runner else []

    def start(self) -> Pipeline:
        where = process_of(self.placement)
        for channel in self.spec.channels:
            if transport_of(channel, self.spec, where) == "cross-process":
                self.channels[channel.name] = make_channel(channel, "cross-process")
        recorder = None
        if self.record_path:
            write_header(self.record_path, self.spec, self.placement)
            recorder = Recorder(self.record_path, MAIN)
        for process in self.placement:
            if process not in (MAIN, CALLER):
                self._spawn(process)
        try:
            stages = wire_process(self.spec, self.placement, MAIN, self.channels,
                                  on_built=recorder.stage_built if recorder else None)
        except BaseException:
            self._stop_children_now()
            raise
        self._runner = ProcessRunner(MAIN, stages, recorder, _own_thread(self.spec),
                                     _counters_channel(self.spec, self.channels))
        self._runner.loop.poll = self._runner.publish_counters
        self.started = True
        for process in self.children:
            self._wait_ready(process)
        self._runner.start_threads()
        if self._runner.loop.stages:
            self._runner.loop.start(name="stage-loop-main")
        threading.Thread(target=self._watch, name="pipeline-watchdog", daemon=True).start()
        return self

    def _watch(self) -> None:
        """Notice a child process or the main loop dying while the pipeline runs."""
        while self.started and self.failure is None:
            time.sleep(WATCH_INTERVAL_S)
            dead = [f"process {name!r} exited with code {child.exitcode}"
                    for name, child in self.children.items() if not child.is_alive() and not self._survive(name)]
            if self._runner is not None and self._runner.loop.failure is not None:
                dead.append(f"the main stage loop failed: {self._runner.loop.failure!r}")
            dead += [f"stage {s.name!r} failed: {s.failure!r}" for s in self.stages if s.failure is not None]
            if dead and self.started:
                self.failure = "; ".join(dead)
                logger.error("pipeline failure: %s", self.failure)
                if self.on_failure is not None:
                    self.on_failure(self.failure)

    def _survive(self, process: str) -> bool:
        """Whether the pipeline lives on without this dead child (``spec.on_process_exit`` says)."""
        if process in self.lost:
            return True
        if self.spec.on_process_exit is None or not self.started:
            return False
        child = self.children[process]
        reason = resolve_object(self.spec.on_process_exit)(self.spec, process, frozenset(self.lost | {process}),
                                                            self.channels)
        if reason:
            return False
        logger.error("process %r exited with code %s; the pipeline lives on without it", process, child.exitcode)
        self.lost.add(process)
        return True

    def _spawn(self, process: str) -> None:
        ctx = multiprocessing.get_context("spawn")
        control_in = process_channel(f"{process}.control", ControlInbox, 16)
        control_out = process_channel(f"{process}.reports", Report, 16)
        where = process_of(self.placement)
        mine = {name: ch for name, ch in self.channels.items()
                if touches(next(c for c in self.spec.channels if c.name == name), process, where)}
        child = ctx.Process(target=child_main, name=f"stagewise-{process}", daemon=True,
                            args=(process, self.spec, self.placement, mine, control_in, control_out,
                                  os.getpid(), self.record_path,
                                  threading.current_thread() is threading.main_thread()))
        child.start()
        logger.info("process %s started (pid %d)", process, child.pid)
        self.children[process] = child
        self._control[process] = (control_in, control_out)

    def _wait_ready(self, process: str) -> None:
        report = self._report(process, 0, self.start_timeout_s)
        if report is None or report.error:
            self.stop(timeout=1.0)
            detail = report.error if report else "it did not report within the start timeout"
            raise RuntimeError(f"process {process!r} failed to start: {detail}")

    def _report(self, process: str, seq: int, timeout_s: float) -> Report | None:
        """The child's report with this seq (None if it died or timed out)."""
        control_out = self._control[process][1]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                report = control_out.get(timeout=0.05)
            except TimeoutError:
                if not self.children[process].is_alive():
                    return None
                continue
            except ChannelClosed:
                return None
            if report.error or report.seq == seq:
                return report
        return None

    def _probe_all(self, timeout_s: float) -> tuple[bool, tuple[int, ...]]:
        """(every process idle, counters of every process) at about one moment.

        A live child that does not answer within ``timeout_s`` counts as busy.
        """
        self._seq += 1
        idle = self._runner is None or not self._runner.busy(in_loop=False)
        totals: list[int] = list(self._runner.totals()) if self._runner else []
        for process, (control_in, _) in self._control.items():
            if not self.children[process].is_alive():
                continue  # dead: nothing more will come from it (the watchdog reports it)
            try:
                control_in.put(Probe(seq=self._seq), timeout=min(timeout_s, 1.0))
                report = self._report(process, self._seq, timeout_s)
            except (ChannelFull, ChannelClosed):
                report = None
            if report is None:
                idle = False
                continue
            idle = idle and report.idle
            totals += [report.messages_in, report.messages_out]
        return idle, tuple(totals)

    def _internal_channels_empty(self) -> bool:
        where = process_of(self.placement)  # a lost child's inbox keeps what it never read
        return all(len(self.channels[c.name]) == 0 for c in self.spec.channels
                   if c.consumer is not None and c.name in self.channels and where.get(c.consumer) not in self.lost
                   and self.channels[c.name].transport == "cross-process")

    def wait_idle(self, timeout: float = 30.0) -> bool:
        """Block until every stage is idle and no message is in flight (two stable probes)."""
        deadline = time.monotonic() + timeout
        previous = None
        while time.monotonic() < deadline:
            idle, totals = self._probe_all(max(0.05, min(5.0, deadline - time.monotonic())))
            quiet = idle and self._internal_channels_empty()
            if quiet and totals == previous:
                return True
            previous = totals if quiet else None
            time.sleep(0.002)
        return False

    def stop(self, timeout: float = 30.0) -> bool:
        """Close the entries, drain until idle, stop every loop and child, close every channel.

        Returns True when the pipeline drained; False when ``timeout`` ran
        out first (what was still in flight is logged) or a process had died.
        """
        if not self.started:
            return True
        self.started = False
        for channel in self.spec.channels:  # a channel a stage also feeds stays open until the end
            if not channel.producers and channel.name in self.channels:
                self.channels[channel.name].close()
        drained = self.wait_idle(timeout)
        if not drained:
            logger.error("pipeline did not drain within %s s; in flight: %s", timeout,
                         {n: len(c) for n, c in self.channels.items() if len(c)})
        self._stop_processes()
        for channel in self.channels.values():
            channel.close()
        return drained and self.failure is None

    def _stop_processes(self) -> None:
        """Stop and close the main process's stages, then each child in placement order.

        Every step runs even if one fails. Main's stages close first: a stage
        that leads other processes (tensor-parallel rank 0) tells them to end
        when it closes, before they are asked to stop.
        """
        errors: list[BaseException] = []
        if self._runner is not None:
            for stop in (lambda: self._runner.loop.stop(timeout=10.0), self._runner.stop_threads):
                try:
                    stop()
                except Exception as exc:  # keep going: the children must still be stopped
                    logger.error("stopping the main process's stages: %s", exc)
                    errors.append(exc)
            for stage in self._runner.stages:
                stage.close()
        for process, child in self.children.items():
            self._stop_child(process, child)
        for control_in, control_out in self._control.values():
            control_in.close()
            control_out.close()
        if self._runner is not None:
            if self._runner.loop.failure is not None:
                errors.append(RuntimeError(f"the main stage loop failed: {self._runner.loop.failure!r}"))
        if errors:
            raise errors[0]

    def _stop_children_now(self) -> None:
        """Start-up failed in this process: stop the children already spawned."""
        for process, child in self.children.items():
            self._stop_child(process, child)
        for control_in, control_out in self._control.values():
            control_in.close()
            control_out.close()

    def _stop_child(self, process: str, child: multiprocessing.process.BaseProcess) -> None:
        try:
            self._control[process][0].put(Shutdown(), timeout=1.0)
        except Exception:
            pass  # dead or stuck: terminated below
        child.join(10.0)
        if child.is_alive():
            logger.error("process %s did not exit; terminating it", process)
            child.terminate()
            child.join(2.0)
        if child.is_alive():
            child.kill()
            child.join()

    def __enter__(self) -> Pipeline:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()
