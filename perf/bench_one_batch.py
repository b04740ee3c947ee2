"""One static batch through the real forward + sample stages: prefill latency and decode speed.

Usage (GPU)::

    python perf/bench_one_batch.py --models Llama-3.1-8B-Instruct,Qwen3-8B \
        --batch-sizes 1,16,64 --input-lens 256,1024 --decode-steps 32

For each model (``--load-format dummy``: random weights of the real shapes)
and each (batch size B, input length L): one prefill ForwardBatch of B x L
tokens (``mode=extend``), then ``--decode-steps`` decode ForwardBatches of B
rows, each followed by sampling (greedy) with its one device->host sync, the
way the engine runs them (decode replays the captured CUDA graph of size B).

Printed per case: prefill latency (ms) and tok/s, decode ms/step and
output tok/s. The anchor beside batch-1 decode is the HBM roofline: the
bytes a decode step must read (``step_read_bytes``: every weight but the
experts and the embedding table, the experts the batch routes to, one
embedding row per request, the lm_head, and the KV cache of the context)
over the copy bandwidth (device-to-device, bytes read + written, measured in
this run) is the fastest possible ms/token. For a dense model that is nearly
all weights; for a MoE model at batch 1 it is the attention weights, k
experts per layer and the lm_head. The all-weights figure is printed too. Results: ``perf/results/one_batch-<device>.json``
(and ``$OUT`` when set).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import ServerArgs, resolve  # noqa: E402
from pipeline.messages import ForwardBatch, SamplingBatch  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------ shared helpers
def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def device_slug() -> str:
    return device_name().lower().replace(" ", "-")


def environment() -> dict:
    import triton

    return {"device": device_name(), "torch": torch.__version__, "triton": triton.__version__}


def write_result(stem: str, payload: dict) -> Path:
    """perf/results/<stem>-<device>.json (and a copy under $OUT)."""
    name = f"{stem}-{device_slug()}.json"
    text = json.dumps(payload, indent=2)
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    path.write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], name).write_text(text)
    return path


def copy_bandwidth_gbps(num_bytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth, bytes read + written per second (median of 10)."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    times = []
    for _ in range(12):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * num_bytes / sorted(times[2:])[len(times[2:]) // 2] / 1e9


# config.json of public models, bundled with the tests: dummy weights need no more.
BUNDLED_CONFIGS = Path(__file__).resolve().parents[1] / "tests" / "models" / "configs"


def model_dir(model: str) -> str:
    """A model directory for dummy weights: ``model`` itself when it is a
    directory; for the name of a bundled config (``Qwen3-8B``: see
    tests/models/configs) a temporary directory holding it as config.json."""
    if Path(model).is_dir():
        return model
    bundled = BUNDLED_CONFIGS / f"{model}.json"
    if not bundled.exists():
        names = ", ".join(sorted(p.stem for p in BUNDLED_CONFIGS.glob("*.json")))
        raise SystemExit(f"{model}: neither a model directory nor a bundled config ({names})")
    directory = Path(tempfile.gettempdir()) / "stagewise-configs" / model
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(bundled, directory / "config.json")
    return str(directory)


# --variant NAME: the same model quantized (dummy weights of that format) and/or with an FP8 KV
# cache. Checkpoint formats are written into a copy of config.json; online ones are flags.
CHECKPOINT_FORMATS = {
    "fp8-block": {"quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True},
}
ONLINE_FORMATS = {"fp8": "fp8", "w8a8-int8": "w8a8_int8"}


def variant_model(model: str, variant: str) -> tuple[str, dict]:
    """(model directory, ServerArgs overrides) of ``variant``: ``bf16``, a checkpoint format
    (``fp8-block``, ``awq``, ``gptq``), an online one (``fp8``, ``w8a8-int8``), any of them
    followed by ``+kv-fp8`` for the FP8 KV cache."""
    weights, _, kv = variant.partition("+")
    overrides: dict = {}
    if kv:
        if kv != "kv-fp8":
            raise SystemExit(f"variant {variant!r}: only '+kv-fp8' may follow the weight format")
        overrides["kv_cache_dtype"] = "fp8_e4m3"
    if weights in ONLINE_FORMATS:
        overrides["quantization"] = ONLINE_FORMATS[weights]
    elif weights in CHECKPOINT_FORMATS:
        source = Path(model_dir(model))
        directory = Path(tempfile.gettempdir()) / "stagewise-configs" / f"{source.name}-{weights}"
        directory.mkdir(parents=True, exist_ok=True)
        config = json.loads((source / "config.json").read_text())
        config["quantization_config"] = CHECKPOINT_FORMATS[weights]
        (directory / "config.json").write_text(json.dumps(config))
        for extra in source.glob("*.json"):
            if extra.name != "config.json":
                shutil.copyfile(extra, directory / extra.name)
        return str(directory), overrides
    elif weights != "bf16":
        formats = ", ".join(["bf16", *ONLINE_FORMATS, *CHECKPOINT_FORMATS])
        raise SystemExit(f"variant {variant!r}: weight format must be one of {formats}")
    return model, overrides


def server_args(model: str, **overrides) -> ServerArgs:
    """Dummy-weight ServerArgs for a model directory or a bundled config's name."""
    fields = dict(model_path=model_dir(model), load_format="dummy",
                  device="cuda" if torch.cuda.is_available() else "cpu")
    fields.update(overrides)
    return resolve(msgspec.structs.replace(ServerArgs(), **fields))


def greedy_sampling(n: int) -> SamplingBatch:
    return SamplingBatch(temperatures=[0.0] * n, top_ps=[1.0] * n, top_ks=[-1] * n, min_ps=[0.0] * n,
                         repetition_penalties=[1.0] * n, frequency_penalties=[0.0] * n,
                         presence_penalties=[0.0] * n, seeds=list(range(n)), steps=[0] * n,
                         need_sample=[True] * n, first_step=[True] * n, return_logprob=[False] * n,
                         top_logprobs_nums=[0] * n, constrained=[False] * n)


def prefill_batch(batch_id: int, batch: int, input_len: int, vocab: int) -> ForwardBatch:
    """B requests in rows 1..B, request b's slots 1 + b*stride ... (contiguous)."""
    stride = input_len + 1024
    ids = torch.randint(0, vocab, (batch * input_len,), generator=torch.Generator().manual_seed(0)).tolist()
    slots = [1 + b * stride + i for b in range(batch) for i in range(input_len)]
    return ForwardBatch(batch_id=batch_id, mode="extend", rids=[f"r{b}" for b in range(batch)], input_ids=ids,
                        positions=[i for _ in range(batch) for i in range(input_len)], out_cache_loc=slots,
                        req_pool_indices=list(range(1, batch + 1)), prefix_lens=[0] * batch,
                        extend_lens=[input_len] * batch, seq_lens=[input_len] * batch,
                        sampling=greedy_sampling(batch))


def decode_batch(batch_id: int, batch: int, position: int, tokens: list[int], input_len: int) -> ForwardBatch:
    stride = input_len + 1024
    return ForwardBatch(batch_id=batch_id, mode="decode", rids=[f"r{b}" for b in range(batch)],
                        input_ids=tokens, positions=[position] * batch,
                        out_cache_loc=[1 + b * stride + position for b in range(batch)],
                        req_pool_indices=list(range(1, batch + 1)), prefix_lens=[position] * batch,
                        extend_lens=[1] * batch, seq_lens=[position + 1] * batch, sampling=greedy_sampling(batch))


# ------------------------------------------------------------------ the benchmark
def step_s(forward, sample, batch: ForwardBatch) -> tuple[float, list[int]]:
    start = time.perf_counter()
    logits = forward.run_batch(batch)
    out = sample.sample_batch(batch.batch_id, batch.rids, logits, batch.sampling, None)
    return time.perf_counter() - start, out.token_ids


def bench_model(model_path: str, batch_sizes: list[int], input_lens: list[int], decode_steps: int,
                max_prefill_tokens: int, **overrides) -> dict:
    from pipeline.assembly import forward_and_sample

    max_bs = max(batch_sizes)
    total = max_bs * (max(input_lens) + 1024) + 1
    args = server_args(model_path, max_total_tokens=total, max_running_requests=max_bs, cuda_graph_max_bs=max_bs,
                       context_length=max(input_lens) + 1024, **overrides)
    load_start = time.perf_counter()
    forward, sample = forward_and_sample(args)
    setup_s = time.perf_counter() - load_start
    weight_bytes = sum(nbytes for _, nbytes in weight_tensors(forward.model))
    kv_token_bytes = kv_bytes_per_token(forward)
    vocab = forward.config.vocab_size
    cases = []
    for batch in batch_sizes:
        for input_len in input_lens:
            if batch * input_len > max_prefill_tokens:
                continue
            step_s(forward, sample, prefill_batch(0, batch, input_len, vocab))  # warm-up (JIT)
            torch.cuda.synchronize()
            runs = [step_s(forward, sample, prefill_batch(1, batch, input_len, vocab)) for _ in range(3)]
            prefill_s, tokens = sorted(runs)[1]  # median of 3 (same slots rewritten each time)
            times = []
            for i in range(decode_steps):
                elapsed, tokens = step_s(forward, sample, decode_batch(2 + i, batch, input_len + i, tokens, input_len))
                times.append(elapsed)
            decode_s = sorted(times[2:])[len(times[2:]) // 2]
            case = {"batch": batch, "input_len": input_len, "prefill_ms": prefill_s * 1e3,
                    "prefill_tok_s": batch * input_len / prefill_s, "decode_ms_per_step": decode_s * 1e3,
                    "decode_tok_s": batch / decode_s,
                    "step_read_bytes": step_read_bytes(forward.model, forward.config, batch,
                                                       input_len + decode_steps // 2, kv_token_bytes)}
            print(f"  B={batch:4d} L={input_len:5d} prefill {case['prefill_ms']:9.2f} ms "
                  f"({case['prefill_tok_s']:9.0f} tok/s)  decode {case['decode_ms_per_step']:7.3f} ms/step "
                  f"({case['decode_tok_s']:8.0f} tok/s)", flush=True)
            cases.append(case)
    del forward, sample
    torch.cuda.empty_cache()
    return {"model": Path(model_path).name, "weight_bytes": weight_bytes, "setup_s": setup_s, "cases": cases}


def experts_read(num_experts: int, top_k: int, batch: int) -> float:
    """Distinct experts a layer reads for ``batch`` tokens of ``top_k`` distinct experts each:
    exactly ``top_k`` for one token, else the expectation under uniform routing."""
    if batch == 1:
        return float(min(top_k, num_experts))
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** batch)


def weight_tensors(model: torch.nn.Module) -> list[tuple[str, int]]:
    """(name, bytes) of every weight: the parameters, and the kernel tensors a quantized
    projection holds as buffers (models/quantization.py)."""
    from models.quantization import quant_modules

    tensors = [(name, p.numel() * p.element_size()) for name, p in model.named_parameters()]
    for module_name, module in quant_modules(model).items():
        tensors += [(f"{module_name}.{name}", b.numel() * b.element_size())
                    for name, b in module.named_buffers(recurse=False) if b is not None]
    return tensors


def step_read_bytes(model: torch.nn.Module, config, batch: int, context_len: int, kv_bytes_per_token: int) -> float:
    """HBM bytes one decode step of ``batch`` requests at ``context_len`` tokens must read."""
    total = 0.0
    shapes = {name: p.shape for name, p in model.named_parameters()}
    for name, nbytes in weight_tensors(model):  # a tied lm_head is the embedding table, listed once
        expert = re.search(r"\.experts\.(w13|w2)(_[qszg])?$", name)
        if expert:  # [E, ...]: only the routed experts
            num_experts = config.num_experts
            total += nbytes / num_experts * experts_read(num_experts, config.num_experts_per_tok, batch)
        elif name.endswith("embed_tokens.weight") and not config.tie_word_embeddings:
            total += nbytes / shapes[name][0] * batch  # one row per request
        else:
            total += nbytes
    return total + batch * context_len * kv_bytes_per_token


def kv_bytes_per_token(forward) -> int:
    cache = forward.runner.kv_cache
    return sum(t[0].numel() * t.element_size() for t in cache.k + cache.v)


def run_each_model_alone(script: str, models: list[str], argv: list[str] | None) -> int:
    """Re-run `script` once per model in its own process, so each starts with the whole GPU."""
    import subprocess

    rest = list(argv if argv is not None else sys.argv[1:])
    if "--models" in rest:
        at = rest.index("--models")
        del rest[at:at + 2]
    codes = [subprocess.call([sys.executable, script, "--models", model, *rest]) for model in models]
    return max(codes)


def print_variant_ratios(results: list[dict]) -> None:
    """Each variant's batch-1 decode step beside the bf16 one of the same model (speedup > 1: faster)."""
    base = {r["model"]: r.get("batch1_decode_ms_per_token") for r in results if r.get("variant") == "bf16"}
    for r in results:
        ms, ref = r.get("batch1_decode_ms_per_token"), base.get(r["model"])
        if r.get("variant") != "bf16" and ms and ref:
            r["batch1_speedup_vs_bf16"] = ref / ms
            print(f"  {r['model']} {r['variant']}: batch-1 decode {ms:.3f} ms vs bf16 {ref:.3f} ms: "
                  f"{ref / ms:.2f}x", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="Llama-3.1-8B-Instruct,Qwen3-8B",
                        help="model directories or names of bundled configs (tests/models/configs)")
    parser.add_argument("--batch-sizes", default="1,16,64")
    parser.add_argument("--input-lens", default="256,1024")
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--max-prefill-tokens", type=int, default=16384)
    parser.add_argument("--variants", default="bf16",
                        help="comma-separated: bf16, fp8, w8a8-int8, fp8-block, awq, gptq, each optionally "
                             "+kv-fp8 (the same model in each form, one after another, in this process)")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_one_batch needs a CUDA device")
        return 2
    models = ns.models.split(",")
    if len(models) > 1:
        return run_each_model_alone(__file__, models, argv)
    env = environment()
    copy_gbps = copy_bandwidth_gbps()
    print(f"{env}  copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results = []
    variants = ns.variants.split(",")
    for model_path, variant in [(m, v) for m in ns.models.split(",") for v in variants]:
        print(f"== {Path(model_path).name} {variant} (dummy weights)", flush=True)
        try:
            directory, overrides = variant_model(model_path, variant)
            result = bench_model(directory, [int(x) for x in ns.batch_sizes.split(",")],
                                 [int(x) for x in ns.input_lens.split(",")], ns.decode_steps,
                                 ns.max_prefill_tokens, **overrides)
        except Exception as exc:  # one variant failing must not lose the others' figures
            traceback.print_exc()
            results.append(dict(model=Path(model_path).name, variant=variant,
                                error=f"{type(exc).__name__}: {str(exc)[:300]}"))
            torch.cuda.empty_cache()
            continue
        result.update(model=Path(model_path).name, variant=variant)
        all_weights_ms = result["weight_bytes"] / (copy_gbps * 1e9) * 1e3
        batch1 = [c for c in result["cases"] if c["batch"] == 1]
        result["all_weights_roofline_ms_per_token"] = all_weights_ms
        if batch1:
            ours = batch1[0]["decode_ms_per_step"]
            read = batch1[0]["step_read_bytes"]
            roofline_ms = read / (copy_gbps * 1e9) * 1e3
            result.update(batch1_decode_ms_per_token=ours, roofline_ms_per_token=roofline_ms,
                          batch1_step_read_bytes=read, batch1_roofline_fraction=roofline_ms / ours)
            print(f"  batch-1 decode {ours:.3f} ms/token vs HBM roofline {roofline_ms:.3f} ms/token "
                  f"({read / 1e9:.2f} GB a step reads): {roofline_ms / ours:.0%} of roofline "
                  f"(all {result['weight_bytes'] / 1e9:.2f} GB of weights: {all_weights_ms / ours:.0%})", flush=True)
        results.append(result)
        stem = f"one_batch-{Path(model_path).name}" + ("" if variants == ["bf16"] else "-quant")
        write_result(stem, {**env, "copy_gbps": copy_gbps, "results": results})
    print_variant_ratios(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
