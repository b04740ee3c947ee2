"""EAGLE and EAGLE3 draft heads: one decoder layer that drafts from the target's features.

Both read Hugging Face-format draft checkpoints (config.json + safetensors)
and run on the target's KV layout (their own one-layer pool). T tokens, H the
head's hidden size, Ht the target's::

    EAGLE   (architectures LlamaForCausalLMEagle / EagleLlamaForCausalLM)
      x      = fc(concat(embed(ids), target_hidden))      fc: [H, 2H] + bias
      h, r   = layers.0(x)          (a Llama layer WITHOUT its input_layernorm)
      hidden = h + r                                        no final norm
      logits = target lm_head(hidden)                       [B, vocab]

    EAGLE3  (architectures LlamaForCausalLMEagle3)
      target_hidden = concat(low, mid, high layer outputs)  [T, 3 Ht], or the
                      head's own previous hidden [T, H] on later draft steps
      x      = fc(target_hidden) if it is [T, 3 Ht]         fc: [H, 3 Ht], no bias
      a      = self_attn(concat(input_layernorm(embed(ids)), hidden_norm(x)))
                                                            qkv over 2H inputs
      r      = x + a;  h = mlp(post_attention_layernorm(r));  r = r + h
      hidden = r (fed to the next draft step);  logits = lm_head(norm(r))
      lm_head: [draft_vocab, H]; draft id d is target id d + d2t[d]

Checkpoint names (``midlayer.*``, ``layers.0.*``, ``fc.*``, ``norm.weight``,
``lm_head.weight``, ``d2t``, ``t2d``) are kept; q/k/v and gate/up are fused
as in ``models/layers.py``. ``embed_tokens`` (and EAGLE's lm_head) usually
live in the target: absent from the checkpoint, they are handed over with
``share_target_weights``. ``t2d`` (a [vocab] bool map) is read but unused.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from models.batch import AttentionMetadata, KVCache
from models.config import ModelConfig, parse_config, read_json
from models.errors import MissingWeightsError, ModelConfigError, UnexpectedWeightsError, WeightShapeError
from models.layers import MLP, Attention, Linear, RMSNorm, make_linear, weight
from models.llama import build_rope_cache
from models.loader import weight_files
from models.weights import Shard, dense_layout
from triton_kernels import KernelOps
from triton_kernels.rotary import build_cos_sin_cache

EAGLE_ARCHITECTURES = {"LlamaForCausalLMEagle": "eagle", "EagleLlamaForCausalLM": "eagle",
                       "LlamaForCausalLMEagle3": "eagle3"}
SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")


@dataclasses.dataclass(frozen=True)
class EagleConfig:
    """The head's layer config (a one-layer Llama) plus what drafting adds."""

    kind: str                      # "eagle" or "eagle3"
    layer: ModelConfig
    draft_vocab_size: int          # EAGLE3's lm_head rows (EAGLE: the target vocabulary)
    target_hidden_size: int


def parse_eagle_config(raw: dict[str, Any], source: str = "config.json") -> EagleConfig:
    """A draft head's config.json -> EagleConfig (the layer read as a Llama config)."""
    architectures = raw.get("architectures") or []
    kind = next((EAGLE_ARCHITECTURES[a] for a in architectures if a in EAGLE_ARCHITECTURES), None)
    if kind is None:
        raise ModelConfigError(f"{source}: architectures {architectures} name no EAGLE head "
                               f"(one of {sorted(EAGLE_ARCHITECTURES)})")
    layer = parse_config({**raw, "architectures": ["LlamaForCausalLM"], "model_type": "llama"},
                         source=source)
    draft_vocab = int(raw.get("draft_vocab_size") or layer.vocab_size) if kind == "eagle3" \
        else layer.vocab_size
    target_hidden = int(raw.get("target_hidden_size") or layer.hidden_size)
    return EagleConfig(kind, layer, draft_vocab, target_hidden)


class EagleHead(nn.Module):
    """EAGLE and EAGLE3 (module docstring); ``forward`` -> (logits, hidden for the next step)."""

    def __init__(self, config: EagleConfig, ops: KernelOps, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        c, H = config.layer, config.layer.hidden_size
        self.config, self.ops, self.dtype, self.device = config, ops, dtype, torch.device(device)
        self.absent: frozenset[str] = frozenset(SHARED_WITH_TARGET)  # load_eagle_head: what the checkpoint lacked
        self.cos_sin_cache = build_rope_cache(c, dtype, self.device)
        self.embed_tokens = nn.Module()
        self.embed_tokens.weight = weight(c.vocab_size, H, dtype=dtype, device=device)
        self.lm_head = nn.Module()
        self.lm_head.weight = weight(config.draft_vocab_size, H, dtype=dtype, device=device)
        if config.kind == "eagle3":
            self.fc = Linear(ops, 3 * config.target_hidden_size, H, False, dtype, device)
            self.midlayer = _DecoderLayer(ops, c, dtype, self.device, self.cos_sin_cache, eagle3=True)
            self.norm = RMSNorm(ops, H, c.rms_norm_eps, dtype, device)
            self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.int64,
                                                    device=device))
            self.register_buffer("t2d", torch.zeros(c.vocab_size, dtype=torch.bool, device=device))
        else:
            self.fc = Linear(ops, 2 * H, H, True, dtype, device)
            self.layers = nn.ModuleList([_DecoderLayer(ops, c, dtype, self.device,
                                                       self.cos_sin_cache, eagle3=False)])

    def cover_positions(self, num_positions: int) -> None:
        """Extend the rotary table to ``num_positions`` rows (published heads state
        ``max_position_embeddings`` 2048, shorter than the contexts their targets serve);
        the table's first rows stay as they were."""
        c = self.config.layer
        if num_positions <= self.cos_sin_cache.shape[0]:
            return
        self.cos_sin_cache = build_cos_sin_cache(c.rotary_dim, num_positions, c.rope_theta, c.rope_parameters,
                                                 self.dtype, self.device,
                                                 original_max_position=c.max_position_embeddings)
        self.layer.self_attn.cos_sin_cache = self.cos_sin_cache

    @property
    def layer(self) -> "_DecoderLayer":
        return self.midlayer if self.config.kind == "eagle3" else self.layers[0]

    def share_target_weights(self, embed_tokens: torch.Tensor | None, lm_head: torch.Tensor | None) -> None:
        """Use the target's embedding (and, EAGLE, its lm_head) in place of absent tensors
        (``None``: keep the head's own; ``absent`` names what the checkpoint lacked)."""
        if embed_tokens is not None:
            self.embed_tokens.weight = nn.Parameter(embed_tokens, requires_grad=False)
        if lm_head is not None and self.config.kind == "eagle":
            self.lm_head.weight = nn.Parameter(lm_head, requires_grad=False)

    def checkpoint_layout(self) -> dict[str, Shard]:
        """Checkpoint name -> Shard (``checkpoint_layout`` below; dummy weights fill these)."""
        return checkpoint_layout(self)

    def draft_to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """EAGLE3 draft-vocabulary ids -> target ids (identity for EAGLE)."""
        if self.config.kind != "eagle3":
            return draft_ids
        return draft_ids + self.d2t[draft_ids]

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, target_hidden: torch.Tensor, positions: torch.Tensor,
                attn_meta: AttentionMetadata, kv_cache: KVCache) -> tuple[torch.Tensor, torch.Tensor]:
        """input_ids[T], target_hidden[T, 2H-side input] -> (fp32 logits at logits_indices
        [B, draft_vocab], hidden [T, H] for the next draft step)."""
        embeds = self.ops.embedding(input_ids, self.embed_tokens.weight)          # [T, H]
        k_cache, v_cache = kv_cache.k[0], kv_cache.v[0]
        if self.config.kind == "eagle3":
            x = target_hidden
            if x.shape[-1] != self.config.layer.hidden_size:                     # [T, 3 Ht]
                x = self.fc(x)
            h, residual = self.midlayer(positions, embeds, x, attn_meta, k_cache, v_cache)
            normed = self.norm(h, residual)                    # residual += h; norm(residual)
            hidden = residual
        else:
            x = self.fc(torch.cat([embeds, target_hidden.to(embeds.dtype)], dim=-1))
            h, residual = self.layers[0](positions, None, x, attn_meta, k_cache, v_cache)
            hidden = normed = h + residual
        last = self.ops.embedding(attn_meta.logits_indices, normed)
        return self.ops.linear(last, self.lm_head.weight, None, torch.float32), hidden


class _DecoderLayer(nn.Module):
    """The head's one layer. EAGLE: a Llama layer with no input_layernorm. EAGLE3:
    attention over concat(input_layernorm(embeds), hidden_norm(hidden)), [T, 2H]."""

    def __init__(self, ops: KernelOps, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device, cos_sin_cache: torch.Tensor, eagle3: bool) -> None:
        super().__init__()
        H, eps = config.hidden_size, config.rms_norm_eps
        self.eagle3 = eagle3
        self.self_attn = Attention(ops, config, 0, cos_sin_cache, dtype, device)
        if eagle3:   # q/k/v read 2H inputs; o_proj still writes H
            a = self.self_attn
            a.qkv_proj = make_linear(ops, 2 * H, a.q_size + 2 * a.kv_size, config.qkv_bias,
                                     dtype, device)
            self.input_layernorm = RMSNorm(ops, H, eps, dtype, device)
            self.hidden_norm = RMSNorm(ops, H, eps, dtype, device)
        self.post_attention_layernorm = RMSNorm(ops, H, eps, dtype, device)
        self.mlp = MLP(ops, H, config.intermediate_size, config.mlp_bias, dtype, device)

    def forward(self, positions: torch.Tensor, embeds: torch.Tensor | None, hidden: torch.Tensor,
                attn_meta: AttentionMetadata, k_cache: torch.Tensor, v_cache: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden
        if self.eagle3:
            hidden = torch.cat([self.input_layernorm(embeds), self.hidden_norm(hidden)], dim=-1)
        hidden = self.self_attn(positions, hidden, attn_meta, k_cache, v_cache)
        hidden = self.post_attention_layernorm(hidden, residual)   # residual += attn
        return self.mlp(hidden), residual


# ----------------------------------------------------------------------------- loading


def checkpoint_layout(head: EagleHead) -> dict[str, Shard]:
    """Checkpoint name -> Shard (q/k/v and gate/up unfused; lm_head whole)."""
    params = dict(head.named_parameters())
    layout = dense_layout(params, head.config.layer)
    layout["lm_head.weight"] = Shard("lm_head.weight", (), (), tuple(params["lm_head.weight"].shape))
    return layout


def load_eagle_head(path: str | Path, ops: KernelOps, dtype: torch.dtype,
                    device: torch.device | str, load_format: str = "auto", seed: int = 0) -> EagleHead:
    """Build the head of ``path/config.json`` and copy its safetensors in (every
    tensor must fit; only embed_tokens and EAGLE's lm_head may be absent).
    ``load_format="dummy"``: random weights of the config's shapes instead (as for the
    target, ``models/loader.init_dummy``; d2t all 0), embed_tokens taken from the target."""
    path = Path(path)
    config = parse_eagle_config(read_json(path / "config.json", f"config.json in {path}"),
                                str(path / "config.json"))
    head = EagleHead(config, ops, dtype, device)
    if load_format == "dummy":
        from models.loader import init_dummy

        init_dummy(head, seed)
        head.absent = frozenset(SHARED_WITH_TARGET)
        return head
    layout, buffers = checkpoint_layout(head), dict(head.named_buffers())
    params, seen = dict(head.named_parameters()), set()
    with torch.no_grad():
        for file in weight_files(path):
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    _copy_tensor(name, f.get_tensor(name), layout, params, buffers, file)
                    seen.add(name)
    optional = set(SHARED_WITH_TARGET) if config.kind == "eagle" else {"embed_tokens.weight"}
    missing = sorted(set(layout) - seen - optional)
    if config.kind == "eagle3":
        missing += [n for n in ("d2t",) if n not in seen]
    if missing:
        raise MissingWeightsError(f"{path}: draft checkpoint lacks {missing}")
    head.absent = frozenset(set(SHARED_WITH_TARGET) - seen)  # to take from the target
    return head


def _copy_tensor(name: str, tensor: torch.Tensor, layout: dict[str, Shard],
                 params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], file: Path) -> None:
    if name in buffers:
        target = buffers[name]
    elif name in layout:
        shard = layout[name]
        if tuple(tensor.shape) != shard.shape:
            raise WeightShapeError(f"{file.name}: {name} has shape {list(tensor.shape)}, the "
                                   f"config implies {list(shard.shape)}")
        target = shard.view(params)
        tensor = tensor[shard.source] if shard.source else tensor
    else:
        raise UnexpectedWeightsError(f"{file.name}: tensor {name} does not belong to this draft head")
    if tuple(tensor.shape) != tuple(target.shape):
        raise WeightShapeError(f"{file.name}: {name} has shape {list(tensor.shape)}, "
                               f"expected {list(target.shape)}")
    target.copy_(tensor)
