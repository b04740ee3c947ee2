"""Child processes that end with their parent.

Every process stagewise starts (engine processes, tensor-parallel ranks, the
grammar sandbox workers) calls ``die_with_parent`` first, so killing the
server, even with SIGKILL, leaves nothing running. This module imports only
the standard library: a worker that must start quickly can use it.
"""
from __future__ import annotations

import ctypes
import os
import signal
import threading
import time

PARENT_POLL_S = 0.2  # how often a child checks that its parent is alive


def die_with_parent(parent_pid: int, use_death_signal: bool = True) -> None:
    """End this process when its parent dies, even if every other thread is blocked.

    The kernel's PR_SET_PDEATHSIG fires when the parent *thread* that spawned
    us exits, so it is only asked for when the parent spawned from its main
    thread; a daemon thread polling the parent pid covers every case.
    """
    if use_death_signal:
        try:
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # not Linux: the polling thread still ends us
    if os.getppid() != parent_pid:
        os._exit(1)

    def watch_parent() -> None:
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_S)
        os._exit(1)

    threading.Thread(target=watch_parent, name="parent-watch", daemon=True).start()
