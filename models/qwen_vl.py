"""Vision-language models: Qwen2.5-VL, Qwen3-VL and Qwen3-VL-MoE.

Each is its language model (Qwen2, Qwen3, Qwen3-MoE: ``models/llama.py``,
``models/qwen_moe.py``) plus a vision tower (``models/vision.py``), with two
changes on the language side:

* **Image embeddings in place of pad tokens.** The prompt holds one
  ``<|image_pad|>`` / ``<|video_pad|>`` token per merged vision token. The
  caller encodes each image once (``encode``) and hands ``forward`` the
  embeddings of the pad tokens that fall in this batch (a prefill chunk may
  hold only part of an image) as ``MultimodalEmbeds``: the batch rows and
  their embeddings, which overwrite the token embeddings of those rows.
  Qwen3-VL's deepstack tensors (same rows) are added to the hidden states
  after decoder layer i, one per deepstack layer.
* **M-RoPE.** A token has three positions (time, height, width): text
  tokens the same number thrice, vision tokens their frame/row/column offset
  by the text before them. ``positions`` is then ``[3, T]``; rotary pair i
  takes its angle from one section's position (contiguous sections for
  Qwen2.5-VL, interleaved for Qwen3-VL; ``triton_kernels/rotary.py``).
  ``mrope_cos_sin`` gathers each token's cos/sin row once per forward, and
  every layer's fused ``qk_norm_rope_store`` rotates with those rows. A
  ``[T]`` ``positions`` (text-only prompts, and decode at ``seq_len +
  mrope_position_delta``) takes the plain table: equal sections give the plain
  row, so decode is the text path unchanged (CUDA graphs included).

Checkpoint names: Qwen2.5-VL files hold ``model.layers.*``, ``visual.*`` and
``lm_head``; Qwen3-VL files ``model.language_model.*``, ``model.visual.*`` and
``lm_head``. Vision towers are replicated; tensor parallelism is not served
for these models yet.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from models.batch import AttentionMetadata, KVCache
from models.config import ModelConfig
from models.errors import ModelConfigError
from models.layers import Attention
from models.llama import LlamaForCausalLM
from models.parallel import TPGroup
from models.qwen_moe import Qwen3MoeForCausalLM
from models.vision import VisionConfig, VisionOutput, VisionTower
from models.weights import Shard
from triton_kernels import KernelOps


@dataclasses.dataclass(frozen=True)
class MultimodalEmbeds:
    """Vision embeddings for one forward batch (process-local, built by the forward stage)."""

    rows: torch.Tensor                         # [n] int64: batch token rows (pad tokens)
    embeds: torch.Tensor                       # [n, H]
    deepstack: tuple[torch.Tensor, ...] = ()   # Qwen3-VL: each [n, H], added after layer i


class RopeRows:
    """What each attention layer rotates with: ``rows[T]`` into ``table``."""

    def __init__(self, rows: torch.Tensor, table: torch.Tensor) -> None:
        self.rows, self.table = rows, table


class MRopeAttention(Attention):
    """The decoder's attention, rotating with per-token rows (``RopeRows``) instead of
    positions into the shared cache; everything else as ``Attention``."""

    def forward(self, rope: RopeRows, x: torch.Tensor, attn_meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
        return super().forward(rope.rows, x, attn_meta, k_cache, v_cache, cos_sin_table=rope.table)


class VisionLanguageMixin:
    """Adds ``visual``, M-RoPE attention and the multimodal forward to a decoder LM class."""

    VISION_KIND = "qwen2_5"
    NESTED_NAMES = False        # Qwen3-VL checkpoints nest the LM under model.language_model

    def __init__(self, config: ModelConfig, ops: KernelOps, dtype: torch.dtype,
                 device: torch.device | str, tp: TPGroup = TPGroup()) -> None:
        mm = config.multimodal
        if not mm or not mm.get("vision_config"):
            raise ModelConfigError(f"{config.architecture}: config.json has no vision_config")
        if tp.size > 1:
            raise ModelConfigError(f"{config.architecture}: tensor parallelism is not supported "
                                   f"for vision-language models yet (tp size {tp.size})")
        super().__init__(config, ops, dtype, device, tp)
        self.mrope_section = tuple(int(s) for s in mm.get("mrope_section") or ())
        self.mrope_interleaved = bool(mm.get("mrope_interleaved", False))
        if 2 * sum(self.mrope_section) != config.rotary_dim:
            raise ModelConfigError(f"{config.architecture}: mrope_section {self.mrope_section} must "
                                   f"sum to rotary_dim / 2 = {config.rotary_dim // 2}")
        self.image_token_id = mm.get("image_token_id")
        self.video_token_id = mm.get("video_token_id")
        for i, layer in enumerate(self.model.layers):
            layer.self_attn = MRopeAttention(ops, config, i, self.cos_sin_cache, dtype, device, tp)
        self.vision_config = VisionConfig.from_dict(self.VISION_KIND, mm["vision_config"])
        self.visual = VisionTower(ops, self.vision_config, dtype, device)

    def encode(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> VisionOutput:
        """Pixel patches of one or more images/videos -> their LM-width embeddings, in order
        (``t * h * w / merge^2`` tokens each)."""
        return self.visual(pixel_values, grid_thw)

    def rope_rows(self, positions: torch.Tensor) -> RopeRows:
        """[T] positions: the shared table; [3, T] M-RoPE positions: rows gathered once."""
        if positions.dim() == 1:
            return RopeRows(positions, self.cos_sin_cache)
        table = self.ops.mrope_cos_sin(positions.contiguous(), self.cos_sin_cache,
                                       self.mrope_section, self.mrope_interleaved)
        return RopeRows(torch.arange(positions.shape[1]).to(positions.device), table)   # built on the host

    def checkpoint_layout(self) -> dict[str, Shard]:
        layout = super().checkpoint_layout()
        if not self.NESTED_NAMES:
            return layout
        def rename(name: str) -> str:
            if name.startswith("visual."):
                return "model." + name
            if name.startswith("model."):
                return "model.language_model." + name[len("model."):]
            return name
        return {rename(name): shard for name, shard in layout.items()}

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_meta: AttentionMetadata, kv_cache: KVCache,
                mm: MultimodalEmbeds | Sequence[MultimodalEmbeds] | None = None) -> torch.Tensor:
        """input_ids[T], positions[T] or [3, T], optional vision embeddings of pad rows (one
        ``MultimodalEmbeds`` or one per image slice: each is scattered where it is, no copy
        joins them) -> fp32 logits at attn_meta.logits_indices."""
        lm = self.model
        pieces = (mm,) if isinstance(mm, MultimodalEmbeds) else tuple(mm or ())
        hidden = self.ops.embedding(input_ids, lm.embed_tokens.weight, lm.vocab_start)   # [T, H]
        for piece in pieces:
            self.ops.scatter_rows(hidden, piece.rows, piece.embeds)
        rope = self.rope_rows(positions)
        residual = None
        for i, layer in enumerate(lm.layers):
            hidden, residual = layer(rope, hidden, residual, attn_meta, kv_cache.k[i], kv_cache.v[i])
            for piece in pieces:   # the layer's output is hidden + residual
                if i < len(piece.deepstack):
                    self.ops.scatter_rows(residual, piece.rows, piece.deepstack[i], True)
        hidden = lm.norm(hidden, residual)
        last = self.ops.embedding(attn_meta.logits_indices, hidden)                       # [B, H]
        return self.ops.linear(last, self.lm_head.weight, None, torch.float32)


class Qwen2_5_VLForConditionalGeneration(VisionLanguageMixin, LlamaForCausalLM):
    """Qwen2.5-VL: the Qwen2 decoder (q/k/v biases), contiguous M-RoPE sections, a windowed
    RMSNorm/SwiGLU vision tower."""


class Qwen3VLForConditionalGeneration(VisionLanguageMixin, LlamaForCausalLM):
    """Qwen3-VL: the Qwen3 decoder (q/k norm), interleaved M-RoPE, a LayerNorm/GELU vision
    tower with a learned position table and deepstack features."""

    VISION_KIND = "qwen3"
    NESTED_NAMES = True


class Qwen3VLMoeForConditionalGeneration(VisionLanguageMixin, Qwen3MoeForCausalLM):
    """Qwen3-VL-MoE: Qwen3-VL with the Qwen3-MoE decoder."""

    VISION_KIND = "qwen3"
    NESTED_NAMES = True
