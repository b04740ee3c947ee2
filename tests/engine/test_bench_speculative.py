"""perf/bench_speculative.py's oracle drafter on CPU: exact output, acceptance follows the corruption."""
from __future__ import annotations

from pipeline.engine import Engine
from perf.bench_speculative import OracleDrafter, run


def test_oracle_drafter_accepts_all_when_clean_and_none_when_corrupt(tiny_llama) -> None:
    kwargs = dict(max_total_tokens=2048, kernel_backend="reference", device="cpu")
    params = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
    prompts = [[5 + 3 * j for j in range(10)], [7 + 11 * j % 300 for j in range(13)]]
    with Engine(str(tiny_llama), **kwargs) as engine:
        plain, _ = run(engine, prompts, params)
    continuations = {tuple(p): out for p, out in zip(prompts, plain)}
    with Engine(str(tiny_llama), speculative_algorithm="NGRAM", speculative_num_draft_tokens=5, **kwargs) as engine:
        spec = engine.schedule.spec
        for corrupt in (0.0, 1.0):
            spec.proposer = OracleDrafter(continuations, corrupt, 400)
            spec.total_verify_ct = spec.total_accepted = 0
            outputs, _ = run(engine, prompts, params)
            assert outputs == plain and spec.total_verify_ct > 0
            if corrupt == 0.0:  # clean drafts: every verify step but each request's last accepts all 4
                assert spec.total_accepted >= 4 * (spec.total_verify_ct - len(prompts))
            else:
                assert spec.total_accepted == 0
