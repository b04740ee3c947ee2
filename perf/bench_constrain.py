"""Structured-output costs: vocabulary mapping, grammar compile, per-step masks.

Workload (seeded, no downloads): a byte-level BPE tokenizer of 150k tokens,
made by training ``tokenizers`` BPE on tinyshakespeare (~21k tokens) and
extending it with random merges of existing tokens up to the target size
(a valid BPE with Qwen's vocabulary scale; Qwen2.5 has 151,643 text tokens).

Measured:

* ``vocab_build_s``: tokenizer -> {token bytes: ids} map (once per tokenizer);
* ``compile_20_fields_s`` / ``compile_json_object_s``: regex + outlines-core
  Index for a 20-field schema and for response_format json_object (once per
  schema, cached);
* per engine step at batch 64 with 32 constrained rows, each state advanced to
  a random point of its output: ``mask_build`` (32 rows written into a fresh
  [32, 4690] int32 bitmask; ``uncached`` walks outlines' allowed tokens,
  ``cached`` copies rows computed before for the same state), ``advance_us`` (32 sampled tokens fed back),
  ``stage_step_us`` (ForwardBatch -> TokenMask plus SampledTokens through the
  ConstrainStage, what the engine loop pays), ``apply_us`` (bitmask applied to
  [64, V] float32 logits: PyTorch reference on CPU; the Triton kernel too when
  CUDA is present).

Bounded strings (``bounded``): on a synthetic byte-level vocabulary of 151k
tokens built directly as token bytes (all 256 bytes, words of the demo text
with and without a leading space, UTF-8 pieces of several scripts, JSON
punctuation and quote pieces like ``",`` ``"}`` ``\"``, then random joins of
those), the compile of ``{"type": "string", "maxLength": 200}`` and of an
object with four bounded strings (``compile_*_s``: lengths counted beside an
unbounded automaton, ``bounded.py``), and the mask of a state inside a
bounded string (``mask_in_string``: first visit of a count, and cached).

Anchor: one decode step of an 8B model on an H100 takes ~6-8 ms, so a mask
step should stay well under 1 ms. Results go to ``perf/results/constrain-<device>.json``.

Usage: ``python perf/bench_constrain.py [--vocab-size 150000] [--out perf/results]``
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.config import ServerArgs  # noqa: E402
from pipeline.harness import wiring  # noqa: E402
from pipeline.messages import (ConstrainInbox, ForwardBatch, GrammarCompile, ModelInfo, SampledTokens,  # noqa: E402
                               SamplingBatch)
from stages.constrain.bitmask import apply_token_bitmask_reference, bitmask_words  # noqa: E402
from stages.constrain.grammar import (CompiledGrammar, GrammarCompiler, GrammarState,  # noqa: E402
                                      response_format_to_sampling)
from stages.constrain.bounded import token_tables  # noqa: E402
from stages.constrain.stage import ConstrainStage  # noqa: E402
from stages.constrain.vocab import TokenVocab, build_token_vocab  # noqa: E402

DATA = ROOT / "models" / "demo" / "tinyshakespeare.txt"  # the demo model's training text
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def synthetic_tokenizer(vocab_size: int, seed: int = 0) -> Any:
    """A byte-level BPE ``transformers`` tokenizer of ``vocab_size`` tokens (see module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = DATA.read_text()
    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    base.train_from_iterator([text], trainer)
    model = json.loads(base.to_str())["model"]
    vocab: dict[str, int] = dict(model["vocab"])
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    pieces = [p for p in vocab if p not in SPECIAL]
    rng = random.Random(seed)
    while len(vocab) < vocab_size:
        left, right = rng.choice(pieces), rng.choice(pieces)
        if len(left) + len(right) <= 16 and left + right not in vocab:
            vocab[left + right] = len(vocab)
            merges.append((left, right))
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(SPECIAL)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL[1:])


def synthetic_vocab(size: int = 151_000, seed: int = 0) -> TokenVocab:
    """A byte-level TokenVocab of ``size`` text tokens from real-looking pieces (module docstring)."""
    rng = random.Random(seed)
    pieces: dict[bytes, None] = {bytes([b]): None for b in range(256)}
    for word in sorted(set(DATA.read_text().split())):
        for variant in (word, " " + word, word.lower(), " " + word.capitalize()):
            pieces[variant.encode()] = None
    scripts = "éèüößñçàâ" + "абвгдежзик" + "αβγδεζηθ" + "中文字的是不了人我在有他这" + "日本語のテスト" + "😀🎉👍🚀"
    for _ in range(8000):
        text = "".join(rng.choice(scripts) for _ in range(rng.randint(1, 3)))
        pieces[(" " if rng.random() < 0.3 else "").encode() + text.encode()] = None
        pieces[text.encode()[: rng.randint(1, 3)]] = None  # pieces ending inside a UTF-8 character
    for punct in ['",', '"}', '\\"', '":', '":"', '","', '"]', '{"', ' "', '"\n', '\\n', '\\\\', '"},{"', '["',
                  '": "', '", "', '"}]', '\\u', '\\t', "{\n", "},\n", '"\n}', ': ', ', ', '\n  "']:
        pieces[punct.encode()] = None
    base = list(pieces)
    while len(pieces) < size:
        joined = rng.choice(base) + rng.choice(base)
        if len(joined) <= 16:
            pieces[joined] = None
    token_bytes = {data: [i] for i, data in enumerate(list(pieces)[:size])}
    return TokenVocab(token_bytes=token_bytes, eos_token_id=size, stop_token_ids=(size,), tokenizer_size=size + 1,
                      kind="byte_level")


def bounded_object_schema() -> dict[str, Any]:
    return {"type": "object", "properties": {
        "title": {"type": "string", "maxLength": 20}, "summary": {"type": "string", "maxLength": 200},
        "code": {"type": "string", "minLength": 3, "maxLength": 10}, "tags": {"type": "array", "maxItems": 3,
                                                                              "items": {"type": "string", "maxLength": 12}},
        "year": {"type": "integer", "minimum": 1900, "maximum": 2100}}, "required": ["title", "summary", "code"]}


def bench_bounded(size: int, repeats: int) -> dict[str, Any]:
    """Compile and mask costs of bounded JSON strings on a synthetic ``size``-token vocabulary."""
    start = time.perf_counter()
    vocab = synthetic_vocab(size)
    build_s = time.perf_counter() - start
    compiler = GrammarCompiler(vocab, max_workers=0)
    start = time.perf_counter()
    token_tables(vocab)
    tables_s = time.perf_counter() - start
    result: dict[str, Any] = {"vocab_tokens": vocab.num_text_tokens, "vocab_build_s": round(build_s, 2),
                              "token_tables_s": round(tables_s, 3)}
    for name, schema in (("max_length_200", {"type": "string", "maxLength": 200}),
                         ("bounded_object", bounded_object_schema())):
        start = time.perf_counter()
        grammar = compiler.compile("json_schema", json.dumps(schema))
        result[f"compile_{name}_s"] = round(time.perf_counter() - start, 3)
        result[f"{name}_counted"] = grammar.bounded is not None
    grammar = compiler.compile("json_schema", json.dumps({"type": "string", "maxLength": 200}))
    state = GrammarState(grammar, vocab)
    state.advance(vocab.token_bytes[b'"'][0])
    letter = vocab.token_bytes[b"a"][0]
    row = np.zeros(bitmask_words(vocab.tokenizer_size), dtype=np.uint32)
    fresh = []
    for _ in range(min(repeats, 150)):  # each count is a new row: the uncached path
        begin = time.perf_counter()
        state.write_mask(row, vocab.tokenizer_size)
        fresh.append((time.perf_counter() - begin) * 1e6)
        state.advance(letter)
    result["mask_in_string_uncached"] = {"median_us": statistics.median(fresh), "p90_us": sorted(fresh)[int(0.9 * len(fresh))]}
    result["mask_in_string_cached"] = timed_us(lambda: state.write_mask(row, vocab.tokenizer_size), repeats)
    return result


def twenty_field_schema() -> dict[str, Any]:
    kinds = [{"type": "string", "maxLength": 32}, {"type": "integer", "minimum": 0, "maximum": 1000},
             {"type": "number"}, {"type": "boolean"}, {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
             {"enum": ["low", "medium", "high"]}, {"type": "string"}]
    properties = {f"field_{i:02d}": kinds[i % len(kinds)] for i in range(20)}
    return {"type": "object", "properties": properties, "required": list(properties)[:15]}


def best_of(function: Callable[[], Any], repeats: int) -> float:
    """Minimum wall time in seconds over ``repeats`` runs (the machine is shared)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return min(times)


def timed_us(function: Callable[[], Any], repeats: int) -> dict[str, float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append((time.perf_counter() - start) * 1e6)
    return {"median_us": statistics.median(times), "p90_us": sorted(times)[int(0.9 * len(times))]}


def advanced_states(grammar: Any, vocab: Any, count: int, rng: random.Random) -> list[GrammarState]:
    """``count`` states, each walked a random number of random allowed tokens into its output."""
    states = []
    for _ in range(count):
        state = GrammarState(grammar, vocab)
        row = torch.empty(bitmask_words(vocab.tokenizer_size), dtype=torch.int32)
        for _ in range(rng.randint(0, 40)):
            if state.accepting:
                break
            state.write_mask(row, vocab.tokenizer_size)
            state.advance(random_allowed_token(row, state, vocab, rng))
        states.append(state)
    return states


def bench_step(grammar: CompiledGrammar, vocab: Any, vocab_size: int, batch: int, constrained: int,
               repeats: int) -> dict[str, Any]:
    """Mask build (without and with the row cache), advance and apply for one engine step."""
    rng = random.Random(0)
    words = bitmask_words(vocab_size)
    uncached = dataclasses.replace(grammar, mask_cache=None)
    cold_states = advanced_states(uncached, vocab, constrained, rng)
    warm_states = advanced_states(grammar, vocab, constrained, random.Random(0))

    def build(states: list[GrammarState]) -> torch.Tensor:
        bitmask = torch.empty(constrained, words, dtype=torch.int32)
        rows_view = bitmask.numpy()
        for i, state in enumerate(states):
            state.write_mask(rows_view[i], vocab_size)
        return bitmask

    bitmask = build(warm_states)
    assert torch.equal(bitmask, build(cold_states)), "cached rows differ from fresh ones"
    rows = list(range(0, batch, batch // constrained))[:constrained]
    logits = torch.randn(batch, vocab_size)
    result = {"mask_build_uncached": timed_us(lambda: build(cold_states), max(5, repeats // 10)),
              "mask_build_cached": timed_us(lambda: build(warm_states), repeats),
              "apply_reference_cpu": timed_us(lambda: apply_token_bitmask_reference(logits, bitmask, rows), 5)}
    fresh = [GrammarState(grammar, vocab) for _ in range(constrained)]
    first_tokens = [rng.choice([t for t in s.guide.get_tokens() if t != vocab.eos_token_id]) for s in fresh]

    def advance() -> None:  # fresh states each time so every advance is legal
        for state, token in zip([GrammarState(grammar, vocab) for _ in range(constrained)], first_tokens):
            state.advance(token)

    construct = timed_us(lambda: [GrammarState(grammar, vocab) for _ in range(constrained)], repeats)
    with_advance = timed_us(advance, repeats)
    result["advance"] = {"median_us": max(0.0, with_advance["median_us"] - construct["median_us"])}
    if torch.cuda.is_available():
        result["apply_triton_cuda"] = bench_triton_apply(logits, bitmask, rows, repeats)
    return result


def bench_triton_apply(logits: torch.Tensor, bitmask: torch.Tensor, rows: list[int], repeats: int) -> dict:
    from triton_kernels.sampling import apply_token_bitmask

    logits_gpu, bitmask_gpu = logits.cuda(), bitmask.cuda()
    rows_gpu = torch.tensor(rows, dtype=torch.int64, device="cuda")
    apply_token_bitmask(logits_gpu.clone(), bitmask_gpu, rows_gpu)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        apply_token_bitmask(logits_gpu, bitmask_gpu, rows_gpu)
    end.record()
    torch.cuda.synchronize()
    return {"mean_us": start.elapsed_time(end) * 1e3 / repeats}


def random_allowed_token(bitmask_row: torch.Tensor, state: GrammarState, vocab: Any, rng: random.Random) -> int:
    """A random non-stop token the row allows: probe random ids, else list the (few) allowed ones."""
    words = bitmask_row.numpy().view("uint32")
    for _ in range(64):
        token = rng.randrange(vocab.tokenizer_size)
        if (int(words[token // 32]) >> (token % 32)) & 1 and token not in vocab.stop_token_ids:
            return token
    allowed = [t for t in state.allowed_token_ids() if t not in vocab.stop_token_ids]
    return rng.choice(allowed or list(vocab.stop_token_ids))


def bench_stage(tokenizer: Any, spec: str, vocab_size: int, batch: int, constrained: int, repeats: int) -> dict:
    """ForwardBatch -> TokenMask and SampledTokens -> advance through ConstrainStage."""
    inbox, outboxes = wiring(ConstrainInbox, "sample", "schedule")
    model_info = ModelInfo(num_slots=1, num_rows=batch + 1, context_len=1 << 16, vocab_size=vocab_size,
                           eos_token_ids=(tokenizer.eos_token_id,))
    stage = ConstrainStage(ServerArgs(), inbox, outboxes, tokenizer=tokenizer, model_info=model_info)
    rids = [f"r{i}" for i in range(batch)]
    flags = [i % (batch // constrained) == 0 for i in range(batch)][:batch]
    for rid, flag in zip(rids, flags):
        if flag:
            stage.handle(GrammarCompile(rid=rid, kind="json_schema", spec=spec))
    while stage.compiling:
        stage.step()
        time.sleep(0.01)
    rng = random.Random(1)
    times = []
    for batch_id in range(repeats):
        start = time.perf_counter()
        stage.handle(forward_batch(batch_id, rids, flags))
        stage.tick()
        (mask,) = outboxes["sample"].drain(4)
        elapsed = time.perf_counter() - start
        tokens = [-1] * batch  # the sampler's pick, made outside the timing
        for i, row in enumerate(mask.row_indices):
            tokens[row] = random_allowed_token(mask.bitmask[i], stage.states[rids[row]], stage.vocab, rng)
        start = time.perf_counter()
        stage.handle(SampledTokens(batch_id=batch_id, rids=rids, token_ids=tokens))
        times.append((elapsed + time.perf_counter() - start) * 1e6)
    stage.close()
    return {"median_us": statistics.median(times), "p90_us": sorted(times)[int(0.9 * len(times))]}


def forward_batch(batch_id: int, rids: list[str], constrained: list[bool]) -> ForwardBatch:
    """A decode batch of ``len(rids)`` rows (only rids and sampling flags matter here)."""
    n = len(rids)
    sampling = SamplingBatch(temperatures=[1.0] * n, top_ps=[1.0] * n, top_ks=[-1] * n, min_ps=[0.0] * n,
                             repetition_penalties=[1.0] * n, frequency_penalties=[0.0] * n,
                             presence_penalties=[0.0] * n, seeds=[0] * n, steps=[0] * n, need_sample=[True] * n,
                             first_step=[False] * n, return_logprob=[False] * n, top_logprobs_nums=[0] * n,
                             constrained=constrained)
    return ForwardBatch(batch_id=batch_id, mode="decode", rids=rids, input_ids=[0] * n, positions=[0] * n,
                        out_cache_loc=list(range(n)), req_pool_indices=list(range(n)), prefix_lens=[0] * n,
                        extend_lens=[1] * n, seq_lens=[1] * n, sampling=sampling)


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return "cpu: " + line.split(":", 1)[1].strip()
    return "cpu: " + platform.processor()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--vocab-size", type=int, default=150_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--constrained", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default=str(ROOT / "perf" / "results"))
    parser.add_argument("--bounded-vocab-size", type=int, default=151_000)
    parser.add_argument("--only-bounded", action="store_true", help="measure bounded strings only")
    args = parser.parse_args(argv)
    import outlines_core  # noqa: F401
    from importlib.metadata import version

    bounded = bench_bounded(args.bounded_vocab_size, args.repeats)
    print(json.dumps({"bounded": bounded}, indent=2), flush=True)
    if args.only_bounded:
        return {"bounded": bounded}

    start = time.perf_counter()
    tokenizer = synthetic_tokenizer(args.vocab_size)
    print(f"synthetic tokenizer: {len(tokenizer)} tokens in {time.perf_counter() - start:.1f} s", flush=True)
    vocab_build_s = best_of(lambda: build_token_vocab(tokenizer), 3)
    vocab = build_token_vocab(tokenizer)
    model_vocab_size = len(tokenizer) + 64  # embedding padded past the tokenizer, as Qwen's is
    schema = json.dumps(twenty_field_schema())
    compiler = GrammarCompiler(vocab, max_workers=0)
    start = time.perf_counter()
    grammar = compiler.compile("json_schema", schema)
    compile_s = time.perf_counter() - start
    json_object = response_format_to_sampling({"type": "json_object"})["json_schema"]
    compile_object_s = best_of(lambda: compiler.compile("json_schema", json_object), 1)
    print(f"vocab {vocab_build_s:.2f} s, compile 20 fields {compile_s:.2f} s, json_object {compile_object_s:.2f} s",
          flush=True)
    step = bench_step(grammar, vocab, model_vocab_size, args.batch, args.constrained, args.repeats)
    stage_step = bench_stage(tokenizer, schema, model_vocab_size, args.batch, args.constrained, args.repeats)
    result = {
        "bench": "constrain", "device": device_name(), "torch": torch.__version__,
        "outlines_core": version("outlines-core"), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenizer_tokens": len(tokenizer), "text_tokens": vocab.num_text_tokens, "model_vocab_size": model_vocab_size,
        "batch": args.batch, "constrained_rows": args.constrained,
        "vocab_build_s": round(vocab_build_s, 3), "compile_20_fields_s": round(compile_s, 3),
        "compile_json_object_s": round(compile_object_s, 3), "step": step, "stage_step": stage_step,
        "bounded": bounded,
        "anchor": "8B decode step on an H100 ~6-8 ms; mask work should be < 1 ms",
    }
    print(json.dumps(result, indent=2))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = torch.cuda.get_device_name().lower().replace(" ", "-") if torch.cuda.is_available() else "cpu"
    (out_dir / f"constrain-{tag}.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main()
