"""Tensor and expert parallelism of the model side: the rank's group and its slice of every dimension.

Each rank of a tensor-parallel (TP) group runs the same forward on the same
batch in lockstep; the weights are split the way SGLang splits them:

=====================  ==========================  ========================================
module                 split                       after the local op
=====================  ==========================  ========================================
qkv_proj, gate_up      column: this rank's heads   nothing (attention, silu_and_mul local)
                       / intermediate rows
o_proj, down_proj      row: the matching columns   ``all_reduce`` (bias added on rank 0)
embed_tokens           vocab rows                  ``all_reduce`` (ids outside -> 0)
lm_head                vocab rows                  ``all_gather`` of the fp32 logits
experts (EP x TP)      whole experts per EP rank,  ``all_reduce`` (one per MoE block)
                       intermediate within
=====================  ==========================  ========================================

Expert parallelism: ``ep_size`` divides ``size``; the group is ``ep_size``
blocks of ``moe_tp_size = size // ep_size`` consecutive ranks. Rank ``r``
holds experts ``[ep_rank * E/ep, (ep_rank+1) * E/ep)`` whole along the hidden
size, and slice ``moe_tp_rank`` of their intermediate size (SGLang runs
ep == tp: every rank holds E/tp whole experts).

Why EP has no all-to-all here: attention is tensor-parallel, so after its
``all_reduce`` every rank already holds every token's hidden state. Dispatch
is therefore a local selection (a rank runs the (token, expert) pairs of its
own experts; the others get weight 0) and combine is the same single
``all_reduce`` that TP-sharded experts need. An all-to-all would ship rows
each rank already has, and more bytes than the all-reduce once top-k > 1; it
pays off only with data-parallel attention, which this runtime does not do.
gloo (torch 2.13 CPU) does support ``all_to_all_single``, should that come.

Sizes that do not divide raise ``ModelConfigError`` naming the dimension and
both sizes; the vocabulary is the exception: it is padded to a multiple of the
group size (rows past the vocabulary are zero and their logits are dropped).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

from models.errors import ModelConfigError


@dataclasses.dataclass(frozen=True)
class TPGroup:
    """This process's place in the tensor-parallel group (size 1: no parallelism).

    ``group`` is a ``torch.distributed`` ProcessGroup over the ``size`` ranks
    (None: the default group; with size 1 nothing is ever communicated).
    """

    rank: int = 0
    size: int = 1
    group: Any = None
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TPGroup: rank {self.rank} is not in a group of size {self.size}")
        if self.ep_size < 1 or self.size % self.ep_size:
            raise ValueError(f"TPGroup: ep_size {self.ep_size} must divide the tp size {self.size}")

    @property
    def moe_tp_size(self) -> int:
        """Ranks that split each expert's intermediate size."""
        return self.size // self.ep_size

    @property
    def moe_tp_rank(self) -> int:
        return self.rank % self.moe_tp_size

    @property
    def ep_rank(self) -> int:
        """Which block of experts this rank holds."""
        return self.rank // self.moe_tp_size

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over the group, in place; returns x."""
        if self.size > 1:
            torch.distributed.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's x concatenated along dim, in rank order (x itself at size 1)."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)]
        torch.distributed.all_gather(parts, x, group=self.group)
        return torch.cat(parts, dim=dim)


def shard_range(total: int, rank: int, size: int, name: str = "dimension",
                group: str = "tp size") -> tuple[int, int]:
    """[start, end) of rank's equal share of `total`; `name` and `group` name the
    dimension and the split in the error."""
    if total % size:
        raise ModelConfigError(f"{name} {total} is not divisible by the {group} {size}")
    per_rank = total // size
    return rank * per_rank, (rank + 1) * per_rank


def head_ranges(num_heads: int, num_kv_heads: int, tp: TPGroup) -> tuple[tuple[int, int], tuple[int, int]]:
    """([q0, q1), [k0, k1)): this rank's query heads and kv heads.

    Query heads split evenly. KV heads split evenly too when tp <= num_kv_heads;
    with more ranks than kv heads each rank keeps the ONE kv head its query
    heads read (replicated over tp / num_kv_heads ranks, as SGLang does).
    """
    q = shard_range(num_heads, tp.rank, tp.size, "num_attention_heads")
    if num_kv_heads >= tp.size:
        return q, shard_range(num_kv_heads, tp.rank, tp.size, "num_key_value_heads")
    if tp.size % num_kv_heads:
        raise ModelConfigError(f"num_key_value_heads {num_kv_heads} is smaller than the tp size "
                               f"{tp.size} and does not divide it, so kv heads cannot be replicated")
    head = tp.rank * num_kv_heads // tp.size
    return q, (head, head + 1)


def vocab_range(vocab_size: int, tp: TPGroup) -> tuple[int, int, int]:
    """(start, end, rows): this rank's vocabulary ids [start, end) in a shard of `rows`
    rows; rows = ceil(vocab / tp), so the last shard may end in zero padding."""
    rows = -(-vocab_size // tp.size)
    start = min(tp.rank * rows, vocab_size)
    return start, min(start + rows, vocab_size), rows


def expert_range(num_experts: int, tp: TPGroup) -> tuple[int, int]:
    """[e0, e1): the experts this rank holds whole (along the hidden size)."""
    if num_experts % tp.ep_size:
        raise ModelConfigError(f"num_experts {num_experts} is not divisible by the ep size {tp.ep_size}")
    per_rank = num_experts // tp.ep_size
    return tp.ep_rank * per_rank, (tp.ep_rank + 1) * per_rank
