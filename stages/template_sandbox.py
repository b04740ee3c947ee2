"""Chat templates sent by clients, rendered in child processes under a time and memory budget.

A chat template is a Jinja program. The server's own template (from the
tokenizer) is trusted and renders in-process. A client's template
(``chat_template_kwargs.chat_template``, accepted only with
``--allow-request-chat-template``) is not: Jinja's sandbox stops attribute
tricks, but not ``{% for a in range(100000) %}{% for b in range(100000) %}``
(minutes of CPU) or ``{{ 'ab' * 50000000 }}`` (a 100 MB string, and more
for a bigger factor). Rendered in the server, one such request would freeze
or grow the whole front end.

So this module (a part of the tokenize stage, not a stage) keeps a small
pool of worker processes, and each client template renders in one of them:

* **time**: the render must answer within ``timeout_s`` (the worker's start
  and imports do not count); past it the worker is killed and the request
  fails with a reason that names the limit;
* **memory**: the worker's address space is capped (``RLIMIT_AS``); a render
  that runs out fails the same way, and the rendered text itself may hold at
  most ``max_chars`` characters (checked in the worker, before anything is
  sent back), so the server never holds a runaway prompt;
* **isolation**: each render holds one worker; a slow template ties up only
  its own, another client's template takes a free one, and requests without
  a client template never come here. ``render_pool`` is a thread pool of the
  same size, on which the tokenize stage runs these requests, so they never
  occupy its ordinary tokenize threads either.

A worker renders exactly as ``tokenizer.apply_chat_template`` does
(transformers' ``render_jinja_template``: the same sandboxed environment,
filters and globals, the tokenizer's special tokens as template variables).
Frames between the server and a worker are an 8-byte length plus JSON (never
pickle: the server must not unpickle what an untrusted template produced).
The first frame tells the worker its memory cap; it answers "ready" once its
imports are done. Each later frame is one render, answered by
``{"text": ...}`` or ``{"error": ...}``. Workers die with the server
(``pipeline.lifetime.die_with_parent``) and are killed on ``close``. The
framing and the slots of workers are ``stages.sandbox_pool``'s, shared with
the grammar compile sandbox.
"""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, BinaryIO

from stages.sandbox_pool import WorkerSlots, read_frame, wait_readable, worker_command, write_frame

logger = logging.getLogger(__name__)

RENDER_TIMEOUT_S = 5.0
RENDER_MEMORY_BYTES = 1 << 30
WORKER_START_TIMEOUT_S = 60.0  # imports on a loaded machine; not part of a render's budget


class TemplateRenderError(RuntimeError):
    """The client's template failed, or broke the time or memory budget; the message says which."""


def _write_frame(stream: BinaryIO, payload: Any) -> None:
    write_frame(stream, json.dumps(payload, ensure_ascii=False).encode("utf-8", "surrogatepass"))


def _read_frame(stream: BinaryIO) -> Any:
    return json.loads(read_frame(stream).decode("utf-8", "surrogatepass"))


class TemplateSandbox:
    """``num_workers`` render processes; ``render`` blocks its caller until the text or an error."""

    def __init__(self, special_tokens: dict[str, Any], *, timeout_s: float = RENDER_TIMEOUT_S,
                 memory_bytes: int = RENDER_MEMORY_BYTES, max_chars: int = 1 << 24, num_workers: int = 2) -> None:
        self.special_tokens = dict(special_tokens)
        self.timeout_s = timeout_s
        self.memory_bytes = memory_bytes
        self.max_chars = max_chars
        self._slots = WorkerSlots(num_workers, "chat-template-sandbox")
        self.render_pool = ThreadPoolExecutor(self._slots.num_workers, thread_name_prefix="chat-template")

    def render(self, messages: list[dict[str, Any]], template: str, *, tools: list[dict[str, Any]] | None,
               add_generation_prompt: bool, continue_final_message: bool,
               template_kwargs: dict[str, Any]) -> str:
        """The template applied to the chat; raises TemplateRenderError."""
        job = {"messages": messages, "chat_template": template, "tools": tools,
               "add_generation_prompt": add_generation_prompt, "continue_final_message": continue_final_message,
               "kwargs": {**self.special_tokens, **template_kwargs}, "max_chars": self.max_chars}
        with self._slots.hold() as slot:
            answer = self._run(slot, job)
        if "error" in answer:
            raise TemplateRenderError(answer["error"])
        return answer["text"]

    def _run(self, slot: int, job: dict[str, Any]) -> dict[str, Any]:
        if self._slots.closed:
            raise TemplateRenderError("the server is shutting down")
        worker = self._ensure_worker(slot)
        try:
            _write_frame(worker.stdin, job)
        except (BrokenPipeError, OSError):
            self._slots.kill(slot)
            raise TemplateRenderError("the chat template worker failed; try again") from None
        if not wait_readable(worker.stdout, self.timeout_s):
            self._slots.kill(slot)
            raise TemplateRenderError(f"the chat template took longer than the time limit of "
                                      f"{self.timeout_s:g} s to render")
        try:
            return _read_frame(worker.stdout)
        except EOFError:
            self._slots.kill(slot)
            if self._slots.closed:
                raise TemplateRenderError("the server is shutting down") from None
            raise TemplateRenderError(f"the chat template ran out of memory (limit "
                                      f"{self.memory_bytes >> 20} MB) while rendering") from None

    def _ensure_worker(self, slot: int) -> subprocess.Popen:
        worker = self._slots.running(slot)
        if worker is not None:
            return worker
        # PR_SET_PDEATHSIG follows the spawning thread: ask for it only from the main thread
        use_signal = "1" if threading.current_thread() is threading.main_thread() else "0"
        worker = self._slots.start(slot, worker_command(__file__, str(os.getpid()), use_signal))
        _write_frame(worker.stdin, {"memory_bytes": self.memory_bytes})
        try:
            ready = wait_readable(worker.stdout, WORKER_START_TIMEOUT_S) and _read_frame(worker.stdout) == "ready"
        except (EOFError, ValueError):
            ready = False
        if not ready:
            self._slots.kill(slot)
            raise TemplateRenderError("the chat template worker did not start")
        return worker

    def worker_pids(self) -> list[int | None]:
        """Process id per slot (None: not started); for tests and debugging."""
        return self._slots.pids()

    def close(self) -> None:
        """Kill every worker (a render in flight fails) and stop the render threads."""
        self._slots.close()
        self.render_pool.shutdown(wait=False, cancel_futures=True)


# --------------------------------------------------------------------------- the worker process


def _render(job: dict[str, Any], render_jinja_template: Any) -> dict[str, Any]:
    try:
        rendered, _ = render_jinja_template(
            conversations=[job["messages"]], tools=job["tools"], chat_template=job["chat_template"],
            add_generation_prompt=job["add_generation_prompt"],
            continue_final_message=job["continue_final_message"], **job["kwargs"])
    except MemoryError:
        raise
    except Exception as error:  # jinja raise_exception(...), syntax errors, sandbox refusals
        return {"error": f"chat template failed: {error}"}
    text = rendered[0]
    if len(text) > job["max_chars"]:
        return {"error": f"the rendered chat template has {len(text)} characters, more than the limit of "
                         f"{job['max_chars']}"}
    return {"text": text}


def _worker_main() -> None:
    """Child: cap memory, import the renderer, then render jobs until stdin closes."""
    if len(sys.argv) > 2:  # [script, parent pid, "1" if the death signal may be used]
        from pipeline.lifetime import die_with_parent

        die_with_parent(int(sys.argv[1]), use_death_signal=sys.argv[2] == "1")
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    memory_bytes = _read_frame(stdin)["memory_bytes"]
    # imported before the cap (it maps shared libraries), so the cap is left for rendering
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    except (ImportError, ValueError, OSError):  # no rlimits here: the time limit still applies
        pass
    _write_frame(stdout, "ready")
    while True:
        try:
            job = _read_frame(stdin)
        except EOFError:
            return
        try:
            answer = _render(job, render_jinja_template)
        except MemoryError:
            answer = None
        if answer is None:  # the failed allocation is freed by now; say so in a small frame
            answer = {"error": f"the chat template ran out of memory (limit {memory_bytes >> 20} MB) while "
                               "rendering"}
        _write_frame(stdout, answer)



if __name__ == "__main__":  # a worker, started by ``worker_command`` (project root on the path)
    _worker_main()
