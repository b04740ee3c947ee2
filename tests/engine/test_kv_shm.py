"""The same-host KV transport (stages/forward/kv_shm.py) between two processes.

A tensor sent under a tag arrives equal in the receiver's tensor, several
messages in flight at once do not mix, and a receive whose message never
comes fails with an error naming it. On CPU through /dev/shm files; on a GPU
through CUDA IPC handles (that test needs CUDA).
"""
from __future__ import annotations

import multiprocessing
import uuid

import pytest
import torch

from stages.forward.kv_shm import SharedMemoryTransport

SHAPES = [(7, 2, 16), (1, 4, 8), (33, 1, 64)]


def _sender(group: str, device: str, done: multiprocessing.Event) -> None:
    transport = SharedMemoryTransport(0, group, device)
    pending = [transport.send(torch.arange(torch.Size(shape).numel(), dtype=torch.float32, device=device)
                              .reshape(shape) * (tag + 1), 1, tag) for tag, shape in enumerate(SHAPES)]
    for work in pending:
        work.wait()
    done.wait(60)  # CUDA IPC: the shared memory lives until the receiver has copied


def _round_trip(device: str) -> None:
    group = f"test-{uuid.uuid4().hex}"
    receiver = SharedMemoryTransport(1, group, device)
    assert receiver.name == ("cuda-ipc" if device == "cuda" else "shm")
    ctx = multiprocessing.get_context("spawn")
    done = ctx.Event()
    sender = ctx.Process(target=_sender, args=(group, device, done))
    sender.start()
    try:
        received = [torch.zeros(shape, device=device) for shape in SHAPES]
        pending = [receiver.recv(t, 0, tag) for tag, t in reversed(list(enumerate(received)))]  # any order
        for work in pending:
            work.wait()
        for tag, (shape, got) in enumerate(zip(SHAPES, received)):
            expected = torch.arange(torch.Size(shape).numel(), dtype=torch.float32).reshape(shape) * (tag + 1)
            assert torch.equal(got.cpu(), expected)
    finally:
        done.set()
        sender.join(60)
    assert sender.exitcode == 0
    assert not any(receiver.dir.iterdir())  # every message was taken
    receiver.dir.rmdir()


def test_cpu_tensors_cross_through_shared_memory():
    _round_trip("cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA IPC needs a GPU")
def test_cuda_tensors_cross_through_ipc_handles():
    _round_trip("cuda")


def test_a_message_that_never_comes_fails_with_its_name():
    receiver = SharedMemoryTransport(1, f"test-{uuid.uuid4().hex}", "cpu", timeout_s=0.05)
    with pytest.raises(RuntimeError, match="message 5 from rank 0 did not come"):
        receiver.recv(torch.zeros(3), 0, 5).wait()
    receiver.dir.rmdir()
