"""Tile sweep of extend (prefill) attention against torch SDPA (GPU only).

Usage::

    python perf/sweep_attention.py [--phase warm|time|both] [--budget-s 200] [--out sweep.json]

Shapes: Llama-3.1-8B / Qwen3-8B heads (Hq=32, Hk=8, D=128), bf16, one request
of S = 1k..8k new tokens (prefix 0), four requests of 1k, and one prefix hit
(3072 cached + 1024 new, ours only); a few candidates at D=64 and D=256. q/k/v
are views of a fused qkv projection, as the model has them. Every config is
first compiled in parallel worker processes (``--phase warm``: the Triton
disk cache then spares the timing pass; a config that fails to compile or
hangs is dropped), then checked against SDPA (relative error) and timed with
CUDA-graph replays (median). The data behind ``_GPU_CONFIGS`` in
``triton_kernels/attention/extend.py``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from triton_kernels.attention.extend import ExtendConfig  # noqa: E402

DEVICE = "cuda"
DTYPE = torch.bfloat16
HQ, HK, D = 32, 8, 128
SEQ_LENS = (1024, 2048, 4096, 8192)
# (name, batch, extend_len, prefix_len, Hq, Hk, D): the D=128 table's shapes
SHAPES = [(f"S={S}", 1, S, 0, HQ, HK, D) for S in SEQ_LENS] + [
    ("B=4 S=1024", 4, 1024, 0, HQ, HK, D),
    ("prefix=3072 S=1024", 1, 1024, 3072, HQ, HK, D),
]
DEVICE_KV = dict(kv_desc_on_host=False)
CONFIGS = [
    ExtendConfig(128, 64, 4, 2),
    ExtendConfig(128, 64, 4, 2, **DEVICE_KV),
    ExtendConfig(128, 64, 4, 2, tma=False), ExtendConfig(64, 64, 4, 2, pair_blocks=True),
    ExtendConfig(128, 64, 4, 2, pair_blocks=True), ExtendConfig(128, 128, 8, 3),
]
# other head dims: a few candidates at S=4k (Hq, Hk as a GQA model of that head dim)
OTHER_D = {
    64: [ExtendConfig(64, 64, 4, 2), ExtendConfig(64, 64, 4, 2, **DEVICE_KV),
         ExtendConfig(128, 64, 4, 2), ExtendConfig(64, 128, 4, 2)],
    256: [ExtendConfig(128, 64, 8, 2)],
}
OTHER_SHAPES = {64: ("D=64 S=4096", 1, 4096, 0, 32, 8, 64),
                256: ("D=256 S=4096", 1, 4096, 0, 16, 8, 256)}


def all_jobs() -> list[tuple[tuple, ExtendConfig]]:
    """(shape, config) pairs in timing order."""
    jobs = [(shape, c) for c in CONFIGS for shape in SHAPES]
    jobs += [(OTHER_SHAPES[d], c) for d, configs in OTHER_D.items() for c in configs]
    return jobs


def make_inputs(shape: tuple, seed: int = 0) -> dict:
    _, batch, S, prefix_len, hq, hk, d = shape
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    T = batch * S
    qkv = torch.randn(T, (hq + 2 * hk) * d, device=DEVICE, dtype=DTYPE, generator=gen)
    q = qkv[:, : hq * d].unflatten(1, (hq, d))
    k = qkv[:, hq * d:(hq + hk) * d].unflatten(1, (hk, d))
    v = qkv[:, (hq + hk) * d:].unflatten(1, (hk, d))
    num_slots = batch * prefix_len + 1
    k_cache = torch.randn(num_slots, hk, d, device=DEVICE, dtype=DTYPE, generator=gen)
    v_cache = torch.randn_like(k_cache)
    req_to_token = torch.zeros(batch, prefix_len + S, device=DEVICE, dtype=torch.int32)
    if prefix_len:
        req_to_token[:, :prefix_len] = torch.randperm(num_slots - 1, device=DEVICE).view(
            batch, prefix_len).int() + 1
    ints = lambda xs: torch.tensor(xs, device=DEVICE, dtype=torch.int32)
    args = (req_to_token, ints(list(range(batch))), ints([prefix_len] * batch), ints([S] * batch),
            ints([b * S for b in range(batch)]), S, d ** -0.5)
    return dict(q=q, k=k, v=v, k_cache=k_cache, v_cache=v_cache, args=args, shape=shape)


def run_ours(inp: dict, config: ExtendConfig) -> torch.Tensor:
    from triton_kernels.attention.extend import launch_extend_attention
    return launch_extend_attention(inp["q"], inp["k"], inp["v"], inp["k_cache"], inp["v_cache"],
                                   *inp["args"], config=config)


def sdpa(inp: dict):
    """SDPA on [B, H, S, D] copies (prefix 0 only: is_causal is top-left aligned)."""
    _, batch, S, _, hq, hk, d = inp["shape"]
    to4 = lambda t: t.view(batch, S, t.shape[1], d).transpose(1, 2).contiguous()
    q4, k4, v4 = to4(inp["q"]), to4(inp["k"]), to4(inp["v"])
    return lambda: torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=True,
                                                                    enable_gqa=True)


def sdpa_as_ours(out4: torch.Tensor) -> torch.Tensor:
    return out4.transpose(1, 2).reshape(-1, out4.shape[1], out4.shape[3])


def flops(shape: tuple) -> float:
    _, batch, S, prefix_len, hq, _, d = shape
    return batch * 4.0 * hq * d * (S * prefix_len + S * (S + 1) / 2)


def median_us(fn) -> float:
    import triton.testing
    return 1e3 * triton.testing.do_bench_cudagraph(fn, rep=20, return_mode="median")


def config_name(c: ExtendConfig) -> str:
    return (f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}"
            f"{' ptr' if not c.tma else ' host-kv' if c.kv_desc_on_host else ' dev-kv'}"
            f"{' pair' if c.pair_blocks else ''}")


def _warm_config(config: ExtendConfig) -> tuple[str, str]:
    """Compile one config at every shape it is timed on (runs in a worker process)."""
    try:
        for shape, c in all_jobs():
            if c == config:
                run_ours(make_inputs(shape), config)
        torch.cuda.synchronize()
        return str(config), "ok"
    except Exception as exc:  # a config the compiler rejects is dropped, not fatal
        return str(config), f"{type(exc).__name__}: {str(exc)[:300]}"


def warm(jobs: int, timeout_s: float) -> dict[str, str]:
    configs = list(dict.fromkeys(c for _, c in all_jobs()))
    status = {str(c): "timeout" for c in configs}
    pool = mp.get_context("spawn").Pool(jobs)
    pending = [pool.apply_async(_warm_config, (c,)) for c in configs]
    deadline = time.time() + timeout_s
    for res in pending:
        try:
            name, msg = res.get(timeout=max(1.0, deadline - time.time()))
            status[name] = msg
        except mp.TimeoutError:
            pass
    pool.terminate()
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("warm", "time", "both"), default="both")
    parser.add_argument("--warm-jobs", type=int, default=12)
    parser.add_argument("--warm-timeout-s", type=float, default=150)
    parser.add_argument("--status-file", type=Path, default=Path("/tmp/sweep_attention_warm.json"))
    parser.add_argument("--budget-s", type=float, default=200)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    t0 = time.time()
    if args.phase in ("warm", "both"):
        status = warm(args.warm_jobs, args.warm_timeout_s)
        args.status_file.write_text(json.dumps(status))
        print(f"warm-up {time.time() - t0:.0f} s: "
              f"{sum(v == 'ok' for v in status.values())}/{len(status)} configs compiled", flush=True)
        for name, msg in status.items():
            if msg != "ok":
                print(f"  dropped {name}: {msg}", flush=True)
        if args.phase == "warm":
            return 0
    status = json.loads(args.status_file.read_text())
    props = torch.cuda.get_device_properties(0)
    import triton
    report = dict(device=props.name, torch=torch.__version__, triton=triton.__version__,
                  dtype="bf16", anchor="SDPA causal gqa on [B, H, S, D] copies", rows=[],
                  dropped={name: m for name, m in status.items() if m != "ok"})
    inputs, refs, sdpa_us = {}, {}, {}
    for shape, _ in all_jobs():
        if shape in inputs:
            continue
        inputs[shape] = make_inputs(shape, seed=len(inputs) + 1)
        if shape[3] == 0:
            fn = sdpa(inputs[shape])
            refs[shape] = sdpa_as_ours(fn()).float()
            sdpa_us[shape] = median_us(fn)
            report["rows"].append(dict(shape=shape[0], config="SDPA", us=sdpa_us[shape],
                                       tflops=flops(shape) / sdpa_us[shape] / 1e6))
            print(f"{shape[0]:20s} SDPA {sdpa_us[shape]:8.1f} us "
                  f"{flops(shape) / sdpa_us[shape] / 1e6:5.0f} TF", flush=True)
    for shape, config in all_jobs():
        if status.get(str(config)) != "ok" or time.time() - t0 > args.budget_s:
            continue
        inp = inputs[shape]
        row = dict(shape=shape[0], config=config_name(config),
                   config_fields=dataclasses.asdict(config))
        try:
            out = run_ours(inp, config).float()
            us = median_us(lambda: run_ours(inp, config))
            row.update(us=us, tflops=flops(shape) / us / 1e6)
            if shape in refs:
                row.update(rel_err=((out - refs[shape]).norm() / refs[shape].norm()).item(),
                           ratio=sdpa_us[shape] / us)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        report["rows"].append(row)
        if args.out:
            args.out.write_text(json.dumps(report, indent=1))
    print_table(report["rows"])
    if args.out:
        args.out.write_text(json.dumps(report, indent=1))
    return 0


def print_table(rows: list[dict]) -> None:
    """One line per config: TFLOP/s (ratio to SDPA) per shape."""
    shapes = list(dict.fromkeys(r["shape"] for r in rows))
    by_config: dict[str, dict[str, dict]] = {}
    for r in rows:
        by_config.setdefault(r["config"], {})[r["shape"]] = r
    print(f"{'config':28s} " + " ".join(f"{s[:18]:>18s}" for s in shapes))
    for name, cells in by_config.items():
        out = []
        for s in shapes:
            r = cells.get(s)
            if r is None:
                out.append(f"{'':>18s}")
            elif "error" in r:
                out.append(f"{'error':>18s}")
            else:
                ratio = f" {r['ratio']:.2f}x" if "ratio" in r else ""
                bad = "!" if r.get("rel_err", 0) > 1e-2 else ""
                out.append(f"{r['tflops']:5.0f}TF{ratio}{bad}".rjust(18))
        print(f"{name:28s} " + " ".join(out), flush=True)


if __name__ == "__main__":
    sys.exit(main())
