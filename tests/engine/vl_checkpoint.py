"""Tiny random Qwen-VL checkpoints as model directories (shared by the engine and server VL tests).

Each directory holds what a real one does: config.json and safetensors written
by transformers' own class, a byte-level BPE tokenizer whose special tokens are
Qwen's (``<|im_start|>``, ``<|vision_start|>``, ``<|image_pad|>``, ...), a chat
template that renders image and video parts into their placeholders, a
preprocessor_config.json and a generation_config.json. ``reference`` gives the
transformers model (fp32, eager) and the inputs of its ``generate`` for a prompt
and its media, using the multimodal stage's own preprocessing (equal to Hugging
Face's processor, tested in tests/stages/test_multimodal.py).
"""
from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import torch

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = range(256, 262)
VOCAB = 320
TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'video' %}"
            "<|vision_start|><|video_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, max_position_embeddings=2048)
VISION = dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
              spatial_merge_size=2, temporal_patch_size=2)
TOKEN_IDS = dict(image_token_id=IMAGE_PAD, video_token_id=VIDEO_PAD, vision_start_token_id=VISION_START,
                 vision_end_token_id=VISION_END, bos_token_id=IM_START, eos_token_id=IM_END, pad_token_id=IM_END)


def _hf_model(kind: str):
    import transformers as tf
    rope = dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])
    if kind == "qwen2_5_vl":
        vision = dict(VISION, patch_size=14, window_size=56, fullatt_block_indexes=[1], tokens_per_second=2)
        return tf.Qwen2_5_VLForConditionalGeneration(
            tf.Qwen2_5_VLConfig(text_config=dict(TEXT, rope_parameters=rope), vision_config=vision, **TOKEN_IDS))
    text = dict(TEXT, rope_parameters=dict(rope, mrope_interleaved=True))
    vision = dict(VISION, patch_size=16, num_position_embeddings=36, deepstack_visual_indexes=[0, 1])
    if kind == "qwen3_vl":
        return tf.Qwen3VLForConditionalGeneration(
            tf.Qwen3VLConfig(text_config=text, vision_config=vision, **TOKEN_IDS))
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    return tf.Qwen3VLMoeForConditionalGeneration(tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision,
                                                                     **TOKEN_IDS))


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab.update({token: 256 + i for i, token in enumerate(SPECIALS)})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|im_end|>",
                                        additional_special_tokens=SPECIALS)
    tokenizer.chat_template = TEMPLATE
    assert tokenizer.convert_tokens_to_ids("<|image_pad|>") == IMAGE_PAD
    return tokenizer


def build(kind: str, path: Path, seed: int = 0):
    """Write the tiny ``kind`` checkpoint (qwen2_5_vl, qwen3_vl, qwen3_vl_moe) into ``path``; return the
    transformers model (fp32, eager, EOS off so that greedy runs go to max_new_tokens)."""
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    hf = _hf_model(kind)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            p.copy_(1.0 + 0.1 * noise if name.endswith("weight") and p.dim() == 1 else 0.08 * noise)
    hf.save_pretrained(str(path), safe_serialization=True)
    GenerationConfig(bos_token_id=IM_START, eos_token_id=IM_END, pad_token_id=IM_END).save_pretrained(str(path))
    _tokenizer().save_pretrained(str(path))
    patch = 14 if kind == "qwen2_5_vl" else 16
    factor = patch * 2
    (path / "preprocessor_config.json").write_text(json.dumps(dict(
        min_pixels=factor * factor * 2, max_pixels=factor * factor * 12, patch_size=patch, merge_size=2,
        temporal_patch_size=2, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])))
    hf.config._attn_implementation = "eager"
    hf.generation_config.eos_token_id = None
    return hf.eval()


def picture(width: int, height: int, seed: int) -> bytes:
    """A random PNG."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def reference_tokens(hf, path: Path, prompt: str, images: list[bytes], videos: list[list[bytes]],
                     max_new_tokens: int) -> list[int]:
    """transformers' greedy tokens for ``prompt`` (placeholders as the template writes them) and media.

    A Qwen3-VL video reaches transformers whole (one ``[t, h, w]`` grid, its patches as the
    multimodal stage decoded them), not as the per-step items the stage sends the engine.
    """
    from pipeline.messages import MediaInput, SamplingParams, TokenizedRequest
    from stages.multimodal.prepare import TextCodec, decode, load_vision_model, prepare

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    media = ([MediaInput(modality="image", data=d) for d in images]
             + [MediaInput(modality="video", frames=f) for f in videos])
    request = TokenizedRequest(rid="r", parent_rid="r", input_ids=tokenizer.encode(prompt),
                               sampling=SamplingParams(), media=media)
    vision = load_vision_model(path)
    prepared = prepare(request, vision, 4096, TextCodec.of(tokenizer))
    kwargs: dict = {}
    for modality, name, grid in (("image", "pixel_values", "image_grid_thw"),
                                 ("video", "pixel_values_videos", "video_grid_thw")):
        items = [item for item in prepared.mm_items if item.modality == modality]
        if modality == "video" and vision.splits_video_frames and videos:
            whole = [decode(m, vision, "video") for m in media if m.modality == "video"]
            kwargs[name] = torch.cat([torch.from_numpy(d.patches) for d in whole])
            kwargs[grid] = torch.tensor([d.grid_thw for d in whole])
        elif items:
            kwargs[name] = torch.cat([torch.frombuffer(bytearray(i.pixel_values.data), dtype=torch.float32)
                                      .view(*i.pixel_values.shape) for i in items])
            kwargs[grid] = torch.tensor([i.grid_thw for i in items])
            if modality == "video" and "qwen2_5" in type(hf).__name__.lower():
                kwargs["second_per_grid_ts"] = torch.tensor([i.second_per_grid_t for i in items])
    ids = torch.tensor([prepared.input_ids])
    # without mm_token_type_ids (text 0, image 1, video 2) transformers falls back to text positions
    kwargs["mm_token_type_ids"] = (ids == IMAGE_PAD).int() + 2 * (ids == VIDEO_PAD).int()
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                          max_new_tokens=max_new_tokens, **kwargs)
    return out[0, ids.shape[1]:].tolist()
