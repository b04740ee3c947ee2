"""Kernel audit: every GPU kernel of one prefill and one decode step must be ours (Triton).

Usage (GPU)::

    python perf/kernel_audit.py [--model Qwen3-8B] [--batch 4] [--input-len 512]

Runs the real forward and sample stages (dummy weights, CUDA graphs off so
every launch is visible) on one prefill ForwardBatch and one decode
ForwardBatch under ``torch.profiler``, and lists every GPU kernel with its
count and time. A kernel passes when its name is a ``@triton.jit`` function
defined in ``triton_kernels/``; device memcpy/memset pass too (host<->device
copies of the packed batch, allocations). Anything else (a cuBLAS GEMM, an
ATen elementwise or indexing kernel) fails the audit: exit code 1.
Results: ``perf/results/kernel_audit-<device>.json`` (and ``$OUT`` when set).
"""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_one_batch import decode_batch, environment, prefill_batch, server_args, write_result  # noqa: E402


def triton_kernel_names() -> set[str]:
    """Names of every @triton.jit function under triton_kernels/."""
    import triton
    import triton_kernels

    names = set()
    for module_info in pkgutil.walk_packages(triton_kernels.__path__, "triton_kernels."):
        module = importlib.import_module(module_info.name)
        for name, obj in vars(module).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                names.add(getattr(obj, "__name__", name))
    return names


def is_copy(name: str) -> bool:
    lowered = name.lower()
    return lowered.startswith("memcpy") or lowered.startswith("memset")


def gpu_kernels(prof) -> dict[str, dict]:
    kernels: dict[str, dict] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        entry = kernels.setdefault(event.name, {"count": 0, "total_us": 0.0})
        entry["count"] += 1
        entry["total_us"] += event.device_time if hasattr(event, "device_time") else event.cuda_time
    return kernels


def main(argv: list[str] | None = None) -> int:
    from pipeline.assembly import forward_and_sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="Qwen3-8B",
                        help="a model directory or the name of a bundled config (tests/models/configs)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=512)
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("kernel_audit needs a CUDA device")
        return 2
    args = server_args(ns.model, max_total_tokens=ns.batch * (ns.input_len + 1024) + 1, disable_cuda_graph=True,
                       max_running_requests=ns.batch, context_length=ns.input_len + 1024)
    forward, sample = forward_and_sample(args)
    vocab = forward.config.vocab_size

    def one_prefill_and_decode(first_id: int) -> None:
        batch = prefill_batch(first_id, ns.batch, ns.input_len, vocab)
        tokens = sample.sample_batch(first_id, batch.rids, forward.run_batch(batch), batch.sampling, None).token_ids
        batch = decode_batch(first_id + 1, ns.batch, ns.input_len, tokens, ns.input_len)
        sample.sample_batch(first_id + 1, batch.rids, forward.run_batch(batch), batch.sampling, None)

    one_prefill_and_decode(0)  # JIT-compile outside the profile
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        one_prefill_and_decode(2)
        torch.cuda.synchronize()
    ours = triton_kernel_names()
    kernels = gpu_kernels(prof)
    rows = []
    for name, entry in sorted(kernels.items(), key=lambda kv: -kv[1]["total_us"]):
        verdict = "triton" if name in ours else "copy" if is_copy(name) else "NOT TRITON"
        rows.append({"kernel": name, "count": entry["count"], "total_us": entry["total_us"], "verdict": verdict})
        print(f"{verdict:>10}  {entry['count']:5d}x  {entry['total_us']:10.1f} us  {name[:110]}")
    offenders = [r for r in rows if r["verdict"] == "NOT TRITON"]
    print(f"{len(rows)} distinct kernels, {len(offenders)} not from triton_kernels/ "
          f"(model {Path(ns.model).name}, batch {ns.batch}, input {ns.input_len})")
    write_result("kernel_audit", {**environment(), "model": Path(ns.model).name, "batch": ns.batch,
                                  "input_len": ns.input_len, "kernels": rows,
                                  "offenders": [r["kernel"] for r in offenders]})
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main())
