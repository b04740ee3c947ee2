"""A stage whose per-request work runs on a small thread pool: results leave as they finish.

The tokenize and multimodal stages both do work that takes milliseconds to
seconds per request (encoding a long prompt, decoding pictures), which must
not run on the loop that also steps the engine. ``PooledStage`` holds what
they share:

* ``submit(request, fn, *args)`` runs ``fn(*args)`` on the pool (inline when
  the stage was built with ``num_workers=0``, for deterministic stepping) and
  records the request with its future; ``refuse(request, error)`` records a
  request already known to fail, so its error leaves in order with the rest;
* ``tick()`` emits every finished request, in arrival order among those
  finished, through the subclass's ``emit_result``; a request never waits
  for an earlier one still running;
* ``pass_abort(abort)``: an Abort for a request still in flight is held until
  that request has been emitted, so the next stage always sees a request
  before its abort; otherwise it goes straight to the ``out`` door.

A subclass writes ``handle``, ``is_in_flight(rid)`` (which requests an
abort's rid names) and ``emit_result(request, future)``.

State owned: the requests in flight with their futures, and the held aborts.
"""
from __future__ import annotations

from concurrent.futures import FIRST_COMPLETED, Executor, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Generic, Mapping, TypeVar

from pipeline.channel import Channel
from pipeline.messages import Abort
from pipeline.stage import Outboxes, Stage

R = TypeVar("R")  # the request type whose work runs on the pool


class PooledStage(Stage, Generic[R]):
    """Base of a stage that runs each request's work on a thread pool and emits results in ``tick``."""

    def __init__(self, name: str, inbox: Channel | None, outboxes: Outboxes | Mapping[str, Channel | None], *,
                 num_workers: int) -> None:
        super().__init__(name, inbox, outboxes)
        self.pool = ThreadPoolExecutor(num_workers, thread_name_prefix=name) if num_workers else None
        self.in_flight: list[tuple[R, Future]] = []
        self.held_aborts: list[Abort] = []

    def submit(self, request: R, fn: Callable[..., Any], *args: Any, pool: Executor | None = None) -> None:
        """Run ``fn(*args)`` for ``request`` on ``pool`` (default: the stage's; inline without workers)."""
        future: Future
        if self.pool is None:
            future = Future()
            try:
                future.set_result(fn(*args))
            except Exception as error:
                future.set_exception(error)
        else:
            future = (pool or self.pool).submit(fn, *args)
            future.add_done_callback(lambda _: self.wake())  # the loop stepping this stage emits it
        self.in_flight.append((request, future))

    def refuse(self, request: R, error: Exception) -> None:
        """Record ``request`` as failed with ``error``; it is answered in order, like any other result."""
        future: Future = Future()
        future.set_exception(error)
        self.in_flight.append((request, future))

    def pass_abort(self, abort: Abort) -> None:
        """Hold ``abort`` while its request is in flight, else send it on through ``out``."""
        if self.is_in_flight(abort.rid):
            self.held_aborts.append(abort)
        else:
            self.outboxes.out.put(abort)  # type: ignore[attr-defined]

    def is_in_flight(self, rid: str) -> bool:
        """Whether an abort of ``rid`` names a request still running on the pool."""
        raise NotImplementedError

    def emit_result(self, request: R, future: Future) -> None:
        """Send on the finished ``future``'s result (or its error) for ``request``."""
        raise NotImplementedError

    def tick(self) -> None:
        """Emit every finished request (arrival order among them), then the aborts no longer waiting."""
        if any(future.done() for _, future in self.in_flight):
            still_running = []
            for request, future in self.in_flight:
                if future.done():
                    self.emit_result(request, future)
                else:
                    still_running.append((request, future))
            self.in_flight = still_running
        if self.held_aborts:
            held, self.held_aborts = self.held_aborts, []
            for abort in held:
                self.handle(abort)

    def has_work(self) -> bool:
        """Inbox messages, or finished results to emit (a running one wakes the loop when done)."""
        return super().has_work() or any(future.done() for _, future in self.in_flight)

    @property
    def busy(self) -> bool:
        """Shutdown waits for the work still running on the pool, too."""
        return super().busy or bool(self.in_flight or self.held_aborts)

    def wait_for_work(self, timeout_s: float) -> None:
        """Block until some request finishes (for a loop with nothing else to do)."""
        if self.in_flight:
            wait([future for _, future in self.in_flight], timeout=timeout_s, return_when=FIRST_COMPLETED)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)
