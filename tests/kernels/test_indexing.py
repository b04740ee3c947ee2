"""Index helpers vs their references, with ragged and empty ranges."""
from __future__ import annotations

import pytest
import torch

from triton_kernels import indexing


def _table(device: torch.device) -> torch.Tensor:
    return torch.arange(5 * 1500, dtype=torch.int32).reshape(5, 1500).to(device)


def test_write_req_to_token(device):
    req_to_token = torch.zeros(5, 1500, dtype=torch.int32, device=device)
    expected = req_to_token.clone()
    rows = torch.tensor([3, 0, 4, 1], device=device)
    starts = torch.tensor([0, 7, 5, 2], device=device)
    ends = torch.tensor([1030, 9, 5, 3], device=device, dtype=torch.int32)  # >1 block, empty
    slots = torch.arange(1, 1034, device=device) * 3
    offsets = torch.tensor([0, 1030, 1032, 1032], device=device)
    indexing.write_req_to_token(req_to_token, rows, starts, ends, slots, offsets)
    indexing.write_req_to_token_reference(expected, rows, starts, ends, slots, offsets)
    assert torch.equal(req_to_token, expected)


def test_extend_positions(device):
    prefix = torch.tensor([0, 5, 17, 0], device=device)
    extend = torch.tensor([4, 1, 1100, 3], device=device, dtype=torch.int32)
    positions, start_loc = indexing.extend_positions(prefix, extend, 1108)
    ref_positions, ref_start_loc = indexing.extend_positions_reference(prefix, extend, 1108)
    assert torch.equal(positions, ref_positions) and positions.dtype == torch.int64
    assert torch.equal(start_loc, ref_start_loc) and start_loc.dtype == torch.int32
    assert start_loc.tolist() == [0, 4, 5, 1105]


def test_gather_req_slots(device):
    table = _table(device)
    rows = torch.tensor([2, 2, 0], device=device)
    starts = torch.tensor([3, 0, 10], device=device)
    ends = torch.tensor([1200, 0, 13], device=device)
    slots = indexing.gather_req_slots(table, rows, starts, ends, 1200)
    assert torch.equal(slots, indexing.gather_req_slots_reference(table, rows, starts, ends, 1200))


def test_bad_inputs_raise(device):
    empty = torch.zeros(0, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="empty batch"):
        indexing.extend_positions(empty, empty, 0)
    with pytest.raises(ValueError, match="req_to_token"):
        indexing.gather_req_slots(_table(device).long(), empty, empty, empty, 0)
    one = torch.zeros(1, dtype=torch.int64, device=device)
    with pytest.raises(ValueError, match="end_positions"):
        indexing.write_req_to_token(_table(device), one, one, one.float(), one, one)
