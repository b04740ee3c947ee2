"""Grammar compiles in a child process, under a time and memory budget.

outlines-core builds a token automaton for a regex; for some valid inputs
(``a{100000}``, ``[\\s\\S]{0,100000}``, large bounded repeats of character
classes) that automaton explodes: tens of gigabytes and minutes of CPU. Run
in the server process, one such request would take the whole server down
(the kernel kills it for memory). So the serving path compiles in a child
process whose address space is capped (``RLIMIT_AS``) and whose work is
timed: a compile past either budget kills the child (a fresh one starts on
the next compile) and fails that grammar with a clear reason, which the
client receives as an HTTP 400. Several children (a small pool) serve
compiles side by side, so one slow grammar does not hold up another
request's; a compile nobody waits for any more (its request was aborted) is
cancelled by killing its child.

The child is a plain Python subprocess running this file
(``stages.sandbox_pool.worker_command``; the engine process is itself a
daemon, which ``multiprocessing`` may not give children). Frames
on its stdin/stdout are 8-byte lengths plus pickles: first the vocabulary,
then one regex per compile, answered by ``(True, pickled Index)`` or
``(False, compiler's reason)``; outlines-core Index objects pickle losslessly.

The child dies with the process that started it (PR_SET_PDEATHSIG plus a
thread polling the parent pid, as ``pipeline/launch.py`` does for its
children): a killed server never leaves a compile running. ``close()`` kills
a compile in progress at once (shutdown does not wait for it); that compile
fails with ``CompileBudgetError``.
"""
from __future__ import annotations

import logging
import os
import pickle
import select
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

from stages.sandbox_pool import WorkerSlots, read_frame, worker_command, write_frame

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 60.0
COMPILE_MEMORY_BYTES = 8 << 30
_CANCEL_POLL_S = 0.05


class CompileBudgetError(RuntimeError):
    """The grammar needed more time or memory than a compile may take."""


def _write_frame(stream: BinaryIO, payload: Any) -> None:
    write_frame(stream, pickle.dumps(payload))


def _read_frame(stream: BinaryIO) -> Any:
    return pickle.loads(read_frame(stream))


class CompileCancelled(RuntimeError):
    """Every request waiting on the compile went away; its worker was killed."""


class CompileSandbox:
    """A pool of ``num_workers`` compile processes; each compile holds one for its duration.

    A slow grammar ties up only its own worker: another request's compile
    takes a free one. A worker whose compile breaks the time or memory budget,
    or is cancelled (``cancel`` event set: the request was aborted), is killed;
    a fresh one starts on that slot's next compile.
    """

    def __init__(self, eos_token_id: int, token_bytes: dict[bytes, list[int]],
                 timeout_s: float = COMPILE_TIMEOUT_S, memory_bytes: int = COMPILE_MEMORY_BYTES,
                 num_workers: int = 2) -> None:
        self.init_frame = (eos_token_id, token_bytes, memory_bytes)
        self.timeout_s = timeout_s
        self._slots = WorkerSlots(num_workers, "grammar-sandbox")

    @property
    def num_workers(self) -> int:
        return self._slots.num_workers

    def build_index(self, regex: str, cancel: threading.Event | None = None) -> Any:
        """Compile in a free worker; raise ValueError (compiler's reason), CompileBudgetError or CompileCancelled."""
        return self.build_index_sized(regex, cancel)[0]

    def build_index_sized(self, regex: str, cancel: threading.Event | None = None) -> tuple[Any, int]:
        """(Index, serialized bytes): the size estimates the Index's memory for the grammar cache."""
        with self._slots.hold() as slot:
            ok, result = self._run(slot, regex, cancel)
        if not ok:
            raise ValueError(result)
        return pickle.loads(result), len(result)

    def _run(self, slot: int, regex: str, cancel: threading.Event | None) -> tuple[bool, Any]:
        if self._slots.closed:
            raise CompileCancelled("the grammar compiler is shut down")
        worker = self._ensure_worker(slot)
        _write_frame(worker.stdin, regex)
        deadline = time.monotonic() + self.timeout_s
        while True:  # short waits so that a cancel is seen within _CANCEL_POLL_S
            left = deadline - time.monotonic()
            if left <= 0:
                self._slots.kill(slot)
                raise CompileBudgetError(
                    f"grammar too complex: compiling it took longer than {self.timeout_s:.0f} s")
            if cancel is not None and cancel.is_set():
                self._slots.kill(slot)
                raise CompileCancelled("compile cancelled: no request waits for it")
            ready, _, _ = select.select([worker.stdout], [], [], min(left, _CANCEL_POLL_S))
            if ready:
                break
        try:
            return _read_frame(worker.stdout)
        except EOFError:
            self._slots.kill(slot)
            if self._slots.closed:
                raise CompileCancelled("the grammar compiler is shut down") from None
            raise CompileBudgetError("grammar too complex: compiling it ran out of memory") from None

    def _ensure_worker(self, slot: int) -> subprocess.Popen:
        worker = self._slots.running(slot)
        if worker is None:
            # the parent's pid on the command line: the worker dies with this process
            worker = self._slots.start(slot, worker_command(__file__, str(os.getpid())))
            _write_frame(worker.stdin, self.init_frame)
        return worker

    def worker_pids(self) -> list[int | None]:
        """Process id per slot (None: not started); for tests and debugging."""
        return self._slots.pids()

    def close(self) -> None:
        """Stop every worker, busy or not (a compile in flight then fails)."""
        self._slots.close()


def _worker_main() -> None:
    """Child: cap memory, build the Vocabulary once, then compile regexes until stdin closes."""
    if len(sys.argv) > 1:
        from pipeline.lifetime import die_with_parent  # stdlib only: the worker starts fast

        die_with_parent(int(sys.argv[1]))
    from outlines_core import Index, Vocabulary

    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    eos_token_id, token_bytes, memory_bytes = _read_frame(stdin)
    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):  # no rlimits here: the timeout still applies
        pass
    vocabulary = Vocabulary(eos_token_id, token_bytes)
    while True:
        try:
            regex = _read_frame(stdin)
        except EOFError:
            return
        try:
            _write_frame(stdout, (True, pickle.dumps(Index(regex, vocabulary))))
        except (ValueError, MemoryError) as error:
            _write_frame(stdout, (False, str(error) if isinstance(error, ValueError) else "out of memory"))


if __name__ == "__main__":  # a worker, started by ``worker_command`` (project root on the path)
    _worker_main()
