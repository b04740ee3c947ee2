"""Attention over the paged KV pool: extend (prefill) and decode.

KV pool (one per layer): ``k_cache[num_slots, Hk, D]`` and ``v_cache`` alike;
``req_to_token[R, L]`` (int32) maps request row ``r`` and token position ``i``
to the slot holding that token's K/V. Cached keys are read through
``req_to_token``, so the kernels never care where the pages of a request lie;
extend reads the keys of the tokens it is adding from the contiguous ``k``/``v``
the layer just computed (and stored into the pool for later steps).

Math, per query head ``h`` (kv head ``h // (Hq // Hk)``: GQA/MQA/MHA)::

    s_j = sm_scale * q . k_j                          (fp32)
    s_j = cap * tanh(s_j / cap)                       (if logit_cap > 0)
    key j visible iff  j <= pos(q)                    (causal)
                  and  pos(q) - j < sliding_window    (if sliding_window > 0)
    o   = sum_j softmax(s)_j v_j                      (online softmax, fp32)

``sliding_window`` counts the query's own token (Hugging Face convention: a
window of W sees W keys). Dtypes: q, k_cache, v_cache share fp16, bf16 or
fp32; the output has q's dtype. Head dims up to 256 (64/80/96/128/256 ...):
the kernels pad to the next power of two and mask.

FP8 KV pool (``--kv-cache-dtype fp8_e4m3``): k_cache/v_cache may be
``float8_e4m3fn`` whatever q's dtype; every tile read from the pool is
dequantised in registers, ``k = float(k_cache) * k_scale`` (``v_scale`` alike,
per-tensor scales passed by keyword, ``kv_fp8.py``), before the dot products.
The new tokens' k/v of an extend step come unquantised from the layer.

* ``extend_attention`` (``extend.py``): a ragged batch; request ``b`` has
  ``prefix_lens[b]`` cached tokens (in the pool) and ``extend_lens[b]`` new ones
  whose rows of ``q``, ``k``, ``v`` start at ``extend_start_loc[b]``. Pure prefill (prefix 0),
  prefix-hit extend and 1-token rows share one launch. Compute-bound:
  ``4 * Hq * D * (visible (q, k) pairs)`` FLOPs.
* ``decode_attention`` (``decode.py``): one query per request; split-KV
  flash-decoding (partial softmax per split, then a reduction). Memory-bound:
  the time to beat is ``K+V bytes / bandwidth``.

``reference.py`` holds the plain-PyTorch references and ``flops_bytes``.

Measured on an H200 (bf16, triton 3.6, ``perf/bench_kernels.py``; Llama-3.1-8B
heads Hq=32, Hk=8, D=128): prefill at S=1k/4k/8k runs at 245/461/492 TFLOP/s,
0.89/0.92/0.89x torch SDPA (causal, GQA, its own contiguous layout), with the
new K/V read by TMA from the fused qkv projection's rows
(``perf/results/attention-extend-nvidia-h200.json``). Decode reads K+V at
80-101% of the device-to-device copy bandwidth (read+write) at (B, ctx) =
(1, 32k), (32, 4k), (128, 2k), 0.94-0.95x SDPA on contiguous K/V.
"""
from triton_kernels.attention.decode import decode_attention, default_num_kv_splits
from triton_kernels.attention.extend import extend_attention
from triton_kernels.attention.reference import (
    decode_attention_reference,
    decode_flops_bytes,
    extend_attention_reference,
    extend_flops_bytes,
)

__all__ = [
    "extend_attention", "extend_attention_reference", "extend_flops_bytes",
    "decode_attention", "decode_attention_reference", "decode_flops_bytes",
    "default_num_kv_splits",
]
