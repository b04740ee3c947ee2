"""The multimodal stage against Hugging Face: pixel patches, grids, pad counts and M-RoPE positions.

Pictures are generated with Pillow; the reference is transformers' Pillow Qwen2-VL
image processor (shared by Qwen2.5-VL and Qwen3-VL) and the models' own
``get_rope_index`` on tiny configs built here.
"""
from __future__ import annotations

import io
import json

import msgspec
import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import ServerArgs
from pipeline.harness import StageDriver
from pipeline.messages import Abort, ErrorOutput, MediaInput, SamplingParams, TokenizedRequest
from stages.multimodal import MultimodalStage
from stages.multimodal.prepare import TextCodec, VisionModel, load_vision_model, prepare
from stages.multimodal.processor import (MediaError, VisionPreprocess, image_patches, normalized, open_image,
                                         smart_resize_video, video_patches)
from stages.multimodal.video import step_times, timestamp_text

IMAGE, VIDEO, START, END = 90, 91, 88, 89  # placeholder ids of the tiny configs below
RULES = dict(min_pixels=32 * 32, max_pixels=64 * 64 * 4, patch_size=16, merge_size=2, temporal_patch_size=2,
             image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])


def encoded(width: int, height: int, fmt: str = "PNG", seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, (height, width, channels), dtype=np.uint8).squeeze()
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode=None).convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    return Qwen2VLImageProcessorPil(**RULES)


def rules() -> VisionPreprocess:
    return VisionPreprocess(min_pixels=RULES["min_pixels"], max_pixels=RULES["max_pixels"], patch_size=16,
                            image_mean=(0.5, 0.5, 0.5), image_std=(0.5, 0.5, 0.5))


def vision(model_type: str = "qwen2_5_vl") -> VisionModel:
    return VisionModel(model_type=model_type, image_token_id=IMAGE, video_token_id=VIDEO, merge_size=2,
                       tokens_per_second=2.0, rules=rules())


@pytest.mark.parametrize("size,fmt,mode", [((37, 53), "PNG", "RGB"), ((200, 90), "JPEG", "RGB"),
                                            ((640, 480), "WEBP", "RGB"), ((5, 300), "PNG", "RGBA"),
                                            ((64, 64), "GIF", "L"), ((1000, 20), "PNG", "L")])
def test_patches_equal_hugging_face(size, fmt, mode):
    data = encoded(*size, fmt=fmt, mode=mode)
    expected = hf_processor()(images=[Image.open(io.BytesIO(data))], return_tensors="np")
    patches, grid = image_patches(open_image(data, "image"), rules())
    assert grid == expected["image_grid_thw"][0].tolist()
    assert patches.dtype == np.float32 and patches.shape == expected["pixel_values"].shape
    np.testing.assert_allclose(patches, expected["pixel_values"], rtol=0, atol=1e-6)


def test_preprocessor_config_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_vl", "image_token_id": IMAGE, "video_token_id": VIDEO,
        "vision_config": {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({
        "size": {"shortest_edge": 1024, "longest_edge": 16384}, "patch_size": 16, "merge_size": 2,
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    model = load_vision_model(tmp_path)
    assert model is not None and model.splits_video_frames
    assert (model.rules.min_pixels, model.rules.max_pixels, model.rules.patch_size) == (1024, 16384, 16)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    assert load_vision_model(tmp_path) is None


@pytest.mark.parametrize("data,problem", [(b"", "empty"), (b"not an image at all", "not an image"),
                                          (encoded(40, 40)[:60], "truncated"),
                                          (encoded(40, 40, fmt="TIFF"), "TIFF")])
def test_bad_pictures_name_the_problem(data, problem):
    with pytest.raises(MediaError, match=problem):
        open_image(data, "messages[0].content[1]")


def test_too_many_pixels_and_aspect_ratio_refused(monkeypatch):
    import stages.multimodal.processor as processor
    monkeypatch.setattr(processor, "MAX_DECODE_PIXELS", 50 * 50)
    with pytest.raises(MediaError, match="pixels"):
        open_image(encoded(60, 60), "image_data[0]")
    with pytest.raises(MediaError, match="aspect ratio"):
        open_image(encoded(2, 450), "image_data[0]")


def request(ids: list[int], media: list[MediaInput], max_new_tokens: int | None = 8, n_index: int = 0,
            rid: str = "r") -> TokenizedRequest:
    return TokenizedRequest(rid=rid if n_index == 0 else f"{rid}.{n_index}", parent_rid=rid, index=n_index,
                            input_ids=ids, sampling=SamplingParams(max_new_tokens=max_new_tokens), media=media)


def image(width: int, height: int, seed: int = 0, param: str = "") -> MediaInput:
    return MediaInput(modality="image", data=encoded(width, height, seed=seed), param=param)


def test_expansion_offsets_and_pixels():
    ids = [1, 2, START, IMAGE, END, 3, START, IMAGE, END, 4]
    out = prepare(request(ids, [image(37, 53), image(200, 90, seed=1)]), vision(), 4096)
    first, second = out.mm_items
    assert (first.grid_thw, second.grid_thw) == ([1, 4, 2], [1, 4, 10])
    assert (first.offset, first.length) == (3, 2) and (second.offset, second.length) == (8, 10)
    assert out.input_ids == [1, 2, START] + [IMAGE] * 2 + [END, 3, START] + [IMAGE] * 10 + [END, 4]
    assert out.media == [] and first.pad_token_id == IMAGE and first.pad_value >= 1 << 30
    assert first.content_hash != second.content_hash and first.pad_value != second.pad_value
    pixels = np.frombuffer(second.pixel_values.data, dtype=np.float32).reshape(second.pixel_values.shape)
    expected = hf_processor()(images=[Image.open(io.BytesIO(encoded(200, 90, seed=1)))], return_tensors="np")
    np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-6)
    again = prepare(request(ids, [image(37, 53), image(200, 90, seed=1)]), vision(), 4096)
    assert again.mm_items[0].content_hash == first.content_hash


def test_placeholder_count_must_match():
    with pytest.raises(MediaError, match="1 image placeholder"):
        prepare(request([1, START, IMAGE, END], [image(40, 40), image(40, 40)]), vision(), 4096)


def test_images_past_the_context_are_a_400_that_counts_them():
    with pytest.raises(MediaError, match=r"takes 19 tokens \(16 of them for 1 image.*context length of 24"):
        prepare(request([1, START, IMAGE, END], [image(600, 600)]), vision(), 24)
    out = prepare(request([1, START, IMAGE, END], [image(40, 40)], max_new_tokens=None), vision(), 64)
    assert out.sampling.max_new_tokens == 64 - len(out.input_ids)


def hf_rope_model(kind: str):
    """A tiny model whose get_rope_index is the reference (weights unused)."""
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]})
    vision_config = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16,
                         spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32)
    if kind == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel
        config = Qwen2_5_VLConfig(text_config=text, vision_config={**vision_config, "tokens_per_second": 2},
                                  image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START)
        return Qwen2_5_VLModel(config)
    from transformers import Qwen3VLConfig, Qwen3VLModel
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True}
    config = Qwen3VLConfig(text_config=text, vision_config={**vision_config, "num_position_embeddings": 16,
                                                              "deepstack_visual_indexes": []},
                           image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START)
    return Qwen3VLModel(config)


@pytest.mark.parametrize("kind", ["qwen2_5_vl", "qwen3_vl"])
def test_mrope_positions_equal_get_rope_index(kind):
    ids = [5, 6, START, IMAGE, END, 7, 8, 9, START, IMAGE, END, START, IMAGE, END, 10]
    media = [image(37, 53), image(300, 70, seed=1), image(64, 64, seed=2)]
    out = prepare(request(ids, media), vision(kind), 4096)
    model = hf_rope_model(kind)
    input_ids = torch.tensor([out.input_ids])
    types = (input_ids == IMAGE).int()
    grids = torch.tensor([item.grid_thw for item in out.mm_items])
    positions, delta = model.get_rope_index(input_ids, mm_token_type_ids=types, image_grid_thw=grids)
    assert out.mrope_positions == positions[:, 0].tolist()
    assert out.mrope_position_delta == int(delta[0, 0])


def test_qwen2_5_video_frames_and_rope():
    frames = [encoded(48, 40, seed=s) for s in range(3)]
    ids = [5, START, VIDEO, END, 6]
    out = prepare(request(ids, [MediaInput(modality="video", frames=frames, fps=2.0)]), vision(), 4096)
    item = out.mm_items[0]
    assert item.grid_thw == [2, 2, 4] and item.length == 4 and item.second_per_grid_t == 1.0
    model = hf_rope_model("qwen2_5_vl")
    input_ids = torch.tensor([out.input_ids])
    positions, delta = model.get_rope_index(input_ids, mm_token_type_ids=(input_ids == VIDEO).int() * 2,
                                            video_grid_thw=torch.tensor([item.grid_thw]),
                                            second_per_grid_ts=torch.tensor([item.second_per_grid_t]))
    assert out.mrope_positions == positions[:, 0].tolist() and out.mrope_position_delta == int(delta[0, 0])


def test_video_file_without_pyav_names_the_extra():
    import importlib.util
    if importlib.util.find_spec("av") is None:
        with pytest.raises(MediaError, match="extra 'video'"):
            prepare(request([START, VIDEO, END], [MediaInput(modality="video", data=b"\x00" * 64)]), vision(), 4096)
    else:
        with pytest.raises(MediaError, match="not a video"):
            prepare(request([START, VIDEO, END], [MediaInput(modality="video", data=b"\x00" * 64)]), vision(), 4096)


def stage(model: VisionModel | None) -> StageDriver:
    args = ServerArgs(context_length=4096)
    return StageDriver(MultimodalStage(args, None, {"out": None, "errors": None}, vision=model, num_workers=0))


def test_stage_passes_text_through_and_refuses_media_for_text_models():
    harness = stage(None)
    text = request([1, 2, 3], [])
    harness.feed(text)
    harness.feed(request([1, START, IMAGE, END], [image(40, 40, param="messages[0].content[1]")], rid="img"))
    harness.step()
    assert harness.take("out") == [text]
    (error,) = harness.take("errors")
    assert isinstance(error, ErrorOutput) and error.status_code == 400 and error.rid == "img"
    assert error.param == "messages[0].content[1]" and "does not accept" in error.message


def test_stage_emits_items_and_one_error_per_request():
    harness = stage(vision())
    harness.feed(request([1, START, IMAGE, END], [image(40, 40)], rid="a"))
    harness.feed(Abort(rid="a"))
    bad = [MediaInput(modality="image", data=b"junk", param="image_data[0]")]
    harness.feed(request([1, START, IMAGE, END], bad, rid="b", n_index=0))
    harness.feed(request([1, START, IMAGE, END], bad, rid="b", n_index=1))
    harness.step()
    out = harness.take("out")
    assert [type(m).__name__ for m in out] == ["TokenizedRequest", "Abort"]
    assert out[0].mm_items and out[0].mrope_positions is not None
    (error,) = harness.take("errors")
    assert error.rid == "b" and error.param == "image_data[0]"


# --------------------------------------------------------------------------- Qwen3-VL video


@pytest.mark.parametrize("num_frames,fps", [(1, 2.0), (3, 2.0), (4, 24.0), (7, 1.5)])
def test_qwen3_step_times_equal_the_processor(num_frames, fps):
    from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
    expected = Qwen3VLProcessor._calculate_timestamps(None, list(range(num_frames)), fps, 2)
    assert step_times([i / fps for i in range(num_frames)], 2) == pytest.approx(expected, abs=1e-12)
    assert timestamp_text(0.25) == "<0.2 seconds>" and timestamp_text(12.75) == "<12.8 seconds>"


@pytest.mark.parametrize("frames,height,width,low,high", [(3, 40, 50, 2048, 12288), (8, 480, 640, 4096, 65536),
                                                          (2, 20, 300, 1024, 40000), (5, 700, 90, 128, 10 ** 7)])
def test_qwen3_video_resize_equals_the_processor(frames, height, width, low, high):
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize
    assert smart_resize_video(frames, height, width, 32, 2, low, high) == smart_resize(
        frames, height, width, 2, 32, low, high)


def test_qwen3_video_patches_equal_the_processors_patchify():
    """Resizing needs torchvision (not installed): the processor's patchify runs on our normalised frames."""
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor
    frames = [open_image(encoded(70, 45, seed=s), "frame") for s in range(3)]
    patches, grid = video_patches(frames, rules(), whole_video_bounds=True)
    height, width = smart_resize_video(3, 45, 70, 32, 2, rules().min_pixels, rules().max_pixels)
    stack = torch.from_numpy(np.stack([normalized(f, height, width, rules()) for f in frames]))[None]
    expected, *expected_grid = Qwen3VLVideoProcessor.patchify(None, stack, 16, 2, 2)
    assert grid == expected_grid
    np.testing.assert_array_equal(patches, expected[0].numpy())


def merging_tokenizer():
    """A byte-level BPE whose one merge is ' <', so that text before a video's first timestamp matters."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["Ġ<"] = 256
    specials = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
    vocab.update({token: 257 + i for i, token in enumerate(specials)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[("Ġ", "<")]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=specials)


def test_qwen3_video_is_written_as_the_processor_writes_it():
    tokenizer = merging_tokenizer()
    start, end, _, video = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                                                            "<|video_pad|>"])
    model = msgspec.structs.replace(vision("qwen3_vl"), video_token_id=video, vision_start_token_id=start,
                                    vision_end_token_id=end)
    frames = [encoded(70, 45, seed=s) for s in range(5)]
    ids = tokenizer.encode("watch <|vision_start|><|video_pad|><|vision_end|> then <|vision_start|><|video_pad|>"
                           "<|vision_end|>")
    media = [MediaInput(modality="video", frames=frames, fps=2.0), MediaInput(modality="video", frames=frames[:2])]
    out = prepare(request(ids, media), model, 4096, TextCodec.of(tokenizer))
    steps = [(item.timestamps_s, item.grid_thw, item.length) for item in out.mm_items]
    assert steps == [([0.25], [1, 2, 4], 2), ([1.25], [1, 2, 4], 2), ([2.0], [1, 2, 4], 2),
                     ([0.25], [1, 2, 4], 2)]

    def written(times):  # Qwen3VLProcessor.replace_video_token's text, the wrapper collapsed
        return "".join(f"<{t:.1f} seconds><|vision_start|>" + "<|video_pad|>" * 2 + "<|vision_end|>" for t in times)
    expected = tokenizer.encode(f"watch {written([0.25, 1.25, 2.0])} then {written([0.25])}")
    assert out.input_ids == expected and expected.count(256) == 2  # ' <' merged across the text boundary
    assert [out.input_ids[i.offset - 1] for i in out.mm_items] == [start] * 4
    whole = torch.from_numpy(np.concatenate([np.frombuffer(i.pixel_values.data, dtype=np.float32)
                                             for i in out.mm_items[:3]]))
    video_patches_whole, _ = video_patches([open_image(f, "f") for f in frames], rules(), whole_video_bounds=True)
    np.testing.assert_array_equal(whole.numpy(), video_patches_whole.ravel())
    model_rope = hf_rope_model("qwen3_vl")
    input_ids = torch.tensor([out.input_ids])
    positions, delta = model_rope.get_rope_index(input_ids, mm_token_type_ids=(input_ids == video).int() * 2,
                                                 video_grid_thw=torch.tensor([[3, 2, 4], [1, 2, 4]]))
    assert out.mrope_positions == positions[:, 0].tolist() and out.mrope_position_delta == int(delta[0, 0])


def test_qwen3_video_without_the_tokenizer_is_an_internal_error():
    with pytest.raises(ValueError, match="tokenizer"):
        prepare(request([5, START, VIDEO, END], [MediaInput(modality="video", frames=[encoded(40, 40)] * 2)]),
                vision("qwen3_vl"), 4096)


def mp4(num_frames: int, fps: int, width: int = 64, height: int = 48) -> bytes:
    import av
    buffer = io.BytesIO()
    with av.open(buffer, mode="w", format="mp4") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((height, width, 3), 30 * i, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())
    return buffer.getvalue()


def test_qwen3_video_file_steps_take_the_decoded_frames_times():
    pytest.importorskip("av", reason="video files need PyAV, the optional 'video' extra")
    tokenizer = merging_tokenizer()
    start, end, video = tokenizer.convert_tokens_to_ids(["<|vision_start|>", "<|vision_end|>", "<|video_pad|>"])
    model = msgspec.structs.replace(vision("qwen3_vl"), video_token_id=video, vision_start_token_id=start,
                                    vision_end_token_id=end)
    ids = tokenizer.encode("<|vision_start|><|video_pad|><|vision_end|>")
    # 6 frames at 4 fps sampled at the processor's 2 fps: frames 0, 2, 4 at 0.0 s, 0.5 s, 1.0 s
    out = prepare(request(ids, [MediaInput(modality="video", data=mp4(6, 4))]), model, 4096,
                  TextCodec.of(tokenizer))
    assert [item.timestamps_s for item in out.mm_items] == [[0.25], [1.0]]
    assert tokenizer.decode(out.input_ids).startswith("<0.2 seconds><|vision_start|><|video_pad|>")
