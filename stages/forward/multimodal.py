"""Vision inputs of a forward batch: encode each image once, hand the model its pad rows.

The schedule stage attaches a ``MultimodalBatch`` to an extend batch that
holds image or video tokens: M-RoPE positions ``[3][T]`` and, per prefill
chunk, which embedding rows of which item go to which batch rows
(``MultimodalSlice``). ``MultimodalInputs.prepare`` turns that into the
model's ``positions`` tensor and ``MultimodalEmbeds``:

1. each item's embeddings come from, in order: what this request kept from
   an earlier chunk cut through the same image; the multimodal cache (LRU
   keyed by the item's content hash, bounded in bytes by
   ``--mm-cache-size``); the vision encoder, which encodes every missing
   item of the batch in one call;
2. an item not finished by this chunk stays kept for its request until the
   chunk that reaches its end (or until the schedule stage releases the
   request), whatever the LRU evicts meanwhile;
3. each slice becomes one ``MultimodalEmbeds`` (its batch rows, a view of its
   embedding rows and of Qwen3-VL's deepstack tensors); the model scatters
   each into place, so no device copy joins them.

A decode batch, or a text-only batch, costs nothing here: the runner calls
``prepare`` only when ``batch.mm`` is set, and a decode batch's positions
already carry the M-RoPE delta. ``stats`` counts images and videos encoded,
encoder seconds and cache hits (for metrics).
"""
from __future__ import annotations

import collections
import dataclasses
import time

import torch

from models.qwen_vl import MultimodalEmbeds
from models.vision import VisionOutput
from pipeline.messages import MultimodalBatch, MultimodalItem


@dataclasses.dataclass
class MultimodalStats:
    """What the encoder and the cache have done so far (counted in items: a Qwen3-VL video is one
    item per temporal step, so each of its steps counts as a video encoded)."""

    images_encoded: int = 0
    videos_encoded: int = 0
    encode_s: float = 0.0
    cache_lookups: int = 0
    cache_hits: int = 0

    @property
    def hit_rate(self) -> float:
        return self.cache_hits / self.cache_lookups if self.cache_lookups else 0.0

    def as_counters(self) -> dict[str, float]:
        """The counters as the forward stage publishes them (pipeline/metrics.py MM_SERIES)."""
        return {"mm_images_encoded": float(self.images_encoded), "mm_videos_encoded": float(self.videos_encoded),
                "mm_encode_s": self.encode_s, "mm_cache_lookups": float(self.cache_lookups),
                "mm_cache_hits": float(self.cache_hits)}


class EmbeddingCache:
    """Vision outputs by content hash, least recently used dropped past ``capacity_bytes``."""

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = capacity_bytes
        self.used_bytes = 0
        self._entries: collections.OrderedDict[str, VisionOutput] = collections.OrderedDict()

    def get(self, key: str) -> VisionOutput | None:
        out = self._entries.get(key)
        if out is not None:
            self._entries.move_to_end(key)
        return out

    def put(self, key: str, out: VisionOutput) -> None:
        size = _nbytes(out)
        if key in self._entries or size > self.capacity_bytes:
            return
        self._entries[key] = out
        self.used_bytes += size
        while self.used_bytes > self.capacity_bytes:
            _, old = self._entries.popitem(last=False)
            self.used_bytes -= _nbytes(old)

    def __len__(self) -> int:
        return len(self._entries)


def _nbytes(out: VisionOutput) -> int:
    return sum(t.numel() * t.element_size() for t in (out.embeds, *out.deepstack))


class MultimodalInputs:
    """The forward stage's side of vision inputs: cache, kept embeddings, encoder calls."""

    def __init__(self, model, device: torch.device, cache_mb: int) -> None:
        self.model = model
        self.device = device
        self.cache = EmbeddingCache(cache_mb << 20)
        self.kept: dict[str, dict[str, VisionOutput]] = {}  # rid -> content hash -> embeddings
        self.stats = MultimodalStats()

    def prepare(self, mm: MultimodalBatch, positions: torch.Tensor) -> tuple[torch.Tensor, list[MultimodalEmbeds]]:
        """(positions for the model, the embeddings of this batch's pad rows: one piece per slice,
        views of the encoder's output, so no device copy joins them)."""
        for rid in mm.released:
            self.kept.pop(rid, None)
        if mm.mrope_positions is not None:
            positions = torch.tensor(mm.mrope_positions, dtype=torch.int64).to(self.device, non_blocking=True)
        if not mm.slices:
            return positions, []
        outputs = self._outputs(mm)
        pieces = []
        for piece in mm.slices:
            out = outputs[piece.item.content_hash]
            cut = slice(piece.item_start, piece.item_start + piece.count)
            rows = torch.arange(piece.batch_row, piece.batch_row + piece.count).to(self.device, non_blocking=True)
            pieces.append(MultimodalEmbeds(rows=rows, embeds=out.embeds[cut],
                                           deepstack=tuple(d[cut] for d in out.deepstack)))
            kept = self.kept.setdefault(piece.rid, {})
            if piece.last:
                kept.pop(piece.item.content_hash, None)
            else:
                kept[piece.item.content_hash] = out
            if not kept:
                del self.kept[piece.rid]
        return positions, pieces

    def _outputs(self, mm: MultimodalBatch) -> dict[str, VisionOutput]:
        """Content hash -> embeddings of every item the batch touches (encoding the missing ones)."""
        found: dict[str, VisionOutput] = {}
        missing: dict[str, MultimodalItem] = {}
        with_pixels = {p.item.content_hash: p.item for p in mm.slices if p.item.pixel_values.data}
        for piece in mm.slices:
            key = piece.item.content_hash
            if key in found or key in missing:
                continue
            out = self.kept.get(piece.rid, {}).get(key)
            if out is None:
                self.stats.cache_lookups += 1
                out = self.cache.get(key)
                self.stats.cache_hits += out is not None
            if out is not None:
                found[key] = out
            elif key in with_pixels:
                missing[key] = with_pixels[key]
            else:   # a later chunk's item comes without pixels: the schedule stage's invariant broke
                raise RuntimeError(f"request {piece.rid}: an image continued from an earlier chunk "
                                   f"({key[:12]}) is neither kept nor cached, and came without pixels")
        if missing:
            found.update(self._encode(list(missing.values())))
        return found

    def _encode(self, items: list[MultimodalItem]) -> dict[str, VisionOutput]:
        """One encoder call for ``items``; each result split per item and put in the cache."""
        started = time.perf_counter()
        pixels = torch.cat([_pixels(item) for item in items])
        grids = [tuple(item.grid_thw) for item in items]
        out = self.model.encode(pixels, grids)   # host pixels: cast to the weights' dtype, then uploaded
        results: dict[str, VisionOutput] = {}
        start = 0
        for item in items:
            cut = slice(start, start + item.length)
            results[item.content_hash] = VisionOutput(out.embeds[cut], tuple(d[cut] for d in out.deepstack))
            self.cache.put(item.content_hash, results[item.content_hash])
            start += item.length
        if start != out.embeds.shape[0]:
            raise RuntimeError(f"the vision encoder gave {out.embeds.shape[0]} rows for {start} pad tokens")
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the encoder time is what the stats report
        self.stats.encode_s += time.perf_counter() - started
        self.stats.images_encoded += sum(item.modality == "image" for item in items)
        self.stats.videos_encoded += sum(item.modality == "video" for item in items)
        return results


def _pixels(item: MultimodalItem) -> torch.Tensor:
    """The item's float32 pixel patches ``[num_patches, patch_dim]`` (a zero-copy view of its bytes)."""
    values = item.pixel_values
    return torch.frombuffer(bytearray(values.data), dtype=torch.float32).view(*values.shape)
