"""The dense decoder-only transformer: Llama 2/3.x, Mistral, Qwen2 and Qwen3.

One implementation, four Hugging Face class names. What differs between the
families is read into ``ModelConfig`` flags (``models/config.py``), not
copied code:

==========  =====================================================================
family      differences
==========  =====================================================================
llama       optional attention/MLP biases; llama3 rope scaling (3.1+); tied
            embeddings and explicit head_dim (3.2 1B/3B)
mistral     sliding window on every layer when ``sliding_window`` is set
qwen2       q/k/v biases; optional sliding window on layers >= max_window_layers
qwen3       per-head RMSNorm of q and k before RoPE (``head_rms_norm``)
==========  =====================================================================

Forward of one batch (T new tokens of B requests, any mix of prefill chunks,
or B decode tokens)::

    h = embed_tokens[input_ids]                                   [T, H]
    for each layer:  h, residual = layer(h, residual)   (pre-norm, fused add+norm)
    h = norm(h + residual)                                        [T, H]
    logits = lm_head(h[logits_indices]), stored in fp32            [B, vocab]

Only the rows of each request's last new token reach the LM head, plus the
prompt rows a prompt-logprob request asked for (``logits_indices`` then has
``B + P`` entries, and so has the result; see ``stages/forward/inputs.py``).

Tensor parallelism (``tp``, ``models/parallel.py``): every rank runs this
same forward on the same batch. The embedding holds the rank's vocabulary
rows (ids outside them read 0) and is summed by ``all_reduce``; attention and
MLP are split as ``models/layers.py`` says; the LM head holds the same
vocabulary rows (one tensor when tied) and its fp32 logits are gathered, so
every rank returns the full ``[B, vocab]``. ``num_kv_heads`` is the rank's
count: the forward stage sizes each rank's KV pool with it.
The MoE models (``models/qwen_moe.py``) subclass this and replace ``build_mlp``.
"""
from __future__ import annotations

import torch
from torch import nn

from models.batch import AttentionMetadata, KVCache
from models.config import ModelConfig
from models.layers import MLP, Attention, RMSNorm, weight
from models.parallel import TPGroup, head_ranges, vocab_range
from models.weights import Shard, dense_layout
from triton_kernels import KernelOps
from triton_kernels.rotary import build_cos_sin_cache


class DecoderLayer(nn.Module):
    """Pre-norm block: attention and MLP, each behind an RMSNorm fused with the residual add."""

    def __init__(self, ops: KernelOps, config: ModelConfig, layer_idx: int, mlp: nn.Module,
                 cos_sin_cache: torch.Tensor, dtype: torch.dtype,
                 device: torch.device | str, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = RMSNorm(ops, H, eps, dtype, device)
        self.self_attn = Attention(ops, config, layer_idx, cos_sin_cache, dtype, device, tp)
        self.post_attention_layernorm = RMSNorm(ops, H, eps, dtype, device)
        self.mlp = mlp

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor,
                residual: torch.Tensor | None, attn_meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:                    # first layer: the embedding is the residual
            residual = hidden
            hidden = self.input_layernorm(hidden)
        else:                                   # residual += hidden; hidden = norm(residual)
            hidden = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, attn_meta, k_cache, v_cache)
        hidden = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class DecoderModel(nn.Module):
    """Token embedding, the layer stack and the final norm (HF ``model.*``)."""

    def __init__(self, ops: KernelOps, config: ModelConfig, layers: list[DecoderLayer],
                 dtype: torch.dtype, device: torch.device | str, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        self.ops, self.tp = ops, tp
        self.vocab_start, vocab_end, rows = vocab_range(config.vocab_size, tp)
        padded = vocab_end - self.vocab_start < rows       # rows past the vocabulary stay 0
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = weight(rows, config.hidden_size, dtype=dtype, device=device,
                                          zeros=padded)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(ops, config.hidden_size, config.rms_norm_eps, dtype, device)
        # Speculative drafting (EAGLE/EAGLE3, stages/forward/speculative.py): the residual
        # stream entering these layers (len(layers): the normed output) is kept in `captured`,
        # [T, H] each, after every forward. Empty: nothing is kept and nothing is computed.
        self.capture_layers: tuple[int, ...] = ()
        self.captured: list[torch.Tensor] = []

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        hidden = self.ops.embedding(input_ids, self.embed_tokens.weight, self.vocab_start)
        hidden = self.tp.all_reduce(hidden)                 # each token's row from its rank
        residual, captured = None, []
        for i, layer in enumerate(self.layers):
            if i in self.capture_layers:                    # layers update residual in place
                captured.append(hidden.clone() if residual is None else hidden + residual)
            hidden, residual = layer(positions, hidden, residual, attn_meta,
                                     kv_cache.k[i], kv_cache.v[i])
        out = self.norm(hidden, residual)
        if self.capture_layers:
            self.captured = captured + ([out] if len(self.layers) in self.capture_layers else [])
        return out


class LlamaForCausalLM(nn.Module):
    """Decoder + LM head; ``forward`` returns fp32 logits of each request's last token."""

    def __init__(self, config: ModelConfig, ops: KernelOps, dtype: torch.dtype,
                 device: torch.device | str, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        self.config, self.ops, self.dtype, self.tp = config, ops, dtype, tp
        self.device = torch.device(device)
        self.cos_sin_cache = build_rope_cache(config, dtype, self.device)
        layers = [DecoderLayer(ops, config, i, self.build_mlp(i), self.cos_sin_cache, dtype, device,
                               tp)
                  for i in range(config.num_hidden_layers)]
        self.model = DecoderModel(ops, config, layers, dtype, device, tp)
        if config.tie_word_embeddings:
            self.lm_head = nn.Module()
            self.lm_head.weight = self.model.embed_tokens.weight
        else:                                   # the same vocabulary rows as the embedding
            self.lm_head = nn.Module()
            self.lm_head.weight = weight(*self.model.embed_tokens.weight.shape, dtype=dtype,
                                         device=device, zeros=config.vocab_size % tp.size != 0)

    # ---- what the forward stage needs to size the KV pool
    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    @property
    def num_kv_heads(self) -> int:
        """KV heads held by THIS rank (all of them at tp size 1)."""
        c = self.config
        (_, _), (k0, k1) = head_ranges(c.num_attention_heads, c.num_key_value_heads, self.tp)
        return k1 - k0

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def build_mlp(self, layer_idx: int) -> nn.Module:
        """The feed-forward block of one layer (MoE models override this)."""
        c = self.config
        return MLP(self.ops, c.hidden_size, c.intermediate_size, c.mlp_bias, self.dtype, self.device,
                   self.tp, quant=c.quantization)

    def checkpoint_layout(self) -> dict[str, Shard]:
        """Checkpoint tensor name -> where this rank's slice lands in our (fused) parameters."""
        return dense_layout(dict(self.named_parameters()), self.config, self.tp)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                attn_meta: AttentionMetadata, kv_cache: KVCache) -> torch.Tensor:
        """input_ids[T], positions[T] -> logits fp32 at attn_meta.logits_indices ([B, vocab], or
        [B + P, vocab] with P prompt-logprob rows)."""
        hidden = self.model(input_ids, positions, attn_meta, kv_cache)       # [T, H]
        # Gathering rows of `hidden` is an embedding lookup with `hidden` as the table.
        last = self.ops.embedding(attn_meta.logits_indices, hidden)          # [B, H]
        logits = self.ops.linear(last, self.lm_head.weight, None, torch.float32)  # [B, vocab/tp] fp32
        if self.tp.size == 1:
            return logits
        # [B, tp * ceil(vocab/tp)] -> [B, vocab]: drop the padding rows' logits
        return self.tp.all_gather(logits, dim=-1)[:, : self.config.vocab_size].contiguous()


def build_rope_cache(config: ModelConfig, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """cos/sin table [max_position_embeddings, rotary_dim] for the config's rope type.

    Stored in the model dtype, as HF casts cos/sin to the activations' dtype
    before rotating (the kernel then rotates in fp32 and rounds once).
    """
    return build_cos_sin_cache(config.rotary_dim, config.max_position_embeddings,
                               config.rope_theta, config.rope_parameters, dtype, device,
                               original_max_position=config.max_position_embeddings)


class MistralForCausalLM(LlamaForCausalLM):
    """Mistral: Llama plus an optional sliding window (a config flag)."""


class Qwen2ForCausalLM(LlamaForCausalLM):
    """Qwen2 / Qwen2.5: Llama plus q/k/v biases (a config flag)."""


class Qwen3ForCausalLM(LlamaForCausalLM):
    """Qwen3: Llama plus per-head q/k RMSNorm (a config flag)."""
