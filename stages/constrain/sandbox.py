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
"""
from __future__ import annotations

import os
import pickle
import select
import struct
import subprocess
import sys
import threading
import time
from typing import Any, BinaryIO

COMPILE_TIMEOUT_S = 60.0
COMPILE_MEMORY_BYTES = 8 << 30
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
                raise CompileBudgetError("grammar too complex: compiling it ran out of memory") from None
        if not ok:
            raise ValueError(result)
        return pickle.loads(result)

    def _ensure_worker(self) -> subprocess.Popen:
        if self._worker is None or self._worker.poll() is not None:
            self._worker = subprocess.Popen([sys.executable, os.path.abspath(__file__)], stdin=subprocess.PIPE,
                                            stdout=subprocess.PIPE, bufsize=0)
            _write_frame(self._worker.stdin, self.init_frame)
        return self._worker

    def _kill(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker.wait()
            self._worker = None

    def close(self) -> None:
        with self._lock:
            if self._worker is not None:
                self._worker.stdin.close()
                self._kill()


def _worker_main() -> None:
    """Child: cap memory, build the Vocabulary once, then compile regexes until stdin closes."""
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
