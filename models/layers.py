"""Building blocks shared by every architecture, each a thin wrapper over KernelOps.

A module here owns its weights (``nn.Parameter``, no gradients) under Hugging
Face names, with projections fused the way the kernels want them:

* ``qkv_proj``: q, k and v rows stacked, ``[(Hq + 2*Hk) * D, hidden]``;
* ``gate_up_proj``: gate rows over up rows, ``[2 * I, hidden]``, so that
  ``silu_and_mul`` reads ``silu(x[:, :I]) * x[:, I:]``;

and its ``forward`` calls only ops of the ``KernelOps`` table it was built with,
plus the collectives of its ``TPGroup`` (``models/parallel.py``). Under tensor
parallelism the parameters are this rank's slice: ``qkv_proj`` and
``gate_up_proj`` hold its heads / intermediate rows (column-parallel, no
communication), ``o_proj`` and ``down_proj`` the matching input columns
(``RowParallelLinear``: partial sums, then one ``all_reduce``).
Shapes: T new tokens in the batch, H hidden size, Hq / Hk query / kv heads
(this rank's), D head dim, I intermediate size (this rank's). Activations
keep the model dtype; only the final logits are fp32.
"""
from __future__ import annotations

import torch
from torch import nn

from models.batch import AttentionMetadata
from models.config import ModelConfig
from models.parallel import TPGroup, head_ranges, shard_range
from models.quantization import QuantConfig, QuantLinear
from triton_kernels import KernelOps


def weight(*shape: int, dtype: torch.dtype, device: torch.device | str,
           zeros: bool = False) -> nn.Parameter:
    """An uninitialised (or zeroed) inference-only parameter; the loader fills it."""
    make = torch.zeros if zeros else torch.empty
    return nn.Parameter(make(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y[*, N] = x[*, K] @ weight[N, K]^T (+ bias[N]) through ``ops.linear``."""

    def __init__(self, ops: KernelOps, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__()
        self.ops = ops
        self.weight = weight(out_features, in_features, dtype=dtype, device=device)
        self.bias = weight(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class RowParallelLinear(Linear):
    """Input-split linear: each rank holds ``weight[N, K/tp]`` and sees its K/tp slice
    of x; the partial products are summed by ``all_reduce``. The bias (full, on
    every rank) is added by rank 0 only, so the sum holds it once."""

    def __init__(self, ops: KernelOps, tp: TPGroup, in_features: int, out_features: int,
                 bias: bool, dtype: torch.dtype, device: torch.device | str) -> None:
        super().__init__(ops, in_features, out_features, bias, dtype, device)
        self.tp = tp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp.rank == 0 else None
        return self.tp.all_reduce(self.ops.linear(x, self.weight, bias))


def make_linear(ops: KernelOps, in_features: int, out_features: int, bias: bool, dtype: torch.dtype,
                device: torch.device | str, quant: QuantConfig | None = None,
                row_parallel: TPGroup | None = None) -> nn.Module:
    """A projection: 16-bit (``Linear`` / ``RowParallelLinear``) or, with ``quant``, a
    ``QuantLinear`` of that scheme (``models/quantization.py``)."""
    if quant is not None:
        return QuantLinear(ops, quant, in_features, out_features, bias, dtype, device, row_parallel)
    if row_parallel is not None:
        return RowParallelLinear(ops, row_parallel, in_features, out_features, bias, dtype, device)
    return Linear(ops, in_features, out_features, bias, dtype, device)


class RMSNorm(nn.Module):
    """HF RMSNorm; with ``residual`` it is the fused ``residual += x; norm(residual)``."""

    def __init__(self, ops: KernelOps, size: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = weight(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.fused_add_rms_norm(x, residual, self.weight, self.eps)


class MLP(nn.Module):
    """SwiGLU feed-forward: down_proj(silu(gate_proj x) * up_proj x).

    Under TP each rank holds I/tp gate rows over I/tp up rows, so
    ``silu_and_mul`` still reads ``[gate | up]`` locally; down_proj reduces.
    """

    def __init__(self, ops: KernelOps, hidden_size: int, intermediate_size: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str, tp: TPGroup = TPGroup(),
                 quant: QuantConfig | None = None) -> None:
        super().__init__()
        self.ops = ops
        start, end = shard_range(intermediate_size, tp.rank, tp.size, "intermediate_size")
        local = end - start
        self.gate_up_proj = make_linear(ops, hidden_size, 2 * local, bias, dtype, device, quant)
        self.down_proj = make_linear(ops, local, hidden_size, bias, dtype, device, quant, row_parallel=tp)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class Attention(nn.Module):
    """GQA self-attention over the paged KV pool.

    qkv_proj -> split into q[T,Hq,D], k[T,Hk,D], v[T,Hk,D] (views, no copy)
    -> one kernel (``qk_norm_rope_store``): optional per-head RMSNorm of q and
    k (Qwen3), RoPE in place, k and v stored at ``attn_meta.out_cache_loc``
    -> extend attention (cached prefix from the pool, new tokens' k/v from the
    views) or decode attention (every key from the pool) -> o_proj.

    Under TP a rank computes only its query heads and their kv heads (its KV
    pool holds those kv heads only), and o_proj reduces over the ranks.
    """

    def __init__(self, ops: KernelOps, config: ModelConfig, layer_idx: int,
                 cos_sin_cache: torch.Tensor, dtype: torch.dtype,
                 device: torch.device | str, tp: TPGroup = TPGroup()) -> None:
        super().__init__()
        self.ops = ops
        (q0, q1), (k0, k1) = head_ranges(config.num_attention_heads, config.num_key_value_heads, tp)
        self.num_heads = q1 - q0
        self.num_kv_heads = k1 - k0
        self.head_dim = config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.sm_scale = self.head_dim ** -0.5
        self.sliding_window = config.sliding_windows[layer_idx]
        # FP8 KV cache: per-tensor scales of this layer's K and V (checkpoint k_scale /
        # v_scale, set by quantization.load_kv_scales; other pools ignore them).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.cos_sin_cache = cos_sin_cache          # shared by all layers, not a parameter
        H = config.hidden_size
        quant = config.quantization
        self.qkv_proj = make_linear(ops, H, self.q_size + 2 * self.kv_size, config.qkv_bias, dtype, device,
                                    quant)
        self.o_proj = make_linear(ops, self.q_size, H, config.o_proj_bias, dtype, device, quant,
                                  row_parallel=tp)
        if config.qk_norm:
            self.q_norm = RMSNorm(ops, self.head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(ops, self.head_dim, config.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, positions: torch.Tensor, x: torch.Tensor, attn_meta: AttentionMetadata,
                k_cache: torch.Tensor, v_cache: torch.Tensor,
                cos_sin_table: torch.Tensor | None = None) -> torch.Tensor:
        """``positions`` index ``cos_sin_table`` (default: the layer's RoPE cache; M-RoPE
        passes per-batch rows and their table, see models/qwen_vl.py)."""
        table = self.cos_sin_cache if cos_sin_table is None else cos_sin_table
        T = x.shape[0]
        qkv = self.qkv_proj(x)                                               # [T, (Hq+2Hk)*D]
        q = qkv[:, : self.q_size].view(T, self.num_heads, self.head_dim)
        k = qkv[:, self.q_size: self.q_size + self.kv_size].view(T, self.num_kv_heads, self.head_dim)
        v = qkv[:, self.q_size + self.kv_size:].view(T, self.num_kv_heads, self.head_dim)
        # In place on the qkv views: q/k head norm (Qwen3), RoPE; then k, v into the pool.
        q_norm_w, k_norm_w, eps = ((self.q_norm.weight, self.k_norm.weight, self.q_norm.eps)
                                   if self.q_norm is not None else (None, None, 1e-6))
        self.ops.qk_norm_rope_store(q, k, v, positions, table, True, k_cache, v_cache,
                                    attn_meta.out_cache_loc, q_norm_w, k_norm_w, eps,
                                    k_scale=self.k_scale, v_scale=self.v_scale)
        o = self._attend(q, k, v, attn_meta, k_cache, v_cache, positions)    # [T, Hq, D]
        return self.o_proj(o.view(T, self.q_size))

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_meta: AttentionMetadata, k_cache: torch.Tensor,
                v_cache: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """Decode reads every key from the pool; extend reads the prefix from the
        pool and the new tokens' keys from k, v (just stored there too); a draft-tree
        verify (``tree_mask``) is extend under each request's tree mask."""
        m = attn_meta
        if m.tree_mask is not None:
            if v_cache.dtype != q.dtype:
                raise ValueError("draft-tree verification needs a KV cache in the model dtype")
            return self.ops.tree_attention(
                q, k, v, k_cache, v_cache, m.req_to_token, m.req_pool_indices, m.prefix_lens,
                m.extend_lens, m.extend_start_loc, m.tree_mask, m.mask_start_loc, m.max_extend_len,
                self.sm_scale, positions=positions, sliding_window=self.sliding_window)
        if m.mode == "decode":
            return self.ops.decode_attention(
                q, k_cache, v_cache, m.req_to_token, m.req_pool_indices, m.seq_lens,
                self.sm_scale, sliding_window=self.sliding_window, k_scale=self.k_scale,
                v_scale=self.v_scale)
        if m.mode != "extend":
            raise ValueError(f"attn_meta.mode must be 'extend' or 'decode', got {m.mode!r}")
        return self.ops.extend_attention(
            q, k, v, k_cache, v_cache, m.req_to_token, m.req_pool_indices, m.prefix_lens,
            m.extend_lens, m.extend_start_loc, m.max_extend_len, self.sm_scale,
            sliding_window=self.sliding_window, k_scale=self.k_scale, v_scale=self.v_scale)
