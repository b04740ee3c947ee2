"""Speculative decoding speed with an oracle drafter: output tok/s against acceptance length.

Random weights accept nothing, so the engine's own speedup is measured with
``OracleDrafter``: it proposes the tokens a plain greedy run produced for
the same prompt, each draft token replaced by a wrong one with probability
``corrupt`` (a chain stops being accepted at its first wrong token). Sweeping
``corrupt`` sweeps the mean acceptance length. Usage::

    python perf/bench_speculative.py --model-path DIR [--num-draft-tokens 5] [--max-new-tokens 128]

Prints one JSON line per setting: corrupt, tokens per verify step, output tok/s,
and the plain (no speculation) tok/s measured in the same process.
"""
from __future__ import annotations

import argparse
import json
import random
import time

from pipeline.engine import Engine


class OracleDrafter:
    """Drafts the known greedy continuation of each prompt, a fraction of tokens corrupted."""

    def __init__(self, continuations: dict[tuple[int, ...], list[int]], corrupt: float, vocab_size: int,
                 seed: int = 0) -> None:
        self.continuations = continuations
        self.corrupt = corrupt
        self.vocab_size = vocab_size
        self.rng = random.Random(seed)

    def __call__(self, req, max_drafts: int) -> list[int]:
        known = self.continuations.get(tuple(req.input_ids), [])
        done = len(req.output_ids)
        drafts = list(known[done:done + max_drafts])
        for i, token in enumerate(drafts):
            if self.rng.random() < self.corrupt:
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", required=True)
    parser.add_argument("--num-draft-tokens", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=4)
    parser.add_argument("--corrupt", default="1.0,0.6,0.4,0.2,0.1,0.0")
    parser.add_argument("--load-format", default="auto")
    options, extra = parser.parse_known_args()
    params = {"temperature": 0.0, "max_new_tokens": options.max_new_tokens, "ignore_eos": True}
    prompts = [[3 + (17 * i + 5 * j) % 1000 for j in range(32)] for i in range(options.num_prompts)]
    common = {"load_format": options.load_format}
    with Engine(options.model_path, **common) as engine:
        vocab = engine.schedule.info.vocab_size
        plain, plain_tps = run(engine, prompts, params)
    continuations = {tuple(p): out for p, out in zip(prompts, plain)}
    with Engine(options.model_path, speculative_algorithm="NGRAM",
                speculative_num_draft_tokens=options.num_draft_tokens, **common) as engine:
        spec = engine.schedule.spec
        for corrupt in (float(c) for c in options.corrupt.split(",")):
            spec.proposer = OracleDrafter(continuations, corrupt, vocab)
            spec.total_verify_ct = spec.total_accepted = 0
            outputs, tps = run(engine, prompts, params)
            steps = max(spec.total_verify_ct, 1)
            print(json.dumps({"corrupt": corrupt, "tokens_per_verify": (steps + spec.total_accepted) / steps,
                              "tok_s": tps, "plain_tok_s": plain_tps, "speedup": tps / plain_tps,
                              "exact": outputs == plain}), flush=True)


if __name__ == "__main__":
    main()
