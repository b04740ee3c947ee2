"""Every GPU operation of the model hot path, hand-written in Triton.

One file per op family. Each file holds, in this order: a docstring with the
math, shapes, dtypes and the roofline bound; the ``@triton.jit`` kernel(s); a
launcher per op with a plain signature (tensors in, tensor out); and, for each
launcher ``<op>``, a plain-PyTorch ``<op>_reference`` with the same signature
and the same math. Importing a file only defines names: no device work.

The models never import these files directly. They receive a ``KernelOps``
namespace chosen once at build time by ``--kernel-backend``:

* ``triton``    -- the Triton launchers (GPU, or CPU under ``TRITON_INTERPRET=1``)
* ``reference`` -- the PyTorch references (the CPU backend of the models)

The op table (name -> family file) is the contract between kernels and models:

==================== ============== ===================================================
op                   family         signature (shapes; T tokens, B requests)
==================== ============== ===================================================
linear               gemm           (x[M,K], weight[N,K], bias[N]|None, out_dtype=None) -> y[M,N]
rms_norm             norm           (x[M,H], weight[H], eps) -> y[M,H]
fused_add_rms_norm   norm           (x[M,H], residual[M,H], weight[H], eps) -> y[M,H];
                                    residual += x in place, y = rms_norm(residual)
head_rms_norm        norm           (x[T,heads,D], weight[D], eps) -> y[T,heads,D]
layer_norm           norm           (x[M,H], weight[H], bias[H], eps) -> y[M,H]
fused_add_layer_norm norm           (x[M,H], residual[M,H], weight[H], bias[H], eps) -> y[M,H];
                                    residual += x in place, y = layer_norm(residual)
apply_rotary         rotary         (q[T,Hq,D], k[T,Hk,D], positions[T] int64,
                                    cos_sin_cache[P, rotary_dim], is_neox) -> None,
                                    q and k rotated in place (first rotary_dim dims)
silu_and_mul         activation     (x[M,2I]) -> y[M,I] = silu(x[:, :I]) * x[:, I:]
gelu_and_mul         activation     (x[M,2I], approximate "none"|"tanh") -> y[M,I]
gelu                 activation     (x[M,N], approximate "none"|"tanh") -> y[M,N]
embedding            embedding      (ids[T] int, weight[V_shard,H], vocab_start=0) -> y[T,H];
                                    ids outside [vocab_start, vocab_start+V_shard) -> 0
store_kv             kv_cache       (k_cache[S,Hk,D], v_cache[S,Hk,D], k[T,Hk,D],
                                    v[T,Hk,D], slots[T] int64) -> None (in place)
qk_norm_rope_store   qkv_prep       (q, k, v, positions, cos_sin_cache, is_neox, k_cache, v_cache,
                                    slots, q_norm_weight=None, k_norm_weight=None, eps) -> None:
                                    head_rms_norm (with weights) + apply_rotary on q, k in place,
                                    then store_kv, in one kernel
extend_attention     attention      (q[T,Hq,D], k[T,Hk,D], v[T,Hk,D] (new tokens), k_cache,
                                    v_cache (prefixes), req_to_token[R,L] int32,
                                    req_pool_indices[B], prefix_lens[B], extend_lens[B],
                                    extend_start_loc[B], max_extend_len, sm_scale,
                                    sliding_window=-1, logit_cap=0.0) -> o[T,Hq,D]
decode_attention     attention      (q[B,Hq,D], k_cache, v_cache, req_to_token,
                                    req_pool_indices[B], seq_lens[B], sm_scale,
                                    sliding_window=-1, logit_cap=0.0,
                                    num_kv_splits=None) -> o[B,Hq,D]
moe_topk             moe            (router_logits[T,E], top_k, renormalize) ->
                                    (topk_weights[T,k] fp32, topk_ids[T,k] int32)
fused_moe            moe            (x[T,H], w13[E,2I,H], w2[E,H,I], topk_weights,
                                    topk_ids) -> y[T,H]
mrope_cos_sin        rotary         (positions[S,T] int, cos_sin_cache[P, rotary_dim], sections,
                                    interleaved) -> rows[T, rotary_dim]: per-token cos/sin
                                    rows of M-RoPE (and the vision 2D rotary)
vision_attention     vision_attn    (q[N,H,D], k[N,H,D], v[N,H,D], cu_seqlens[S+1] i32,
                                    max_seqlen, sm_scale) -> o[N,H,D], non-causal per segment
add_interpolated_    pos_embed      (x[N,D], table[P,D], indices[N,K] int, weights[N,K] fp32)
  pos_embed                         -> y[N,D] = x + sum_k weights[:,k] * table[indices[:,k]]
scatter_rows         scatter        (dst[T,H], rows[n] int, src[n,H], accumulate=False) -> None:
                                    dst[rows] = src (or += src) in place
tree_attention       tree_attention (q, k, v, k_cache, v_cache, req_to_token, req_pool_indices,
                                    prefix_lens, tree_lens, tree_start_loc, tree_mask,
                                    mask_start_loc, max_tree_len, sm_scale, positions=None,
                                    sliding_window=-1) -> o[T,Hq,D]: draft-tree verify
==================== ============== ===================================================

KV pool layout: one ``[num_slots, num_kv_heads, head_dim]`` tensor for K and
one for V per layer; a token's KV lives at a *slot*; ``req_to_token[r, i]`` is
the slot of token ``i`` of the request in row ``r``. The new tokens' K/V are
stored first (``qk_norm_rope_store`` or ``store_kv``), for later steps. Extend
attention reads a request's cached prefix from the pool through
``req_to_token`` and its new tokens' K/V straight from the ``k``/``v`` tensors
the layer just computed, so one kernel serves pure prefill and prefix-hit
extend. Slot 0 is never allocated to a request: padded rows (CUDA graphs) write
there.

Two sibling tables, built the same way, serve the stages that launch kernels
outside the model: ``SamplingOps`` (``load_sampling_ops``: the sample stage's
penalties, grammar mask, sampling and logprobs; ``sampling/``) and ``IndexOps``
(``load_index_ops``: the forward stage's ``req_to_token`` helpers;
``indexing.py``), plus the future-token pair of ``future.py`` (overlap
scheduling). Their launchers are documented in their own files.

``KernelOptions`` (``runtime.py``) holds the Triton backend's A/B switches
(the warp-specialised decode gemm, programmatic dependent launch). The
loaders bind them once: a launcher that takes the keyword ``gemm_ws`` or
``pdl`` is wrapped in ``functools.partial`` with the option's value, so no
kernel file reads a switch from the environment or from module state.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib
import inspect
from typing import Callable, Literal

from triton_kernels.runtime import KernelOptions

__all__ = ["IndexOps", "KernelBackend", "KernelOps", "KernelOptions", "SamplingOps", "load_index_ops",
           "load_ops", "load_sampling_ops"]

KernelBackend = Literal["triton", "reference"]

# op name -> family module that defines it (as `<op>` and `<op>_reference`).
OP_FAMILIES: dict[str, str] = {
    "linear": "gemm",
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "head_rms_norm": "norm",
    "layer_norm": "norm",
    "fused_add_layer_norm": "norm",
    "apply_rotary": "rotary",
    "silu_and_mul": "activation",
    "gelu_and_mul": "activation",
    "gelu": "activation",
    "embedding": "embedding",
    "store_kv": "kv_cache",
    "qk_norm_rope_store": "qkv_prep",
    "extend_attention": "attention",
    "decode_attention": "attention",
    "moe_topk": "moe",
    "fused_moe": "moe",
    "mrope_cos_sin": "rotary",
    "vision_attention": "vision_attention",
    "add_interpolated_pos_embed": "pos_embed",
    "scatter_rows": "scatter",
    "tree_attention": "tree_attention",
}
SAMPLING_OPS: dict[str, str] = {op: "sampling" for op in (
    "apply_penalties", "apply_token_bitmask", "sample", "greedy", "compute_logprobs", "token_ranks")}
SAMPLING_OPS["store_future_tokens"] = "future"
INDEX_OPS: dict[str, str] = {op: "indexing" for op in (
    "write_req_to_token", "extend_positions", "gather_req_slots")}
INDEX_OPS["resolve_future_tokens"] = "future"


@dataclasses.dataclass(frozen=True)
class KernelOps:
    """The ops a model may call, bound to one backend."""

    backend: str
    linear: Callable
    rms_norm: Callable
    fused_add_rms_norm: Callable
    head_rms_norm: Callable
    layer_norm: Callable
    fused_add_layer_norm: Callable
    apply_rotary: Callable
    silu_and_mul: Callable
    gelu_and_mul: Callable
    gelu: Callable
    embedding: Callable
    store_kv: Callable
    qk_norm_rope_store: Callable
    extend_attention: Callable
    decode_attention: Callable
    moe_topk: Callable
    fused_moe: Callable
    mrope_cos_sin: Callable
    vision_attention: Callable
    add_interpolated_pos_embed: Callable
    scatter_rows: Callable
    tree_attention: Callable


@dataclasses.dataclass(frozen=True)
class SamplingOps:
    """The sample stage's ops (triton_kernels/sampling/), bound to one backend."""

    backend: str
    apply_penalties: Callable
    apply_token_bitmask: Callable
    sample: Callable
    greedy: Callable
    compute_logprobs: Callable
    token_ranks: Callable          # 1 + logits above each row's token (prompt logprob ranks)
    store_future_tokens: Callable  # future.py: tokens kept on the device for the next step


@dataclasses.dataclass(frozen=True)
class IndexOps:
    """The forward stage's index helpers (triton_kernels/indexing.py), bound to one backend."""

    backend: str
    write_req_to_token: Callable
    extend_positions: Callable
    gather_req_slots: Callable
    resolve_future_tokens: Callable  # future.py: placeholders of the next step's inputs


def _bind(families: dict[str, str], backend: KernelBackend, options: KernelOptions) -> dict[str, Callable]:
    """op name -> launcher of the chosen backend; Triton launchers that take an
    option's keyword (``gemm_ws``, ``pdl``) get it bound to the option's value."""
    if backend not in ("triton", "reference"):
        raise ValueError(f"unknown kernel backend {backend!r}; expected 'triton' or 'reference'")
    if not isinstance(options, KernelOptions):
        raise TypeError(f"options must be a KernelOptions, got {type(options).__name__}")
    switches = dataclasses.asdict(options)
    ops: dict[str, Callable] = {}
    for op, family in families.items():
        module = importlib.import_module(f"triton_kernels.{family}")
        if backend == "reference":
            ops[op] = getattr(module, op + "_reference")
            continue
        fn = getattr(module, op)
        params = inspect.signature(fn).parameters
        bound = {name: value for name, value in switches.items() if name in params}
        ops[op] = functools.partial(fn, **bound) if bound else fn
    return ops


def load_ops(backend: KernelBackend, options: KernelOptions = KernelOptions()) -> KernelOps:
    """Bind every op of OP_FAMILIES to the chosen backend (and, for Triton, the options)."""
    return KernelOps(backend=backend, **_bind(OP_FAMILIES, backend, options))


def load_sampling_ops(backend: KernelBackend, options: KernelOptions = KernelOptions()) -> SamplingOps:
    """The sample stage's table, chosen the same way as ``load_ops``."""
    return SamplingOps(backend=backend, **_bind(SAMPLING_OPS, backend, options))


def load_index_ops(backend: KernelBackend, options: KernelOptions = KernelOptions()) -> IndexOps:
    """The forward stage's index table, chosen the same way as ``load_ops``."""
    return IndexOps(backend=backend, **_bind(INDEX_OPS, backend, options))
