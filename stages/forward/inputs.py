"""ForwardBatch (host ints) -> device tensors, with one host->device copy.

Every integer the model step needs is packed into one int64 buffer, copied
once (through reused pinned staging, ``stages/staging.py``) and sliced into views, so building a
batch launches no kernel at all. The attention kernels and the index
helpers accept int64 vectors, so nothing needs a dtype conversion.

Packed layout (B requests, T new tokens, W row writes, S row-write slots;
each field padded to an even length, so every field is 16-byte aligned)::

    input_ids[T] positions[T] out_cache_loc[T]
    req_pool_indices[B] prefix_lens[B] extend_lens[B] extend_start_loc[B] seq_lens[B] logits_indices[B+P]
    write_rows[W] write_starts[W] write_ends[W] write_offsets[W] write_slots[S]

``logits_indices`` holds each request's last row, then the P prompt rows
whose logits a prompt-logprob request wants (``prompt_logit_rows``; P is 0
unless some request asks), so the model's one gather before the LM head
serves both.

``req_to_token`` is then updated on the device: first the row writes
(cached-prefix slots, from the radix cache), then every new token's slot at
its position (``write_req_to_token`` of the backend's ``IndexOps``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from models.batch import AttentionMetadata
from pipeline.messages import ForwardBatch


@dataclasses.dataclass(frozen=True)
class DeviceBatch:
    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    row_writes: tuple[torch.Tensor, ...] | None  # rows, starts, ends, offsets, slots


ALIGN = 2  # int64 elements: every field starts 16 bytes into the buffer (see below)


def _aligned(fields: list[list[int]]) -> list[int]:
    """Concatenate, padding each field to a multiple of ALIGN elements with zeros."""
    packed: list[int] = []
    for field in fields:
        packed += field
        packed += [0] * (-len(field) % ALIGN)
    return packed


def pack_batch(batch: ForwardBatch) -> tuple[list[int], int, int]:
    """The packed int list, number of row writes W and their slot count S.

    Each field is padded to 16 bytes: Triton specializes kernels on whether a
    pointer is 16-byte aligned, so fields at offsets that depend on T and B would
    make a kernel compile a new variant (seconds) when a batch's sizes change parity.
    """
    extend_start, logits_indices, offset = [], [], 0
    for length in batch.extend_lens:
        extend_start.append(offset)
        offset += length
        logits_indices.append(offset - 1)
    logits_indices += prompt_logit_rows(batch, extend_start)
    logits_indices += draft_logit_rows(batch, extend_start)
    fields = [batch.input_ids, batch.positions, batch.out_cache_loc, batch.req_pool_indices,
              batch.prefix_lens, batch.extend_lens, extend_start, batch.seq_lens, logits_indices]
    writes = batch.row_writes
    if not writes:
        return _aligned(fields), 0, 0
    offsets, slots, start = [], [], 0
    for write in writes:
        offsets.append(start)
        slots.extend(write.slots)
        start += len(write.slots)
    fields += [[w.row for w in writes], [w.start for w in writes],
               [w.start + len(w.slots) for w in writes], offsets, slots]
    return _aligned(fields), len(writes), len(slots)


def unpack(buffer: torch.Tensor, batch: ForwardBatch, num_writes: int, num_write_slots: int,
           req_to_token: torch.Tensor, max_seq_len: int | None = None) -> DeviceBatch:
    """Slice the packed device buffer into the model's inputs (views, no kernels)."""
    T, B = len(batch.input_ids), len(batch.rids)
    sizes = [T, T, T, B, B, B, B, B, B + num_prompt_logit_rows(batch) + num_draft_logit_rows(batch)]
    if num_writes:
        sizes += [num_writes] * 4 + [num_write_slots]
    parts, offset = [], 0
    for size in sizes:
        parts.append(buffer.narrow(0, offset, size))
        offset += size + (-size % ALIGN)
    (input_ids, positions, out_cache_loc, rows, prefix_lens, extend_lens, extend_start, seq_lens,
     logits_indices) = parts[:9]
    meta = AttentionMetadata(
        mode=batch.mode, req_to_token=req_to_token, req_pool_indices=rows, prefix_lens=prefix_lens,
        extend_lens=extend_lens, extend_start_loc=extend_start, seq_lens=seq_lens,
        out_cache_loc=out_cache_loc, logits_indices=logits_indices,
        max_extend_len=max(batch.extend_lens),
        max_seq_len=max_seq_len if max_seq_len is not None else max(batch.seq_lens))
    row_writes = tuple(parts[9:]) if num_writes else None
    return DeviceBatch(input_ids, positions, meta, row_writes)


def num_prompt_logit_rows(batch: ForwardBatch) -> int:
    return sum(len(ids) for ids in batch.sampling.prompt_logprob_ids)


def prompt_logit_rows(batch: ForwardBatch, extend_start: list[int]) -> list[int]:
    """q rows of the prompt positions whose logits are wanted (``SamplingBatch.prompt_logprob_ids``).

    Request b's rows are a suffix of its chunk: ending at its last row, or at
    the row before it when that last row samples the first output token.
    """
    rows: list[int] = []
    sampling = batch.sampling
    for b, ids in enumerate(sampling.prompt_logprob_ids):
        if ids:
            end = extend_start[b] + batch.extend_lens[b] - (1 if sampling.need_sample[b] else 0)
            rows.extend(range(end - len(ids), end))
    return rows


def num_draft_logit_rows(batch: ForwardBatch) -> int:
    return sum(len(ids) for ids in batch.sampling.draft_ids)


def draft_logit_rows(batch: ForwardBatch, extend_start: list[int]) -> list[int]:
    """q rows whose logits verify draft tokens (``SamplingBatch.draft_ids``), after the prompt rows.

    Row b feeds its last token then its d drafts: the first d of those
    positions predict the drafts (the last one is the row's usual last row).
    """
    rows: list[int] = []
    for b, ids in enumerate(batch.sampling.draft_ids):
        rows.extend(range(extend_start[b], extend_start[b] + len(ids)))
    return rows


def write_req_to_token(write: Callable, device_batch: DeviceBatch) -> None:
    """Apply row writes, then store each new token's slot at its position.

    ``write`` is the backend's ``write_req_to_token`` (``triton_kernels.IndexOps``).
    """
    meta = device_batch.meta
    if device_batch.row_writes is not None:
        rows, starts, ends, offsets, slots = device_batch.row_writes
        write(meta.req_to_token, rows, starts, ends, slots, offsets)
    write(meta.req_to_token, meta.req_pool_indices, meta.prefix_lens, meta.seq_lens,
          meta.out_cache_loc, meta.extend_start_loc)
