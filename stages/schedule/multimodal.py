"""Images and videos in the schedule stage: radix keys, M-RoPE positions, per-chunk slices.

A request with ``mm_items`` keeps a ``RequestMedia`` on its ``Req``. Three
things follow from it, and nothing else in the stage changes:

* **Radix keys.** ``input_ids`` holds the real pad id at every image token,
  so two prompts with different images look alike. The cache keys those
  positions by the item's ``pad_value`` instead (``prompt_keys``, read
  through ``Req.key_ids``): the same image shares a cached prefix, a
  different one never does.
* **Positions.** An extend batch holding such a request carries M-RoPE
  positions ``[3][T]`` for every token of the batch (text rows repeat their
  position thrice, so the model's plain and M-RoPE paths agree on them); a
  generated token at sequence index ``i`` sits at ``i + delta``. A decode
  batch stays ``[T]`` (the CUDA-graph path): its positions are shifted by
  each request's ``mrope_position_delta``.
* **Slices.** Each prefill chunk lists, per item it overlaps, which of the
  item's embedding rows go to which batch rows (``MultimodalSlice``). The
  first chunk of an item carries its pixels; a later chunk cut inside the
  same image carries the item without them (``pixels_sent``), since the
  forward stage keeps what it encoded for the earlier chunk until the chunk
  that reaches the item's end.

A text-only batch is returned untouched (one ``any`` over its rows).
"""
from __future__ import annotations

import dataclasses

import msgspec

from pipeline.messages import (
    ForwardBatch, ImageInput, MultimodalBatch, MultimodalItem, MultimodalSlice, TokenizedRequest,
)


@dataclasses.dataclass(frozen=True)
class RequestMedia:
    """What the schedule stage keeps of a request's images and videos."""

    items: tuple[MultimodalItem, ...]
    prompt_keys: list[int]                     # input_ids with pad positions replaced by pad_value
    mrope_positions: list[list[int]] | None    # [3][len(input_ids)], None: plain positions
    delta: int                                 # a generated token at index i sits at i + delta
    pixels_sent: set[str] = dataclasses.field(default_factory=set)  # items the forward stage keeps

    @classmethod
    def of(cls, msg: TokenizedRequest) -> "RequestMedia | None":
        """None for a text-only request whose positions need no shift."""
        if not msg.mm_items and msg.mrope_positions is None and msg.mrope_position_delta == 0:
            return None
        keys = list(msg.input_ids)
        for item in msg.mm_items:
            keys[item.offset:item.offset + item.length] = [item.pad_value] * item.length
        return cls(tuple(msg.mm_items), keys, msg.mrope_positions, msg.mrope_position_delta)

    def position(self, index: int, axis: int) -> int:
        """M-RoPE position ``axis`` of sequence token ``index``."""
        prompt_len = len(self.prompt_keys)
        if index < prompt_len and self.mrope_positions is not None:
            return self.mrope_positions[axis][index]
        return index + self.delta if index >= prompt_len else index

    def slices(self, rid: str, batch_row: int, start: int, end: int) -> list[MultimodalSlice]:
        """The items' embedding rows that sequence tokens ``start..end-1`` (batch row ``batch_row`` on) take."""
        out = []
        for item in self.items:
            first, last = max(start, item.offset), min(end, item.offset + item.length)
            if first < last:
                ends_here = last == item.offset + item.length
                carried = without_pixels(item) if item.content_hash in self.pixels_sent else item
                if ends_here:
                    self.pixels_sent.discard(item.content_hash)
                else:
                    self.pixels_sent.add(item.content_hash)
                out.append(MultimodalSlice(rid=rid, item=carried, batch_row=batch_row + first - start,
                                           item_start=first - item.offset, count=last - first, last=ends_here))
        return out

    def unfinished(self, kv_len: int) -> bool:
        """Is an item only partly computed (the forward stage may still keep its embeddings)?"""
        return any(item.offset < kv_len < item.offset + item.length for item in self.items)


def without_pixels(item: MultimodalItem) -> MultimodalItem:
    """The item with no pixel bytes (shape [0, patch_dim]): the forward stage already holds its embeddings."""
    values = item.pixel_values
    empty = ImageInput(dtype=values.dtype, shape=[0, *values.shape[1:]], data=b"")
    return msgspec.structs.replace(item, pixel_values=empty)


def attach(batch: ForwardBatch, reqs: list, released: list[str]) -> ForwardBatch:
    """The batch with its ``MultimodalBatch`` (positions shifted for decode), or unchanged.

    ``reqs``: the batch's ``Req`` per row, in order; ``released``: rids whose
    kept embeddings the forward stage may drop (emptied here once sent).
    """
    if not released and not any(req.media is not None for req in reqs):
        return batch
    gone, released[:] = list(released), []
    if batch.mode == "decode":
        positions = [p + (req.media.delta if req.media is not None else 0)
                     for p, req in zip(batch.positions, reqs)]
        return msgspec.structs.replace(batch, positions=positions, mm=MultimodalBatch(released=gone))
    rows: list[list[int]] = [[], [], []]
    slices: list[MultimodalSlice] = []
    row = 0
    for req, start, n in zip(reqs, batch.prefix_lens, batch.extend_lens):
        media: RequestMedia | None = req.media
        for axis in range(3):
            rows[axis].extend(range(start, start + n) if media is None else
                              (media.position(i, axis) for i in range(start, start + n)))
        if media is not None:
            slices.extend(media.slices(req.rid, row, start, start + n))
        row += n
    return msgspec.structs.replace(batch, mm=MultimodalBatch(mrope_positions=rows, slices=slices, released=gone))
