"""Mixture-of-experts decoders: Qwen3-MoE and Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B).

Attention, norms and embeddings are the dense decoder's (``models/llama.py``);
only the feed-forward block changes. A layer is sparse unless it is listed in
``mlp_only_layers``, and then only every ``decoder_sparse_step``-th layer.

Sparse block, T tokens, E experts, k experts per token::

    router_logits = gate(x)                                  [T, E]
    w, ids        = moe_topk(router_logits, k, norm_topk_prob)  softmax -> top-k
    y             = fused_moe(x, experts.w13, experts.w2, w, ids)

Qwen3-MoE renormalises the top-k weights (``norm_topk_prob: true``);
Qwen2-MoE keeps the raw softmax probabilities (default false) and adds a
shared expert scaled by ``sigmoid(shared_expert_gate(x))``::

    y += sigmoid(g) * shared_expert(x)        g = shared_expert_gate(x)   [T, 1]

The kernel table has no sigmoid, so the shared expert goes through the MoE
kernels: ``sigmoid(g) = softmax([g, 0])[0]``. The gate weight gets a zero
second row (logits ``[g, 0]``), ``moe_topk(top_k=2)`` returns both
probabilities, and the shared expert is expert 0 of a two-expert
``fused_moe`` whose expert 1 is all zeros, so it adds ``sigmoid(-g) * 0``.
The sum of the two expert outputs goes through the one elementwise add the
table has, ``residual += x`` inside ``fused_add_rms_norm`` (its normed output
is dropped). The price is computing the zero expert (twice the shared
expert's FLOPs) and one spare norm; what it buys is a hot path of kernel
launches only.

Tensor / expert parallelism (``models/parallel.py``): the router is
replicated; each rank holds experts ``[e0, e1)`` (all E unless
``ep_size > 1``) with its ``moe_tp_rank`` slice of their intermediate size
(w13 rows of gate and of up, w2 columns), and the shared expert split like a
dense MLP over the whole group.

* ``ep_size == tp_size > 1`` (``_forward_dispatch``): each rank routes its
  1/ep slice of the tokens, all-to-all sends each (token, expert) pair to the
  rank holding the expert, runs ``fused_moe`` there with k = 1 and local ids,
  and all-to-all brings the weighted outputs back to be summed per token;
  the routed slices are then all-gathered, or, with a shared expert, added
  into its partial output and summed by one ``all_reduce``.
* otherwise every rank routes every token (the hidden states are replicated
  after attention's all_reduce) and keeps the pairs whose expert it holds;
  the partial outputs, routed and shared, are summed by ONE ``all_reduce``.
  With ``ep_size > 1``, the pairs of other ranks' experts are
  pointed at local expert 0 with weight 0: a few elementwise torch ops
  outside the kernel table (``fused_moe`` has no "skip this pair" id), and
  those pairs still cost expert-0 FLOPs.

CUDA-graph capture of decode (``stages/forward/graphs.py``) takes the second
path even at ``ep_size == tp_size``: dispatch reads the pair counts on the
host (``.tolist()`` for the split sizes) and its shapes follow the routing,
neither of which a graph can hold. So on GPU, eager prefill/extend batches
dispatch and graph-replayed decode batches all-reduce; both give the same
sums. A capturable dispatch needs fixed-capacity buffers and a kernel that
skips padding pairs (SGLang's DeepEP low-latency mode).
"""
from __future__ import annotations

import torch
from torch import nn

from models.config import ModelConfig
from models.layers import MLP, Linear, weight
from models.llama import LlamaForCausalLM
from models.parallel import ExpertDispatch, TPGroup, expert_range, shard_range
from models.quantization import ExpertSlice, QuantExperts
from models.weights import Shard, dense_layout
from triton_kernels import KernelOps


class Experts(nn.Module):
    """Stacked expert weights: w13 [E, 2I, H] (gate rows over up rows), w2 [E, H, I]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int,
                 dtype: torch.dtype, device: torch.device | str, zeros: bool = False) -> None:
        super().__init__()
        self.w13 = weight(num_experts, 2 * intermediate_size, hidden_size, dtype=dtype,
                          device=device, zeros=zeros)
        self.w2 = weight(num_experts, hidden_size, intermediate_size, dtype=dtype,
                         device=device, zeros=zeros)


def make_experts(ops: KernelOps, config: ModelConfig, num_experts: int, inter_size: int,
                 dtype: torch.dtype, device: torch.device | str, shared: bool = False,
                 part: ExpertSlice = ExpertSlice()) -> nn.Module:
    """16-bit ``Experts`` or, with ``config.quantization``, ``QuantExperts`` of that scheme
    (``models/quantization.py``); ``shared``: the zero-padded two-expert shared expert;
    ``part``: the experts and intermediate rows this rank holds (``QuantExperts.layout``
    reads them; the 16-bit experts' slices are ``dense_layout``'s)."""
    if config.quantization is not None:
        return QuantExperts(ops, config.quantization, num_experts, config.hidden_size, inter_size,
                            dtype, device, shared=shared, part=part)
    return Experts(num_experts, config.hidden_size, inter_size, dtype, device, zeros=shared)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ the gated shared expert of Qwen2-MoE)."""

    def __init__(self, ops: KernelOps, config: ModelConfig, dtype: torch.dtype,
                 device: torch.device | str, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        H = config.hidden_size
        self.ops, self.tp = ops, tp
        self.top_k = config.num_experts_per_tok
        self.renormalize = config.norm_topk_prob
        self.gate = Linear(ops, H, config.num_experts, False, dtype, device)
        self.expert_start, expert_end = expert_range(config.num_experts, tp)
        self.num_local_experts = expert_end - self.expert_start
        i0, i1 = shard_range(config.moe_intermediate_size, tp.moe_tp_rank, tp.moe_tp_size,
                             "moe_intermediate_size", "tp size / ep size")
        self.experts = make_experts(ops, config, self.num_local_experts, i1 - i0, dtype, device,
                                    part=ExpertSlice(self.expert_start, i0, config.moe_intermediate_size))
        self.shared_expert = self.shared_expert_gate = None
        self.eps = config.rms_norm_eps
        if config.shared_expert_intermediate_size > 0:
            # expert 0: the shared expert; expert 1: zeros (see the module docstring)
            s0, s1 = shard_range(config.shared_expert_intermediate_size, tp.rank, tp.size,
                                 "shared_expert_intermediate_size")
            self.shared_expert = make_experts(
                ops, config, 2, s1 - s0, dtype, device, shared=True,
                part=ExpertSlice(0, s0, config.shared_expert_intermediate_size))
            self.shared_expert_gate = nn.Module()
            self.shared_expert_gate.weight = weight(2, H, dtype=dtype, device=device, zeros=True)
            self.register_buffer("unit_norm", torch.ones(H, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.ep_dispatch and not (x.is_cuda and torch.cuda.is_current_stream_capturing()):
            return self._forward_dispatch(x)
        router_logits = self.gate(x)                                            # [T, E]
        topk_weights, topk_ids = self.ops.moe_topk(router_logits, self.top_k, self.renormalize)
        if self.tp.ep_size > 1:
            topk_weights, topk_ids = self._local_pairs(topk_weights, topk_ids)
        y = self._run_experts(self.experts, x, topk_weights, topk_ids)
        if self.shared_expert is not None:
            self.ops.fused_add_rms_norm(self._shared(x), y, self.unit_norm, self.eps)  # y += shared
        return self.tp.all_reduce(y)            # partial sums over experts / intermediate slices

    def _forward_dispatch(self, x: torch.Tensor) -> torch.Tensor:
        """ep == tp: route this rank's token slice, all-to-all its pairs to the ranks
        holding their experts and back, then every rank gets all T rows again."""
        T = x.shape[0]
        start, end = self.tp.token_range(T)
        mine = x[start:end]                                                     # [t, H]
        if end > start:
            topk_weights, topk_ids = self.ops.moe_topk(self.gate(mine), self.top_k,
                                                       self.renormalize)        # [t, k]
        else:                                   # ragged T: no tokens here, but join the collectives
            topk_weights = x.new_empty((0, self.top_k), dtype=torch.float32)
            topk_ids = x.new_empty((0, self.top_k), dtype=torch.int32)
        plan, rows, weights, ids = ExpertDispatch.send(self.tp, mine, topk_weights, topk_ids,
                                                       self.num_local_experts)  # rows [N, H]
        out = (self._run_experts(self.experts, rows, weights, ids)
               if rows.shape[0] else rows)      # one pair per row: weights[N, 1], ids[N, 1]
        y = plan.combine(out)                                                   # [t, H]
        if self.shared_expert is None:
            return self.tp.all_gather_tokens(y, T)
        shared = self._shared(x)                # [T, H], a partial sum over the group
        shared[start:end] += y                  # fold the routed slice in: one all_reduce
        return self.tp.all_reduce(shared)

    def _shared(self, x: torch.Tensor) -> torch.Tensor:
        """sigmoid(shared_expert_gate(x)) * shared_expert(x) (this rank's intermediate slice)."""
        gate_logits = self.ops.linear(x, self.shared_expert_gate.weight, None)  # [T, 2] = [g, 0]
        gate_weights, gate_ids = self.ops.moe_topk(gate_logits, 2, False)       # sigmoid(+-g)
        return self._run_experts(self.shared_expert, x, gate_weights, gate_ids)

    def _run_experts(self, experts: nn.Module, x: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
        """fused_moe over 16-bit ``Experts`` or quantized ``QuantExperts``."""
        if isinstance(experts, QuantExperts):
            return experts(x, topk_weights, topk_ids)
        return self.ops.fused_moe(x, experts.w13, experts.w2, topk_weights, topk_ids)

    def _local_pairs(self, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce EP: global expert ids -> this rank's [0, E_local); pairs of experts
        held elsewhere -> local expert 0 with weight 0 (torch ops: see the module docstring)."""
        local = topk_ids - self.expert_start
        mine = (local >= 0) & (local < self.num_local_experts)
        ids = torch.where(mine, local, torch.zeros_like(local))
        return torch.where(mine, topk_weights, torch.zeros_like(topk_weights)), ids


class Qwen3MoeForCausalLM(LlamaForCausalLM):
    """Qwen3-MoE: the Qwen3 decoder (q/k norm) with sparse MLP layers."""

    def build_mlp(self, layer_idx: int) -> nn.Module:
        c = self.config
        if c.is_moe_layer(layer_idx):
            return SparseMoeBlock(self.ops, c, self.dtype, self.device, self.tp)
        return MLP(self.ops, c.hidden_size, c.intermediate_size, False, self.dtype, self.device,
                   self.tp, quant=c.quantization)

    def checkpoint_layout(self) -> dict[str, Shard]:
        params = dict(self.named_parameters())
        shared = {n: p for n, p in params.items() if ".shared_expert" in n}
        layout = dense_layout({n: p for n, p in params.items() if n not in shared}, self.config,
                              self.tp)
        rank, H = self.tp.rank, self.config.hidden_size
        for name, param in shared.items():
            prefix = name.rsplit(".", 1)[0]                   # ...mlp.shared_expert(_gate)
            if name.endswith("shared_expert_gate.weight"):    # [2, H]: row 1 stays zero
                layout[name] = Shard(name, (slice(0, 1),), (), (1, H))
                continue
            local = param.shape[2] if name.endswith(".w2") else param.shape[1] // 2
            rows = slice(rank * local, (rank + 1) * local)  # this rank's intermediate range
            full = local * self.tp.size
            if name.endswith(".w13"):
                layout[f"{prefix}.gate_proj.weight"] = Shard(name, (0, slice(0, local)), (rows,),
                                                             (full, H))
                layout[f"{prefix}.up_proj.weight"] = Shard(name, (0, slice(local, 2 * local)),
                                                           (rows,), (full, H))
            else:
                layout[f"{prefix}.down_proj.weight"] = Shard(name, (0,), (slice(None), rows),
                                                             (H, full))
        return layout


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    """Qwen2-MoE: q/k/v biases, no q/k norm, shared expert (all config flags)."""
