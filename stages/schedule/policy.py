"""In which order waiting requests are admitted (``--schedule-policy``).

* ``fcfs``: first come, first served (retracted requests keep their original
  arrival order, so they resume first).
* ``lpm``: longest prefix match first. Requests that share a long cached
  prefix run together while it is still in the cache, which raises the hit
  rate on workloads with shared system prompts. Matching every waiting
  request costs a tree walk each, so above ``LPM_MAX_QUEUE`` waiting requests
  the policy falls back to fcfs (as SGLang does).
"""
from __future__ import annotations

from typing import Callable, Literal

from stages.schedule.req_table import Req

LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: Literal["fcfs", "lpm"],
                  prefix_len: Callable[[Req], int]) -> list[Req]:
    """The waiting queue in admission order (a new list; ``waiting`` is untouched)."""
    by_arrival = sorted(waiting, key=lambda r: r.arrival_order)
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE:
        return by_arrival
    matched = {r.rid: prefix_len(r) for r in by_arrival}
    return sorted(by_arrival, key=lambda r: -matched[r.rid])  # stable: ties stay fcfs
