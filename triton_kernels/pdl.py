"""Programmatic dependent launch (PDL): a kernel may start before the previous one ends.

On Hopper a kernel launched with ``launch_pdl=True`` can be scheduled while the
previous kernel in the stream is still running: its launch, block scheduling
and prologue overlap that kernel's tail. A decode step is a chain of a few
hundred short kernels (6-60 us each), so the gap between two kernels is a
real share of the step.

The rule that keeps this correct: a PDL kernel calls ``pdl_wait`` before it
touches memory. ``gdc_wait`` blocks until the previous kernel has completed
and its writes are visible (the inputs it produced, and any buffer it was
still reading that the allocator may hand to us). ``gdc_launch_dependents``
then allows the *next* PDL kernel to be scheduled early in turn; a kernel
that is not launched with PDL, or a copy, serialises as usual.

``pdl_args(device)`` gives the launch keywords (``USE_PDL`` for the kernel's
constexpr, ``launch_pdl`` for Triton): empty off Hopper, under the
interpreter, or with ``STAGEWISE_PDL=0`` (for A/B measurements).
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

PDL_ENABLED = os.environ.get("STAGEWISE_PDL", "1") != "0"


@triton.jit
def pdl_wait():
    """Wait for the previous kernel (and its writes), then let the next one launch."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


@functools.lru_cache(maxsize=None)
def _capability_of(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device, looked up once per device."""
    return _capability_of(device.index if device.index is not None else torch.cuda.current_device())


def pdl_args(device: torch.device) -> dict:
    """Launch keywords for a PDL launch on ``device`` ({} where it does not apply)."""
    if not PDL_ENABLED or device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1":
        return {}
    if device_capability(device)[0] < 9:
        return {}
    return {"USE_PDL": True, "launch_pdl": True}
