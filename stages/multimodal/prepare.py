"""One request's images and videos -> pixel patches, expanded pad tokens and M-RoPE positions.

``prepare(request, vision, context_length)`` is the multimodal stage's whole
job for one ``TokenizedRequest`` (pure; it runs on a worker thread):

1. decode every ``MediaInput`` (``processor.py``) into pixel patches + grid;
2. match the k-th image with the prompt's k-th ``<|image_pad|>`` (videos with
   ``<|video_pad|>``) and expand that one token into the item's
   ``t*h*w/merge^2`` pad tokens, recording ``offset`` and ``length``;
3. check the expanded prompt against the context length (images are what
   make it long: the 400 says how many tokens they took);
4. compute the M-RoPE positions and decode delta (``mrope.py``).

Qwen3-VL videos are written as their processor writes them: the template's
``<|vision_start|><|video_pad|><|vision_end|>`` becomes, per temporal grid
step, ``<t seconds><|vision_start|>`` + that step's pad tokens +
``<|vision_end|>``. Each step is its own item (grid ``[1, h, w]``): the
vision encoder attends within one step's frames only and the M-RoPE
positions treat each step as an image, so splitting changes nothing but
lets the schedule and forward stages handle a step like an image. The
timestamp text is tokenized together with the text before it (one text run,
as the processor tokenizes the whole expanded prompt), so prepare needs the
tokenizer (``TextCodec``) for such videos.

A request without media passes unchanged. ``VisionModel`` is what the stage
reads once from the model's config.json; ``None`` means a text model, which
refuses media with a 400.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import msgspec
import numpy as np

from pipeline.messages import MM_PAD_VALUE_BASE, ImageInput, MediaInput, MultimodalItem, TokenizedRequest
from stages.multimodal.mrope import rope_index
from stages.multimodal.processor import (MediaError, VisionPreprocess, image_patches, load_preprocess, open_image,
                                         video_patches)
from stages.multimodal.video import decode_video, step_times, timestamp_text

MAX_ITEMS = 64  # images and videos per request


class VisionModel(msgspec.Struct, frozen=True, kw_only=True):
    """A Qwen-VL model's placeholder ids and preprocessing, from config.json + preprocessor_config.json."""

    model_type: str
    image_token_id: int
    video_token_id: int
    merge_size: int
    tokens_per_second: float  # Qwen2.5-VL's temporal spacing of video positions
    rules: VisionPreprocess
    vision_start_token_id: int = 151652  # Qwen3-VL video steps are wrapped in these
    vision_end_token_id: int = 151653

    @property
    def splits_video_frames(self) -> bool:
        """Qwen3-VL writes a timestamp before each temporal step of a video (one item per step)."""
        return self.model_type.startswith("qwen3")


def load_vision_model(model_dir: str | Path) -> VisionModel | None:
    """The vision side of the model at ``model_dir``; None for a text model (no vision_config)."""
    path = Path(model_dir) / "config.json"
    config: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}
    vision = config.get("vision_config")
    if not isinstance(vision, dict):
        return None
    rules = load_preprocess(model_dir, vision)
    return VisionModel(model_type=str(config.get("model_type", "")),
                       image_token_id=int(config.get("image_token_id", 151655)),
                       video_token_id=int(config.get("video_token_id", 151656)),
                       vision_start_token_id=int(config.get("vision_start_token_id", 151652)),
                       vision_end_token_id=int(config.get("vision_end_token_id", 151653)),
                       merge_size=int(vision.get("spatial_merge_size", rules.merge_size)),
                       tokens_per_second=float(vision.get("tokens_per_second", 1)), rules=rules)


class Decoded(msgspec.Struct, frozen=True, kw_only=True):
    """One media input turned into patches (before it has a place in the prompt)."""

    modality: str
    patches: np.ndarray
    grid_thw: list[int]
    second_per_grid_t: float = 0.0
    timestamps_s: list[float] = []  # Qwen3-VL video: seconds of each temporal step


@dataclass(frozen=True)
class TextCodec:
    """The tokenizer as Qwen3-VL's video expansion uses it (process-local, never sent)."""

    tokenizer: Any
    added_ids: frozenset[int] = field(default=frozenset())

    @classmethod
    def of(cls, tokenizer: Any) -> "TextCodec":
        """``added_ids``: the tokenizer's added tokens, which bound a text run when it encodes."""
        return cls(tokenizer, frozenset(getattr(tokenizer, "added_tokens_decoder", {}) or ()))

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def decode(media: MediaInput, vision: VisionModel, what: str) -> Decoded:
    rules = vision.rules
    if media.modality == "image":
        patches, grid = image_patches(open_image(media.data, what), rules)
        return Decoded(modality="image", patches=patches, grid_thw=grid)
    fps = media.fps or rules.video_fps
    if media.frames:
        frames = [open_image(frame, f"{what} frame {i}") for i, frame in enumerate(media.frames)]
        times = [i / fps for i in range(len(frames))]
    else:
        frames, times = decode_video(media.data, rules.video_fps, what)
        fps = rules.video_fps
    if vision.splits_video_frames:
        patches, grid = video_patches(frames, rules, whole_video_bounds=True)
        return Decoded(modality="video", patches=patches, grid_thw=grid,
                       timestamps_s=step_times(times, rules.temporal_patch_size))
    patches, grid = video_patches(frames, rules)
    return Decoded(modality="video", patches=patches, grid_thw=grid,
                   second_per_grid_t=rules.temporal_patch_size / fps)


def _decoded(media: MediaInput, vision: VisionModel, index: int) -> Decoded:
    try:
        return decode(media, vision, media.param or f"{media.modality} {index}")
    except MediaError as error:
        raise MediaError(error.message, error.param or media.param or "messages") from None


def content_hash(decoded: Decoded) -> str:
    digest = hashlib.sha256(decoded.patches.tobytes())
    digest.update(np.asarray(decoded.grid_thw, dtype=np.int64).tobytes())
    return digest.hexdigest()


def placeholder_positions(input_ids: list[int], token_id: int) -> list[int]:
    return [i for i, token in enumerate(input_ids) if token == token_id]


def expand(request: TokenizedRequest, decoded: list[Decoded], vision: VisionModel,
           codec: TextCodec | None = None) -> tuple[list[int], list[MultimodalItem]]:
    """Each item's one placeholder token -> its run of pad tokens; the items with offset and length."""
    where: dict[int, tuple[int, Decoded]] = {}
    for modality, token_id in (("image", vision.image_token_id), ("video", vision.video_token_id)):
        mine = [(i, d) for i, d in enumerate(decoded) if d.modality == modality]
        found = placeholder_positions(request.input_ids, token_id)
        if len(found) != len(mine):
            raise MediaError(f"the prompt has {len(found)} {modality} placeholder(s) for {len(mine)} "
                             f"{modality}(s); each {modality} needs exactly one")
        where.update({position: (index, d) for position, (index, d) in zip(found, mine)})
    input_ids: list[int] = []
    items: list[tuple[int, MultimodalItem]] = []
    source = request.input_ids
    position = 0
    while position < len(source):
        token = source[position]
        position += 1
        if position - 1 not in where:
            input_ids.append(token)
            continue
        index, d = where[position - 1]
        if d.modality == "video" and vision.splits_video_frames:
            if (input_ids and input_ids[-1] == vision.vision_start_token_id and position < len(source)
                    and source[position] == vision.vision_end_token_id):
                input_ids.pop()  # the template's wrapper: each step brings its own
                position += 1
            floor = items[-1][1].offset + items[-1][1].length if items else 0
            items.extend((index, step) for step in _placed_steps(d, input_ids, token, vision, _codec(codec), floor))
            continue
        items.append((index, _placed(d, input_ids, token, vision)))
    return input_ids, [item for _, item in sorted(items, key=lambda pair: pair[1].offset)]


def _placed_steps(d: Decoded, input_ids: list[int], token: int, vision: VisionModel, codec: TextCodec,
                  floor: int) -> list[MultimodalItem]:
    """A Qwen3-VL video's steps appended to ``input_ids`` (in place), each
    ``<t seconds><|vision_start|>`` + pads + ``<|vision_end|>``; their items."""
    placed = []
    for step in frame_steps(d):
        add_text(input_ids, timestamp_text(step.timestamps_s[0]), codec, floor)
        input_ids.append(vision.vision_start_token_id)
        placed.append(_placed(step, input_ids, token, vision))
        input_ids.append(vision.vision_end_token_id)
    return placed


def _placed(d: Decoded, input_ids: list[int], token: int, vision: VisionModel) -> MultimodalItem:
    """The item of ``d`` with its pad tokens appended to ``input_ids`` (in place)."""
    length = vision.rules.tokens_for(d.grid_thw)
    item = make_item(d, offset=len(input_ids), length=length, pad_token_id=token)
    input_ids.extend([token] * length)
    return item


def _codec(codec: TextCodec | None) -> TextCodec:
    if codec is None:
        raise ValueError("a Qwen3-VL video needs the tokenizer to write its frame timestamps")
    return codec


def frame_steps(d: Decoded) -> list[Decoded]:
    """A Qwen3-VL video as one ``[1, h, w]`` item per temporal step (its rows are step-major)."""
    t, h, w = d.grid_thw
    rows = h * w
    return [Decoded(modality="video", patches=d.patches[k * rows:(k + 1) * rows], grid_thw=[1, h, w],
                    timestamps_s=[d.timestamps_s[k]]) for k in range(t)]


def add_text(input_ids: list[int], text: str, codec: TextCodec, floor: int) -> None:
    """Append ``text``'s tokens, encoded together with the text run that ``input_ids`` ends with
    (back to an added token or ``floor``), as a tokenizer encodes the whole expanded prompt."""
    start = len(input_ids)
    while start > floor and input_ids[start - 1] not in codec.added_ids:
        start -= 1
    input_ids[start:] = codec.encode(codec.decode(input_ids[start:]) + text)


def make_item(d: Decoded, offset: int, length: int, pad_token_id: int) -> MultimodalItem:
    digest = content_hash(d)
    pixels = ImageInput(dtype="float32", shape=list(d.patches.shape), data=d.patches.tobytes())
    return MultimodalItem(modality=d.modality, content_hash=digest, pixel_values=pixels, grid_thw=list(d.grid_thw),
                          offset=offset, length=length, pad_token_id=pad_token_id,
                          pad_value=MM_PAD_VALUE_BASE + int(digest[:8], 16) % (1 << 30),
                          second_per_grid_t=d.second_per_grid_t, timestamps_s=list(d.timestamps_s))


def check_length(request: TokenizedRequest, input_ids: list[int], items: list[MultimodalItem],
                 context_length: int) -> TokenizedRequest:
    """The expanded prompt must leave room for the output; max_new_tokens None becomes that room."""
    num_vision = sum(item.length for item in items)
    room = context_length - len(input_ids)
    sampling = request.sampling
    wanted = sampling.max_new_tokens if sampling.max_new_tokens is not None else max(sampling.min_new_tokens, 1)
    if wanted > room:
        raise MediaError(f"the prompt takes {len(input_ids)} tokens ({num_vision} of them for {len(items)} "
                         f"image/video item(s)); with {wanted} tokens to generate that is more than the model's "
                         f"context length of {context_length} tokens: send fewer or smaller images, or lower "
                         "max_tokens", "max_tokens" if sampling.max_new_tokens else "messages")
    if sampling.max_new_tokens is None:
        sampling = msgspec.structs.replace(sampling, max_new_tokens=room)
    return msgspec.structs.replace(request, input_ids=input_ids, sampling=sampling)


def prepare(request: TokenizedRequest, vision: VisionModel | None, context_length: int,
            codec: TextCodec | None = None) -> TokenizedRequest:
    """The request with its media turned into mm_items, pads expanded and M-RoPE positions (raises MediaError).

    ``codec``: the tokenizer, needed only for a Qwen3-VL video (its timestamp text)."""
    if not request.media:
        return request
    if vision is None:
        raise MediaError("this model does not accept image or video inputs", request.media[0].param or "messages")
    if len(request.media) > MAX_ITEMS:
        raise MediaError(f"{len(request.media)} images/videos in one request; at most {MAX_ITEMS}", "messages")
    decoded = [_decoded(media, vision, i) for i, media in enumerate(request.media)]
    input_ids, items = expand(request, decoded, vision, codec)
    request = check_length(request, input_ids, items, context_length)
    spans = [(item.offset, item.grid_thw, vision.tokens_per_second * item.second_per_grid_t if item.modality == "video"
              else 1.0) for item in items]
    positions, delta = rope_index(len(input_ids), spans, vision.merge_size)
    return msgspec.structs.replace(request, media=[], mm_items=items, mrope_positions=positions,
                                   mrope_position_delta=delta)
