"""Offline throughput: many requests at once through the engine core, as fast as it goes.

Usage (GPU)::

    python perf/bench_offline.py --models Qwen3-0.6B,Qwen3-8B

The public offline workload: 256 requests, input and output lengths uniform
in [100, 1024], ``ignore_eos``, seed 0, greedy, random token ids as prompts
(the configs come without tokenizers, so the text stages are played by this
script: it is the engine core of the one assembly -- multimodal, forward,
constrain, sample, schedule -- stepped in its own loop, exactly as the Engine
ticks it). Dummy weights of the real shapes. A short warm-up workload
(48 prompts, 2 output tokens) runs first, so Triton compiles are not timed.

Printed per model: wall time, output tok/s, total (input + output) tok/s,
steps, retractions and the mean per-step time. Results:
``perf/results/offline-<device>.json`` (and ``$OUT`` when set).
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_one_batch import environment, run_each_model_alone, server_args, write_result  # noqa: E402
from pipeline.assembly import pipeline_spec  # noqa: E402
from pipeline.messages import SamplingParams, TokenizedRequest  # noqa: E402
from pipeline.placement import MAIN, played_by_caller, single, wire_process  # noqa: E402

# Played by this script: token ids in, token ids out. The configs come without tokenizers, so
# there is no grammar either (no request is constrained; nothing reaches constrain's doors).
PLAYED_STAGES = ("ingest", "tokenize", "detokenize", "constrain")


def workload(num_requests: int, low: int, high: int, vocab: int, seed: int) -> list[TokenizedRequest]:
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        input_len, output_len = rng.randint(low, high), rng.randint(low, high)
        ids = [rng.randrange(vocab) for _ in range(input_len)]
        params = SamplingParams(max_new_tokens=output_len, temperature=0.0, ignore_eos=True)
        requests.append(TokenizedRequest(rid=str(i), parent_rid=str(i), input_ids=ids, sampling=params))
    return requests


class Core:
    """The engine stages of the one assembly, built in this process and stepped by hand."""

    def __init__(self, args) -> None:
        spec = pipeline_spec(args)
        channels: dict = {}
        self.stages = wire_process(spec, played_by_caller(single(spec), *PLAYED_STAGES), MAIN, channels)
        by_name = {stage.name: stage for stage in self.stages}
        self.forward, self.schedule = by_name["forward"], by_name["schedule"]
        self.requests = channels["multimodal"]  # what tokenize's out door would feed
        self.outputs = channels["detokenize"]  # what detokenize would read (TokenOutputBatch, EngineStats)

    def _timed(self) -> list:
        """Wrap forward.run_batch to record CUDA events around it (no sync): GPU time per forward."""
        events: list = []
        run_batch = self.forward.run_batch

        def timed(batch):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            logits = run_batch(batch)
            end.record()
            events.append((batch.mode, start, end, len(batch.input_ids), len(batch.rids)))
            return logits

        self.forward.run_batch = timed
        return events

    def run(self, requests: list[TokenizedRequest]) -> dict:
        events = self._timed()
        for request in requests:
            self.requests.put(request)
        finished, output_tokens, steps = 0, 0, 0
        first_batch = self.schedule.next_batch_id
        busy_before = {s.name: s.counters.busy_s for s in self.stages}
        start = time.perf_counter()
        while finished < len(requests):
            for stage in self.stages:
                stage.step(1 << 16)
            steps += 1
            for batch in self.outputs.drain(1 << 16):
                for out in getattr(batch, "outputs", ()):  # TokenOutputBatch; EngineStats pass by
                    output_tokens += len(out.new_token_ids)
                    finished += out.finish_reason is not None
        torch.cuda.synchronize()
        wall_s = time.perf_counter() - start
        gpu_ms = {"decode": [], "extend": []}
        extend_shapes = []  # (new tokens, rows, ms) of each extend step: prefill chunks + mixed decodes
        for mode, ev_start, ev_end, num_tokens, num_rows in events:
            gpu_ms[mode].append(ev_start.elapsed_time(ev_end))
            if mode == "extend":
                extend_shapes.append((num_tokens, num_rows, round(gpu_ms[mode][-1], 2)))
        del self.forward.run_batch  # back to the class method
        input_tokens = sum(len(r.input_ids) for r in requests)
        return {"wall_s": wall_s, "requests": len(requests), "input_tokens": input_tokens,
                "output_tokens": output_tokens, "output_tok_s": output_tokens / wall_s,
                "total_tok_s": (input_tokens + output_tokens) / wall_s, "loop_iterations": steps,
                "forward_batches": self.schedule.next_batch_id - first_batch,
                "retractions": self.schedule.num_retractions, "kv_capacity_tokens": self.schedule.kv.capacity_tokens,
                "ms_per_batch": wall_s * 1e3 / max(1, self.schedule.next_batch_id - first_batch),
                "busy_s": {s.name: s.counters.busy_s - busy_before[s.name] for s in self.stages},
                "forward_gpu_ms_mean": {m: sum(v) / len(v) for m, v in gpu_ms.items() if v},
                "forward_steps": {m: len(v) for m, v in gpu_ms.items()},
                "extend_steps_tokens_rows_ms": extend_shapes}


def record_compiles() -> list[str]:
    """From now on, note every Triton kernel variant compiled (a compile inside the timed
    run means the warm-up missed a specialization; it costs seconds)."""
    import triton

    compiled: list[str] = []

    def hook(*args, **kwargs) -> None:
        compiled.append(str(kwargs.get("repr", "?"))[:400])
        print(f"  compile during the run: {compiled[-1]}", flush=True)
        return None

    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs.runtime, "jit_cache_hook"):
        knobs.runtime.jit_cache_hook = hook
    else:
        triton.runtime.jit.JITFunction.cache_hook = hook
    return compiled


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="Qwen3-0.6B,Qwen3-8B",
                        help="model directories or names of bundled configs (tests/models/configs)")
    parser.add_argument("--num-requests", type=int, default=256)
    parser.add_argument("--low", type=int, default=100)
    parser.add_argument("--high", type=int, default=1024)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-running-requests", type=int, default=256)
    parser.add_argument("--cuda-graph-max-bs", type=int, default=256)
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_offline needs a CUDA device")
        return 2
    models = ns.models.split(",")
    if len(models) > 1:
        return run_each_model_alone(__file__, models, argv)
    env = environment()
    print(env, flush=True)
    results = []
    for model_path in ns.models.split(","):
        args = server_args(model_path, max_running_requests=ns.max_running_requests,
                           cuda_graph_max_bs=ns.cuda_graph_max_bs, context_length=2 * ns.high + 16)
        setup = time.perf_counter()
        core = Core(args)
        setup_s = time.perf_counter() - setup
        requests = workload(ns.num_requests, ns.low, ns.high, core.forward.config.vocab_size, ns.seed)
        # Warm-up: JIT-compile the extend kernels for full and ragged chunks outside the measurement.
        warm = workload(48, ns.low, ns.high, core.forward.config.vocab_size, ns.seed + 1)
        core.run([msgspec.structs.replace(r, sampling=msgspec.structs.replace(r.sampling, max_new_tokens=2))
                  for r in warm])
        compiled = record_compiles()
        result = {"model": Path(model_path).name, "setup_s": setup_s, **core.run(requests),
                  "compiles_during_run": compiled}
        print(f"== {result['model']}: {result['output_tok_s']:.0f} output tok/s, {result['total_tok_s']:.0f} total "
              f"tok/s, {result['wall_s']:.1f} s, {result['forward_batches']} batches "
              f"({result['ms_per_batch']:.2f} ms each), {result['retractions']} retractions, "
              f"KV {result['kv_capacity_tokens']} tokens, busy {result['busy_s']}, forward GPU ms "
              f"{result['forward_gpu_ms_mean']} over {result['forward_steps']} steps", flush=True)
        results.append(result)
        write_result(f"offline-{Path(model_path).name}", {**env, "workload": vars(ns), "results": results})
        del core
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
