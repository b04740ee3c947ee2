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
``Shard`` (region of our parameter, region of the checkpoint tensor, whole
checkpoint shape). The loader checks the shape, copies ``tensor[source]`` into
``param[index]`` and reports the names it never saw. Fused 3-D expert tensors
(``experts.gate_up_proj``, the in-memory transformers 5 form) are accepted as
an alternative (``fused_alias``).

Under tensor parallelism (``models/parallel.py``) each rank's layout names
the same checkpoint tensors, each cut to the rank's slice: q/k/v and
gate/up rows of its heads and intermediate range, o_proj/down_proj columns,
embed_tokens/lm_head vocabulary rows, and only the experts it holds.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import torch

from models.config import ModelConfig
from models.parallel import TPGroup, head_ranges, vocab_range


class Shard(NamedTuple):
    """``param[index] <- checkpoint_tensor[source]``, the checkpoint tensor being ``shape``.

    ``index`` is a region of our (fused, per-rank) parameter and ``source`` the
    region of the checkpoint tensor this rank reads (both as in ``t[index]``;
    ``()`` = all of it). ``shape`` is the whole checkpoint tensor's shape as the
    config implies it, checked against the file's header. With tensor
    parallelism ``source`` is the rank's slice (safetensors ``get_slice`` reads
    only that), and dummy weights draw the whole ``shape`` then keep ``source``.
    With ``broadcast`` the checkpoint tensor holds one value (any shape of one
    element) that fills ``param[index]``.
    """

    param: str
    index: tuple = ()
    source: tuple = ()
    shape: tuple[int, ...] = ()
    broadcast: bool = False     # one value (a per-tensor scale) fills the whole region

    def view(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        return params[self.param][self.index]


def _rows(start: int, end: int) -> tuple[slice]:
    return (slice(start, end),)


def _cols(start: int, end: int) -> tuple[slice, slice]:
    return (slice(None), slice(start, end))


def _halves(name: str, prefix: str, first: str, second: str, param: torch.Tensor, full: int,
            start: int, expert: tuple = ()) -> dict[str, Shard]:
    """Two checkpoint tensors ``[full, *rest]`` whose rows [start, start + local) stack,
    first over second, along the output rows of one fused parameter."""
    rows = param.shape[len(expert)]
    local = rows // 2
    suffix = name.rsplit(".", 1)[1] if not expert else "weight"
    shape = (full, *param.shape[len(expert) + 1:])
    return {f"{prefix}.{first}.{suffix}": Shard(name, (*expert, slice(0, local)),
                                                _rows(start, start + local), shape),
            f"{prefix}.{second}.{suffix}": Shard(name, (*expert, slice(local, rows)),
                                                 _rows(start, start + local), shape)}


def dense_layout(params: dict[str, torch.Tensor], config: ModelConfig,
                 tp: TPGroup = TPGroup()) -> dict[str, Shard]:
    """Checkpoint layout of every parameter, unfusing qkv, gate_up and stacked experts,
    each checkpoint tensor cut to this rank's slice (``models/parallel.py``)."""
    H, D = config.hidden_size, config.head_dim
    (q0, q1), (k0, k1) = head_ranges(config.num_attention_heads, config.num_key_value_heads, tp)
    v0, v1, _ = vocab_range(config.vocab_size, tp)
    q_full, kv_full = config.num_attention_heads * D, config.num_key_value_heads * D
    layout: dict[str, Shard] = {}
    for name, param in params.items():
        match = re.fullmatch(r"(.*)\.qkv_proj\.(weight|bias)", name)
        if match:
            prefix, suffix = match.groups()
            q, kv = (q1 - q0) * D, (k1 - k0) * D
            rest = tuple(param.shape[1:])
            for piece, rows, source, full in (
                    ("q", slice(0, q), _rows(q0 * D, q1 * D), q_full),
                    ("k", slice(q, q + kv), _rows(k0 * D, k1 * D), kv_full),
                    ("v", slice(q + kv, q + 2 * kv), _rows(k0 * D, k1 * D), kv_full)):
                layout[f"{prefix}.{piece}_proj.{suffix}"] = Shard(name, (rows,), source, (full, *rest))
            continue
        match = re.fullmatch(r"(.*)\.gate_up_proj\.(weight|bias)", name)
        if match:
            local = param.shape[0] // 2
            layout.update(_halves(name, match[1], "gate_proj", "up_proj", param,
                                  local * tp.size, local * tp.rank))
            continue
        match = re.fullmatch(r"(.*)\.experts\.(w13|w2)", name)
        if match:
            layout.update(_expert_layout(name, match[1], match[2], param, tp))
            continue
        if re.fullmatch(r".*\.(o_proj|down_proj)\.weight", name):     # row-parallel: columns
            local = param.shape[1]
            layout[name] = Shard(name, (), _cols(local * tp.rank, local * (tp.rank + 1)),
                                 (param.shape[0], local * tp.size))
            continue
        if name in ("model.embed_tokens.weight", "lm_head.weight"):  # vocab-parallel: rows
            layout[name] = Shard(name, (slice(0, v1 - v0),), _rows(v0, v1),
                                 (config.vocab_size, H))
            continue
        layout[name] = Shard(name, (), (), tuple(param.shape))       # replicated
    return layout


def _expert_layout(name: str, prefix: str, kind: str, param: torch.Tensor,
                   tp: TPGroup) -> dict[str, Shard]:
    """Per-expert checkpoint tensors of this rank's experts, cut to its intermediate slice."""
    local_experts = param.shape[0]
    first = tp.ep_rank * local_experts
    layout: dict[str, Shard] = {}
    for e in range(local_experts):
        names = f"{prefix}.experts.{first + e}"
        if kind == "w13":
            local = param.shape[1] // 2
            layout.update(_halves(name, names, "gate_proj", "up_proj", param,
                                  local * tp.moe_tp_size, local * tp.moe_tp_rank, (e,)))
        else:
            local = param.shape[2]
            layout[f"{names}.down_proj.weight"] = Shard(
                name, (e,), _cols(local * tp.moe_tp_rank, local * (tp.moe_tp_rank + 1)),
                (param.shape[1], local * tp.moe_tp_size))
    return layout


_FUSED_EXPERTS = re.compile(r"(.*\.experts)\.(gate_up_proj|down_proj)(\.weight)?")


def fused_alias(name: str, layout: dict[str, Shard], num_experts: int
                ) -> tuple[list[Shard], str] | None:
    """A fused 3-D expert tensor -> (one Shard per local expert and half, regex of the
    per-expert names it covers), derived from the per-expert entries of `layout`."""
    match = _FUSED_EXPERTS.fullmatch(name)
    if not match:
        return None
    prefix, kind = match[1], match[2]
    pieces = ("gate_proj", "up_proj") if kind == "gate_up_proj" else ("down_proj",)
    shards: list[Shard] = []
    for e in range(num_experts):
        for j, piece in enumerate(pieces):
            s = layout.get(f"{prefix}.{e}.{piece}.weight")
            if s is None:
                continue
            if kind == "gate_up_proj":              # [E, 2I, H]: up rows follow the I gate rows
                full = s.shape[0]
                rows = s.source[0]
                source = (e, slice(rows.start + j * full, rows.stop + j * full))
                shape = (num_experts, 2 * full, *s.shape[1:])
            else:                                   # [E, H, I]
                source, shape = (e, *s.source), (num_experts, *s.shape)
            shards.append(Shard(s.param, s.index, source, shape))
    if not shards:
        return None
    group = "(gate_proj|up_proj)" if kind == "gate_up_proj" else "down_proj"
    return shards, rf"{re.escape(prefix)}\.\d+\.{group}\.weight"


_EXPERT = re.compile(r"(.*\.experts)\.(\d+)\.(?:gate|up|down)_proj\.(\w+)")


def held_elsewhere(name: str, params: dict[str, torch.Tensor], num_experts: int) -> bool:
    """An expert tensor of an MoE layer whose expert another EP rank holds (not ours to load):
    a 16-bit ``weight`` (stacked here as ``w13``) or a quantized expert's ``weight``,
    ``qweight``, ``scales``, ... (stacked as ``w13_<suffix>`` by models/quantization.py)."""
    match = _EXPERT.fullmatch(name)
    if not match:
        return False
    experts, index, suffix = match[1], int(match[2]), match[3]
    stacked = f"{experts}.w13" in params if suffix == "weight" else False
    return (stacked or f"{experts}.w13_{suffix}" in params) and index < num_experts


# Names that checkpoints carry but no model needs (buffers saved by old transformers).
IGNORED = re.compile(r".*\.rotary_emb\.inv_freq|.*\.attn\.bias|.*\.attn\.masked_bias"
                     r"|.*\.self_attn\.(?:(?:k_proj|v_proj|attn)\.)?[kv]_scale")  # quantization.load_kv_scales
