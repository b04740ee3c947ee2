"""Where a decode (or prefill) step's time goes: GPU kernels vs host work, per kernel.

Usage (GPU)::

    python perf/profile_decode.py --model Llama-3.1-8B-Instruct --batch 1

Runs the real forward and sample stages (dummy weights, CUDA graphs as the
server runs them) for a few decode steps under ``torch.profiler`` and prints:

* wall ms per step (host included, as bench_one_batch measures it);
* GPU busy ms per step (sum of kernel times) and the difference, which is
  host time the GPU spent waiting (input packing, graph launch, sampling's
  device->host sync);
* every kernel with calls and µs per step, heaviest first.

``--prefill`` profiles prefill steps of ``batch x input-len`` new tokens
instead. The chrome trace goes to ``$OUT/decode-trace.json`` when ``$OUT`` is set.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_one_batch import decode_batch, prefill_batch, server_args, step_s  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    from pipeline.assembly import forward_and_sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="Llama-3.1-8B-Instruct",
                        help="a model directory or the name of a bundled config (tests/models/configs)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prefill", action="store_true",
                        help="profile the prefill step (batch x input-len new tokens) instead")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA GPU")
    args = server_args(ns.model, max_total_tokens=ns.batch * (ns.input_len + 1024) + 1,
                       max_running_requests=ns.batch, cuda_graph_max_bs=max(ns.batch, 1),
                       context_length=ns.input_len + 1024)
    forward, sample = forward_and_sample(args)
    vocab = forward.config.vocab_size
    _, tokens = step_s(forward, sample, prefill_batch(0, ns.batch, ns.input_len, vocab))
    position = ns.input_len
    for i in range(4):  # warm-up: JIT, graph capture
        _, tokens = step_s(forward, sample, decode_batch(1 + i, ns.batch, position, tokens, ns.input_len))
        position += 1
    torch.cuda.synchronize()
    walls = []
    make_batch = (lambda i: prefill_batch(10 + i, ns.batch, ns.input_len, vocab)) if ns.prefill else None
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA,
                                            torch.profiler.ProfilerActivity.CPU]) as prof:
        for i in range(ns.steps):
            batch = make_batch(i) if make_batch else decode_batch(10 + i, ns.batch, position, tokens,
                                                                  ns.input_len)
            elapsed, tokens = step_s(forward, sample, batch)
            walls.append(elapsed)
            position += 1
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = {}
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = kernels.setdefault(event.name, [0, 0.0])
            entry[0] += 1
            entry[1] += event.device_time
    busy_us = sum(total for _, total in kernels.values()) / ns.steps
    wall_ms = sorted(walls)[len(walls) // 2] * 1e3
    print(f"{'prefill' if ns.prefill else 'decode'} batch {ns.batch} x {ns.input_len}: wall {wall_ms:.3f} ms/step (median), GPU busy {busy_us / 1e3:.3f} ms/step, "
          f"host-only {wall_ms - busy_us / 1e3:.3f} ms/step")
    for name, (count, total) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f"  {count / ns.steps:6.1f}x  {total / ns.steps:9.1f} us/step  {name[:100]}")
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=25))
    if os.environ.get("OUT"):
        prof.export_chrome_trace(str(Path(os.environ["OUT"], "decode-trace.json")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
