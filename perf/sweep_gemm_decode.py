"""Decode gemm config sweep: the data behind the decode tables in triton_kernels/gemm_tables.py.

Usage (GPU only)::

    python perf/sweep_gemm_decode.py [--ms 1,4,16,64] [--shapes llama.qkv,...] [--top 3]

For every projection of Llama-3.1-8B and Qwen3-8B (``gemm_shapes.gemm_shapes``)
and every M, times cuBLAS and a grid of stream-kernel configs (tensor-core
tiles with 16..64 rows, CUDA-core GEMV tiles for M <= 4, split-K), each
checked against cuBLAS before it is timed. Timing is the same as in
bench_kernels.py: median of CUDA-graph replays over rotated inputs (cold L2).
Prints the best configs per (shape, M) and writes
``perf/results/gemm-decode-sweep-<device>.json`` (``--out-name``; and ``$OUT``
when set). Candidates are launched with programmatic dependent launch, as the
table launches them (``--pdl off`` for the plain launch, ``both`` for each).
``--rounds R`` times cuBLAS, the table and every candidate in R alternating
passes and keeps each one's median, so that drift falls on all alike.
``--disable-gemm-ws`` times the table as ``KernelOptions(gemm_ws=False)`` binds
it (no warp-specialised entries). The candidate grids are in perf/gemm_shapes.py.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gemm_shapes import DTYPE, Ctx, candidate_configs, gemm_shapes, median_us, rotating  # noqa: E402
from triton_kernels import KernelOptions, load_ops  # noqa: E402


def launch_on(inputs: tuple, config) -> None:
    """One launch on one rotated set (x, w, y): taking each tensor from a separate
    ``sets()`` call would pin the weight to one set and keep it in L2."""
    from triton_kernels import gemm

    x, w, y = inputs
    gemm.launch_linear(x, w, None, y, config)


def check_config(x, w, y, expect, config) -> bool:
    """Run one config once and compare with cuBLAS; report and drop it if it fails."""
    from triton_kernels import gemm

    try:
        y.fill_(float("nan"))
        gemm.launch_linear(x, w, None, y, config)
        err = ((y.float() - expect).norm() / expect.norm()).item()
        if not err < 2e-2:
            raise RuntimeError(f"wrong result (rel err {err:.2e})")
        return True
    except Exception as exc:  # a config the chip cannot take: report, keep sweeping
        print(f"  {config}: {type(exc).__name__}: {str(exc)[:100]}")
        return False


def configs_for(M: int, N: int, K: int, kinds: set[str], pdl_modes: tuple[bool, ...],
                options: KernelOptions = KernelOptions()) -> list:
    """Candidates of ``kinds`` (``table``: the config gemm.linear picks;
    ``stagger``: that config with staggered K starts), each launched with
    and/or without PDL as ``pdl_modes`` says, without repeats."""
    from triton_kernels import gemm

    table = gemm._pick_config(M, N, K, DTYPE, torch.device("cuda"), tma_ok=True,
                              gemm_ws=options.gemm_ws, pdl=options.pdl)
    base = candidate_configs(M, kinds, N)
    if "stagger" in kinds:  # the table's tile, programs starting at staggered K offsets
        base += [dataclasses.replace(table, stagger_k=st) for st in (1, 3, 7, 13)]
    if "table" in kinds:
        base.insert(0, table)
    out = []
    for config in base:
        for pdl in pdl_modes:
            variant = dataclasses.replace(config, pdl=pdl)
            if variant not in out:
                out.append(variant)
    return out


def sweep_one(ctx: Ctx, name: str, N: int, K: int, M: int, top: int, kinds: set[str],
              pdl_modes: tuple[bool, ...], rounds: int) -> dict:
    """Check every candidate, then time cuBLAS, the table and every candidate in
    ``rounds`` alternating passes; each keeps the median of its passes."""
    from triton_kernels import gemm

    _, num_bytes = gemm.flops_bytes(M, N, K, DTYPE)
    sets = rotating(ctx, lambda: (torch.randn(M, K, device=ctx.device, dtype=DTYPE),
                                  torch.randn(N, K, device=ctx.device, dtype=DTYPE) / K ** 0.5,
                                  torch.empty(M, N, device=ctx.device, dtype=DTYPE)), num_bytes)
    x, w, y = sets()
    expect = torch.nn.functional.linear(x, w).float()
    configs = [c for c in configs_for(M, N, K, kinds, pdl_modes, ctx.options)
               if check_config(x, w, y, expect, c)]
    linear = load_ops("triton", ctx.options).linear
    runs: dict = {"cublas": [], "table": [], **{c: [] for c in configs}}
    for _ in range(rounds):
        runs["cublas"].append(median_us(lambda: torch.nn.functional.linear(*sets()[:2]), quick=True))
        runs["table"].append(median_us(lambda: linear(*sets()[:2]), quick=True))
        for config in configs:
            runs[config].append(median_us(lambda c=config: launch_on(sets(), c), quick=True))
    cublas_us = statistics.median(runs.pop("cublas"))
    table_us = statistics.median(runs.pop("table"))
    timings = sorted(((statistics.median(times), c) for c, times in runs.items()), key=lambda t: t[0])
    for us, config in timings[:top]:
        print(f"{name:16s} M={M:3d} cuBLAS {cublas_us:7.1f} table {table_us:7.1f} "
              f"cfg {us:7.1f} us ({cublas_us / us:4.2f}x) {config}")
    return dict(shape=name, M=M, N=N, K=K, rounds=rounds, cublas_us=cublas_us, table_us=table_us,
                top=[dict(us=us, config=dataclasses.asdict(c)) for us, c in timings[:top]])


def compile_only(ctx: Ctx, shapes: list[tuple[str, int, int]], ms: list[int], kinds: set[str],
                 pdl_modes: tuple[bool, ...], shard: int, num_shards: int) -> None:
    """Launch each candidate once (every ``num_shards``-th, from ``shard``) so that
    parallel processes fill Triton's cache before the timed sweep."""
    from triton_kernels import gemm

    seen = set()
    for _, N, K in shapes:
        for M in ms:
            x = torch.randn(M, K, device=ctx.device, dtype=DTYPE)
            w = torch.randn(N, K, device=ctx.device, dtype=DTYPE)
            y = torch.empty(M, N, device=ctx.device, dtype=DTYPE)
            for i, config in enumerate(configs_for(M, N, K, kinds, pdl_modes, ctx.options)):
                if i % num_shards != shard or (config, K % config.block_k == 0) in seen:
                    continue
                seen.add((config, K % config.block_k == 0))
                try:
                    gemm.launch_linear(x, w, None, y, config)
                except Exception:  # reported by the timed sweep
                    pass
    torch.cuda.synchronize()


def write_report(device_name: str, results: list[dict], name: str) -> None:
    import triton

    report = dict(device=device_name, torch=torch.__version__, triton=triton.__version__,
                  time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), results=results)
    tag = device_name.lower().replace(" ", "-")
    out_dirs = [Path(__file__).resolve().parent / "results"]
    if os.environ.get("OUT"):
        out_dirs.append(Path(os.environ["OUT"]))
    for out_dir in out_dirs:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{name}-{tag}.json").write_text(json.dumps(report, indent=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ms", default="1,4,16,64")
    parser.add_argument("--shapes", default="", help="comma-separated names (default: all)")
    parser.add_argument("--top", type=int, default=3)
    parser.add_argument("--kinds", default="stream,tma", help="kernels to sweep: table, stagger, stream, grid, tma, swap, swaptop, deep, ws, ws8, wstail, wswide, wssk")
    parser.add_argument("--compile-only", default="", metavar="I/N",
                        help="only compile shard I of N of the candidates (run N in parallel first)")
    parser.add_argument("--out-name", default="gemm-decode-sweep",
                        help="results file: perf/results/<name>-<device>.json")
    parser.add_argument("--pdl", choices=("on", "off", "both"), default="on",
                        help="launch candidates with programmatic dependent launch, without, or both")
    parser.add_argument("--disable-gemm-ws", action="store_true",
                        help="time the table as KernelOptions(gemm_ws=False) binds it")
    parser.add_argument("--rounds", type=int, default=1,
                        help="alternating timing passes over all candidates (median of each)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep_gemm_decode.py needs a CUDA GPU")
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)
    ctx = Ctx(device=device, l2_bytes=getattr(props, "L2_cache_size", 50 * 2 ** 20), quick=True,
              options=KernelOptions(gemm_ws=not args.disable_gemm_ws))
    wanted = {s for s in args.shapes.split(",") if s}
    shapes = [shape for shape in gemm_shapes() if not wanted or shape[0] in wanted]
    ms = [int(m) for m in args.ms.split(",")]
    pdl_modes = {"on": (True,), "off": (False,), "both": (True, False)}[args.pdl]
    if args.compile_only:
        shard, num_shards = (int(v) for v in args.compile_only.split("/"))
        compile_only(ctx, shapes, ms, set(args.kinds.split(",")), pdl_modes, shard, num_shards)
        return 0
    results = []
    for name, N, K in shapes:
        for M in ms:
            results.append(sweep_one(ctx, name, N, K, M, args.top, set(args.kinds.split(",")),
                                     pdl_modes, args.rounds))
            print(flush=True)
            write_report(props.name, results, args.out_name)  # after every case: a cut-short run keeps its data
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
