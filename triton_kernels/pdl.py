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

``pdl_args(device, enabled)`` gives the launch keywords (``USE_PDL`` for the
kernel's constexpr, ``launch_pdl`` for Triton): empty off Hopper, under the
interpreter, or with ``enabled=False``. Each launcher that uses PDL takes a
``pdl: bool = True`` keyword and passes it here; ``load_ops`` binds it from
``KernelOptions.pdl`` (``--disable-pdl`` turns it off for A/B measurements).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from triton_kernels.runtime import device_capability, interpreting


@triton.jit
def pdl_wait():
    """Wait for the previous kernel (and its writes), then let the next one launch."""
    tl.extra.cuda.gdc_wait()
    tl.extra.cuda.gdc_launch_dependents()


def pdl_args(device: torch.device, enabled: bool = True) -> dict:
    """Launch keywords for a PDL launch on ``device`` ({} where it does not apply)."""
    if not enabled or device.type != "cuda" or interpreting():
        return {}
    if device_capability(device)[0] < 9:
        return {}
    return {"USE_PDL": True, "launch_pdl": True}
