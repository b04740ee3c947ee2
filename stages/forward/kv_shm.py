"""Same-host KV transport: tensors through shared memory instead of a socket.

When a prefill and a decode engine run on one machine (``--placement pd``,
or per-role commands whose addresses name one host), KV need not go through
the network stack. ``SharedMemoryTransport`` has the ``Transport`` interface
of ``stages/forward/kv_transfer.py`` (``send``/``recv`` of one tensor to a peer
rank under a tag, each returning something to ``wait`` on):

* CPU tensors: the sender's ``wait`` writes the tensor's bytes into a file
  of a directory in ``/dev/shm`` (RAM-backed; the temporary directory where
  there is none), named by sender, receiver and tag, and renames it into
  place when complete; the receiver's ``wait`` polls for the name, copies the
  bytes into its tensor and deletes the file. A send is complete when written.
* CUDA tensors: the sender writes a CUDA IPC handle of its tensor instead
  (``torch.multiprocessing.reductions.reduce_tensor``, pickled); the
  receiver opens it, copies device to device into its tensor and writes an
  acknowledgement; the sender's ``wait`` waits for that, since the memory
  it shared must stay untouched until the copy is done.

Every wait gives up after ``timeout_s`` (a peer that died never writes) with
an error naming the message. Ranks and tags are those of ``TorchP2P``, so
``KVTransfer`` is the same over either transport; ``name`` ("shm" or
"cuda-ipc", ``TorchP2P``'s "gloo" or "nccl") says which one moved the bytes
(EngineStats ``pd_transport``, ``/get_server_info``, ``/metrics``).
"""
from __future__ import annotations

import datetime
import hashlib
import os
import pickle
import tempfile
import time
from pathlib import Path

import torch

POLL_S = 0.0002  # first poll interval of a wait; doubles up to MAX_POLL_S
MAX_POLL_S = 0.005


def shared_dir(group: str) -> Path:
    """The directory of one topology's messages (``group``: its rendezvous address)."""
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"stagewise-kv-{hashlib.sha1(group.encode()).hexdigest()[:16]}"


class _Pending:
    """One posted message; ``wait`` runs its completion (in a KVTransfer waiter thread)."""

    def __init__(self, complete) -> None:
        self._complete = complete

    def wait(self, timeout: datetime.timedelta | None = None) -> bool:
        try:
            self._complete()
        except OSError as error:  # a file gone or unwritable: the transfer fails like a closed connection
            raise RuntimeError(f"shared-memory transport: {error}") from error
        return True


class SharedMemoryTransport:
    """Point-to-point tensor messages between engines of one host, through ``/dev/shm`` (or CUDA IPC)."""

    def __init__(self, rank: int, group: str, device: str = "cpu", timeout_s: float = 120.0) -> None:
        self.name = "cuda-ipc" if device.startswith("cuda") else "shm"
        self.rank = rank
        self.timeout_s = timeout_s
        self.dir = shared_dir(group)
        self.dir.mkdir(mode=0o700, exist_ok=True)

    def _path(self, src: int, dst: int, tag: int, suffix: str = "") -> Path:
        return self.dir / f"{src}-{dst}-{tag}{suffix}"

    def send(self, tensor: torch.Tensor, peer: int, tag: int) -> _Pending:
        path = self._path(self.rank, peer, tag)
        staged = path.with_suffix(".part")
        if tensor.is_cuda:
            from torch.multiprocessing.reductions import reduce_tensor

            staged.write_bytes(pickle.dumps(reduce_tensor(tensor)))
            os.replace(staged, path)
            ack = self._path(self.rank, peer, tag, ".ack")
            return _Pending(lambda: self._await(ack, f"the acknowledgement of message {tag} from rank {peer}",
                                                remove=True))
        def write() -> None:  # in the waiter thread: the engine loop does not wait for the copy
            tensor.contiguous().view(torch.uint8).numpy().tofile(staged)
            os.replace(staged, path)

        return _Pending(write)

    def recv(self, tensor: torch.Tensor, peer: int, tag: int) -> _Pending:
        path = self._path(peer, self.rank, tag)

        def complete() -> None:
            self._await(path, f"message {tag} from rank {peer}")
            if tensor.is_cuda:
                rebuild, args = pickle.loads(path.read_bytes())
                tensor.copy_(rebuild(*args))
                torch.cuda.current_stream(tensor.device).synchronize()
                path.unlink()
                self._path(peer, self.rank, tag, ".ack").touch()
                return
            data = torch.from_file(str(path), size=tensor.numel() * tensor.element_size(), dtype=torch.uint8)
            tensor.view(torch.uint8).reshape(-1).copy_(data)
            path.unlink()

        return _Pending(complete)

    def _await(self, path: Path, what: str, remove: bool = False) -> None:
        deadline = time.monotonic() + self.timeout_s
        pause = POLL_S
        while not path.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"shared-memory transport: {what} did not come within {self.timeout_s:.0f} s")
            time.sleep(pause)
            pause = min(2 * pause, MAX_POLL_S)
        if remove:
            path.unlink()

    def clear(self) -> None:
        """Remove every message of this group (rank 0 at start: a run before with the same rendezvous may
        have left some; no engine sends before every engine is up)."""
        for path in self.dir.iterdir():
            path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove what this rank sent that nobody took (a peer that died)."""
        for path in self.dir.glob(f"{self.rank}-*"):
            path.unlink(missing_ok=True)
        try:
            self.dir.rmdir()  # the last engine to go removes the directory
        except OSError:
            pass  # another engine's messages (or the engine itself) are still there
