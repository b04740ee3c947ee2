"""Index helpers of the scheduler/forward hot path, so a step launches no
non-Triton kernels besides allocation and copies.

``req_to_token[R, L]`` (int32) maps request row ``r`` and token position ``i``
to the KV slot of that token (see ``attention``). Launchers (``*_reference``
twins in PyTorch)::

    write_req_to_token(req_to_token, req_pool_indices[B], start_positions[B],
                       end_positions[B], slots[N] int, slot_offsets[B]) -> None
        req_to_token[req_pool_indices[b], start[b]:end[b]]
            = slots[slot_offsets[b] : slot_offsets[b] + end[b] - start[b]]
    extend_positions(prefix_lens[B], extend_lens[B], num_tokens)
        -> (positions[num_tokens] int64, extend_start_loc[B] int32)
        extend_start_loc = exclusive cumsum of extend_lens; the new tokens of
        request b sit at positions prefix_lens[b] + 0 .. extend_lens[b] - 1
    gather_req_slots(req_to_token, req_pool_indices[B], start_positions[B],
                     end_positions[B], num_tokens) -> slots[num_tokens] int64
        concatenation of req_to_token[req_pool_indices[b], start[b]:end[b]]

``num_tokens`` (the sum of the lengths) is passed by the caller, who knows it
on the host, so no launcher reads the device. Each program ``b`` finds its own
offset by summing the lengths before it (``B / BLOCK`` tile loads): one
launch, no separate scan. All are memory-trivial; their cost is the launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_INT = (torch.int32, torch.int64)
BLOCK = 1024


@triton.jit
def _sum_before(end_ptr, start_ptr, req, HAS_START: tl.constexpr, BLOCK: tl.constexpr):
    """sum(end[0:req] - start[0:req]) (start taken as 0 without HAS_START)."""
    offs0 = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], dtype=tl.int64)
    for first in range(0, req, BLOCK):
        offs = first + offs0
        total += tl.load(end_ptr + offs, mask=offs < req, other=0).to(tl.int64)
        if HAS_START:
            total -= tl.load(start_ptr + offs, mask=offs < req, other=0).to(tl.int64)
    return tl.sum(total, 0)


@triton.jit
def _write_req_to_token_kernel(req_to_token_ptr, req_pool_indices_ptr, start_ptr, end_ptr,
                               slots_ptr, slot_offsets_ptr, stride_req, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    row = tl.load(req_pool_indices_ptr + req).to(tl.int64)
    start = tl.load(start_ptr + req).to(tl.int32)
    end = tl.load(end_ptr + req).to(tl.int32)
    slot_offset = tl.load(slot_offsets_ptr + req).to(tl.int64)
    offs0 = tl.arange(0, BLOCK)
    for pos in range(start, end, BLOCK):
        offs = pos + offs0
        mask = offs < end
        slots = tl.load(slots_ptr + slot_offset + (offs - start), mask=mask)
        tl.store(req_to_token_ptr + row * stride_req + offs, slots.to(tl.int32), mask=mask)


@triton.jit
def _extend_positions_kernel(prefix_lens_ptr, extend_lens_ptr, positions_ptr, start_loc_ptr,
                             BLOCK: tl.constexpr):
    req = tl.program_id(0)
    start_loc = _sum_before(extend_lens_ptr, extend_lens_ptr, req, False, BLOCK)
    tl.store(start_loc_ptr + req, start_loc.to(tl.int32))
    prefix_len = tl.load(prefix_lens_ptr + req).to(tl.int64)
    extend_len = tl.load(extend_lens_ptr + req).to(tl.int32)
    offs0 = tl.arange(0, BLOCK)
    for j in range(0, extend_len, BLOCK):
        offs = j + offs0
        tl.store(positions_ptr + start_loc + offs, prefix_len + offs, mask=offs < extend_len)


@triton.jit
def _gather_req_slots_kernel(req_to_token_ptr, req_pool_indices_ptr, start_ptr, end_ptr,
                             out_ptr, stride_req, BLOCK: tl.constexpr):
    req = tl.program_id(0)
    out_start = _sum_before(end_ptr, start_ptr, req, True, BLOCK)
    row = tl.load(req_pool_indices_ptr + req).to(tl.int64)
    start = tl.load(start_ptr + req).to(tl.int32)
    end = tl.load(end_ptr + req).to(tl.int32)
    offs0 = tl.arange(0, BLOCK)
    for pos in range(start, end, BLOCK):
        offs = pos + offs0
        mask = offs < end
        slots = tl.load(req_to_token_ptr + row * stride_req + offs, mask=mask)
        tl.store(out_ptr + out_start + (offs - start), slots.to(tl.int64), mask=mask)


def _check_vectors(**vectors: torch.Tensor) -> int:
    batch = None
    for name, t in vectors.items():
        if t.dim() != 1 or t.dtype not in _INT:
            raise ValueError(f"{name} must be a 1-D int32/int64 tensor, got {t.dtype} "
                             f"{tuple(t.shape)}")
        batch = t.shape[0] if batch is None else batch
        if t.shape[0] != batch:
            raise ValueError(f"{name} has {t.shape[0]} entries, expected {batch}")
    if not batch:
        raise ValueError("empty batch: no requests given")
    return batch


def _check_table(req_to_token: torch.Tensor) -> None:
    if req_to_token.dim() != 2 or req_to_token.dtype != torch.int32 or req_to_token.stride(1) != 1:
        raise ValueError(f"req_to_token must be a 2-D int32 tensor with contiguous rows, got "
                         f"{req_to_token.dtype} {tuple(req_to_token.shape)}")


def write_req_to_token(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                       start_positions: torch.Tensor, end_positions: torch.Tensor,
                       slots: torch.Tensor, slot_offsets: torch.Tensor) -> None:
    """Write each request's new slots into its req_to_token row (in place)."""
    _check_table(req_to_token)
    batch = _check_vectors(req_pool_indices=req_pool_indices, start_positions=start_positions,
                           end_positions=end_positions, slot_offsets=slot_offsets)
    _check_vectors(slots=slots)
    _write_req_to_token_kernel[(batch,)](req_to_token, req_pool_indices, start_positions,
                                         end_positions, slots, slot_offsets,
                                         req_to_token.stride(0), BLOCK=BLOCK, num_warps=4)


def extend_positions(prefix_lens: torch.Tensor, extend_lens: torch.Tensor,
                     num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token positions [num_tokens] int64 and extend_start_loc [B] int32."""
    batch = _check_vectors(prefix_lens=prefix_lens, extend_lens=extend_lens)
    positions = torch.empty(num_tokens, dtype=torch.int64, device=prefix_lens.device)
    start_loc = torch.empty(batch, dtype=torch.int32, device=prefix_lens.device)
    _extend_positions_kernel[(batch,)](prefix_lens, extend_lens, positions, start_loc,
                                       BLOCK=BLOCK, num_warps=4)
    return positions, start_loc


def gather_req_slots(req_to_token: torch.Tensor, req_pool_indices: torch.Tensor,
                     start_positions: torch.Tensor, end_positions: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """Slots of rows' [start, end) ranges, concatenated in request order (int64)."""
    _check_table(req_to_token)
    batch = _check_vectors(req_pool_indices=req_pool_indices, start_positions=start_positions,
                           end_positions=end_positions)
    out = torch.empty(num_tokens, dtype=torch.int64, device=req_to_token.device)
    _gather_req_slots_kernel[(batch,)](req_to_token, req_pool_indices, start_positions,
                                       end_positions, out, req_to_token.stride(0),
                                       BLOCK=BLOCK, num_warps=4)
    return out


def write_req_to_token_reference(req_to_token, req_pool_indices, start_positions, end_positions,
                                 slots, slot_offsets) -> None:
    """Reference of `write_req_to_token`."""
    for b in range(req_pool_indices.shape[0]):
        start, end, offset = int(start_positions[b]), int(end_positions[b]), int(slot_offsets[b])
        req_to_token[int(req_pool_indices[b]), start:end] = \
            slots[offset:offset + end - start].to(torch.int32)


def extend_positions_reference(prefix_lens, extend_lens, num_tokens):
    """Reference of `extend_positions`."""
    _check_vectors(prefix_lens=prefix_lens, extend_lens=extend_lens)
    lens = extend_lens.long()
    start_loc = torch.cumsum(lens, 0) - lens
    owner = torch.repeat_interleave(torch.arange(lens.numel(), device=lens.device), lens)
    positions = prefix_lens.long()[owner] + torch.arange(num_tokens, device=lens.device) - start_loc[owner]
    return positions, start_loc.to(torch.int32)


def gather_req_slots_reference(req_to_token, req_pool_indices, start_positions, end_positions,
                               num_tokens):
    """Reference of `gather_req_slots`."""
    parts = [req_to_token[int(r), int(s):int(e)].long()
             for r, s, e in zip(req_pool_indices, start_positions, end_positions)]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
