"""The bundled Qwen2.5-VL-7B-Instruct config.json (the published flat layout: text fields at the
top level, beside vision_config) and its preprocessor_config.json, as the loader and the
multimodal stage read them: the dummy-weight benchmarks rely on these files alone."""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

from models.config import parse_config

CONFIGS = Path(__file__).resolve().parent / "configs"
NAME = "Qwen2.5-VL-7B-Instruct"


def test_flat_qwen2_5_vl_config_is_multimodal():
    config = parse_config(json.loads((CONFIGS / f"{NAME}.json").read_text()))
    assert config.architecture == "Qwen2_5_VLForConditionalGeneration"
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads) == (3584, 28, 4)
    assert config.qkv_bias and config.rope_theta == 1000000.0
    mm = config.multimodal
    assert mm is not None and mm["image_token_id"] == 151655 and mm["video_token_id"] == 151656
    assert mm["mrope_section"] == [16, 24, 24] and not mm["mrope_interleaved"]
    assert 2 * sum(mm["mrope_section"]) == config.rotary_dim
    vision = mm["vision_config"]
    assert (vision["depth"], vision["hidden_size"], vision["window_size"]) == (32, 1280, 112)
    assert vision["fullatt_block_indexes"] == [7, 15, 23, 31]


def test_preprocessor_config_gives_qwen_grid_for_1024x768(tmp_path):
    from PIL import Image

    from pipeline.messages import MediaInput
    from stages.multimodal.prepare import decode, load_vision_model

    shutil.copyfile(CONFIGS / f"{NAME}.json", tmp_path / "config.json")
    shutil.copyfile(CONFIGS / f"{NAME}.preprocessor_config.json", tmp_path / "preprocessor_config.json")
    vision = load_vision_model(tmp_path)
    assert vision is not None
    assert (vision.rules.min_pixels, vision.rules.max_pixels) == (3136, 12845056)
    buffer = io.BytesIO()
    Image.new("RGB", (1024, 768), (10, 200, 30)).save(buffer, format="PNG")
    decoded = decode(MediaInput(modality="image", data=buffer.getvalue()), vision, "picture")
    # smart resize to multiples of 28: 1024 -> 1036, 768 -> 756; patches of 14 px
    assert decoded.grid_thw == [1, 54, 74]
    assert decoded.patches.shape == (54 * 74, 3 * 2 * 14 * 14)
    assert vision.rules.tokens_for(decoded.grid_thw) == 999
