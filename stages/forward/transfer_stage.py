"""TransferStage: a prefill/decode engine's door to the KV transfer path.

Under ``--pd-prefill N --pd-decode M`` every engine process runs one beside
its forward stage, on the same KV pool (the forward stage's tensors, handed
over by the assembly). Inbox ``TransferInbox``:

* ``KVSend`` (prefill engine's schedule): send a request's slots to a decode engine;
* ``KVRecv`` (decode engine's schedule): receive them into slots allocated there;
* ``EngineDown`` (either schedule): the engine of that transport rank died; every
  transfer with it fails now (``KVTransfer.fail_peer``).

Outbox ``schedule``: one ``KVTransferDone`` per send or receive, with its
bytes and seconds, or its error (timed out, peer gone). The schedule stage
owns the slots throughout: it frees them only after the transfer ended, so
the wire never reads or writes a slot that was given to someone else.

Transfers run asynchronously (``stages/forward/kv_transfer.py``); a waiter
thread wakes the loop when one ends and ``tick`` collects it, so the
engine keeps stepping batches meanwhile.
"""
from __future__ import annotations

import dataclasses

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import EngineDown, KVRecv, KVSend, KVTransferDone, TransferInbox
from pipeline.stage import Outbox, Outboxes, Stage
from stages.forward.kv_transfer import KVTransfer


@dataclasses.dataclass(frozen=True)
class TransferOutboxes(Outboxes):
    schedule: Outbox[KVTransferDone]


class TransferStage(Stage):
    """KVSend / KVRecv -> asynchronous transfers -> KVTransferDone."""

    Inbox = TransferInbox
    Outboxes = TransferOutboxes
    outboxes: TransferOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: TransferOutboxes | dict[str, Channel | None], *, transfer: KVTransfer) -> None:
        super().__init__("transfer", inbox, outboxes)
        self.transfer = transfer
        transfer.on_done = self.wake  # a waiter thread finished a transfer: poll it next step
        self.rids: dict[tuple[str, int, int, int], str] = {}  # (direction, peer, transfer id, segment) -> rid

    def handle(self, message: TransferInbox) -> None:
        match message:
            case KVSend():
                self.rids[("send", message.peer, message.transfer_id, message.segment)] = message.rid
                self.transfer.start_send(message.transfer_id, message.peer, message.slots, message.segment)
            case KVRecv():
                self.rids[("recv", message.peer, message.transfer_id, 0)] = message.rid
                self.transfer.start_recv(message.transfer_id, message.peer, message.slots, message.segment_tokens)
            case EngineDown():
                self.transfer.fail_peer(message.rank, f"KV transfer failed: {message.role} engine "
                                                      f"{message.index} died ({message.reason})")
                self.wake()
            case _:
                raise TypeError(f"transfer stage got an unexpected {type(message).__name__}")

    def tick(self) -> None:
        for record in self.transfer.poll():
            rid = self.rids.pop((record.direction, record.peer, record.transfer_id, record.segment), "")
            self.outboxes.schedule.put(KVTransferDone(
                rid=rid, transfer_id=record.transfer_id, direction=record.direction, ok=record.ok,
                error=record.error, num_bytes=record.num_bytes, seconds=record.seconds,
                transport=self.transfer.transport.name))

    def close(self) -> None:
        self.transfer.close()
        super().close()
