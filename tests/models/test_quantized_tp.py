"""Quantized checkpoints under tensor parallelism: two CPU ranks over gloo against one.

The checkpoints come from test_quantized.py's writers (each format's published
layout), on a tiny Llama whose every shard holds whole quantization units at
tp = 2: 4 query and 4 kv heads of 64 (q/k/v shards of 128 rows: one 128 x 128
fp8 block), an MLP of 512 (row-parallel ``down_proj`` shards of K = 256: two
int4 groups of 128). One ``torch.multiprocessing`` spawn runs every format;
each rank saves the logits of a prefill and greedy decode steps.

* Weight-only formats (AWQ, GPTQ, act-order GPTQ): the same math as tp = 1
  up to the order of fp32 sums, so the logits agree within ``TP_RTOL`` of the
  largest one.
* W8A8 formats: a row-parallel projection quantizes its half of each token's
  activations with that half's own scale (as every tensor-parallel W8A8
  server does), so tp = 2 differs from tp = 1 by activation rounding; the
  relative logit error against the dequantized-weights reference stays within
  the same bound as at tp = 1 (test_quantized.W8A8_REL_ERROR), on the prefill
  logits (the greedy steps after it may read other tokens once a rounding
  flips a small top-1 margin of the random model).

Both ranks must return identical logits (the lm_head all_gather). A shard that
would cut a quantization unit is refused at load, naming its shape.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import models
from models import ModelConfigError
from models.parallel import TPGroup
from tests.models.runner import PagedRunner
from tests.models.test_quantized import W8A8_REL_ERROR, WEIGHT_ONLY, write_pair
from tests.models.tiny import build_hf_model, prompts, tiny_config
from triton_kernels import load_ops

TP_SIZE = 2
TP_RTOL = 1e-4
SIZES_TP = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=4,
                head_dim=64, vocab_size=512)
FORMATS_TP = ["awq", "gptq_sym", "gptq_asym_act_order", "fp8_block", "ct_fp8_channel", "ct_int8_channel"]
PROMPT_LENS = [7, 12, 3]
NUM_NEW = 4


def _trace(path: Path, tp: TPGroup, quantization: str = "") -> torch.Tensor:
    """Logits of the prefill and NUM_NEW - 1 greedy decode steps, [NUM_NEW, B, vocab]."""
    model, config = models.load_model(path, load_ops("reference"), torch.float32, "cpu", tp=tp,
                                      quantization=quantization)
    batch = prompts(config.vocab_size, PROMPT_LENS)
    runner = PagedRunner(model, len(batch), max(PROMPT_LENS) + NUM_NEW)
    steps = [runner.prefill(batch)]
    for _ in range(NUM_NEW - 1):
        steps.append(runner.decode(steps[-1].argmax(dim=-1).tolist()))
    return torch.stack(steps)


def _rank_main(rank: int, init_file: str, jobs: list[tuple[str, Path, str]], out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=TP_SIZE)
    try:
        for name, path, quantization in jobs:
            logits = _trace(path, TPGroup(rank, TP_SIZE, dist.group.WORLD), quantization)
            torch.save(logits, out_dir / f"{name}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def tp_runs(tmp_path_factory) -> dict[str, dict]:
    """format -> {"quant", "deq" (checkpoint paths), "ranks": [logits of rank 0, rank 1]}, from ONE spawn."""
    root = tmp_path_factory.mktemp("quant_tp")
    hf = build_hf_model(tiny_config("llama3.1", **SIZES_TP), seed=3)
    pairs = {fmt: write_pair(root, "llama3.1", fmt, hf=hf) for fmt in FORMATS_TP}
    jobs = [(fmt, quant, "") for fmt, (quant, _) in pairs.items()]
    jobs.append(("online_fp8", pairs["awq"][1], "fp8"))          # a 16-bit checkpoint quantized at load
    mp.spawn(_rank_main, args=(str(root / "init"), jobs, root), nprocs=TP_SIZE, join=True)
    runs = {name: {"quant": path, "quantization": q,
                   "ranks": [torch.load(root / f"{name}.rank{r}.pt") for r in range(TP_SIZE)]}
            for name, path, q in jobs}
    for fmt, (_, deq) in pairs.items():
        runs[fmt]["deq"] = deq
    runs["online_fp8"]["deq"] = pairs["awq"][1]
    return runs


@pytest.mark.parametrize("name", [*FORMATS_TP, "online_fp8"])
def test_tp2_quantized_equals_tp1(name, tp_runs):
    run = tp_runs[name]
    ours, other = run["ranks"]
    assert torch.equal(ours, other), f"{name}: the two ranks returned different logits"
    single = _trace(run["quant"], TPGroup(), run["quantization"])
    assert ours.shape == single.shape
    scale = single.abs().max().item()
    if name in WEIGHT_ONLY:
        diff = (ours - single).abs().max().item()
        assert diff <= TP_RTOL * scale, f"{name}: tp=2 vs tp=1 max |logit diff| {diff:.3e} (max {scale:.2f})"
        assert torch.equal(ours.argmax(-1), single.argmax(-1))
        return
    # Activation rounding may flip a small top-1 margin of the random model, after which the
    # greedy decode steps read different tokens: compare the prefill, where inputs are equal.
    reference = _trace(run["deq"], TPGroup())[0]
    bound = W8A8_REL_ERROR["int8" if "int8" in name else "fp8"]
    for label, logits in (("tp=2", ours[0]), ("tp=1", single[0])):
        rel = ((logits - reference).norm() / reference.norm()).item()
        assert rel < bound, f"{name} {label}: relative logit error {rel:.3f} vs dequantized > {bound}"


def test_a_shard_that_cuts_a_quantization_unit_is_refused(tmp_path):
    """MLP 384 at tp = 2: down_proj shards of K = 192 would split an int4 group of 128; the error
    names the shard's shape and the group size."""
    hf = build_hf_model(tiny_config("llama3.1", **{**SIZES_TP, "intermediate_size": 384}), seed=3)
    quant, _ = write_pair(tmp_path, "llama3.1", "awq", hf=hf)
    with pytest.raises(ModelConfigError, match=r"\[256, 192\] projection .* group size 128"):
        models.load_model(quant, load_ops("reference"), torch.float32, "cpu", tp=TPGroup(1, TP_SIZE))


def test_quantized_moe_under_tensor_parallelism_is_refused_by_name(tmp_path):
    from tests.models.test_quantized_moe import write_moe_pair

    quant, _ = write_moe_pair(tmp_path, "qwen3_moe", "awq")
    with pytest.raises(ModelConfigError, match="quantized MoE experts .* tensor parallelism"):
        models.load_model(quant, load_ops("reference"), torch.float32, "cpu", tp=TPGroup(1, TP_SIZE))
