"""ForwardRankStage: a tensor-parallel rank other than 0, in a process of its own.

It has no doors: rank 0 (the forward stage) broadcasts each ForwardBatch to
it (``peers.py``) and it runs the same step on its shard of the weights and
the KV heads, joining the layers' collectives; rank 0 keeps the logits. Its
``run()`` waits for batches on its own thread until rank 0 sends the end,
which rank 0 does when it closes (the launcher closes rank 0 before it stops
this process).
"""
from __future__ import annotations

import dataclasses

from models.parallel import TPGroup
from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import ForwardBatch
from pipeline.stage import Outboxes, Stage
from stages.forward.peers import BatchBroadcast
from stages.forward.runner import ModelRunner


@dataclasses.dataclass(frozen=True)
class ForwardRankOutboxes(Outboxes):
    """No doors: batches come from rank 0 over the ranks' process group."""


class ForwardRankStage(Stage):
    """One more tensor-parallel rank: runs every batch rank 0 broadcasts, on its own shard."""

    Inbox = ForwardBatch  # never wired: batches arrive by broadcast
    Outboxes = ForwardRankOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None, outboxes: ForwardRankOutboxes | dict,
                 *, tp: TPGroup, peers: BatchBroadcast, name: str = "forward_rank") -> None:
        super().__init__(name, inbox, outboxes)
        if tp.rank == 0:
            raise ValueError("rank 0 is the forward stage itself")
        self.runner = ModelRunner(args, tp)
        self.peers = peers
        self.steps_run = 0

    def run(self) -> None:
        """Run each broadcast batch until rank 0 sends the end."""
        while True:
            batch = self.peers.receive()
            if batch is None:
                self.peers.leave()
                return
            self.runner.run_batch(batch)
            self.steps_run += 1
            self.counters.messages_in += 1
            self.counters.steps += 1
