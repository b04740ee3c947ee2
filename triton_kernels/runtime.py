"""What the kernel files ask of the runtime, in one place.

* ``interpreting()``: are the kernels running under the Triton CPU interpreter
  (``TRITON_INTERPRET=1``)? Launchers then take small, cheap tiles and skip
  what only a GPU has (PDL, TMA scratch, the Gluon kernel).
* ``ensure_tma_allocator(device)``: tensor descriptors built inside a kernel
  (``tl.make_tensor_descriptor``) need a small global scratch, which Triton
  asks for through ``triton.set_allocator``. Launchers call this before each
  TMA launch: Triton keeps the allocator per context (thread), and a stage
  may launch from another thread than the one that launched first.
* ``device_capability``, ``num_sms``, ``is_hopper``: device facts, looked up
  once per device (cached), never at import.
* ``KernelOptions``: the A/B switches of the Triton backend, fixed when the
  ops are bound (``triton_kernels.load_ops``), never read from the
  environment. A launcher called directly takes each switch as a keyword
  whose default is the option's default.

Nothing here runs at import.
"""
from __future__ import annotations

import dataclasses
import functools
import os

import torch
import triton


@dataclasses.dataclass(frozen=True)
class KernelOptions:
    """Switches of the Triton backend (each on by default; off for A/B runs).

    ``gemm_ws``: decode linears may take the warp-specialised Gluon kernel
    (triton_kernels/gemm_ws.py) on Hopper; off, they take the pointer kernels.
    ``pdl``: kernels launch with programmatic dependent launch where the GPU
    has it (triton_kernels/pdl.py); off, every launch is a plain one.
    """

    gemm_ws: bool = True
    pdl: bool = True


def interpreting() -> bool:
    """True when kernels run under the Triton CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s input_precision for operands of ``dtype``: exact products for fp32 (as the
    references), tf32 otherwise (where 16-bit operands ignore it)."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=None)
def _tma_allocator(device: torch.device):
    def alloc(size: int, alignment: int, stream: int | None) -> torch.Tensor:
        return torch.empty(size, dtype=torch.int8, device=device)
    return alloc


def ensure_tma_allocator(device: torch.device) -> None:
    """Give Triton the scratch allocator that on-device tensor descriptors need."""
    triton.set_allocator(_tma_allocator(device))


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


@functools.lru_cache(maxsize=None)
def _capability_of(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def device_capability(device: torch.device) -> tuple[int, int]:
    """(major, minor) compute capability of a CUDA device."""
    return _capability_of(_index(device))


def is_hopper(device: torch.device) -> bool:
    """wgmma, the Gluon warp-specialised kernel and its TMA ring are sm_90 only."""
    return device.type == "cuda" and device_capability(device)[0] == 9


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 for any other device)."""
    if device.type != "cuda":
        return 4
    return _num_sms(_index(device))
