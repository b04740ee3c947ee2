"""Packing a ForwardBatch into one int64 buffer: every field round-trips and starts
16 bytes into the buffer, whatever the batch's sizes (kernels see aligned pointers)."""
from __future__ import annotations

import pytest
import torch

from perf.bench_one_batch import greedy_sampling
from pipeline.messages import ForwardBatch, RowWrite
from stages.forward.inputs import pack_batch, unpack


def _batch(extend_lens: list[int], writes: list[RowWrite]) -> ForwardBatch:
    num_tokens, num_reqs = sum(extend_lens), len(extend_lens)
    prefix_lens = [3 * b for b in range(num_reqs)]
    return ForwardBatch(
        batch_id=1, mode="extend", rids=[f"r{b}" for b in range(num_reqs)],
        input_ids=list(range(100, 100 + num_tokens)), positions=list(range(200, 200 + num_tokens)),
        out_cache_loc=list(range(300, 300 + num_tokens)), req_pool_indices=list(range(1, num_reqs + 1)),
        prefix_lens=prefix_lens, extend_lens=extend_lens,
        seq_lens=[p + e for p, e in zip(prefix_lens, extend_lens)], row_writes=writes,
        sampling=greedy_sampling(num_reqs))


@pytest.mark.parametrize("extend_lens,num_writes", [([1], 0), ([3, 4, 1], 0), ([5, 2], 1), ([2, 2, 7, 1], 3)])
def test_pack_round_trip_and_alignment(extend_lens, num_writes):
    writes = [RowWrite(row=w + 1, start=0, slots=list(range(10 * w, 10 * w + 2 * w + 1)))
              for w in range(num_writes)]
    batch = _batch(extend_lens, writes)
    packed, got_writes, got_slots = pack_batch(batch)
    assert (got_writes, got_slots) == (num_writes, sum(len(w.slots) for w in writes))
    req_to_token = torch.zeros(8, 64, dtype=torch.int32)
    device_batch = unpack(torch.tensor(packed, dtype=torch.int64), batch, got_writes, got_slots,
                          req_to_token)
    meta = device_batch.meta
    starts = [sum(extend_lens[:b]) for b in range(len(extend_lens))]
    expected = {
        "input_ids": (device_batch.input_ids, batch.input_ids),
        "positions": (device_batch.positions, batch.positions),
        "out_cache_loc": (meta.out_cache_loc, batch.out_cache_loc),
        "req_pool_indices": (meta.req_pool_indices, batch.req_pool_indices),
        "prefix_lens": (meta.prefix_lens, batch.prefix_lens),
        "extend_lens": (meta.extend_lens, batch.extend_lens),
        "extend_start_loc": (meta.extend_start_loc, starts),
        "seq_lens": (meta.seq_lens, batch.seq_lens),
        "logits_indices": (meta.logits_indices, [s + e - 1 for s, e in zip(starts, extend_lens)]),
    }
    views = [view for view, _ in expected.values()]
    if num_writes:
        rows, begins, ends, offsets, slots = device_batch.row_writes
        assert rows.tolist() == [w.row for w in writes]
        assert ends.tolist() == [w.start + len(w.slots) for w in writes]
        assert slots.tolist() == [s for w in writes for s in w.slots]
        views += list(device_batch.row_writes)
    else:
        assert device_batch.row_writes is None
    for name, (view, want) in expected.items():
        assert view.tolist() == want, name
    assert all(view.storage_offset() % 2 == 0 for view in views), "a field is not 16-byte aligned"
