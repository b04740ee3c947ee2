"""Pinned host staging for the small per-step copies of the forward and sample stages.

Every decode step moves a few hundred bytes each way: the batch's packed ints
and sampling parameters up, the chosen token ids down. The copies must be
asynchronous (a copy from pageable memory synchronizes the stream), so the
bytes go through page-locked (pinned) host memory. Allocating that memory
per step (``tensor.pin_memory()``) costs tens of microseconds of host time
each call even with torch's caching host allocator -- at batch 1 that is
time the GPU sits idle -- so these classes keep a few pinned buffers and
reuse them.

``Uploader``: a ring of pinned buffers. A buffer is reused only after the
copy that last read it has finished (a CUDA event per buffer), so a staged
value is never overwritten while the GPU is still reading it.

``Downloader``: one pinned buffer per result slot, read on the host after
the caller's single stream synchronization.

On a CPU device both are plain tensor conversions.
"""
from __future__ import annotations

import torch

RING_SIZE = 8
MIN_BUFFER_BYTES = 1 << 16


class _StagingBuffer:
    def __init__(self, num_bytes: int) -> None:
        self.host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=True)
        self.done = torch.cuda.Event()
        self.done.record()


class Uploader:
    """Host lists -> device tensors through a ring of reused pinned buffers."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # Allocated up front: a pinned allocation in the middle of serving costs a step.
        self.ring = ([_StagingBuffer(MIN_BUFFER_BYTES) for _ in range(RING_SIZE)]
                     if device.type == "cuda" else [])
        self.next_index = 0

    def upload(self, values: list | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A new device tensor holding ``values`` (a list or a host tensor; copied asynchronously)."""
        host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        if self.device.type != "cuda":
            return host
        out = torch.empty(host.shape, dtype=dtype, device=self.device)
        self._copy(host, out)
        return out

    def upload_into(self, values: list, out: torch.Tensor) -> None:
        """Copy ``values`` into the existing device tensor ``out`` (e.g. a CUDA graph's input)."""
        host = torch.tensor(values, dtype=out.dtype)
        if self.device.type != "cuda":
            out.copy_(host.view(out.shape))
            return
        self._copy(host, out)

    def _copy(self, host: torch.Tensor, out: torch.Tensor) -> None:
        num_bytes = host.numel() * host.element_size()
        buffer = self._take(num_bytes)
        buffer.done.synchronize()  # the last copy out of this buffer has finished
        staged = buffer.host[:num_bytes].view(host.dtype).view(host.shape)
        staged.copy_(host)
        out.copy_(staged.view(out.shape), non_blocking=True)
        buffer.done.record()

    def _take(self, num_bytes: int) -> _StagingBuffer:
        index = self.next_index
        self.next_index = (index + 1) % RING_SIZE
        if self.ring[index].host.numel() < num_bytes:
            self.ring[index].done.synchronize()
            self.ring[index] = _StagingBuffer(max(num_bytes, 2 * self.ring[index].host.numel()))
        return self.ring[index]


class Downloader:
    """Device tensors -> pinned host copies, valid after the caller synchronizes the stream."""

    def __init__(self) -> None:
        self.buffers: dict[int, torch.Tensor] = {}

    def start(self, slot: int, tensor: torch.Tensor) -> torch.Tensor:
        """Begin copying ``tensor`` to the host; read the result after synchronizing."""
        if tensor.device.type != "cuda":
            return tensor
        num_bytes = tensor.numel() * tensor.element_size()
        buffer = self.buffers.get(slot)
        if buffer is None or buffer.numel() < num_bytes:
            buffer = torch.empty(max(num_bytes, 4096), dtype=torch.uint8, pin_memory=True)
            self.buffers[slot] = buffer
        host = buffer[:num_bytes].view(tensor.dtype).view(tensor.shape)
        host.copy_(tensor, non_blocking=True)
        return host
