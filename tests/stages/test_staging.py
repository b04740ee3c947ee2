"""Pinned staging (stages/staging.py): values arrive intact, buffers are reused safely."""
from __future__ import annotations

import pytest
import torch

from stages.staging import RING_SIZE, Downloader, Uploader


def test_cpu_upload_is_a_plain_conversion():
    uploader = Uploader(torch.device("cpu"))
    out = uploader.upload([3, -1, 7], torch.int64)
    assert out.dtype == torch.int64 and out.tolist() == [3, -1, 7]
    assert uploader.upload(torch.tensor([1, 2], dtype=torch.int32), torch.float32).tolist() == [1.0, 2.0]
    target = torch.zeros(2, 3, dtype=torch.int64)
    uploader.upload_into([1, 2, 3, 4, 5, 6], target)
    assert target.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert Downloader().start(0, out) is out


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (pinned memory and async copies)")
def test_gpu_ring_reuse_keeps_every_upload_intact():
    device = torch.device("cuda")
    uploader = Uploader(device)
    # A slow kernel ahead of the copies keeps them queued while the ring wraps around.
    torch.cuda._sleep(10_000_000)
    outs = [uploader.upload(list(range(i, i + 50 + i)), torch.int64) for i in range(3 * RING_SIZE)]
    grown = uploader.upload(list(range(100_000)), torch.int32)  # larger than any buffer so far
    target = torch.empty(4, dtype=torch.float32, device=device)
    uploader.upload_into([0.5, 1.5, 2.5, 3.5], target)
    downloader = Downloader()
    host = downloader.start(0, outs[-1])
    torch.cuda.synchronize()
    for i, out in enumerate(outs):
        assert out.tolist() == list(range(i, i + 50 + i))
    assert grown.tolist() == list(range(100_000))
    assert target.tolist() == [0.5, 1.5, 2.5, 3.5]
    assert host.tolist() == outs[-1].tolist()
