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
apply_rotary         rotary         (q[T,Hq,D], k[T,Hk,D], positions[T] int64,
                                    cos_sin_cache[P, rotary_dim], is_neox) -> None,
                                    q and k rotated in place (first rotary_dim dims)
silu_and_mul         activation     (x[M,2I]) -> y[M,I] = silu(x[:, :I]) * x[:, I:]
gelu_and_mul         activation     (x[M,2I], approximate "none"|"tanh") -> y[M,I]
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

Sampling (``sampling.py``) and the scheduler's index helpers (``indexing.py``)
are used by the sample and forward stages, not by models; their launchers are
documented in their own files.
"""
from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Literal

KernelBackend = Literal["triton", "reference"]

# op name -> family module that defines it (as `<op>` and `<op>_reference`).
OP_FAMILIES: dict[str, str] = {
    "linear": "gemm",
    "rms_norm": "norm",
    "fused_add_rms_norm": "norm",
    "head_rms_norm": "norm",
    "apply_rotary": "rotary",
    "silu_and_mul": "activation",
    "gelu_and_mul": "activation",
    "embedding": "embedding",
    "store_kv": "kv_cache",
    "qk_norm_rope_store": "qkv_prep",
    "extend_attention": "attention",
    "decode_attention": "attention",
    "moe_topk": "moe",
    "fused_moe": "moe",
}


@dataclasses.dataclass(frozen=True)
class KernelOps:
    """The ops a model may call, bound to one backend."""

    backend: str
    linear: Callable
    rms_norm: Callable
    fused_add_rms_norm: Callable
    head_rms_norm: Callable
    apply_rotary: Callable
    silu_and_mul: Callable
    gelu_and_mul: Callable
    embedding: Callable
    store_kv: Callable
    qk_norm_rope_store: Callable
    extend_attention: Callable
    decode_attention: Callable
    moe_topk: Callable
    fused_moe: Callable


def load_ops(backend: KernelBackend) -> KernelOps:
    """Bind every op of OP_FAMILIES to the chosen backend."""
    if backend not in ("triton", "reference"):
        raise ValueError(f"unknown kernel backend {backend!r}; expected 'triton' or 'reference'")
    suffix = "" if backend == "triton" else "_reference"
    ops: dict[str, Callable] = {}
    for op, family in OP_FAMILIES.items():
        module = importlib.import_module(f"triton_kernels.{family}")
        ops[op] = getattr(module, op + suffix)
    return KernelOps(backend=backend, **ops)
