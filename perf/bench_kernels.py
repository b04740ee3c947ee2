"""Kernel benchmark: every Triton op beside its anchor, on the shapes of real models.

Usage (GPU only)::

    python perf/bench_kernels.py [--only gemm,norm,...] [--quick] [--sweep-gemm 1,64,1024]

Prints the device and torch/triton versions, measures the device-to-device
copy bandwidth (bytes read + written), then one table:

    kernel | shape | ours (us) | anchor (us) | ratio | TFLOP/s | % of copy bandwidth

``ratio`` is anchor time / our time (> 1: we are faster). The anchor is cuBLAS
(``F.linear``) for gemm and the plain-PyTorch path for the memory-bound ops,
whose real yardstick is the last column (bytes moved at least once over the
measured copy bandwidth). Times are medians of
``triton.testing.do_bench_cudagraph``: calls replayed from a CUDA graph, as the
decode path runs, so host launch overhead stays out of the numbers for ours
and the anchor alike. Ours and the anchor are timed in alternation
(``--rounds``, default 3) and each keeps the median of its rounds. Inputs are
rotated over at least three copies (more when they are smaller than twice
L2): no call finds its inputs in cache, and no time rests on where a single
allocation landed in DRAM. Results go to ``perf/results/kernels-<device>.json``
(and ``$OUT`` when set).

Shapes come from Llama-3.1-8B-Instruct and Qwen3-8B (config.json values
copied in perf/gemm_shapes.py; checked against the configs bundled in
tests/models/configs, or ``--models-dir``). Our launchers are bound with
``load_ops`` as the server binds them; ``--disable-gemm-ws`` and
``--disable-pdl`` set the matching ``KernelOptions`` for A/B runs.
``--sweep-gemm`` also times candidate gemm configs per shape and bucket: the
data behind the explicit tables in ``triton_kernels/gemm_tables.py``.

Structure: a family is a function returning a list of ``Case``; FAMILIES maps
names to them; one printer and one JSON writer serve all families.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemm_shapes import (  # noqa: E402
    DTYPE, MODELS, Ctx, candidate_configs, gemm_shapes, median_us, rotating,
)
from triton_kernels import KernelOptions, load_ops  # noqa: E402

GEMM_MS = (1, 4, 16, 64, 256, 1024, 4096)
QUICK_GEMM_MS = (1, 16, 64, 1024, 4096)


@dataclasses.dataclass
class Case:
    """One row of the table: our op and its anchor on the same inputs."""

    family: str
    kernel: str
    shape: str
    ours: Callable[[], object]
    anchor: Callable[[], object] | None
    anchor_name: str
    bytes_moved: int = 0        # minimum bytes (each input read once, output written once)
    flops: int = 0


def model_dims(models_dir: Path | None) -> dict[str, dict[str, int]]:
    """The table above, checked against the real config.json files: ``models_dir``'s
    (``<name>/config.json``) when given, else those bundled in tests/models/configs."""
    bundled = Path(__file__).resolve().parents[1] / "tests" / "models" / "configs"
    for name, dims in MODELS.items():
        path = models_dir / name / "config.json" if models_dir else bundled / f"{name}.json"
        if path.exists():
            config = json.loads(path.read_text())
            for key, value in dims.items():
                found = config.get(key, config["hidden_size"] // config["num_attention_heads"]
                                   if key == "head_dim" else None)
                if found != value:
                    raise SystemExit(f"{path}: {key}={found}, bench table says {value}")
    return MODELS


# ----------------------------------------------------------------------------- gemm


def gemm_cases(ctx: Ctx) -> list[Case]:
    from triton_kernels import gemm

    linear = load_ops("triton", ctx.options).linear
    cases = []
    for name, N, K in gemm_shapes():
        for M in (QUICK_GEMM_MS if ctx.quick else GEMM_MS):
            flops, num_bytes = gemm.flops_bytes(M, N, K, DTYPE)
            make = lambda M=M, N=N, K=K: (torch.randn(M, K, device=ctx.device, dtype=DTYPE),
                                          torch.randn(N, K, device=ctx.device, dtype=DTYPE) / K ** 0.5)
            inputs = rotating(ctx, make, num_bytes)
            cases.append(Case("gemm", f"linear {name}", f"M={M} N={N} K={K}",
                              ours=lambda f=inputs: linear(*f()),
                              anchor=lambda f=inputs: torch.nn.functional.linear(*f()),
                              anchor_name="cuBLAS", bytes_moved=num_bytes, flops=flops))
    return cases


def gemm_sweep_configs(M: int) -> list:
    """Candidates around the tables of triton_kernels/gemm_tables.py: decode shapes
    (M <= 64) take the grid of perf/gemm_shapes.py; prefill shapes the tiles below."""
    from triton_kernels.gemm_tables import GemmConfig

    if M <= 64:
        return candidate_configs(M, {"stream", "tma"})
    tma = [(128, 256, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4), (64, 64, 64, 4, 4),
           (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]
    out = [GemmConfig("tma", bm, bn, bk, group_m=8, num_warps=w, num_stages=s) for bm, bn, bk, w, s in tma]
    out += [GemmConfig("stream", 64, 128, 64, split_k=2, num_warps=4, num_stages=4),
            GemmConfig("tiled", 128, 128, 64, num_warps=8, num_stages=3)]
    return out


def gemm_sweep(ctx: Ctx, sweep_ms: list[int]) -> list[dict]:
    """Time candidate configs per (shape, M); print the best of each."""
    from triton_kernels import gemm

    results = []
    for name, N, K in gemm_shapes():
        for M in sweep_ms:
            _, num_bytes = gemm.flops_bytes(M, N, K, DTYPE)
            sets = rotating(ctx, lambda M=M, N=N, K=K: (
                torch.randn(M, K, device=ctx.device, dtype=DTYPE),
                torch.randn(N, K, device=ctx.device, dtype=DTYPE) / K ** 0.5,
                torch.empty(M, N, device=ctx.device, dtype=DTYPE)), num_bytes)
            x, w, y = sets()
            expect = torch.nn.functional.linear(x, w)
            cublas_us = median_us(lambda: torch.nn.functional.linear(*sets()[:2]), quick=True)
            timings = []
            for config in gemm_sweep_configs(M):
                try:
                    gemm.launch_linear(x, w, None, y, config)
                    err = ((y.float() - expect.float()).norm() / expect.float().norm()).item()
                    if not err < 2e-2:
                        raise RuntimeError(f"wrong result (rel err {err:.2e})")
                    us = median_us(lambda c=config: gemm.launch_linear(*_with_no_bias(sets()), c),
                                   quick=True)
                except Exception as exc:  # a config the chip cannot take: report, keep sweeping
                    print(f"  sweep {name} M={M} {config}: {type(exc).__name__}: {str(exc)[:120]}")
                    continue
                timings.append((us, config))
            if not timings:
                print(f"sweep {name} M={M}: no candidate config ran")
                continue
            timings.sort(key=lambda t: t[0])
            best_us, best = timings[0]
            print(f"sweep {name:16s} M={M:5d} cuBLAS {cublas_us:9.1f} us  best {best_us:9.1f} us "
                  f"({cublas_us / best_us:4.2f}x) {best}")
            results.append(dict(shape=name, M=M, N=N, K=K, cublas_us=cublas_us,
                                top=[dict(us=us, config=dataclasses.asdict(c)) for us, c in timings[:4]]))
            del x, w, y, expect
            torch.cuda.empty_cache()
    return results


def _with_no_bias(xwy: tuple) -> tuple:
    x, w, y = xwy
    return x, w, None, y


# ----------------------------------------------------------------------------- memory-bound families


def norm_cases(ctx: Ctx) -> list[Case]:
    from triton_kernels import norm

    ops = load_ops("triton", ctx.options)
    cases = []
    H = MODELS["Llama-3.1-8B-Instruct"]["hidden_size"]
    w = torch.randn(H, device=ctx.device, dtype=DTYPE)
    for M in ((1, 4096) if ctx.quick else (1, 256, 4096, 16384)):
        _, nb = norm.flops_bytes(M, H, DTYPE)
        xs = rotating(ctx, lambda: (torch.randn(M, H, device=ctx.device, dtype=DTYPE),), nb)
        cases.append(Case("norm", "rms_norm", f"M={M} H={H}",
                          lambda s=xs: ops.rms_norm(s()[0], w, 1e-5),
                          lambda s=xs: norm.rms_norm_reference(s()[0], w, 1e-5), "torch", nb))
        _, nb2 = norm.flops_bytes(M, H, DTYPE, fused_add=True)
        pairs = rotating(ctx, lambda: (torch.randn(M, H, device=ctx.device, dtype=DTYPE),
                                       torch.randn(M, H, device=ctx.device, dtype=DTYPE)), nb2)
        cases.append(Case("norm", "fused_add_rms_norm", f"M={M} H={H}",
                          lambda s=pairs: ops.fused_add_rms_norm(*s(), w, 1e-5),
                          lambda s=pairs: norm.fused_add_rms_norm_reference(*s(), w, 1e-5), "torch", nb2))
        d = MODELS["Qwen3-8B"]
        heads, D = d["num_attention_heads"], d["head_dim"]
        wd = torch.randn(D, device=ctx.device, dtype=DTYPE)
        _, nb3 = norm.flops_bytes(M * heads, D, DTYPE)
        qs = rotating(ctx, lambda: (torch.randn(M, heads, D, device=ctx.device, dtype=DTYPE),), nb3)
        cases.append(Case("norm", "head_rms_norm", f"T={M} heads={heads} D={D}",
                          lambda s=qs, wd=wd: norm.head_rms_norm(s()[0], wd, 1e-6),
                          lambda s=qs, wd=wd: norm.head_rms_norm_reference(s()[0], wd, 1e-6), "torch", nb3))
    return cases


def rotary_cases(ctx: Ctx) -> list[Case]:
    from triton_kernels import rotary

    d = MODELS["Llama-3.1-8B-Instruct"]
    hq, hk, D = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    cache = rotary.build_cos_sin_cache(D, 131072, 500000.0, {"rope_type": "llama3", "factor": 8.0,
                                       "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                       "original_max_position_embeddings": 8192}, torch.float32, ctx.device)
    cases = []
    for T in ((1, 4096) if ctx.quick else (1, 256, 4096, 16384)):
        _, nb = rotary.flops_bytes(T, hq, hk, D, DTYPE)

        def make(T=T):
            qkv = torch.randn(T, (hq + 2 * hk) * D, device=ctx.device, dtype=DTYPE)
            pos = torch.randint(0, 131072, (T,), device=ctx.device)
            return qkv[:, : hq * D].view(T, hq, D), qkv[:, hq * D: (hq + hk) * D].view(T, hk, D), pos
        sets = rotating(ctx, make, nb)
        cases.append(Case("rotary", "apply_rotary neox", f"T={T} Hq={hq} Hk={hk} D={D}",
                          lambda s=sets: rotary.apply_rotary(*s(), cache, True),
                          lambda s=sets: rotary.apply_rotary_reference(*s(), cache, True), "torch", nb))
    return cases


def qkv_prep_cases(ctx: Ctx) -> list[Case]:
    """q/k norm + RoPE + KV write in one kernel vs the three Triton kernels it replaces (Qwen3-8B)."""
    from triton_kernels import kv_cache, norm, rotary

    ops = load_ops("triton", ctx.options)
    d = MODELS["Qwen3-8B"]
    hq, hk, D = d["num_attention_heads"], d["num_key_value_heads"], d["head_dim"]
    cache = rotary.build_cos_sin_cache(D, 40960, 1000000.0, None, torch.float32, ctx.device)
    q_w = torch.ones(D, device=ctx.device, dtype=DTYPE)
    cases = []
    for T in ((1, 4096) if ctx.quick else (1, 64, 4096, 16384)):
        # q, k read and written, v read, k and v written to the pool
        nb = torch.empty((), dtype=DTYPE).element_size() * T * D * (2 * hq + 4 * hk + 2 * hk)

        def make(T=T):
            qkv = torch.randn(T, (hq + 2 * hk) * D, device=ctx.device, dtype=DTYPE)
            pool = torch.zeros(2, T + 1, hk, D, device=ctx.device, dtype=DTYPE)
            return (qkv[:, : hq * D].view(T, hq, D), qkv[:, hq * D: (hq + hk) * D].view(T, hk, D),
                    qkv[:, (hq + hk) * D:].view(T, hk, D), torch.randint(0, 40960, (T,), device=ctx.device),
                    pool[0], pool[1], torch.arange(1, T + 1, device=ctx.device))
        sets = rotating(ctx, make, nb)

        def fused(s=sets):
            q, k, v, pos, kc, vc, slots = s()
            ops.qk_norm_rope_store(q, k, v, pos, cache, True, kc, vc, slots, q_w, q_w, 1e-6)

        def unfused(s=sets):
            q, k, v, pos, kc, vc, slots = s()
            q, k = norm.head_rms_norm(q, q_w, 1e-6), norm.head_rms_norm(k, q_w, 1e-6)
            rotary.apply_rotary(q, k, pos, cache, True)
            kv_cache.store_kv(kc, vc, k, v, slots)
        cases.append(Case("qkv_prep", "qk_norm_rope_store", f"T={T} Hq={hq} Hk={hk} D={D}",
                          fused, unfused, "3 Triton kernels", nb))
    return cases


def activation_cases(ctx: Ctx) -> list[Case]:
    from triton_kernels import activation

    ops = load_ops("triton", ctx.options)
    inter = MODELS["Llama-3.1-8B-Instruct"]["intermediate_size"]
    cases = []
    for M in ((1, 4096) if ctx.quick else (1, 256, 4096, 16384)):
        _, nb = activation.flops_bytes(M, inter, DTYPE)
        xs = rotating(ctx, lambda M=M: (torch.randn(M, 2 * inter, device=ctx.device, dtype=DTYPE),), nb)

        def torch_silu(s=xs):
            gate, up = s()[0].chunk(2, dim=-1)
            return torch.nn.functional.silu(gate) * up
        cases.append(Case("activation", "silu_and_mul", f"M={M} I={inter}",
                          lambda s=xs: ops.silu_and_mul(s()[0]), torch_silu, "torch", nb))
        if not ctx.quick:
            cases.append(Case("activation", "gelu_and_mul tanh", f"M={M} I={inter}",
                              lambda s=xs: ops.gelu_and_mul(s()[0], "tanh"),
                              lambda s=xs: activation.gelu_and_mul_reference(s()[0], "tanh"), "torch", nb))
    return cases


def embedding_cases(ctx: Ctx) -> list[Case]:
    from triton_kernels import embedding

    d = MODELS["Llama-3.1-8B-Instruct"]
    w = torch.randn(d["vocab_size"], d["hidden_size"], device=ctx.device, dtype=DTYPE)
    cases = []
    for T in ((1, 4096) if ctx.quick else (1, 256, 4096, 16384)):
        _, nb = embedding.flops_bytes(T, d["hidden_size"], DTYPE)
        ids = rotating(ctx, lambda T=T: (torch.randint(0, d["vocab_size"], (T,), device=ctx.device),), nb)
        cases.append(Case("embedding", "embedding", f"T={T} V={d['vocab_size']} H={d['hidden_size']}",
                          lambda s=ids: embedding.embedding(s()[0], w),
                          lambda s=ids: torch.nn.functional.embedding(s()[0], w), "torch", nb))
    return cases


def kv_cache_cases(ctx: Ctx) -> list[Case]:
    from triton_kernels import kv_cache

    d = MODELS["Llama-3.1-8B-Instruct"]
    hk, D, num_slots = d["num_key_value_heads"], d["head_dim"], 65536
    k_cache = torch.zeros(num_slots, hk, D, device=ctx.device, dtype=DTYPE)
    v_cache = torch.zeros_like(k_cache)
    cases = []
    for T in ((1, 4096) if ctx.quick else (1, 256, 4096, 16384)):
        _, nb = kv_cache.flops_bytes(T, hk, D, DTYPE)
        sets = rotating(ctx, lambda T=T: (torch.randn(T, hk, D, device=ctx.device, dtype=DTYPE),
                                          torch.randn(T, hk, D, device=ctx.device, dtype=DTYPE),
                                          torch.randperm(num_slots, device=ctx.device)[:T]), nb)
        cases.append(Case("kv_cache", "store_kv", f"T={T} Hk={hk} D={D}",
                          lambda s=sets: kv_cache.store_kv(k_cache, v_cache, *s()),
                          lambda s=sets: kv_cache.store_kv_reference(k_cache, v_cache, *s()), "torch", nb))
    return cases


FAMILIES: dict[str, Callable[[Ctx], list[Case]]] = {
    "gemm": gemm_cases,
    "norm": norm_cases,
    "rotary": rotary_cases,
    "qkv_prep": qkv_prep_cases,
    "activation": activation_cases,
    "embedding": embedding_cases,
    "kv_cache": kv_cache_cases,
}

# ============================================================================
# Families of the attention, moe and sampling kernels register below this line
# (each a `def <family>_cases(ctx: Ctx) -> list[Case]` plus a FAMILIES entry).
# ============================================================================

ATTN_MODELS = {  # (Hq, Hk, D)
    "llama3.1-8b": (32, 8, 128),
    "qwen3-8b": (32, 8, 128),
}
QWEN3_MOE = dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, top_k=8)  # Qwen3-30B-A3B


def _contiguous_pool(num_tokens: int, hk: int, D: int, ctx: Ctx, shuffle: bool):
    """A KV pool holding num_tokens tokens (slot 0 unused), and their slot list."""
    k_cache = torch.randn(num_tokens + 1, hk, D, device=ctx.device, dtype=DTYPE)
    v_cache = torch.randn_like(k_cache)
    slots = (torch.randperm(num_tokens, device=ctx.device) if shuffle
             else torch.arange(num_tokens, device=ctx.device)) + 1
    return k_cache, v_cache, slots.to(torch.int32)


def _fused_qkv(num_tokens: int, hq: int, hk: int, D: int, ctx: Ctx):
    """q[T,Hq,D], k[T,Hk,D], v[T,Hk,D] as views of one qkv projection, as the model has them."""
    qkv = torch.randn(num_tokens, (hq + 2 * hk) * D, device=ctx.device, dtype=DTYPE)
    q = qkv[:, : hq * D].unflatten(1, (hq, D))
    k = qkv[:, hq * D:(hq + hk) * D].unflatten(1, (hk, D))
    v = qkv[:, (hq + hk) * D:].unflatten(1, (hk, D))
    return q, k, v


def attention_cases(ctx: Ctx) -> list[Case]:
    """Prefill (extend, prefix 0, new K/V from the fused projection) vs SDPA flash; decode
    vs SDPA and the copy roofline."""
    from triton_kernels import attention

    ops = load_ops("triton", ctx.options)
    cases = []
    seen = set()
    for model, (hq, hk, D) in ATTN_MODELS.items():
        if (hq, hk, D) in seen:
            continue
        seen.add((hq, hk, D))
        for S in ((1024, 8192) if ctx.quick else (1024, 4096, 8192)):
            k_cache, v_cache, slots = _contiguous_pool(S, hk, D, ctx, shuffle=False)
            req_to_token = slots[None, :].contiguous()
            q, k, v = _fused_qkv(S, hq, hk, D, ctx)
            zero = torch.zeros(1, dtype=torch.int32, device=ctx.device)
            lens = torch.full((1,), S, dtype=torch.int32, device=ctx.device)
            flops, nbytes = attention.extend_flops_bytes([S], [0], hq, hk, D)
            q4 = q.transpose(0, 1)[None].contiguous()                       # [1, Hq, S, D]
            k4 = k.transpose(0, 1)[None].contiguous()                       # [1, Hk, S, D]
            v4 = v.transpose(0, 1)[None].contiguous()
            sdpa = lambda q4=q4, k4=k4, v4=v4: torch.nn.functional.scaled_dot_product_attention(
                q4, k4, v4, is_causal=True, enable_gqa=True)
            cases.append(Case("attention", f"extend {model}", f"B=1 S={S} Hq={hq} Hk={hk} D={D}",
                              ours=lambda q=q, k=k, v=v, kc=k_cache, vc=v_cache, r=req_to_token,
                              z=zero, n=lens, S=S:
                              attention.extend_attention(q, k, v, kc, vc, r, z, z, n, z, S, D ** -0.5),
                              anchor=sdpa, anchor_name="SDPA causal gqa", bytes_moved=int(nbytes),
                              flops=int(flops)))
    hq, hk, D = ATTN_MODELS["llama3.1-8b"]
    for batch, ctx_len in ((1, 32768), (32, 4096), (128, 2048)):
        k_cache, v_cache, slots = _contiguous_pool(batch * ctx_len, hk, D, ctx, shuffle=True)
        req_to_token = slots.view(batch, ctx_len).contiguous()
        rows = torch.arange(batch, device=ctx.device)
        seq_lens = torch.full((batch,), ctx_len, dtype=torch.int32, device=ctx.device)
        q = torch.randn(batch, hq, D, device=ctx.device, dtype=DTYPE)
        flops, nbytes = attention.decode_flops_bytes([ctx_len] * batch, hq, hk, D)
        k4 = k_cache[1:].view(batch, ctx_len, hk, D).transpose(1, 2).contiguous()
        v4 = v_cache[1:].view(batch, ctx_len, hk, D).transpose(1, 2).contiguous()
        q4 = q[:, :, None, :]
        sdpa = lambda q4=q4, k4=k4, v4=v4: torch.nn.functional.scaled_dot_product_attention(
            q4, k4, v4, enable_gqa=True)
        cases.append(Case("attention", "decode llama3.1-8b", f"B={batch} ctx={ctx_len} (shuffled slots)",
                          ours=lambda q=q, k=k_cache, v=v_cache, r=req_to_token, i=rows, s=seq_lens:
                          ops.decode_attention(q, k, v, r, i, s, D ** -0.5),
                          anchor=sdpa, anchor_name="SDPA contiguous KV", bytes_moved=int(nbytes),
                          flops=int(flops)))
        del k4, v4
    return cases


def moe_cases(ctx: Ctx) -> list[Case]:
    """fused_moe (align + gate/up + down + sum) on Qwen3-30B-A3B shapes."""
    from triton_kernels import moe

    H, I, E, k = (QWEN3_MOE[key] for key in ("hidden_size", "moe_intermediate_size", "num_experts", "top_k"))
    w13 = torch.randn(E, 2 * I, H, device=ctx.device, dtype=DTYPE) * H ** -0.5
    w2 = torch.randn(E, H, I, device=ctx.device, dtype=DTYPE) * I ** -0.5
    cases = []
    for T in ((1, 64, 4096) if ctx.quick else (1, 16, 64, 256, 1024, 4096)):
        x = torch.randn(T, H, device=ctx.device, dtype=DTYPE)
        weights, ids = moe.moe_topk(torch.randn(T, E, device=ctx.device), k, True)
        flops, nbytes = moe.moe_flops_bytes(T, k, E, H, I)
        cases.append(Case("moe", "fused_moe qwen3-30b-a3b", f"T={T} E={E} k={k} H={H} I={I}",
                          ours=lambda x=x, w=weights, i=ids: moe.fused_moe(x, w13, w2, w, i),
                          anchor=None, anchor_name="-", bytes_moved=int(nbytes), flops=int(flops)))
    return cases


def _torch_sample(logits, counts, temperature, top_k, top_p, rep, freq, pres):
    """The sort-based PyTorch path (penalties, temperature, top-k, top-p, exponential race)."""
    seen = counts > 0
    logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - counts * freq - seen * pres
    probs = torch.softmax(logits / temperature, dim=-1)
    probs_sort, probs_idx = probs.sort(dim=-1, descending=True)
    cum = probs_sort.cumsum(dim=-1)
    probs_sort[(cum - probs_sort) > top_p] = 0.0
    probs_sort[:, top_k:] = 0.0
    choice = (probs_sort / torch.empty_like(probs_sort).exponential_(1)).argmax(dim=-1, keepdim=True)
    return probs_idx.gather(1, choice)


def sampling_cases(ctx: Ctx) -> list[Case]:
    """Penalties + top-k/top-p sampling and logprobs over Qwen3's vocab, batch 128."""
    from triton_kernels import sampling

    B, V = 128, MODELS["Qwen3-8B"]["vocab_size"]
    nbytes = B * V * 4 * 2

    def make():
        logits = torch.randn(B, V, device=ctx.device) * 3
        counts = (torch.rand(B, V, device=ctx.device) < 0.002).to(torch.int32)
        return logits, counts
    sets = rotating(ctx, make, nbytes)
    full = lambda value, dtype: torch.full((B,), value, device=ctx.device, dtype=dtype)
    temps, ks, ps, mps = full(0.8, torch.float32), full(50, torch.int32), full(0.9, torch.float32), full(0.0, torch.float32)
    rep, freq, pres = full(1.1, torch.float32), full(0.1, torch.float32), full(0.1, torch.float32)
    seeds, steps = torch.arange(B, device=ctx.device), torch.zeros(B, dtype=torch.int64, device=ctx.device)

    def ours():
        logits, counts = sets()
        sampling.apply_penalties(logits, counts, rep, freq, pres)
        return sampling.sample(logits, temps, ks, ps, mps, seeds, steps)

    def anchor():
        logits, counts = sets()
        return _torch_sample(logits, counts, 0.8, 50, 0.9, 1.1, 0.1, 0.1)

    def ours_top_p_only():
        return sampling.sample(sets()[0], temps, full(0, torch.int32), ps, mps, seeds, steps)

    tokens = torch.zeros(B, dtype=torch.int64, device=ctx.device)

    def logprobs_anchor():
        lp = torch.log_softmax(sets()[0], dim=-1)
        return lp.gather(1, tokens[:, None]), lp.topk(5, dim=-1)
    greedy_cases = []
    for rows in (1, B):
        greedy_sets = rotating(ctx, lambda rows=rows: (torch.randn(rows, V, device=ctx.device),), rows * V * 4)
        greedy_cases.append(Case("sampling", "greedy (split argmax)", f"B={rows} V={V}",
                                 lambda g=greedy_sets: sampling.greedy(*g()),
                                 lambda g=greedy_sets: torch.argmax(g()[0], dim=-1), "torch argmax",
                                 bytes_moved=rows * V * 4))
    return greedy_cases + [
        Case("sampling", "penalties+sample k50 p0.9", f"B={B} V={V}", ours, anchor, "torch sort",
             bytes_moved=nbytes),
        Case("sampling", "sample p0.9 only", f"B={B} V={V}", ours_top_p_only, anchor, "torch sort",
             bytes_moved=B * V * 4),
        Case("sampling", "compute_logprobs top5", f"B={B} V={V}",
             lambda: sampling.compute_logprobs(sets()[0], tokens, 5), logprobs_anchor,
             "torch log_softmax+topk", bytes_moved=B * V * 4),
    ]


FAMILIES.update(attention=attention_cases, moe=moe_cases, sampling=sampling_cases)


QWEN25_VL_VISION = dict(num_heads=16, head_dim=80)   # Qwen2.5-VL-7B vision tower (hidden 1280)


def vision_attention_cases(ctx: Ctx) -> list[Case]:
    """Packed non-causal attention over equal segments vs SDPA on the same segments as a batch
    (the varlen anchor: with equal lengths a [S, H, L, D] batch is exactly the packed problem).
    Shapes of a 1024x768 image in Qwen2.5-VL-7B: 4144 patches (74 x 56) under full attention,
    and its 8 x 8-patch windows."""
    from triton_kernels import vision_attention as va

    H, D = QWEN25_VL_VISION["num_heads"], QWEN25_VL_VISION["head_dim"]
    cases = []
    shapes = ((1, 4144), (64, 64), (8, 1024)) if not ctx.quick else ((1, 4144), (64, 64))
    for segments, L in shapes:
        N = segments * L
        qkv = torch.randn(N, 3 * H * D, device=ctx.device, dtype=DTYPE)
        q, k, v = (qkv[:, i * H * D:(i + 1) * H * D].view(N, H, D) for i in range(3))
        cu = torch.arange(0, N + 1, L, dtype=torch.int32, device=ctx.device)
        q4, k4, v4 = (t.view(segments, L, H, D).transpose(1, 2).contiguous() for t in (q, k, v))
        flops, nbytes = va.flops_bytes([L] * segments, H, D, DTYPE)
        cases.append(Case("vision_attention", "vision_attention", f"S={segments} L={L} H={H} D={D}",
                          ours=lambda q=q, k=k, v=v, cu=cu, L=L: va.vision_attention(q, k, v, cu, L, D ** -0.5),
                          anchor=lambda q4=q4, k4=k4, v4=v4: torch.nn.functional.scaled_dot_product_attention(
                              q4, k4, v4),
                          anchor_name="SDPA batch of segments", bytes_moved=int(nbytes), flops=int(flops)))
    return cases


FAMILIES.update(vision_attention=vision_attention_cases)


# ----------------------------------------------------------------------------- quantized GEMMs, FP8 KV


QUANT_MS = (1, 16, 1024, 4096)


def _quant_weights(N: int, K: int, ctx: Ctx) -> dict[str, torch.Tensor]:
    """One random bf16 weight [N, K] in every served layout (models/quantization.py's packers)."""
    from models.quantization import quantize_fp8_blocks, quantize_int4_groups, quantize_per_channel

    w = torch.randn(N, K, device=ctx.device, dtype=DTYPE) / K ** 0.5
    fp8, fp8_scale = quantize_per_channel(w, torch.float8_e4m3fn)
    int8, int8_scale = quantize_per_channel(w, torch.int8)
    block, block_scale = quantize_fp8_blocks(w, (128, 128))
    qweight, scales, zeros = quantize_int4_groups(w, 128)
    return dict(bf16=w, fp8=fp8, fp8_scale=fp8_scale, int8=int8, int8_scale=int8_scale, block=block,
                block_scale=block_scale, qweight=qweight, scales=scales, zeros=zeros)


def _scaled_mm_of(x: torch.Tensor, w: dict[str, torch.Tensor]) -> torch.Tensor:
    """torch._scaled_mm row-wise (per-token x scale, per-channel w scale), x quantised here too:
    the same work as our fused kernel."""
    x_scale = x.abs().amax(dim=1, keepdim=True).float().clamp_min(1e-10) / 448.0
    xq = (x.float() / x_scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    return torch._scaled_mm(xq, w["fp8"].t(), scale_a=x_scale, scale_b=w["fp8_scale"][None, :], out_dtype=DTYPE)


def _decode_tile_candidates() -> dict[str, list]:
    """Alternative M=1 tiles per kernel family: "8-bit" (quant_w8a8) and "w4a16"."""
    from triton_kernels.quant_tiles import QuantTile

    weight_only = dict(act_quant=False)   # W8A8 kernels: 16-bit products
    eight_bit = [QuantTile(16, 64, 128, 4, 4, 2),   # the decode tile with 8-bit products
                 QuantTile(16, 32, 128, 4, 4, 2, **weight_only), QuantTile(16, 64, 128, 4, 4, 4, **weight_only),
                 QuantTile(16, 128, 128, 4, 4, 2, **weight_only), QuantTile(16, 64, 256, 4, 3, 2, **weight_only),
                 QuantTile(16, 64, 128, 4, 6, 2, **weight_only),
                 QuantTile(4, 32, 128, 4, 4, 2, gemv=True), QuantTile(4, 64, 128, 4, 4, 2, gemv=True),
                 QuantTile(4, 64, 128, 8, 3, 4, gemv=True), QuantTile(4, 16, 128, 4, 4, 4, gemv=True)]
    gemv = dict(gemv=True)
    w4a16 = [QuantTile(16, 64, 128, 4, 4, 2), QuantTile(16, 64, 128, 4, 4, 2, packed_loads=True),
             QuantTile(4, 32, 128, 4, 4, 2, **gemv), QuantTile(4, 64, 128, 4, 4, 2, **gemv),
             QuantTile(4, 128, 128, 4, 4, 2, **gemv), QuantTile(4, 128, 128, 8, 4, 2, **gemv),
             QuantTile(4, 64, 128, 4, 3, 4, **gemv), QuantTile(4, 64, 64, 4, 6, 2, **gemv),
             QuantTile(4, 256, 128, 8, 3, 2, **gemv)]
    return {"8-bit": eight_bit, "w4a16": w4a16}


DECODE_TILE_CANDIDATES = _decode_tile_candidates()


def _w4a16_mid_candidates() -> list:
    from triton_kernels.quant_tiles import CUDA_TILES
    tile = CUDA_TILES[16]
    return [dataclasses.replace(tile, packed_loads=False), dataclasses.replace(tile, packed_loads=True),
            dataclasses.replace(tile, packed_loads=True, num_stages=2)]


W4A16_MID_CANDIDATES = _w4a16_mid_candidates()


def _tile_name(t) -> str:
    return (f"tile {t.block_n}x{t.block_k} w{t.num_warps} s{t.num_stages} p{t.target_programs_per_sm}"
            + (" packed" if t.packed_loads else "") + (" gemv" if t.gemv else "")
            + ("" if t.act_quant else " w-only"))


def quant_cases(ctx: Ctx) -> list[Case]:
    """Each quantized GEMM beside our bf16 GEMM on the same shape (Llama-3.1-8B projections), and
    the fp8 row-wise GEMM beside torch._scaled_mm. ratio > 1: the quantized kernel is faster.
    The alternative tiles come after every shape's anchored cases, so a run cut short by its
    time limit has the figures the issue names first."""
    from triton_kernels import gemm, quant_w4a16, quant_w8a8

    linear = load_ops("triton", ctx.options).linear
    cases, alternatives = [], []
    for name, N, K in [s for s in gemm_shapes() if s[0].startswith("llama") and "lm_head" not in s[0]]:
        weights = rotating(ctx, lambda N=N, K=K: (_quant_weights(N, K, ctx),), 3 * N * K)
        for M in QUANT_MS:
            x = torch.randn(M, K, device=ctx.device, dtype=DTYPE)
            flops, _ = gemm.flops_bytes(M, N, K, DTYPE)
            bf16 = lambda x=x, f=weights: linear(x, f()[0]["bf16"])
            shape = f"M={M} N={N} K={K}"
            ops = {
                "fp8 channel": lambda x, w, t=None: quant_w8a8.w8a8_linear(x, w["fp8"], w["fp8_scale"], tile=t),
                "fp8 block128": lambda x, w, t=None: quant_w8a8.fp8_block_linear(
                    x, w["block"], w["block_scale"], (128, 128), tile=t),
                "int8 channel": lambda x, w, t=None: quant_w8a8.w8a8_linear(x, w["int8"], w["int8_scale"], tile=t),
                "w4a16 g128": lambda x, w, t=None: quant_w4a16.w4a16_linear(
                    x, w["qweight"], w["scales"], w["zeros"], None, 128, tile=t),
            }
            eight_bit_bytes = M * K * 2 + N * K + M * N * 2
            for kind, op in ops.items():
                nbytes = quant_w4a16.flops_bytes(M, N, K)[1] if kind.startswith("w4a16") else eight_bit_bytes
                cases.append(Case("quant", f"{kind} {name}", shape, ours=lambda x=x, f=weights, op=op: op(x, f()[0]),
                                  anchor=bf16, anchor_name="ours bf16", bytes_moved=int(nbytes), flops=flops))
            if M == 1:    # alternative decode tiles (no anchor): the data behind quant_tiles' table
                for kind, op in ops.items():
                    family = "w4a16" if kind.startswith("w4a16") else "8-bit"
                    nbytes = quant_w4a16.flops_bytes(M, N, K)[1] if family == "w4a16" else eight_bit_bytes
                    for tile in DECODE_TILE_CANDIDATES[family]:
                        alternatives.append(Case("quant", f"{kind} {name}", f"{shape} {_tile_name(tile)}",
                                          ours=lambda x=x, f=weights, op=op, t=tile: op(x, f()[0], t),
                                          anchor=None, anchor_name="-", bytes_moved=int(nbytes), flops=flops))
            if M == 16:   # the 4-bit tensor-core tile with and without packed loads (5-64 tokens)
                for tile in W4A16_MID_CANDIDATES:
                    alternatives.append(Case("quant", f"w4a16 g128 {name}", f"{shape} {_tile_name(tile)}",
                                      ours=lambda x=x, f=weights, t=tile: ops["w4a16 g128"](x, f()[0], t),
                                      anchor=None, anchor_name="-", flops=flops,
                                      bytes_moved=int(quant_w4a16.flops_bytes(M, N, K)[1])))
            if M >= 16:   # torch._scaled_mm wants M a multiple of 16
                cases.append(Case("quant", f"fp8 channel {name}", shape,
                                  ours=lambda x=x, f=weights, op=ops["fp8 channel"]: op(x, f()[0]),
                                  anchor=lambda x=x, f=weights: _scaled_mm_of(x, f()[0]),
                                  anchor_name="torch._scaled_mm", bytes_moved=eight_bit_bytes, flops=flops))
    return cases + alternatives


def kv_fp8_cases(ctx: Ctx) -> list[Case]:
    """Decode attention over an FP8 (e4m3) KV pool beside the same over a bf16 pool (Llama-3.1-8B
    heads, 8k context). ratio > 1: the FP8 pool is faster."""
    from triton_kernels import attention

    ops = load_ops("triton", ctx.options)
    hq, hk, D = ATTN_MODELS["llama3.1-8b"]
    cases = []
    for batch, ctx_len in ((1, 8192), (16, 8192), (64, 8192)):
        k_cache, v_cache, slots = _contiguous_pool(batch * ctx_len, hk, D, ctx, shuffle=True)
        k8, v8 = k_cache.to(torch.float8_e4m3fn), v_cache.to(torch.float8_e4m3fn)
        req_to_token = slots.view(batch, ctx_len).contiguous()
        rows = torch.arange(batch, device=ctx.device)
        seq_lens = torch.full((batch,), ctx_len, dtype=torch.int32, device=ctx.device)
        q = torch.randn(batch, hq, D, device=ctx.device, dtype=DTYPE)
        flops, nbytes = attention.decode_flops_bytes([ctx_len] * batch, hq, hk, D)
        cases.append(Case("kv_fp8", "decode fp8 KV llama3.1-8b", f"B={batch} ctx={ctx_len}",
                          ours=lambda q=q, k=k8, v=v8, r=req_to_token, i=rows, s=seq_lens:
                          ops.decode_attention(q, k, v, r, i, s, D ** -0.5, k_scale=1.0, v_scale=1.0),
                          anchor=lambda q=q, k=k_cache, v=v_cache, r=req_to_token, i=rows, s=seq_lens:
                          ops.decode_attention(q, k, v, r, i, s, D ** -0.5),
                          anchor_name="ours bf16 KV", bytes_moved=int(nbytes) // 2, flops=int(flops)))
    return cases


FAMILIES.update(quant=quant_cases, kv_fp8=kv_fp8_cases)


QWEN3_VL_VISION = dict(hidden=1152, intermediate=4304, pos_table=2304)   # Qwen3-VL-8B vision tower


def vision_tower_cases(ctx: Ctx) -> list[Case]:
    """The vision towers' memory-bound ops vs torch, on a 1024x768 image: Qwen3-VL-8B (3072
    patches of 16 px, hidden 1152, MLP 4304, merged width 4608) and Qwen2.5-VL-7B's merger GELU
    (1036 merged tokens of width 5120)."""
    from triton_kernels import activation, norm, pos_embed

    ops = load_ops("triton", ctx.options)
    D, inter, P = QWEN3_VL_VISION["hidden"], QWEN3_VL_VISION["intermediate"], QWEN3_VL_VISION["pos_table"]
    F = torch.nn.functional
    size = torch.empty((), dtype=DTYPE).element_size()
    w, b = torch.randn(D, device=ctx.device, dtype=DTYPE), torch.randn(D, device=ctx.device, dtype=DTYPE)
    cases = []
    for N in ((3072,) if ctx.quick else (1024, 3072, 12288)):
        xs = rotating(ctx, lambda N=N: (torch.randn(N, D, device=ctx.device, dtype=DTYPE),), 2 * size * N * D)
        cases.append(Case("vision_tower", "layer_norm", f"M={N} H={D}",
                          lambda s=xs: ops.layer_norm(s()[0], w, b, 1e-6),
                          lambda s=xs: F.layer_norm(s()[0], (D,), w, b, 1e-6), "torch", 2 * size * N * D))
        pairs = rotating(ctx, lambda N=N: (torch.randn(N, D, device=ctx.device, dtype=DTYPE),
                                           torch.randn(N, D, device=ctx.device, dtype=DTYPE)), 4 * size * N * D)

        def torch_add_norm(s=pairs):
            x, residual = s()
            residual.add_(x)
            return F.layer_norm(residual, (D,), w, b, 1e-6)
        cases.append(Case("vision_tower", "fused_add_layer_norm", f"M={N} H={D}",
                          lambda s=pairs: ops.fused_add_layer_norm(*s(), w, b, 1e-6), torch_add_norm,
                          "torch add_ + layer_norm", 4 * size * N * D))
        hs = rotating(ctx, lambda N=N: (torch.randn(N, inter, device=ctx.device, dtype=DTYPE),),
                      2 * size * N * inter)
        cases.append(Case("vision_tower", "gelu tanh", f"M={N} N={inter}",
                          lambda s=hs: ops.gelu(s()[0], "tanh"),
                          lambda s=hs: F.gelu(s()[0], approximate="tanh"), "torch", 2 * size * N * inter))
        table = torch.randn(P, D, device=ctx.device, dtype=DTYPE)
        _, nb = pos_embed.flops_bytes(N, D, 4, DTYPE)

        def pos_inputs(N=N):
            weights = torch.rand(N, 4, device=ctx.device)
            return (torch.randn(N, D, device=ctx.device, dtype=DTYPE),
                    torch.randint(0, P, (N, 4), device=ctx.device), weights / weights.sum(1, keepdim=True))
        ps = rotating(ctx, pos_inputs, nb)

        def torch_blend(s=ps):
            x, idx, wts = s()
            blend = (F.embedding(idx, table) * wts[..., None]).sum(1)
            return x + blend.to(x.dtype)
        cases.append(Case("vision_tower", "add_interpolated_pos_embed", f"N={N} D={D} P={P}",
                          lambda s=ps: ops.add_interpolated_pos_embed(*_pos_args(s(), table)),
                          torch_blend, "torch gather+mul+sum+add", nb))
    merged = rotating(ctx, lambda: (torch.randn(1036, 5120, device=ctx.device, dtype=DTYPE),),
                      2 * size * 1036 * 5120)
    cases.append(Case("vision_tower", "gelu erf", "M=1036 N=5120",
                      lambda s=merged: ops.gelu(s()[0]), lambda s=merged: F.gelu(s()[0]), "torch",
                      2 * size * 1036 * 5120))
    return cases


def _pos_args(inputs: tuple, table: torch.Tensor) -> tuple:
    x, idx, wts = inputs
    return x, table, idx, wts


FAMILIES.update(vision_tower=vision_tower_cases)

# ============================================================================
# End of the attention / moe / sampling section.
# ============================================================================


# ----------------------------------------------------------------------------- timing, table, JSON


def copy_bandwidth_gbps(device: torch.device) -> float:
    """Device-to-device copy of 1 GiB: (bytes read + bytes written) / time.
    Timed with plain do_bench: inside a CUDA graph the copy becomes a memcpy
    node served by the slower copy engines (2.8 vs 4.2 TB/s on the H200)."""
    import triton.testing

    src = torch.randn(256 * 1024 * 1024, device=device, dtype=torch.float32)
    dst = torch.empty_like(src)
    us = 1e3 * triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() * 4 / (us * 1e-6) / 1e9


def measure(case: Case, copy_gbps: float, quick: bool, rounds: int) -> dict:
    """Ours and the anchor timed in alternation, ``rounds`` times each; each side
    reports the median of its rounds, so a drift of clocks or of the memory
    system during the run falls on both alike."""
    ours_runs, anchor_runs = [], []
    for _ in range(rounds):
        ours_runs.append(median_us(case.ours, quick))
        if case.anchor is not None:
            anchor_runs.append(median_us(case.anchor, quick))
    ours_us = statistics.median(ours_runs)
    anchor_us = statistics.median(anchor_runs) if anchor_runs else None
    row = dict(family=case.family, kernel=case.kernel, shape=case.shape, ours_us=ours_us,
               anchor=case.anchor_name, anchor_us=anchor_us,
               ratio=(anchor_us / ours_us) if anchor_us else None,
               tflops=case.flops / (ours_us * 1e-6) / 1e12 if case.flops else None,
               ours_rounds_us=ours_runs, anchor_rounds_us=anchor_runs,
               pct_copy_bw=None)
    if case.bytes_moved:
        row["pct_copy_bw"] = 100 * case.bytes_moved / (ours_us * 1e-6) / 1e9 / copy_gbps
    return row


def print_table(rows: list[dict]) -> None:
    header = f"{'kernel':26s} {'shape':34s} {'ours us':>9s} {'anchor us':>10s} {'ratio':>6s} {'TFLOP/s':>8s} {'%copyBW':>8s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        fmt = lambda v, spec: format(v, spec) if v is not None else "-"
        print(f"{r['kernel']:26s} {r['shape']:34s} {fmt(r['ours_us'], '9.1f'):>9s} "
              f"{fmt(r['anchor_us'], '10.1f'):>10s} {fmt(r['ratio'], '6.2f'):>6s} "
              f"{fmt(r['tflops'], '8.1f'):>8s} {fmt(r['pct_copy_bw'], '8.1f'):>8s}")


def write_json(report: dict, device_name: str) -> list[Path]:
    slug = "".join(c if c.isalnum() else "-" for c in device_name).strip("-").lower()
    paths = [Path(__file__).resolve().parent / "results" / f"kernels-{slug}.json"]
    if os.environ.get("OUT"):
        paths.append(Path(os.environ["OUT"]) / f"kernels-{slug}.json")
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated families: " + ",".join(FAMILIES))
    parser.add_argument("--quick", action="store_true", help="fewer shapes, shorter timing")
    parser.add_argument("--rounds", type=int, default=3,
                        help="alternating rounds of ours and the anchor per row (median of each)")
    parser.add_argument("--sweep-gemm", default="", metavar="MS",
                        help="also time candidate gemm configs at these M (comma-separated)")
    parser.add_argument("--disable-gemm-ws", action="store_true",
                        help="KernelOptions(gemm_ws=False): decode linears skip the warp-specialised kernel")
    parser.add_argument("--disable-pdl", action="store_true",
                        help="KernelOptions(pdl=False): launch every kernel without PDL")
    parser.add_argument("--models-dir", type=Path, default=None,
                        help="check the shapes against <dir>/<model>/config.json (default: the bundled configs)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU: the timings mean nothing under the "
                         "Triton interpreter (run the tests on CPU instead)")
    families = [f for f in args.only.split(",") if f] or list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    model_dims(args.models_dir)
    import triton

    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    torch.manual_seed(0)
    print(f"device {props.name} ({props.multi_processor_count} SMs), torch {torch.__version__}, "
          f"triton {triton.__version__}")
    copy_gbps = copy_bandwidth_gbps(device)
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write)")
    options = KernelOptions(gemm_ws=not args.disable_gemm_ws, pdl=not args.disable_pdl)
    ctx = Ctx(device=device, l2_bytes=getattr(props, "L2_cache_size", 50 * 2 ** 20), quick=args.quick,
              options=options)
    report = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  copy_gbps=copy_gbps, dtype=str(DTYPE), rounds=args.rounds,
                  options=dataclasses.asdict(options),
                  time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  rows=[], sweep=[])
    for family in families:
        for case in FAMILIES[family](ctx):
            try:
                row = measure(case, copy_gbps, args.quick, args.rounds)
            except Exception as exc:  # a candidate the chip cannot take: report it, keep measuring
                row = dict(family=case.family, kernel=case.kernel, shape=case.shape, ours_us=None,
                           anchor=case.anchor_name, anchor_us=None, ratio=None, tflops=None,
                           pct_copy_bw=None, error=f"{type(exc).__name__}: {str(exc)[:200]}")
                print(f"  {case.kernel} {case.shape}: {row['error']}", flush=True)
            else:  # as it goes: a run cut short by its time limit still shows what it measured
                print(f"  {case.kernel} {case.shape}: {row['ours_us']:.1f} us", flush=True)
            report["rows"].append(row)
        torch.cuda.empty_cache()
    print_table(report["rows"])
    for path in write_json(report, props.name):
        print(f"wrote {path}")
    if args.sweep_gemm:
        report["sweep"] = gemm_sweep(ctx, [int(m) for m in args.sweep_gemm.split(",")])
        write_json(report, props.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
