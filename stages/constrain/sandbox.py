"""Grammar compiles in a child process, under a time and memory budget.

outlines-core builds a token automaton for a regex; for some valid inputs
(``a{100000}``, ``[\\s\\S]{0,100000}``, large bounded repeats of character
classes) that automaton explodes: tens of gigabytes and minutes of CPU. Run
in the server process, one such request would take the whole server down
(the kernel kills it for memory). So the serving path compiles in a child
process whose address space is capped (``RLIMIT_AS``) and whose work is
timed: a compile past either budget kills the child (a fresh one starts on
the next compile) and fails that grammar with a clear reason, which the
client receives as an HTTP 400.

The child is a plain ``python this_file.py`` subprocess (the engine process
is itself a daemon, which ``multiprocessing`` may not give children). Frames
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

import ctypes
import logging
import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

logger = logging.getLogger(__name__)

COMPILE_TIMEOUT_S = 60.0
COMPILE_MEMORY_BYTES = 8 << 30
PARENT_POLL_S = 0.2  # how often the child checks that its parent is alive
_HEADER = struct.Struct("<Q")


class CompileBudgetError(RuntimeError):
    """The grammar needed more time or memory than a compile may take."""


def _write_frame(stream: BinaryIO, payload: Any) -> None:
    data = pickle.dumps(payload)
    stream.write(_HEADER.pack(len(data)) + data)
    stream.flush()


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    chunks, left = [], size
    while left:
        chunk = stream.read(left)
        if not chunk:
            raise EOFError("compile worker closed its pipe")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _read_frame(stream: BinaryIO) -> Any:
    (size,) = _HEADER.unpack(_read_exact(stream, _HEADER.size))
    return pickle.loads(_read_exact(stream, size))


class CompileSandbox:
    """One compile worker process at a time, restarted whenever a compile breaks its budget."""

    def __init__(self, eos_token_id: int, token_bytes: dict[bytes, list[int]],
                 timeout_s: float = COMPILE_TIMEOUT_S, memory_bytes: int = COMPILE_MEMORY_BYTES) -> None:
        self.init_frame = (eos_token_id, token_bytes, memory_bytes)
        self.timeout_s = timeout_s
        self._worker: subprocess.Popen | None = None
        self._lock = threading.Lock()  # one compile in the worker at a time
        self._closed = False

    def build_index(self, regex: str) -> Any:
        """Compile in the child; raise ValueError (compiler's reason) or CompileBudgetError."""
        with self._lock:
            worker = self._ensure_worker()
            _write_frame(worker.stdin, regex)
            deadline = time.monotonic() + self.timeout_s
            ready, _, _ = select.select([worker.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                self._kill()
                raise CompileBudgetError(
                    f"grammar too complex: compiling it took longer than {self.timeout_s:.0f} s")
            try:
                ok, result = _read_frame(worker.stdout)
            except EOFError:
                self._kill()
                if self._closed:
                    raise CompileBudgetError("the server is shutting down: grammar compile cancelled") from None
                raise CompileBudgetError("grammar too complex: compiling it ran out of memory") from None
        if not ok:
            raise ValueError(result)
        return pickle.loads(result)

    def _ensure_worker(self) -> subprocess.Popen:
        if self._closed:
            raise CompileBudgetError("the server is shutting down: no more grammar compiles")
        if self._worker is None or self._worker.poll() is not None:
            self._worker = subprocess.Popen([sys.executable, os.path.abspath(__file__), str(os.getpid())],
                                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0)
            logger.info("process grammar-sandbox started (pid %d)", self._worker.pid)
            _write_frame(self._worker.stdin, self.init_frame)
        return self._worker

    def _kill(self) -> None:
        worker, self._worker = self._worker, None
        if worker is not None:
            worker.kill()
            worker.wait()

    def close(self) -> None:
        """Kill the worker now, even mid-compile (that compile fails); later compiles are refused."""
        self._closed = True
        worker = self._worker  # not under the lock: a compile in progress holds it
        if worker is not None:
            worker.kill()
        with self._lock:
            if self._worker is not None:
                self._worker.stdin.close()
                self._kill()


def _die_with_parent(parent_pid: int) -> None:
    """Child: end when the process that started us dies (kernel signal, and a polling thread)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG = 1, SIGKILL = 9
    except (OSError, AttributeError):
        pass  # not Linux: the polling thread still ends us
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()


def _worker_main() -> None:
    """Child: cap memory, build the Vocabulary once, then compile regexes until stdin closes."""
    if len(sys.argv) > 1:
        _die_with_parent(int(sys.argv[1]))
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


if __name__ == "__main__":
    _worker_main()
