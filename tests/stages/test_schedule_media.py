"""The schedule stage's per-chunk image slices: pixels travel with an image's first chunk only.

A prefill chunk cut inside an image hands the forward stage the rest of that image's
embedding rows; the forward stage kept the embeddings from the first chunk, so later
chunks carry the item without its pixel bytes, and the first chunk after the image
ended (a re-prefill after retraction, say) carries them again."""
from __future__ import annotations

import torch

from pipeline.messages import ImageInput, MultimodalItem, SamplingParams, TokenizedRequest
from stages.schedule.multimodal import RequestMedia


def _request(num_pads: int = 10, offset: int = 3) -> TokenizedRequest:
    pixels = torch.arange(num_pads * 4 * 6, dtype=torch.float32).view(num_pads * 4, 6)
    item = MultimodalItem(modality="image", content_hash="ab" * 32,
                          pixel_values=ImageInput(dtype="float32", shape=list(pixels.shape),
                                                  data=pixels.numpy().tobytes()),
                          grid_thw=[1, 4, num_pads], offset=offset, length=num_pads, pad_token_id=7,
                          pad_value=(1 << 30) + 5)
    ids = [1] * offset + [7] * num_pads + [2] * 4
    return TokenizedRequest(rid="r", parent_rid="r", input_ids=ids, sampling=SamplingParams(), mm_items=[item])


def test_pixels_travel_with_the_first_chunk_of_an_image_only():
    media = RequestMedia.of(_request())
    first = media.slices("r", 0, 0, 8)          # tokens 0..7: pads 3..7 (5 of 10)
    second = media.slices("r", 0, 8, 11)        # pads 8..10
    third = media.slices("r", 0, 11, 17)        # pads 11..12, the image's end
    assert [len(s) for s in (first, second, third)] == [1, 1, 1]
    assert first[0].item.pixel_values.data and not first[0].last
    assert second[0].item.pixel_values.data == b"" and second[0].item.pixel_values.shape == [0, 6]
    assert second[0].item_start == 5 and second[0].count == 3
    assert third[0].item.pixel_values.data == b"" and third[0].last
    # The image ended: a later prefill of the same tokens (after a retraction) sends the pixels again.
    again = media.slices("r", 0, 0, 17)
    assert again[0].item.pixel_values.data and again[0].last and again[0].count == 10


def test_a_chunk_holding_the_whole_image_carries_its_pixels():
    media = RequestMedia.of(_request())
    whole = media.slices("r", 0, 0, 17)
    assert whole[0].item.pixel_values.data == _request().mm_items[0].pixel_values.data
    assert not media.pixels_sent
