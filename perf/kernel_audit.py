"""Kernel audit: every GPU kernel of one prefill and one decode step must be ours (Triton).

Usage (GPU)::

    python perf/kernel_audit.py [--model Qwen3-8B] [--batch 4] [--input-len 512]
    python perf/kernel_audit.py --model Qwen2.5-VL-7B-Instruct --image 1024x768 [--batch 2]

Runs the real forward and sample stages (dummy weights, CUDA graphs off so
every launch is visible) on one prefill ForwardBatch and one decode
ForwardBatch under ``torch.profiler``, and lists every GPU kernel with its
count and time. A kernel passes when its name is a ``@triton.jit`` function
defined in ``triton_kernels/``; device memcpy/memset pass too (host<->device
copies of the packed batch, allocations). Anything else (a cuBLAS GEMM, an
ATen elementwise or indexing kernel) fails the audit: exit code 1.
Results: ``perf/results/kernel_audit-<device>.json`` (and ``$OUT`` when set;
``kernel_audit-vl-<device>.json`` with ``--image``).

``--image WxH`` (a vision-language model): each request's prompt is
``--input-len`` text tokens around one generated W x H picture, prepared as
the multimodal stage prepares it (decode, Qwen's resize, patches, M-RoPE
positions) and attached as the schedule stage attaches it (a
``MultimodalBatch``), so the prefill runs the forward stage's multimodal path:
the vision encoder, the embeddings put in the pad rows, M-RoPE. The profiled
step uses pictures not seen before, so the encoder runs under the profile
(not the multimodal cache). A bundled config's name gets its bundled
``<name>.preprocessor_config.json`` beside it.
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

from bench_one_batch import (  # noqa: E402
    decode_batch, environment, greedy_sampling, prefill_batch, server_args, variant_model, write_result,
)


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


def vl_batches(model_dir: Path, first_id: int, batch: int, input_len: int, image: tuple[int, int],
               vocab: int, seed: int):
    """(prefill ForwardBatch with a MultimodalBatch, the decode batch maker): B requests, each
    ``input_len // 2`` text tokens, one picture, the rest of the text."""
    from bench_vl import picture
    from pipeline.messages import ForwardBatch, MediaInput, MultimodalBatch, MultimodalSlice
    from stages.multimodal.mrope import rope_index
    from stages.multimodal.prepare import decode, load_vision_model, make_item

    vision = load_vision_model(model_dir)
    if vision is None:
        raise SystemExit(f"{model_dir}: not a vision-language model (no vision_config); drop --image")
    gen = torch.Generator().manual_seed(seed)
    ids, slots, slices, rows = [], [], [], [[], [], []]
    lens, deltas = [], []
    stride = input_len + 8192
    for b in range(batch):
        decoded = decode(MediaInput(modality="image", data=picture(*image, seed * 1000 + b)), vision, "picture")
        length = vision.rules.tokens_for(decoded.grid_thw)
        head = input_len // 2
        text = torch.randint(0, min(vocab, 150000), (input_len,), generator=gen).tolist()
        prompt = text[:head] + [vision.image_token_id] * length + text[head:]
        item = make_item(decoded, offset=head, length=length, pad_token_id=vision.image_token_id)
        positions, delta = rope_index(len(prompt), [(head, item.grid_thw, 1.0)], vision.merge_size)
        slices.append(MultimodalSlice(rid=f"r{b}", item=item, batch_row=len(ids) + head, item_start=0,
                                      count=length, last=True))
        for axis in range(3):
            rows[axis].extend(positions[axis])
        slots.extend(1 + b * stride + i for i in range(len(prompt)))
        ids.extend(prompt)
        lens.append(len(prompt))
        deltas.append(delta)
    prefill = ForwardBatch(batch_id=first_id, mode="extend", rids=[f"r{b}" for b in range(batch)], input_ids=ids,
                           positions=rows[0], out_cache_loc=slots, req_pool_indices=list(range(1, batch + 1)),
                           prefix_lens=[0] * batch, extend_lens=lens, seq_lens=lens, sampling=greedy_sampling(batch),
                           mm=MultimodalBatch(mrope_positions=rows, slices=slices))

    def decode_step(batch_id: int, tokens: list[int]) -> ForwardBatch:
        return ForwardBatch(batch_id=batch_id, mode="decode", rids=prefill.rids, input_ids=tokens,
                            positions=[n + d for n, d in zip(lens, deltas)],
                            out_cache_loc=[1 + b * stride + n for b, n in enumerate(lens)],
                            req_pool_indices=prefill.req_pool_indices, prefix_lens=lens, extend_lens=[1] * batch,
                            seq_lens=[n + 1 for n in lens], sampling=greedy_sampling(batch))
    return prefill, decode_step


def vl_model_dir(model: str) -> Path:
    """A directory holding a bundled VL config and its preprocessor_config.json (or ``model`` itself)."""
    import tempfile

    from bench_vl import bundled_vl_dir

    if Path(model).is_dir():
        return Path(model)
    return bundled_vl_dir(model, Path(tempfile.gettempdir()) / "stagewise-configs" / f"{model}-vl", tokenizer=False)


def parse_image(value: str) -> tuple[int, int]:
    width, _, height = value.partition("x")
    if not (width.isdigit() and height.isdigit() and int(width) > 0 and int(height) > 0):
        raise argparse.ArgumentTypeError(f"--image must be WxH in pixels, got {value!r}")
    return int(width), int(height)


def main(argv: list[str] | None = None) -> int:
    from pipeline.assembly import forward_and_sample

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="Qwen3-8B",
                        help="a model directory or the name of a bundled config (tests/models/configs)")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="run the batches once on the CPU without profiling (a check of the script)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--image", type=parse_image, default=None, metavar="WxH",
                        help="one generated picture of this size per request (a vision-language model)")
    parser.add_argument("--variant", default="bf16",
                        help="bench_one_batch's weight format / KV cache: bf16, fp8, w8a8-int8, fp8-block, awq, "
                             "gptq, each optionally +kv-fp8")
    ns = parser.parse_args(argv)
    if not torch.cuda.is_available() and not ns.cpu_dry_run:
        print("kernel_audit needs a CUDA device")
        return 2
    model = str(vl_model_dir(ns.model)) if ns.image else ns.model
    model, overrides = variant_model(model, ns.variant)
    extra = 8192 if ns.image else 1024               # a picture's tokens (1024x768: 999 in Qwen2.5-VL)
    args = server_args(model, max_total_tokens=ns.batch * (ns.input_len + extra) + 1, disable_cuda_graph=True,
                       max_running_requests=ns.batch, context_length=ns.input_len + extra,
                       chunked_prefill_size=ns.batch * (ns.input_len + extra), **overrides)
    forward, sample = forward_and_sample(args)
    vocab = forward.config.vocab_size

    def one_prefill_and_decode(first_id: int) -> None:
        if ns.image:
            batch, decode_step = vl_batches(Path(model), first_id, ns.batch, ns.input_len, ns.image, vocab,
                                            seed=first_id + 1)
        else:
            batch = prefill_batch(first_id, ns.batch, ns.input_len, vocab)
        tokens = sample.sample_batch(first_id, batch.rids, forward.run_batch(batch), batch.sampling, None).token_ids
        if ns.image:
            batch = decode_step(first_id + 1, tokens)
        else:
            batch = decode_batch(first_id + 1, ns.batch, ns.input_len, tokens, ns.input_len)
        sample.sample_batch(first_id + 1, batch.rids, forward.run_batch(batch), batch.sampling, None)

    if ns.cpu_dry_run:              # the batches build and run (no profile): a check of this script off the GPU
        one_prefill_and_decode(0)
        print(f"dry run: one prefill and one decode step ran; multimodal counters {forward.telemetry()}")
        return 0

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
    picture = f", one {ns.image[0]}x{ns.image[1]} picture each" if ns.image else ""
    print(f"{len(rows)} distinct kernels, {len(offenders)} not from triton_kernels/ "
          f"(model {Path(ns.model).name} {ns.variant}, batch {ns.batch}, input {ns.input_len}{picture})")
    stem = ("kernel_audit-vl" if ns.image else "kernel_audit") + ("" if ns.variant == "bf16" else f"-{ns.variant}")
    write_result(stem,
                 {**environment(), "model": Path(ns.model).name, "variant": ns.variant, "batch": ns.batch,
                  "input_len": ns.input_len,
                  "image": list(ns.image) if ns.image else None, "kernels": rows,
                  "offenders": [r["kernel"] for r in offenders]})
    return 1 if offenders else 0


if __name__ == "__main__":
    sys.exit(main())
