"""KV transfer: move one request's KV slots, layer by layer, from one engine's pool to another's.

Prefill/decode disaggregation computes a prompt's KV on a prefill engine and
decodes on a decode engine; between them the request's K and V rows move
here. The interface is small and explicit:

* ``KVTransfer.start_send(transfer_id, peer, slots, segment)``: gather
  ``k[slots]`` and ``v[slots]`` of every layer into one staging tensor
  ``[2 * num_layers, tokens, kv heads, head dim]`` (K0, V0, K1, V1, ...) and
  post it as one message, one segment of the transfer;
* ``KVTransfer.start_recv(transfer_id, peer, slots, segment_tokens)``: post
  the matching receive of every segment (``kv_segments``: the slots cut
  in pieces of ``segment_tokens``) into one staging tensor each; when all
  arrive, scatter them into ``k[slots]``, ``v[slots]`` of this pool. One
  message per segment, not per layer: a CUDA IPC handle is opened once per
  segment, and NCCL/gloo move one large buffer instead of many small ones. A prefill
  engine sends a long prompt's segments one by one as its chunks are
  computed, so the transfer overlaps the rest of the prefill;
* ``KVTransfer.poll()``: the transfers that ended since the last poll
  (``TransferRecord``: bytes, seconds, ok or the error), never blocking;
* ``KVTransfer.fail_peer(peer, error)``: that peer's engine died; its
  transfers end with ``error`` at the next poll.

Both ends say the same ``transfer_id`` (the decode engine picks it when it
accepts a request; the prefill engine learns it from the accept; two decode
engines may pick the same, so a transfer is known by its peer and id), and the
slot lists have the same length (the prompt's tokens). Send and receive are
asynchronous, so an engine keeps running batches while its transfers are in
the wire, and a receiver posts all its receives at once: no order of sends
between several engines can deadlock. A small pool of waiter threads waits
on each transfer's messages (gloo reports a point-to-point message complete
only to a ``wait``), so ``poll`` itself never blocks.

A ``Transport`` moves tensors between peers. ``TorchP2P`` is
``torch.distributed`` point-to-point (``isend``/``irecv``): gloo on CPU,
NCCL between GPUs, one process group of every engine of the topology,
message tags from the transfer id and segment, so concurrent transfers
between the same two engines never mix. Engines of one host use
``SharedMemoryTransport`` (``stages/forward/kv_shm.py``: ``/dev/shm`` files,
CUDA IPC handles on GPUs) with the same ranks and tags.

A transfer that has not ended ``timeout_s`` after it started fails. Its
staging tensors are kept (``abandoned``) rather than freed: the transport
may still write into them later, and it must not write into memory that
was reused. The waiter goes on waiting (up to the transport's own timeout)
instead of giving up at ``timeout_s``: gloo closes the connection between
two engines when a wait times out, which would fail every later transfer
between them. So the schedule stages make sure every posted receive gets
its send, even for a request that was aborted or has failed meanwhile.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import time
from typing import Callable, Protocol

import torch

from models.batch import KVCache
from pipeline.messages import KV_MAX_SEGMENTS, kv_segments

TAG_SPACE = 1 << 14  # transfer ids wrap here (tags stay inside 31 bits up to 512 layers)
MAX_SEGMENTS = KV_MAX_SEGMENTS  # segments of one transfer (a prompt's KV sent piece by piece as its prefill goes)
WAITERS = 8  # threads waiting on transfers (a transfer waits for all its messages in one of them)


class Pending(Protocol):
    """An asynchronous send or receive (``torch.distributed.Work`` fits)."""

    def wait(self, timeout: datetime.timedelta = ...) -> bool: ...


class Transport(Protocol):
    """Point-to-point tensor messages between engines named by rank (``name``: what it is, for metrics)."""

    rank: int
    name: str

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> Pending: ...

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> Pending: ...


class TorchP2P:
    """``torch.distributed`` isend/irecv in a process group of all the topology's engines."""

    def __init__(self, rank: int, world_size: int, init_method: str, backend: str = "gloo",
                 timeout_s: float = 120.0) -> None:
        import torch.distributed as dist

        self.rank = rank
        self.world_size = world_size
        self.name = backend  # "gloo" or "nccl"
        if not dist.is_initialized():
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                    timeout=datetime.timedelta(seconds=timeout_s))
        self._dist = dist

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> Pending:
        return self._dist.isend(tensor, peer, tag=tag)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> Pending:
        return self._dist.irecv(tensor, peer, tag=tag)

    def close(self) -> None:
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


@dataclasses.dataclass
class TransferRecord:
    """One ended transfer: what moved, how long it took, and whether it arrived."""

    transfer_id: int
    direction: str  # "send" or "recv"
    peer: int
    num_tokens: int
    num_bytes: int
    seconds: float
    ok: bool
    error: str = ""
    segment: int = 0

    @property
    def gbps(self) -> float:
        """Gigabytes per second (0 for a failed or empty transfer)."""
        return self.num_bytes / self.seconds / 1e9 if self.ok and self.seconds > 0 else 0.0


@dataclasses.dataclass
class _Transfer:
    transfer_id: int
    direction: str
    peer: int
    slots: list[int]
    staging: list[torch.Tensor]  # per segment: [2 * layers (K0, V0, K1, ...), tokens, kv heads, head dim]
    works: list[Pending]
    started_s: float
    waited: concurrent.futures.Future | None = None  # the waiter's outcome: ("" or the error, end time)
    segment: int = 0  # a send: which segment of its transfer
    messages: list[tuple[torch.Tensor, int]] = dataclasses.field(default_factory=list)  # (tensor, tag) to post


class KVTransfer:
    """Sends and receives of request KV between this engine's pool and its peers'."""

    def __init__(self, kv_cache: KVCache, transport: Transport, timeout_s: float = 60.0,
                 on_done: Callable[[], None] | None = None) -> None:
        """``on_done``: called (from a waiter thread) whenever a transfer's wait ends: time to poll."""
        self.kv = kv_cache
        self.on_done = on_done
        self.transport = transport
        self.timeout_s = timeout_s
        # (direction, peer, id, segment): ids are per decode engine; a receive is segment 0 of its id
        self.active: dict[tuple[str, int, int, int], _Transfer] = {}
        self.abandoned: list[_Transfer] = []  # timed out: their staging stays alive (see module docstring)
        self.bytes_sent = 0
        self.bytes_received = 0
        self.seconds_total = 0.0
        self.num_failed = 0
        self._waiters = concurrent.futures.ThreadPoolExecutor(WAITERS, thread_name_prefix="kv-transfer")

    @property
    def num_layers(self) -> int:
        return len(self.kv.k)

    def _tag(self, transfer_id: int, index: int, segment: int = 0) -> int:
        return ((transfer_id % TAG_SPACE) * MAX_SEGMENTS + segment) * 2 * self.num_layers + index

    def _layers(self) -> list[torch.Tensor]:
        return [t for pair in zip(self.kv.k, self.kv.v) for t in pair]  # K0, V0, K1, V1, ...

    def start_send(self, transfer_id: int, peer: int, slots: list[int], segment: int = 0) -> None:
        """Post the sends of ``slots``' K and V, every layer: segment ``segment`` of the transfer (the
        receiver posts the same id). The K and V are copied now, so the slots may be reused at once."""
        layers = self._layers()
        index = torch.tensor(slots, dtype=torch.long, device=layers[0].device)
        packed = self._packed(len(slots))
        for i, layer in enumerate(layers):
            torch.index_select(layer, 0, index, out=packed[i])
        transfer = _Transfer(transfer_id, "send", peer, list(slots), [packed], [], time.monotonic(), segment=segment)
        transfer.messages = [(packed, self._tag(transfer_id, 0, segment))]
        self._post(transfer, self.transport.send)

    def start_recv(self, transfer_id: int, peer: int, slots: list[int], segment_tokens: int = 0) -> None:
        """Post the receives of ``len(slots)`` tokens' K and V, every layer, landing in ``slots``: one
        message per layer and segment (``segment_bounds``), however the sender's segments come."""
        bounds = kv_segments(0, len(slots), segment_tokens)
        staging = [self._packed(end - start) for start, end in bounds]
        transfer = _Transfer(transfer_id, "recv", peer, list(slots), staging, [], time.monotonic())
        transfer.messages = [(packed, self._tag(transfer_id, 0, segment)) for segment, packed in enumerate(staging)]
        self._post(transfer, self.transport.recv)

    def _packed(self, num_tokens: int) -> torch.Tensor:
        """A staging tensor for ``num_tokens`` tokens of every layer's K and V (the pool's layers share
        one shape and dtype)."""
        layer = self.kv.k[0]
        return torch.empty((2 * self.num_layers, num_tokens) + tuple(layer.shape[1:]), dtype=layer.dtype,
                           device=layer.device)

    def _post(self, transfer: _Transfer, post: Callable[[torch.Tensor, int, int], Pending]) -> None:
        """Post every message of ``transfer`` and wait on them in a waiter thread. A transport that refuses
        one (the peer is gone) fails the transfer at once: its next poll reports the error."""
        try:
            for tensor, tag in transfer.messages:
                transfer.works.append(post(tensor, transfer.peer, tag))
        except RuntimeError as error:
            transfer.waited = concurrent.futures.Future()
            transfer.waited.set_result((f"KV transfer failed: {error}", time.monotonic()))
        else:
            transfer.waited = self._waiters.submit(_wait_all, transfer.works)
        if self.on_done is not None:
            on_done = self.on_done
            transfer.waited.add_done_callback(lambda _: on_done())
        transfer.messages = []
        self.active[(transfer.direction, transfer.peer, transfer.transfer_id, transfer.segment)] = transfer

    def fail_peer(self, peer: int, error: str) -> None:
        """The engine of rank ``peer`` died: every transfer with it ends with ``error`` at the next poll.
        Their staging stays alive (``abandoned``) until the transport lets go of it."""
        for transfer in self.active.values():
            if transfer.peer == peer:
                failed: concurrent.futures.Future = concurrent.futures.Future()
                failed.set_result((error, time.monotonic()))
                self.abandoned.append(dataclasses.replace(transfer))  # keeps the waiter's future, staging
                transfer.waited = failed

    def cancel(self, direction: str, peer: int, transfer_id: int, segment: int = 0) -> None:
        """Forget a transfer whose request went away; its buffers stay alive until the wire is done."""
        transfer = self.active.pop((direction, peer, transfer_id, segment), None)
        if transfer is not None:
            self.abandoned.append(transfer)

    def poll(self) -> list[TransferRecord]:
        """Transfers that ended (arrived, or timed out) since the last poll; never blocks."""
        now = time.monotonic()
        ended: list[TransferRecord] = []
        for key, transfer in list(self.active.items()):
            done = transfer.waited is not None and transfer.waited.done()
            error, end_s = transfer.waited.result() if done else (None, now)
            if end_s - transfer.started_s > self.timeout_s:  # judged by when it ended, not when polled
                error = None
            elif not done:
                continue
            del self.active[key]
            ended.append(self._end(transfer, error, end_s))
        self.abandoned = [t for t in self.abandoned if t.waited is not None and not t.waited.done()]
        return ended

    @property
    def busy(self) -> bool:
        return bool(self.active)

    def close(self) -> None:
        self._waiters.shutdown(wait=False, cancel_futures=True)
        release = getattr(self.transport, "release", None)  # a transport with files of its own to remove
        if release is not None:
            release()

    def _end(self, transfer: _Transfer, error: str | None, end_s: float) -> TransferRecord:
        """``error``: None (timed out), "" (arrived by ``end_s``) or what the transport raised."""
        num_bytes = sum(t.numel() * t.element_size() for t in transfer.staging)
        seconds = end_s - transfer.started_s
        if error is None or error:
            if error is None:
                self.abandoned.append(transfer)
                error = f"KV transfer {transfer.transfer_id} timed out after {seconds:.1f} s"
            self.num_failed += 1
            return TransferRecord(transfer.transfer_id, transfer.direction, transfer.peer, len(transfer.slots),
                                  num_bytes, seconds, ok=False, error=error, segment=transfer.segment)
        if transfer.direction == "recv":
            index = torch.tensor(transfer.slots, dtype=torch.long, device=self.kv.k[0].device)
            start = 0
            for packed in transfer.staging:          # one per segment, in slot order
                rows = index[start:start + packed.shape[1]]
                for layer, staged in zip(self._layers(), packed):
                    layer.index_copy_(0, rows, staged)
                start += packed.shape[1]
            self.bytes_received += num_bytes
        else:
            self.bytes_sent += num_bytes
        self.seconds_total += seconds
        return TransferRecord(transfer.transfer_id, transfer.direction, transfer.peer, len(transfer.slots),
                              num_bytes, seconds, ok=True, segment=transfer.segment)


def _wait_all(works: list[Pending]) -> tuple[str, float]:
    """Wait for every message of one transfer (a waiter thread): ("" when all arrived, else the error;
    when the wait ended, ``time.monotonic()``).

    No deadline of our own (see the module docstring): the transport's timeout ends a wait on a peer
    that never sends.
    """
    try:
        for work in works:
            work.wait()
    except RuntimeError as error:
        return f"KV transfer failed: {error}", time.monotonic()
    return "", time.monotonic()
