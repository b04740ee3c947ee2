"""Qwen-VL through the Engine (CPU, reference kernels): greedy tokens equal transformers' generate.

Tiny random Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE checkpoints (tests/engine/vl_checkpoint.py).
Cases: one image, two images of odd sizes in one prompt, a video sent as frames (Qwen3-VL
writes a timestamp before each temporal step), and a prompt without images; each with the radix cache
on and off and with prefill chunks of 16 tokens, which cut through the images. Then the
caches: the same image twice shares its cached prefix and is encoded once; a different image
of the same size shares nothing past the text before it.
"""
from __future__ import annotations

import pytest

from pipeline.engine import Engine
from tests.engine.vl_checkpoint import build, picture, reference_tokens

NEW = 6
GREEDY = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"


def chat(content: str) -> str:
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


CASES = {
    "one_image": (chat(f"look {IMAGE} what?"), [(61, 45, 1)], []),
    "two_images": (chat(f"{IMAGE} and {IMAGE} differ?"), [(90, 37, 2), (33, 71, 3)], []),
    "video": (chat(f"watch {VIDEO} now"), [], [[(50, 40, 4), (50, 40, 5), (50, 40, 6)]]),
    "text_only": (chat("no picture here, just words"), [], []),
    # 5 frames: Qwen3-VL writes three steps, '<0.2 seconds>', '<1.2 seconds>', '<2.0 seconds>'
    "longer_video": (chat(f"{IMAGE} then {VIDEO} end"), [(40, 40, 9)], [[(64, 48, seed) for seed in range(20, 25)]]),
}


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return request.param, path, build(request.param, path)


def _media(case: str) -> tuple[str, list[bytes], list[list[bytes]]]:
    prompt, images, videos = CASES[case]
    return (prompt, [picture(*spec) for spec in images],
            [[picture(*frame) for frame in video] for video in videos])


def _engine(path, **kwargs) -> Engine:
    return Engine(str(path), max_total_tokens=2048, kernel_backend="reference", device="cpu", **kwargs)


def _generate(engine: Engine, prompt: str, images, videos) -> list[int]:
    return engine.generate(prompt, dict(GREEDY), image_data=images or None,
                           video_data=videos or None)["output_ids"]


@pytest.mark.parametrize("engine_args", [{}, {"disable_radix_cache": True},
                                         {"chunked_prefill_size": 16}], ids=["radix", "no_radix", "chunk16"])
def test_greedy_tokens_equal_transformers(checkpoint, engine_args):
    kind, path, hf = checkpoint
    with _engine(path, **engine_args) as engine:
        for case in CASES:
            prompt, images, videos = _media(case)
            expected = reference_tokens(hf, path, prompt, images, videos, NEW)
            assert _generate(engine, prompt, images, videos) == expected, case
            # the same request again: a radix-cache hit (when on) and an mm-cache hit
            assert _generate(engine, prompt, images, videos) == expected, case
        engine.check_integrity()


def _forward_stats(engine: Engine):
    return engine.stages["forward"].runner.multimodal.stats


@pytest.mark.parametrize("checkpoint", ["qwen2_5_vl"], indirect=True)  # the caches do not depend on it
def test_same_image_shares_its_prefix_and_is_encoded_once(checkpoint):
    _, path, _ = checkpoint
    prompt = chat(f"a long enough text before the picture, so whole pages fill {IMAGE} what is it?")
    first, other = picture(61, 45, 7), picture(61, 45, 8)  # same size: same token ids, other pixels
    with _engine(path, page_size=1) as engine:
        stats = _forward_stats(engine)
        engine.generate(prompt, dict(GREEDY), image_data=first)
        assert (stats.images_encoded, stats.cache_hits) == (1, 0)
        again = engine.generate(prompt, dict(GREEDY), image_data=first)
        prompt_len = again["meta_info"]["prompt_tokens"]
        assert again["meta_info"]["cached_tokens"] == prompt_len - 1  # all but the last token
        assert stats.images_encoded == 1  # the whole image came from the radix cache
        changed = engine.generate(prompt, dict(GREEDY), image_data=other)
        from transformers import AutoTokenizer
        text_before = len(AutoTokenizer.from_pretrained(str(path)).encode(prompt.split("<|image_pad|>")[0]))
        assert changed["meta_info"]["cached_tokens"] <= text_before
        assert stats.images_encoded == 2
        engine.check_integrity()
    with _engine(path, disable_radix_cache=True) as engine:
        stats = _forward_stats(engine)
        for _ in range(2):
            engine.generate(prompt, dict(GREEDY), image_data=first)
        assert (stats.images_encoded, stats.cache_lookups, stats.cache_hits) == (1, 2, 1)
