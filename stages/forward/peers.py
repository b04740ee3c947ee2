"""BatchBroadcast: tensor-parallel rank 0 hands each ForwardBatch to the other ranks.

Every rank must run the same forward at the same time: the layers'
collectives pair up step by step. Rank 0 (the forward stage) is the only one
the scheduler talks to, so before each step it broadcasts the batch over the
ranks' CPU process group: its length (one int64), then its msgpack bytes
(``pipeline.messages.encode``). The other ranks wait in ``receive``. A
length of -1 is the end: rank 0 sends it when it closes, and each other
rank's loop returns.

The CPU group is gloo on every device: on GPUs the tensor collectives run on
NCCL, while this small control traffic stays off the GPU streams.
"""
from __future__ import annotations

import os
from typing import Any

import torch

from pipeline import messages
from pipeline.messages import ForwardBatch

END = -1
_DECODE_BATCH = messages.decoder(ForwardBatch)


class BatchBroadcast:
    """One end of the batch broadcast (``src`` sends, every other rank receives)."""

    def __init__(self, cpu_group: Any, src: int = 0, rendezvous_file: str | None = None) -> None:
        self.group = cpu_group
        self.src = src
        self.rendezvous_file = rendezvous_file  # the group's file:// rendezvous, which rank src removes

    def send(self, batch: ForwardBatch | None) -> None:
        """Rank ``src``: the next batch for every other rank (None: the end)."""
        import torch.distributed as dist

        payload = messages.encode(batch) if batch is not None else b""
        length = torch.tensor([len(payload) if batch is not None else END], dtype=torch.int64)
        dist.broadcast(length, src=self.src, group=self.group)
        if batch is not None:
            dist.broadcast(torch.frombuffer(bytearray(payload), dtype=torch.uint8), src=self.src, group=self.group)

    def leave(self) -> None:
        """Leave the ranks' process group (this process may join another one later)."""
        import torch.distributed as dist

        if dist.is_initialized():
            is_src = dist.get_rank() == self.src
            dist.destroy_process_group()
            if is_src and self.rendezvous_file:
                try:
                    os.remove(self.rendezvous_file)
                except FileNotFoundError:
                    pass

    def receive(self) -> ForwardBatch | None:
        """Any other rank: the batch rank ``src`` sent next (None: the end)."""
        import torch.distributed as dist

        length = torch.empty(1, dtype=torch.int64)
        dist.broadcast(length, src=self.src, group=self.group)
        if int(length.item()) == END:
            return None
        payload = torch.empty(int(length.item()), dtype=torch.uint8)
        dist.broadcast(payload, src=self.src, group=self.group)
        return _DECODE_BATCH.decode(payload.numpy().tobytes())
