"""Child processes that run work the server must not run itself: framing, slots, start and kill.

Two parts of the serving path hand a job to a child process under a time and
memory budget: grammar compiles (``stages.constrain.sandbox``: an automaton
that may explode) and chat templates sent by clients
(``stages.template_sandbox``: a Jinja program that may loop or balloon).
Both keep a small pool of such children, one job per child at a time, and
kill a child whose job breaks its budget; a fresh one starts on that slot's
next job. What they share lives here:

* frames on a child's stdin/stdout: an 8-byte little-endian length, then the
  payload bytes (each sandbox picks its own encoding: the template sandbox
  JSON, since the server must not unpickle what an untrusted template made);
* ``worker_command``: run a module file as a child script with the project
  root on ``sys.path`` (not the file's folder, whose modules could shadow the
  standard library), without importing the package it sits in;
* ``WorkerSlots``: the children by slot, the free slots, start, kill, close.

Standard library only: a child imports this module before its real work.
"""
from __future__ import annotations

import contextlib
import logging
import os
import queue
import select
import struct
import subprocess
import sys
from typing import BinaryIO, Iterator

logger = logging.getLogger(__name__)

_HEADER = struct.Struct("<Q")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_frame(stream: BinaryIO, data: bytes) -> None:
    """One frame: the length, then ``data``."""
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("the worker process closed its pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(stream: BinaryIO) -> bytes:
    """The next frame's payload; EOFError when the other side has closed (or died)."""
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return _read_exact(stream, size)


def wait_readable(stream: BinaryIO, timeout_s: float) -> bool:
    """Whether ``stream`` has something to read (or hit EOF) within ``timeout_s``."""
    ready, _, _ = select.select([stream], [], [], max(0.0, timeout_s))
    return bool(ready)


def worker_command(script: str, *args: str) -> list[str]:
    """The command running ``script`` as ``__main__`` with the project importable; ``args`` are sys.argv[1:]."""
    code = (f"import runpy, sys; sys.path[0] = {_PROJECT_ROOT!r}; "
            f"runpy.run_path({os.path.abspath(script)!r}, run_name='__main__')")
    return [sys.executable, "-c", code, *args]


class WorkerSlots:
    """``num_workers`` child processes, started on demand; a job holds one slot for its duration."""

    def __init__(self, num_workers: int, label: str) -> None:
        self.label = label
        self.workers: list[subprocess.Popen | None] = [None] * max(1, num_workers)
        self._idle: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(len(self.workers)):
            self._idle.put(slot)
        self.closed = False

    @property
    def num_workers(self) -> int:
        return len(self.workers)

    @contextlib.contextmanager
    def hold(self) -> Iterator[int]:
        """A free slot for one job (blocks while every slot is busy)."""
        slot = self._idle.get()
        try:
            yield slot
        finally:
            self._idle.put(slot)

    def running(self, slot: int) -> subprocess.Popen | None:
        """The slot's child if it is alive."""
        worker = self.workers[slot]
        return worker if worker is not None and worker.poll() is None else None

    def start(self, slot: int, command: list[str]) -> subprocess.Popen:
        """Start a child for ``slot`` with pipes on stdin and stdout."""
        worker = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
        self.workers[slot] = worker
        logger.info("process %s-%d started (pid %d)", self.label, slot, worker.pid)
        return worker

    def kill(self, slot: int) -> None:
        worker = self.workers[slot]
        if worker is not None:
            worker.kill()
            worker.wait()
            self.workers[slot] = None

    def pids(self) -> list[int | None]:
        """Process id per slot (None: not started); for tests and debugging."""
        return [w.pid if w is not None and w.poll() is None else None for w in self.workers]

    def close(self) -> None:
        """Kill every child, busy or not (a job in flight then fails)."""
        self.closed = True
        for slot, worker in enumerate(self.workers):
            if worker is not None:
                worker.stdin.close()
                self.kill(slot)
