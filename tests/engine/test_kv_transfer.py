"""KV transfer between two processes over gloo: slots arrive intact, bytes are counted, a timeout fails."""
from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import uuid

import torch

from models.batch import KVCache
from stages.forward.kv_transfer import KVTransfer, TorchP2P

LAYERS, SLOTS, HEADS, DIM = 3, 32, 2, 4


def _pool(seed: int) -> KVCache:
    kv = KVCache.allocate(LAYERS, SLOTS, HEADS, DIM, torch.float32, "cpu")
    generator = torch.Generator().manual_seed(seed)
    for layer in kv.k + kv.v:
        layer.copy_(torch.randn(layer.shape, generator=generator))
    return kv


def _poll_until(transfer: KVTransfer, count: int, limit_s: float = 30.0) -> list:
    records, deadline = [], time.monotonic() + limit_s
    while len(records) < count and time.monotonic() < deadline:
        records += transfer.poll()
        time.sleep(0.001)
    return records


def _sender(init: str, queue, finished) -> None:
    transfer = KVTransfer(_pool(1), TorchP2P(0, 2, init))
    transfer.start_send(7, 1, [3, 9, 4])
    transfer.start_send(8, 1, [10, 11])  # a second transfer to the same peer, in flight together
    records = _poll_until(transfer, 2)
    queue.put([(r.transfer_id, r.ok, r.num_bytes) for r in records])
    finished.wait(60)  # the receiver's timeout must come from its clock, not from this process leaving
    transfer.close()
    transfer.transport.close()


def _receiver(init: str, queue) -> None:
    kv = _pool(2)
    before = [t.clone() for t in kv.k + kv.v]
    transfer = KVTransfer(kv, TorchP2P(1, 2, init), timeout_s=0.5)
    transfer.start_recv(8, 0, [20, 21])  # posted in the other order than the sends
    transfer.start_recv(7, 0, [0, 1, 2])
    transfer.start_recv(99, 0, [30])  # never sent: times out
    records = _poll_until(transfer, 3)
    source = _pool(1)
    same = all(torch.equal(mine[[0, 1, 2]], theirs[[3, 9, 4]]) and torch.equal(mine[[20, 21]], theirs[[10, 11]])
               for mine, theirs in zip(kv.k + kv.v, source.k + source.v))
    untouched = all(torch.equal(now[3:20], old[3:20]) for now, old in zip(kv.k + kv.v, before))
    queue.put(([(r.transfer_id, r.ok, r.num_bytes, r.error) for r in records], same, untouched,
               transfer.bytes_received, len(transfer.abandoned)))
    transfer.close()
    transfer.transport.close()


def test_two_processes_move_slots_layer_by_layer():
    init = "file://" + os.path.join(tempfile.gettempdir(), f"kvt-{uuid.uuid4().hex}")
    context = multiprocessing.get_context("spawn")
    sent, received, finished = context.Queue(), context.Queue(), context.Event()
    processes = [context.Process(target=_sender, args=(init, sent, finished)),
                 context.Process(target=_receiver, args=(init, received))]
    for process in processes:
        process.start()
    send_records = sent.get(timeout=60)
    recv_records, same, untouched, bytes_received, abandoned = received.get(timeout=60)
    finished.set()
    for process in processes:
        process.join(timeout=30)
    per_token = 2 * LAYERS * HEADS * DIM * 4
    assert sorted(send_records) == [(7, True, 3 * per_token), (8, True, 2 * per_token)]
    by_id = {r[0]: r for r in recv_records}
    assert by_id[7][1:3] == (True, 3 * per_token) and by_id[8][1:3] == (True, 2 * per_token)
    assert by_id[99][1] is False and "timed out" in by_id[99][3].lower(), by_id[99]
    assert same, "the received K/V differ from the sender's slots"
    assert untouched, "slots outside the transfer changed"
    assert bytes_received == 5 * per_token
    assert abandoned <= 1  # a receive still posted keeps its buffers until the wire lets go


class _GoneTransport:
    """A transport whose peer is gone: the first message posts, the second is refused."""

    rank = 0

    def __init__(self) -> None:
        self.posted = 0

    def _post(self, tensor: torch.Tensor, peer: int, tag: int):
        if self.posted:
            raise RuntimeError("Connection closed by peer")
        self.posted += 1
        return _Arrived()

    send = recv = _post


class _Arrived:
    def wait(self, timeout=None) -> bool:
        return True


def test_a_refused_message_fails_the_transfer_instead_of_raising():
    woken = []
    transfer = KVTransfer(_pool(1), _GoneTransport(), on_done=lambda: woken.append(True))
    transfer.start_recv(5, 1, [1, 2, 3, 4], segment_tokens=2)   # two segments: two messages
    [record] = transfer.poll()
    assert (record.transfer_id, record.direction, record.ok) == (5, "recv", False)
    assert "Connection closed by peer" in record.error and woken
    assert not transfer.busy
