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


def test_exact_acceptance_oracle(tiny_llama) -> None:
    """``accept=a`` corrupts the draft at index a: every verify step accepts exactly a drafts
    (until the end of the continuation), and the output stays exact."""
    kwargs = dict(max_total_tokens=2048, kernel_backend="reference", device="cpu")
    params = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}
    prompts = [[5 + 3 * j for j in range(10)]]
    with Engine(str(tiny_llama), **kwargs) as engine:
        plain, _ = run(engine, prompts, params)
    continuations = {tuple(p): out for p, out in zip(prompts, plain)}
    with Engine(str(tiny_llama), speculative_algorithm="NGRAM", speculative_num_steps=5, **kwargs) as engine:
        spec = engine.schedule.spec
        spec.proposer = OracleDrafter(continuations, 0.0, 400, accept=2)
        outputs, _ = run(engine, prompts, params)
        assert outputs == plain
        assert spec.total_accepted == 2 * spec.total_verify_ct  # 20 = 1 (prefill) + 6 steps of 3 + 1 plain


def test_tiny_run_covers_every_section(tmp_path, monkeypatch) -> None:
    """``--tiny`` runs the verify-cost, oracle and EAGLE3 sections on CPU (the GPU command's
    smoke test) and writes their results."""
    import perf.bench_one_batch as one_batch
    from perf.bench_speculative import main

    monkeypatch.setattr(one_batch, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("OUT", raising=False)
    result = main(["--tiny", "--max-new-tokens", "12", "--repeats", "2", "--num-prompts", "1",
                   "--verify-tokens", "4,8"])
    assert [row["tokens"] for row in result["verify_cost"]["verify"]] == [4, 8]
    assert all(row["ms"] > 0 for row in result["verify_cost"]["verify"])
    sweep = result["oracle"]["sweep"]
    assert [row["accept"] for row in sweep] == [1, 2, 3, 4, 5] and all(row["exact"] for row in sweep)
    assert sweep[0]["mean_accepted"] == 1.0
    for name in ("chain", "tree"):
        assert result["eagle3"][name]["verify_steps"] > 0
    assert (tmp_path / "speculative-tiny-cpu.json").exists()
