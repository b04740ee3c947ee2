"""Speculative decoding on one GPU: verify cost, oracle speedup curve, EAGLE3 step time.

Random weights accept nothing, so this measures the engine's machinery, in
three sections (one process, batch 1, CUDA graphs on as the engine runs):

``verify``  The forward + sample step of a verify batch of N tokens (the
            last token and N - 1 drafts, ``--verify-tokens`` 4, 8, 16; the
            verify graphs of ``stages/forward/graphs.py``) against a plain
            decode step (the decode graph), at a ``--context`` token prefix,
            medians over ``--repeats`` alternating runs; ratios printed
            (issue 25's bounds: 1.15x, 1.2x, 1.35x).
``oracle``  Output tok/s of the plain engine against an engine drafting
            ``--num-drafts`` tokens (NGRAM machinery) whose drafts come from
            ``OracleDrafter``: the plain greedy continuation with the draft at
            index ``a`` corrupted, so exactly ``a`` drafts are accepted per
            step, for ``a`` in ``--accept`` (1..5). Issue 25's target: at 4 of 5,
            >= 3x. ``corrupt`` (a fraction of random drafts) is the older knob.
``eagle3``  The target with a dummy EAGLE3 head of the public Llama-3.1-8B
            EAGLE3 shape (``tests/models/configs/EAGLE3-LLaMA3.1-Instruct-8B.json``,
            ``--load-format dummy`` for both): ms per draft + verify step, a
            chain (``--speculative-num-steps 3``) and a tree (topk 4, 8 tokens),
            against the plain decode step. The head's steps run as the
            engine runs them: through its draft graphs (catch-up, chain or
            tree, ``stages/forward/graphs.DraftGraphs``) when the runner
            captured them; each result names the graphs and their replays.

Usage (one H100, about 4 minutes)::

    python perf/bench_speculative.py            # Llama-3.1-8B-Instruct, dummy weights

``--tiny`` runs every section on a tiny random Llama and EAGLE3 head on the
CPU (reference kernels, no graphs): a check that the script runs, not a
measurement. Results: ``perf/results/speculative-<device>.json`` (and
``$OUT``), written after each section.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import msgspec
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.engine import Engine  # noqa: E402
from perf.bench_one_batch import (  # noqa: E402
    BUNDLED_CONFIGS, environment, greedy_sampling, model_dir, prefill_batch, server_args, write_result)
from pipeline.messages import ForwardBatch, Logits  # noqa: E402

DEMO = Path(__file__).resolve().parents[1] / "models" / "demo"
TINY_TARGET = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=512)
TINY_HEAD = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 head_dim=16, vocab_size=512, draft_vocab_size=128)


class OracleDrafter:
    """Drafts the known greedy continuation of each prompt: with ``accept`` set, the draft at
    that index is corrupted (exactly ``accept`` accepted per step); else each draft is
    corrupted with probability ``corrupt``."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], corrupt: float, vocab_size: int,
                 seed: int = 0, accept: int | None = None) -> None:
        self.continuations = continuations
        self.corrupt, self.accept = corrupt, accept
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def __call__(self, req, max_drafts: int) -> list[int]:
        known = self.continuations.get(tuple(req.input_ids), [])
        done = len(req.output_ids)
        drafts = list(known[done:done + max_drafts])
        for i, token in enumerate(drafts):
            wrong = i == self.accept if self.accept is not None else self.rng.random() < self.corrupt
            if wrong:
                drafts[i] = (token + 1) % self.vocab_size
        return drafts


def run(engine: Engine, prompts: list[list[int]], params: dict) -> tuple[list[list[int]], float]:
    """(output ids per prompt, output tokens per second), one request at a time (batch 1)."""
    outputs, tokens, start = [], 0, time.perf_counter()
    for prompt in prompts:
        out = engine.generate(input_ids=prompt, sampling_params=params)
        outputs.append(out["output_ids"])
        tokens += len(out["output_ids"])
    return outputs, tokens / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- models
def tiny_models(directory: Path) -> tuple[str, str]:
    """Configs of a tiny Llama-3.1 and a tiny EAGLE3 head for it (dummy weights)."""
    target, head = directory / "target", directory / "eagle3"
    for path, source, sizes in ((target, "Llama-3.1-8B-Instruct", TINY_TARGET),
                                (head, "EAGLE3-LLaMA3.1-Instruct-8B", TINY_HEAD)):
        path.mkdir(parents=True, exist_ok=True)
        config = json.loads((BUNDLED_CONFIGS / f"{source}.json").read_text())
        config.update(sizes, torch_dtype="float32")
        (path / "config.json").write_text(json.dumps(config))
    return str(target), str(head)


def head_dir(name: str) -> str:
    """A directory holding a bundled EAGLE head config as config.json (dummy weights)."""
    directory = Path(tempfile.gettempdir()) / "stagewise-configs" / name
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(BUNDLED_CONFIGS / f"{name}.json", directory / "config.json")
    return str(directory)


# ----------------------------------------------------------------------------- verify cost
def verify_batch(batch_id: int, context: int, tokens: int, vocab: int) -> ForwardBatch:
    """Row 1 feeds its last token and ``tokens - 1`` drafts at positions context.. (slots of
    ``prefill_batch``'s layout)."""
    ids = [(7 * i + 3) % vocab for i in range(tokens)]
    positions = list(range(context, context + tokens))
    sampling = msgspec.structs.replace(greedy_sampling(1), draft_ids=[ids[1:]])
    return ForwardBatch(batch_id=batch_id, mode="extend", rids=["r0"], input_ids=ids, positions=positions,
                        out_cache_loc=[1 + p for p in positions], req_pool_indices=[1], prefix_lens=[context],
                        extend_lens=[tokens], seq_lens=[context + tokens], sampling=sampling)


def decode_step(batch_id: int, context: int, token: int) -> ForwardBatch:
    return ForwardBatch(batch_id=batch_id, mode="decode", rids=["r0"], input_ids=[token], positions=[context],
                        out_cache_loc=[1 + context], req_pool_indices=[1], prefix_lens=[context], extend_lens=[1],
                        seq_lens=[context + 1], sampling=greedy_sampling(1))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def verify_cost(model: str, tokens_list: list[int], context: int, repeats: int, **overrides) -> dict:
    """Median forward + sample time of a verify step of each size and of a decode step."""
    from pipeline.assembly import forward_and_sample

    args = server_args(model, speculative_algorithm="NGRAM", speculative_num_draft_tokens=max(tokens_list),
                       max_total_tokens=context + 2048, max_running_requests=1, cuda_graph_max_bs=1,
                       context_length=context + 1024, **overrides)
    forward, sample = forward_and_sample(args)
    vocab = forward.config.vocab_size
    forward.run_batch(prefill_batch(0, 1, context, vocab))

    def decode() -> None:
        batch = decode_step(1, context, 11)
        logits = forward.run_batch(batch)
        sample.sample_batch(batch.batch_id, batch.rids, logits, batch.sampling, None)

    def verify(tokens: int):
        batch = verify_batch(2, context, tokens, vocab)

        def step() -> None:
            logits = forward.run_batch(batch)
            sample._verify(Logits(batch_id=batch.batch_id, rids=batch.rids, logits=logits[:1],
                                  sampling=batch.sampling, draft_logits=logits[1:]), None)
        return step

    steps = {n: verify(n) for n in tokens_list}
    times: dict[str, list[float]] = {"decode": [], **{str(n): [] for n in tokens_list}}
    for _ in range(3):  # warm-up: compile and capture outside the timing
        decode()
        for step in steps.values():
            step()
    for _ in range(repeats):
        times["decode"].append(timed(decode))
        for n, step in steps.items():
            times[str(n)].append(timed(step))
    decode_ms = statistics.median(times["decode"]) * 1e3
    graphs = forward.runner.verify_graphs
    result = {"context": context, "decode_ms": decode_ms, "verify": [], "verify_graphs":
              sorted(str(k) for k in graphs.graphs) if graphs is not None else []}
    for n in tokens_list:
        ms = statistics.median(times[str(n)]) * 1e3
        result["verify"].append({"tokens": n, "ms": ms, "ratio_to_decode": ms / decode_ms})
        print(f"  verify {n:2d} tokens: {ms:7.3f} ms  = {ms / decode_ms:5.2f}x decode ({decode_ms:.3f} ms)",
              flush=True)
    del forward, sample
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


# ----------------------------------------------------------------------------- oracle sweep
def oracle_sweep(model: str, prompts: list[list[int]], params: dict, num_drafts: int, accepts: list[int],
                 **common) -> dict:
    """Plain tok/s, then an oracle-drafting engine's tok/s at each exact acceptance length."""
    with Engine(model, **common) as engine:
        vocab = engine.schedule.info.vocab_size
        run(engine, prompts[:1], params)  # warm-up
        plain, plain_tps = run(engine, prompts, params)
    print(f"  plain: {plain_tps:8.1f} tok/s", flush=True)
    continuations = {tuple(p): out for p, out in zip(prompts, plain)}
    rows = []
    with Engine(model, speculative_algorithm="NGRAM", speculative_num_steps=num_drafts, **common) as engine:
        spec = engine.schedule.spec
        spec.proposer = OracleDrafter(continuations, 0.0, vocab, accept=num_drafts)
        run(engine, prompts[:1], params)  # warm-up
        for accept in accepts:
            spec.proposer = OracleDrafter(continuations, 0.0, vocab, accept=accept)
            spec.total_verify_ct = spec.total_accepted = 0
            outputs, tps = run(engine, prompts, params)
            steps = max(spec.total_verify_ct, 1)
            row = {"accept": accept, "mean_accepted": spec.total_accepted / steps,
                   "tokens_per_step": (steps + spec.total_accepted) / steps, "tok_s": tps,
                   "speedup": tps / plain_tps, "exact": outputs == plain}
            rows.append(row)
            print(f"  accept {accept}/{num_drafts}: {tps:8.1f} tok/s  {row['speedup']:5.2f}x plain "
                  f"(mean accepted {row['mean_accepted']:.2f}, exact {row['exact']})", flush=True)
    return {"num_drafts": num_drafts, "plain_tok_s": plain_tps, "sweep": rows}


# ----------------------------------------------------------------------------- EAGLE3 steps
def eagle3_steps(model: str, head: str, prompts: list[list[int]], params: dict, plain_tok_s: float,
                 **common) -> dict:
    """ms per EAGLE3 draft + verify step (random weights: one token each) against plain decode."""
    configs = {"chain": dict(speculative_num_steps=3),
               "tree": dict(speculative_eagle_topk=4, speculative_num_steps=3, speculative_num_draft_tokens=8)}
    results = {"plain_ms_per_token": 1e3 / plain_tok_s}
    for name, flags in configs.items():
        with Engine(model, speculative_algorithm="EAGLE3", speculative_draft_model_path=head, **flags,
                    **common) as engine:
            run(engine, prompts[:1], params)  # warm-up
            spec = engine.schedule.spec
            spec.total_verify_ct = spec.total_accepted = 0
            start = time.perf_counter()
            outputs, tps = run(engine, prompts, params)
            elapsed = time.perf_counter() - start
            steps = max(spec.total_verify_ct, 1)
            ms = elapsed / steps * 1e3
            results[name] = {"flags": flags, "ms_per_step": ms, "tok_s": tps, "verify_steps": steps,
                             "accepted": spec.total_accepted, "ratio_to_decode": ms * plain_tok_s / 1e3,
                             "draft_graphs": draft_graphs(engine)}
            print(f"  EAGLE3 {name}: {ms:7.3f} ms per draft+verify step = "
                  f"{results[name]['ratio_to_decode']:.2f}x a decode step ({steps} steps, "
                  f"{spec.total_accepted} drafts accepted; head draft graphs "
                  f"{results[name]['draft_graphs']['replays'] or 'off'})", flush=True)
    return results


def draft_graphs(engine: Engine) -> dict:
    """Which head draft graphs the runner captured (``stages/forward/graphs.DraftGraphs``) and
    how often each step kind replayed: the eagle3 section runs the head as the engine does,
    its graphs by the runner's own choice (none on CPU or with --disable-cuda-graph)."""
    runner = engine.stages["forward"].runner
    graphs = runner.drafter.graphs
    if graphs is None:
        return {"captured": [], "replays": {}}
    replays = {kind: n for kind, n in graphs.replays.items() if n}
    if not graphs.eager and set(replays) != set(graphs.kinds):  # graphs on: every step kind replayed
        raise RuntimeError(f"the head's draft graphs {graphs.kinds} did not all serve: replays {replays}")
    return {"captured": sorted(f"{size}:{kind}" for size, kind in graphs.graphs), "replays": replays}


# ----------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="Llama-3.1-8B-Instruct", help="directory or bundled config name")
    parser.add_argument("--draft-model", default="EAGLE3-LLaMA3.1-Instruct-8B")
    parser.add_argument("--tiny", action="store_true", help="tiny random models on the CPU (a smoke run)")
    parser.add_argument("--sections", default="verify,oracle,eagle3")
    parser.add_argument("--verify-tokens", default="4,8,16")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--num-drafts", type=int, default=5)
    parser.add_argument("--accept", default="1,2,3,4,5")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=2)
    options = parser.parse_args(argv)
    sections = options.sections.split(",")
    overrides: dict = {}
    model, head = options.model, options.draft_model
    if options.tiny:
        model, head = tiny_models(Path(tempfile.mkdtemp(prefix="bench-spec-")))
        overrides = dict(device="cpu", kernel_backend="reference", dtype="float32")
    else:
        model, head = model_dir(model), (head if Path(head).is_dir() else head_dir(head))
    # prompts are token ids: any tokenizer serves (the demo model's, as perf/serve_and_bench.sh)
    common = dict(load_format="dummy", max_total_tokens=32768, cuda_graph_max_bs=1, tokenizer_path=str(DEMO),
                  **overrides)
    params = {"temperature": 0.0, "max_new_tokens": options.max_new_tokens, "ignore_eos": True}
    prompts = [[3 + (17 * i + 5 * j) % 500 for j in range(32)] for i in range(options.num_prompts)]
    result: dict = {"environment": environment(), "model": Path(model).name, "tiny": options.tiny}
    stem = "speculative-tiny" if options.tiny else "speculative"
    if "verify" in sections:
        print("verify cost (batch 1):", flush=True)
        result["verify_cost"] = verify_cost(model, [int(n) for n in options.verify_tokens.split(",")],
                                            options.context, options.repeats, **overrides)
        write_result(stem, result)
    if "oracle" in sections or "eagle3" in sections:
        print(f"oracle drafter, {options.num_drafts} drafts per step (batch 1):", flush=True)
        result["oracle"] = oracle_sweep(model, prompts, params, options.num_drafts,
                                        [int(a) for a in options.accept.split(",")], **common)
        write_result(stem, result)
    if "eagle3" in sections:
        print(f"EAGLE3 head {Path(head).name} (dummy weights):", flush=True)
        result["eagle3"] = eagle3_steps(model, head, prompts, params, result["oracle"]["plain_tok_s"], **common)
    path = write_result(stem, result)
    print(f"wrote {path}", flush=True)
    return result


if __name__ == "__main__":
    main()
