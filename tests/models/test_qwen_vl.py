"""Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE (models/qwen_vl.py, models/vision.py) vs transformers.

Tiny random checkpoints are built here with transformers' own classes and saved
as safetensors. Inputs are processor-free: random pixel patches of the shape the
processor would give for each grid, and hand-built input_ids with one pad token
per merged vision token. Checked, fp32 on CPU (reference kernels):

* the vision tower's embeddings (and Qwen3-VL's deepstack features) equal HF's;
* the logits of every prompt position, with M-RoPE positions from HF's
  ``get_rope_index``, equal HF's forward; then one decode step at
  ``seq_len + mrope_position_delta`` equals HF on the prompt plus that token;
* a prefill split inside an image's pad tokens (embeddings sliced per chunk)
  gives the same logits as one chunk.

Cases: one image; two images of odd sizes; a video of two temporal patches
(Qwen3-VL: frames separated by text, as its timestamps are).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

import models
from models.batch import KVCache, build_metadata_reference
from models.qwen_vl import MultimodalEmbeds
from triton_kernels import load_ops

IMAGE, VIDEO, START, END = 500, 501, 502, 503
TEXT = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6)
VISION = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=64,
              spatial_merge_size=2, temporal_patch_size=2)
TOKEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=START,
                 vision_end_token_id=END)


def _build(kind: str):
    import transformers as tf
    if kind == "qwen2_5_vl":
        text = dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                               mrope_section=[2, 3, 3]))
        vision = dict(VISION, patch_size=14, window_size=56, fullatt_block_indexes=[1])
        return tf.Qwen2_5_VLForConditionalGeneration(
            tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **TOKEN_IDS))
    text = dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                           mrope_section=[2, 3, 3], mrope_interleaved=True))
    vision = dict(VISION, patch_size=16, num_position_embeddings=36, deepstack_visual_indexes=[0, 2])
    if kind == "qwen3_vl":
        return tf.Qwen3VLForConditionalGeneration(
            tf.Qwen3VLConfig(text_config=text, vision_config=vision, **TOKEN_IDS))
    text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24)
    return tf.Qwen3VLMoeForConditionalGeneration(
        tf.Qwen3VLMoeConfig(text_config=text, vision_config=vision, **TOKEN_IDS))


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Random weights (biases and norms too, so a missing one shows in the outputs)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("weight") and p.dim() == 1:        # norms: around 1
                p.copy_(1.0 + 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe"])
def checkpoint(request, tmp_path_factory):
    """(directory, HF model in fp32 eager) of one tiny VL architecture."""
    kind = request.param
    hf = _build(kind)
    _randomise(hf, seed=len(kind))
    directory = tmp_path_factory.mktemp(kind)
    hf.save_pretrained(directory)
    hf.config._attn_implementation = "eager"
    return kind, directory, hf.eval()


@dataclasses.dataclass
class Prompt:
    input_ids: torch.Tensor             # [L]
    token_types: torch.Tensor           # [L] 0 text, 1 image, 2 video
    pixels: torch.Tensor                # [patches, C*Tp*P*P]
    grids: list[tuple[int, int, int]]
    video: bool


def _prompt(hf, grids: list[tuple[int, int, int]], video: bool, seed: int) -> Prompt:
    """Text, then for each grid <start> pads <end> text (a video of t frames in Qwen3-VL:
    one <start> pads <end> group per frame, text between, as its timestamps are)."""
    gen = torch.Generator().manual_seed(seed)
    vc = hf.config.vision_config
    per_frame_split = video and "Qwen3" in type(hf).__name__
    ids: list[int] = torch.randint(0, 400, (5,), generator=gen).tolist()
    pad = VIDEO if video else IMAGE
    for t, h, w in grids:
        groups = [(1, h, w)] * t if per_frame_split else [(t, h, w)]
        for gt, gh, gw in groups:
            ids += [START] + [pad] * (gt * gh * gw // vc.spatial_merge_size ** 2) + [END]
            ids += torch.randint(0, 400, (3,), generator=gen).tolist()
    input_ids = torch.tensor(ids)
    types = torch.where(input_ids == pad, 2 if video else 1, 0)
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    patches = sum(t * h * w for t, h, w in grids)
    return Prompt(input_ids, types, torch.randn(patches, patch, generator=gen), grids, video)


def _hf_inputs(p: Prompt) -> dict:
    grid = torch.tensor(p.grids)
    key = ("pixel_values_videos", "video_grid_thw") if p.video else ("pixel_values", "image_grid_thw")
    return {key[0]: p.pixels, key[1]: grid, "input_ids": p.input_ids[None],
            "mm_token_type_ids": p.token_types[None]}


def _hf_positions(hf, p: Prompt) -> tuple[torch.Tensor, int]:
    grid = torch.tensor(p.grids)
    kwargs = {"video_grid_thw" if p.video else "image_grid_thw": grid}
    positions, delta = hf.model.get_rope_index(p.input_ids[None], p.token_types[None], **kwargs)
    return positions[:, 0], int(delta.item())


class OneRequest:
    """Our model on one request through a paged KV cache (extend chunks, then decode)."""

    def __init__(self, model, max_len: int) -> None:
        self.model, self.done = model, 0
        self.req_to_token = (torch.randperm(max_len) + 1).to(torch.int32)[None]
        self.kv = KVCache.allocate(model.num_layers, max_len + 1, model.num_kv_heads, model.head_dim,
                                   model.dtype, "cpu")

    def extend(self, ids: torch.Tensor, positions: torch.Tensor, mm: MultimodalEmbeds | None):
        n = ids.shape[0]
        slots = self.req_to_token[0, self.done:self.done + n].tolist()
        meta = build_metadata_reference("extend", self.req_to_token, [0], [self.done], [n], slots, "cpu")
        meta = dataclasses.replace(meta, logits_indices=torch.arange(n))
        self.done += n
        return self.model.forward(ids, positions, meta, self.kv, mm)

    def decode(self, token: int, position: int):
        slot = self.req_to_token[0, self.done:self.done + 1].tolist()
        meta = build_metadata_reference("decode", self.req_to_token, [0], [self.done], [1], slot, "cpu")
        self.done += 1
        return self.model.forward(torch.tensor([token]), torch.tensor([position]), meta, self.kv)


def _mm_for_rows(p: Prompt, encoded, start: int, end: int) -> MultimodalEmbeds | None:
    """The vision embeddings of the pad tokens in [start, end), rows relative to start."""
    pads = torch.nonzero(p.token_types > 0).flatten()
    keep = (pads >= start) & (pads < end)
    if not keep.any():
        return None
    return MultimodalEmbeds(rows=pads[keep] - start, embeds=encoded.embeds[keep],
                            deepstack=tuple(d[keep] for d in encoded.deepstack))


def _hf_vision(hf, p: Prompt):
    grid = torch.tensor(p.grids)
    get = hf.model.get_video_features if p.video else hf.model.get_image_features
    out = get(p.pixels, grid, return_dict=True)
    deepstack = [torch.cat(d) for d in getattr(out, "deepstack_features", None) or []]
    return torch.cat(out.pooler_output), deepstack


CASES = {"one_image": ([(1, 6, 8)], False), "two_odd_images": ([(1, 10, 6), (1, 4, 14)], False),
         "video_t2": ([(2, 6, 4)], True)}


@pytest.mark.parametrize("case", list(CASES))
def test_vision_features_and_logits_match_transformers(checkpoint, case):
    kind, directory, hf = checkpoint
    grids, video = CASES[case]
    p = _prompt(hf, grids, video, seed=len(case))
    model, config = models.load_model(directory, load_ops("reference"), torch.float32, "cpu")
    assert config.multimodal is not None
    encoded = model.encode(p.pixels, p.grids)
    with torch.no_grad():
        hf_embeds, hf_deepstack = _hf_vision(hf, p)
        expected = hf(**_hf_inputs(p)).logits[0].float()                    # [L, V]
    torch.testing.assert_close(encoded.embeds, hf_embeds, rtol=1e-4, atol=1e-4)
    assert len(encoded.deepstack) == len(hf_deepstack) == (2 if kind != "qwen2_5_vl" else 0)
    for ours, theirs in zip(encoded.deepstack, hf_deepstack):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    positions, delta = _hf_positions(hf, p)
    L = p.input_ids.shape[0]
    runner = OneRequest(model, L + 4)
    logits = runner.extend(p.input_ids, positions, _mm_for_rows(p, encoded, 0, L))
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() <= 1e-3 * scale
    # one decode step at seq_len + delta == HF on the prompt plus that token
    token = int(logits[-1].argmax())
    step = runner.decode(token, L + delta)
    longer = dict(_hf_inputs(p), input_ids=torch.cat([p.input_ids, torch.tensor([token])])[None],
                  mm_token_type_ids=torch.cat([p.token_types, torch.tensor([0])])[None])
    with torch.no_grad():
        expected_step = hf(**longer).logits[0, -1].float()
    assert (step[0] - expected_step).abs().max().item() <= 1e-3 * expected_step.abs().max().item()


def test_prefill_split_inside_an_image_equals_one_chunk(checkpoint):
    kind, directory, hf = checkpoint
    p = _prompt(hf, [(1, 6, 8)], False, seed=7)
    model, _ = models.load_model(directory, load_ops("reference"), torch.float32, "cpu")
    encoded = model.encode(p.pixels, p.grids)
    positions, _ = _hf_positions(hf, p)
    L = p.input_ids.shape[0]
    whole = OneRequest(model, L).extend(p.input_ids, positions, _mm_for_rows(p, encoded, 0, L))
    cut = int(torch.nonzero(p.token_types).flatten()[5])         # inside the image's pads
    runner = OneRequest(model, L)
    first = runner.extend(p.input_ids[:cut], positions[:, :cut], _mm_for_rows(p, encoded, 0, cut))
    second = runner.extend(p.input_ids[cut:], positions[:, cut:], _mm_for_rows(p, encoded, cut, L))
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-5, atol=1e-5)


def test_text_only_positions_take_the_plain_path(checkpoint):
    """A [T] positions tensor equals the [3, T] one with equal sections (decode, text prompts)."""
    kind, directory, hf = checkpoint
    model, _ = models.load_model(directory, load_ops("reference"), torch.float32, "cpu")
    ids = torch.randint(0, 400, (9,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(9)
    plain = OneRequest(model, 9).extend(ids, pos, None)
    mrope = OneRequest(model, 9).extend(ids, pos.expand(3, -1), None)
    assert torch.equal(plain, mrope)
    with torch.no_grad():
        expected = hf(input_ids=ids[None]).logits[0].float()
    assert (plain - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()


def test_triton_backend_matches_transformers(checkpoint):
    """The Triton kernels (interpreted on CPU) through the whole model: vision_attention,
    mrope_cos_sin and the fused rotary on one image, every prompt logit against HF."""
    kind, directory, hf = checkpoint
    p = _prompt(hf, [(1, 4, 6)], False, seed=3)
    model, _ = models.load_model(directory, load_ops("triton"), torch.float32, "cpu")
    encoded = model.encode(p.pixels, p.grids)
    with torch.no_grad():
        hf_embeds, _ = _hf_vision(hf, p)
        expected = hf(**_hf_inputs(p)).logits[0].float()
    torch.testing.assert_close(encoded.embeds, hf_embeds, rtol=1e-4, atol=1e-4)
    positions, _ = _hf_positions(hf, p)
    L = p.input_ids.shape[0]
    logits = OneRequest(model, L).extend(p.input_ids, positions, _mm_for_rows(p, encoded, 0, L))
    assert (logits - expected).abs().max().item() <= 1e-3 * expected.abs().max().item()
