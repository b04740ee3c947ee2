"""Where each checkpoint tensor lands in the model's fused parameters.

Checkpoints keep Hugging Face's unfused layout: separate ``q_proj``,
``k_proj``, ``v_proj``; separate ``gate_proj`` and ``up_proj``; and, on disk
(also with transformers 5), one 2-D weight per expert
(``mlp.experts.{e}.gate_proj.weight``). Our modules fuse them:

==================================  ========================================
our parameter                       checkpoint tensors (row ranges)
==================================  ========================================
``*.qkv_proj.weight|bias``          q_proj [0, q), k_proj [q, q+kv), v_proj
``*.gate_up_proj.weight|bias``      gate_proj [0, I), up_proj [I, 2I)
``*.experts.w13  [E, 2I, H]``       experts.{e}.gate_proj -> [e, 0:I), up -> [e, I:2I)
``*.experts.w2   [E, H, I]``        experts.{e}.down_proj -> [e]
==================================  ========================================

``checkpoint_layout`` lists every checkpoint name the model expects with its
``Shard`` (parameter, expert index, row range). The loader copies each tensor
into ``param[expert][rows]`` after checking the shape, and reports the names
it never saw. Fused 3-D expert tensors (``experts.gate_up_proj``, the
in-memory transformers 5 form) are accepted as an alternative (``fused_alias``).
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from models.config import ModelConfig


class Shard(NamedTuple):
    """A region of one parameter: ``param[expert][rows]`` (None = all)."""

    param: str
    expert: int | None = None
    rows: slice | None = None

    def view(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        target = params[self.param]
        if self.expert is not None:
            target = target[self.expert]
        if self.rows is not None:
            target = target[self.rows]
        return target


def _halves(name: str, prefix: str, first: str, second: str, param: torch.Tensor,
            expert: int | None = None) -> dict[str, Shard]:
    """Two checkpoint tensors stacked along the output rows of one fused parameter."""
    rows = param.shape[-2] if param.dim() == 3 else param.shape[0]
    half = rows // 2
    suffix = name.rsplit(".", 1)[1] if param.dim() < 3 else "weight"
    return {f"{prefix}.{first}.{suffix}": Shard(name, expert, slice(0, half)),
            f"{prefix}.{second}.{suffix}": Shard(name, expert, slice(half, rows))}


def dense_layout(params: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, Shard]:
    """Checkpoint layout of every parameter, unfusing qkv, gate_up and stacked experts."""
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    layout: dict[str, Shard] = {}
    for name, param in params.items():
        match = re.fullmatch(r"(.*)\.qkv_proj\.(weight|bias)", name)
        if match:
            prefix, suffix = match.groups()
            for piece, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)),
                                ("v", slice(q + kv, q + 2 * kv))):
                layout[f"{prefix}.{piece}_proj.{suffix}"] = Shard(name, None, rows)
            continue
        match = re.fullmatch(r"(.*)\.gate_up_proj\.(weight|bias)", name)
        if match:
            layout.update(_halves(name, match[1], "gate_proj", "up_proj", param))
            continue
        match = re.fullmatch(r"(.*)\.experts\.(w13|w2)", name)
        if match:
            for e in range(param.shape[0]):
                prefix = f"{match[1]}.experts.{e}"
                if match[2] == "w13":
                    layout.update(_halves(name, prefix, "gate_proj", "up_proj", param, e))
                else:
                    layout[f"{prefix}.down_proj.weight"] = Shard(name, e, None)
            continue
        layout[name] = Shard(name)
    return layout


_FUSED_EXPERTS = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)(\.weight)?")


def fused_alias(name: str, params: dict[str, torch.Tensor]) -> tuple[Shard, str] | None:
    """A fused 3-D expert tensor -> (its whole-parameter Shard, regex of the names it covers)."""
    match = _FUSED_EXPERTS.fullmatch(name)
    if not match:
        return None
    prefix, kind = match[1], match[2]
    param = f"{prefix}.w13" if kind == "gate_up_proj" else f"{prefix}.w2"
    if param not in params:
        return None
    pieces = "(gate_proj|up_proj)" if kind == "gate_up_proj" else "down_proj"
    return Shard(param), rf"{re.escape(prefix)}\.\d+\.{pieces}\.weight"


# Names that checkpoints carry but no model needs (buffers saved by old transformers).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq|.*\.attn\.bias|.*\.attn\.masked_bias")
