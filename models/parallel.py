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
experts, ep < tp       whole experts per EP rank,  ``all_reduce`` (one per MoE block)
                       intermediate within
experts, ep == tp      E/tp whole experts a rank   all-to-all dispatch and combine, then
                                                   ``all_gather`` of the token slices
=====================  ==========================  ========================================

Expert parallelism: ``ep_size`` divides ``size``; the group is ``ep_size``
blocks of ``moe_tp_size = size // ep_size`` consecutive ranks. Rank ``r``
holds experts ``[ep_rank * E/ep, (ep_rank+1) * E/ep)`` whole along the hidden
size, and slice ``moe_tp_rank`` of their intermediate size.

Two ways to run those experts, picked by ``TPGroup.ep_dispatch``:

* ``ep_size < size`` (each expert also split over ``size / ep`` ranks):
  every rank routes every token (attention's ``all_reduce`` left every
  hidden state on every rank), runs the (token, expert) pairs of its own
  experts on its intermediate slice, and ONE ``all_reduce`` sums the partial
  outputs. Simple, but each rank walks all T tokens' routing.

* ``ep_size == size`` (SGLang's usual expert-parallel setting, and the one
  the multi-GPU benchmark measures): all-to-all dispatch and combine, so a
  rank computes only the pairs that need its experts and ships only rows
  that some other rank needs.
  Decode batches replayed from a CUDA graph still take the all-reduce path
  (dispatch sizes its buffers from counts read on the host; see
  ``models/qwen_moe.py``), so measure dispatch on prefill, or on decode
  with ``--disable-cuda-graph``.

Dispatch and combine, T tokens, k experts per token, ``ep`` ranks::

    1. slice     rank r owns tokens [r*c, (r+1)*c), c = ceil(T / ep)
                 (ragged: the last ranks may own fewer, possibly none)
    2. route     top-k of its tokens -> t*k pairs (row, expert, weight);
                 destination = expert // (E / ep); pairs sorted by destination
    3. counts    all_to_all_single of [pairs for rank 0, ..., rank ep-1]:
                 now every rank knows how many rows it will receive
    4. dispatch  all_to_all_single of the rows x[row] and of (local expert
                 id, weight), split sizes from the counts
    5. compute   fused_moe on the received rows, one pair per row (k = 1),
                 ids all local: out[i] = weight_i * expert_i(x_i)
    6. combine   all_to_all_single of out back along the same splits, then
                 index_add by row: y[row] += out, the top-k sum per token
    7. gather    all_gather of the ep token slices: every rank holds y[T, H]
                 again, as tensor-parallel attention needs

Qwen2-MoE's shared expert stays split like a dense MLP over the group, so
its output is a partial sum over ranks on all T tokens. Rather than a second
collective, each rank adds its routed slice into its rows of that partial
sum and ONE ``all_reduce`` replaces the ``all_gather`` of step 7.

Bytes per MoE block, H hidden, pairs spread evenly: the all-reduce path moves
~2 T H per rank; dispatch and combine move ~2 (T/ep) k H (ep-1)/ep per rank
plus the gather's T H (ep-1)/ep. Dispatch wins on FLOPs (no rank touches
another rank's pairs) and, at large ep, on bytes. With ep < tp the received
rows would also need an all-reduce within each EP block; that case keeps
the all-reduce path.

Steps 2-6 are torch index ops and collectives (``ExpertDispatch``), outside
the kernel table: routing bookkeeping, not math on activations. A pair
whose expert is local goes through the all-to-all as a self-copy.

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

    @property
    def ep_dispatch(self) -> bool:
        """Experts run behind all-to-all dispatch/combine (ep == tp > 1; see the module
        docstring), rather than the all-reduce path."""
        return self.ep_size > 1 and self.ep_size == self.size

    def token_range(self, num_tokens: int) -> tuple[int, int]:
        """[start, end) of the tokens this EP rank dispatches: contiguous ceil(T / ep)
        rows each, so the last ranks may get fewer, or none."""
        per_rank = -(-num_tokens // self.ep_size)
        start = min(self.ep_rank * per_rank, num_tokens)
        return start, min(start + per_rank, num_tokens)

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

    def all_gather_tokens(self, x: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """x[t, H], this rank's ``token_range`` rows -> [num_tokens, H], every rank's
        rows in order (slices padded to ceil(T / ep) rows for the gather; ep == size)."""
        per_rank = -(-num_tokens // self.ep_size)
        padded = x.new_zeros((per_rank, *x.shape[1:]))
        padded[: x.shape[0]] = x
        return self.all_gather(padded, dim=0)[:num_tokens]

    def all_to_all(self, x: torch.Tensor, send_counts: list[int],
                   recv_counts: list[int]) -> torch.Tensor:
        """Rows x[sum(send_counts[:r]) : ...+send_counts[r]] go to rank r; the result
        holds recv_counts[r] rows from rank r, in rank order (ep == size)."""
        out = x.new_empty((sum(recv_counts), *x.shape[1:]))
        torch.distributed.all_to_all_single(out, x.contiguous(), recv_counts, send_counts,
                                            group=self.group)
        return out


@dataclasses.dataclass(frozen=True)
class ExpertDispatch:
    """One MoE block's all-to-all round trip (steps 2-6 of the module docstring).

    ``send`` ships this rank's (token, expert) pairs to the ranks holding their
    experts and remembers the order; ``combine`` brings the expert outputs back
    and sums each token's top-k. Build it with ``ExpertDispatch.send``.
    """

    tp: TPGroup
    rows: torch.Tensor          # [N_send] int64: token row (in this rank's slice) of each sent pair
    num_rows: int               # t: tokens in this rank's slice
    send_counts: list[int]      # pairs sent to each rank
    recv_counts: list[int]      # pairs received from each rank

    @classmethod
    def send(cls, tp: TPGroup, x: torch.Tensor, topk_weights: torch.Tensor,
             topk_ids: torch.Tensor, num_local_experts: int
             ) -> tuple[ExpertDispatch, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x[t, H], topk_weights[t, k] fp32, topk_ids[t, k] (global expert ids) ->
        (plan, rows[N, H], weights[N, 1] fp32, ids[N, 1] int32 local to this rank)."""
        t, k = topk_ids.shape
        ids = topk_ids.reshape(-1).long()                                   # [t*k]
        dest = ids // num_local_experts
        order = torch.argsort(dest, stable=True)                            # grouped by rank
        rows = torch.arange(t, device=x.device).repeat_interleave(k)[order]
        send_counts = torch.bincount(dest, minlength=tp.ep_size)
        recv_counts = torch.empty_like(send_counts)
        torch.distributed.all_to_all_single(recv_counts, send_counts, group=tp.group)
        plan = cls(tp, rows, t, send_counts.tolist(), recv_counts.tolist())
        # (local id, weight) ride together as fp32: ids < 2^24 are exact
        meta = torch.stack([(ids - dest * num_local_experts)[order].float(),
                            topk_weights.reshape(-1)[order].float()], dim=1)  # [N_send, 2]
        recv_x = tp.all_to_all(x[rows], plan.send_counts, plan.recv_counts)
        recv_meta = tp.all_to_all(meta, plan.send_counts, plan.recv_counts)
        return (plan, recv_x, recv_meta[:, 1:].contiguous(),
                recv_meta[:, :1].to(torch.int32))

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """out[N_recv, H] (weighted expert outputs, in received order) -> y[t, H]:
        each token's top-k contributions summed in fp32."""
        back = self.tp.all_to_all(out, self.recv_counts, self.send_counts)  # [N_send, H]
        y = torch.zeros((self.num_rows, out.shape[1]), dtype=torch.float32, device=out.device)
        y.index_add_(0, self.rows, back.float())
        return y.to(out.dtype)


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
