"""Tensor and expert parallelism (models/parallel.py): two CPU ranks over gloo equal one.

One ``torch.multiprocessing`` spawn of 2 ranks (file:// rendezvous in a tmp
dir) runs every case below in turn; each rank saves the fp32 logits of a
prefill and a few greedy decode steps. The parent then checks, per case:

* both ranks returned the same full logits (the lm_head all_gather);
* they equal the tp=1 model's on the same checkpoint and backend
  (``TP_RTOL * max |logit|``: only the order of fp32 sums differs);
* the greedy tokens equal transformers' ``generate`` (checkpoints only).

Cases cover Llama (dense, GQA, biases on the row-parallel projections, one kv
head replicated over both ranks), Qwen3 (q/k norm; tied embeddings with a
vocabulary of 1001, padded to 2 x 501), Qwen2-MoE (shared expert, a dense
layer) and Qwen3-MoE at ep 1 and 2 (ep 2 == tp: all-to-all dispatch, also
with one prompt, so prefill has 5 tokens and decode 1 and rank 1 routes
none), a fused 3-D expert checkpoint, dummy weights, and the Triton kernels
under the interpreter. ``test_expert_parallel.py`` drives one MoE block with
chosen routing and 4 ranks. The size errors need no second process.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

import models
from models import ModelConfigError
from models.parallel import TPGroup, expert_range, shard_range, vocab_range
from tests.models.runner import PagedRunner
from tests.models.tiny import hf_greedy, load_hf, prompts, tiny_config
from triton_kernels import load_ops

TP_SIZE = 2
TP_RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    id: str
    tiny: str                              # tests/models/tiny.py TINY name
    overrides: tuple = ()                  # config overrides, as (key, value) pairs
    ep_size: int = 1
    backend: str = "reference"
    load_format: str = "auto"
    fused_experts: bool = False            # rewrite experts as 3-D experts.gate_up_proj / down_proj
    prompt_lens: tuple[int, ...] = (7, 12, 3)
    num_new: int = 4


TRITON_SHORT = dict(backend="triton", prompt_lens=(6, 3), num_new=2)
CASES = [
    Case("llama3.1", "llama3.1"),
    Case("llama_bias", "llama_bias"),
    Case("llama_one_kv_head", "llama3.1", (("num_key_value_heads", 1),)),
    Case("qwen3", "qwen3"),
    Case("qwen3_tied_vocab1001", "qwen3_tied", (("vocab_size", 1001),)),
    Case("qwen2_moe", "qwen2_moe"),
    Case("qwen2_moe_ep2", "qwen2_moe", ep_size=2),
    Case("qwen3_moe", "qwen3_moe"),
    Case("qwen3_moe_ep2", "qwen3_moe", ep_size=2),
    Case("qwen2_moe_ep2_one_prompt", "qwen2_moe", ep_size=2, prompt_lens=(5,)),
    Case("qwen3_moe_ep2_one_prompt", "qwen3_moe", ep_size=2, prompt_lens=(5,)),
    Case("qwen3_moe_fused_experts", "qwen3_moe", fused_experts=True),
    Case("dummy_qwen2_moe_ep2", "qwen2_moe", ep_size=2, load_format="dummy"),
    Case("dummy_qwen3_tied_vocab1001", "qwen3_tied", (("vocab_size", 1001),), load_format="dummy"),
    Case("triton_qwen3", "qwen3", (("num_hidden_layers", 1),), **TRITON_SHORT),
    Case("triton_qwen3_moe_ep2", "qwen3_moe", (("num_hidden_layers", 1),), ep_size=2, **TRITON_SHORT),
]


def _trace(model: torch.nn.Module, case: Case, vocab_size: int) -> torch.Tensor:
    """Logits of the prefill and num_new - 1 greedy decode steps, [num_new, B, vocab]."""
    batch = prompts(vocab_size, list(case.prompt_lens))
    runner = PagedRunner(model, len(batch), max(case.prompt_lens) + case.num_new)
    steps = [runner.prefill(batch)]
    for _ in range(case.num_new - 1):
        steps.append(runner.decode(steps[-1].argmax(dim=-1).tolist()))
    return torch.stack(steps)


def _load(path: Path, case: Case, tp: TPGroup) -> tuple[torch.nn.Module, Any]:
    return models.load_model(path, load_ops(case.backend), torch.float32, "cpu",
                             load_format=case.load_format, tp=tp)


def _rank_main(rank: int, init_file: str, jobs: list[tuple[Case, Path]], out_dir: Path) -> None:
    """One rank: every case at tp=2, logits saved as <id>.rank<r>.pt."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=TP_SIZE)
    try:
        for case, path in jobs:
            tp = TPGroup(rank, TP_SIZE, dist.group.WORLD, case.ep_size)
            model, config = _load(path, case, tp)
            torch.save({"logits": _trace(model, case, config.vocab_size),
                        "num_kv_heads": model.num_kv_heads}, out_dir / f"{case.id}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _fuse_experts(source: Path, destination: Path) -> Path:
    """The checkpoint with per-expert tensors stacked as transformers 5 keeps them in memory."""
    tensors = load_file(source / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    prefixes = sorted({k.split(".experts.")[0] for k in tensors if ".experts." in k})
    for prefix in prefixes:
        num_experts = sum(1 for k in tensors if k.startswith(f"{prefix}.experts.")
                          and k.endswith("down_proj.weight"))
        expert = [f"{prefix}.experts.{e}" for e in range(num_experts)]
        fused[f"{prefix}.experts.gate_up_proj"] = torch.stack([
            torch.cat([tensors[f"{x}.gate_proj.weight"], tensors[f"{x}.up_proj.weight"]]) for x in expert])
        fused[f"{prefix}.experts.down_proj"] = torch.stack([tensors[f"{x}.down_proj.weight"] for x in expert])
    destination.mkdir(parents=True, exist_ok=True)
    save_file(fused, destination / "model.safetensors")
    (destination / "config.json").write_text((source / "config.json").read_text())
    return destination


@pytest.fixture(scope="module")
def tp_runs(tiny_checkpoint, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """case id -> {"path", "ranks": [rank 0 output, rank 1 output]}, from ONE spawn."""
    root = tmp_path_factory.mktemp("tp")
    jobs = []
    for case in CASES:
        path = tiny_checkpoint(case.tiny, **dict(case.overrides))
        if case.fused_experts:
            path = _fuse_experts(path, root / f"{case.id}_checkpoint")
        jobs.append((case, path))
    mp.spawn(_rank_main, args=(str(root / "init"), jobs, root), nprocs=TP_SIZE, join=True)
    return {case.id: {"path": path,
                      "ranks": [torch.load(root / f"{case.id}.rank{r}.pt") for r in range(TP_SIZE)]}
            for case, path in jobs}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_tp2_equals_tp1_and_transformers(case, tp_runs, tiny_checkpoint):
    run = tp_runs[case.id]
    ours, other = (r["logits"] for r in run["ranks"])
    assert torch.equal(ours, other), f"{case.id}: the two ranks returned different logits"
    single_path = tiny_checkpoint(case.tiny, **dict(case.overrides))   # tp=1 on per-expert tensors
    single, config = _load(single_path, case, TPGroup())
    expected = _trace(single, case, config.vocab_size)
    assert ours.shape == expected.shape == (case.num_new, len(case.prompt_lens), config.vocab_size)
    max_diff = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert max_diff <= TP_RTOL * scale, (f"{case.id}: tp={TP_SIZE} vs tp=1 max |logit diff| "
                                         f"{max_diff:.3e} > {TP_RTOL} x {scale:.3f}")
    kv_heads = config.num_key_value_heads
    assert run["ranks"][0]["num_kv_heads"] == max(1, kv_heads // TP_SIZE)
    if case.load_format == "dummy":
        return
    hf = load_hf(single_path)
    tokens = ours.argmax(dim=-1)                                       # [num_new, B]
    for b, prompt in enumerate(prompts(config.vocab_size, list(case.prompt_lens))):
        assert tokens[:, b].tolist() == hf_greedy(hf, prompt, case.num_new), (
            f"{case.id}: greedy tokens of prompt {b} differ from transformers")


# ----------------------------------------------------------------------------- size errors


def test_heads_not_divisible_by_tp_size_name_the_dimension(tiny_checkpoint):
    path = tiny_checkpoint("qwen2")                                    # 6 heads, 2 kv heads
    with pytest.raises(ModelConfigError, match=r"num_attention_heads 6 is not divisible by the tp size 4"):
        models.load_model(path, load_ops("reference"), torch.float32, "cpu", tp=TPGroup(0, 4))


def test_kv_heads_neither_divisible_nor_replicable(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("qwen2", num_key_value_heads=3)))
    with pytest.raises(ModelConfigError, match=r"num_key_value_heads 3 is not divisible by the tp size 2"):
        models.load_model(tmp_path, load_ops("reference"), torch.float32, "cpu",
                          load_format="dummy", tp=TPGroup(1, 2))


def test_expert_and_intermediate_sizes_are_checked(tmp_path):
    config = tiny_config("qwen3_moe", moe_intermediate_size=33)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelConfigError, match=r"moe_intermediate_size 33 is not divisible"):
        models.load_model(tmp_path, load_ops("reference"), torch.float32, "cpu",
                          load_format="dummy", tp=TPGroup(0, 2))
    with pytest.raises(ModelConfigError, match=r"num_experts 8 is not divisible by the ep size 3"):
        expert_range(8, TPGroup(0, 3, ep_size=3))
    with pytest.raises(ValueError, match=r"ep_size 3 must divide the tp size 2"):
        TPGroup(0, 2, ep_size=3)


def test_ranges_cover_every_index_once():
    assert [shard_range(12, r, 3) for r in range(3)] == [(0, 4), (4, 8), (8, 12)]
    assert [vocab_range(1001, TPGroup(r, 2)) for r in range(2)] == [(0, 501, 501), (501, 1001, 501)]
    assert [expert_range(8, TPGroup(r, 4, ep_size=2)) for r in range(4)] == [(0, 4), (0, 4), (4, 8), (4, 8)]


def test_rank_holds_its_slice_and_local_kv_heads(tiny_checkpoint):
    """Loading alone needs no collective: rank 1 of 2 gets half the heads and vocab rows."""
    path = tiny_checkpoint("llama3.1")
    single, config = models.load_model(path, load_ops("reference"), torch.float32, "cpu")
    half, _ = models.load_model(path, load_ops("reference"), torch.float32, "cpu", tp=TPGroup(1, 2))
    assert (single.num_kv_heads, half.num_kv_heads) == (2, 1)
    V, D, q = config.vocab_size, config.head_dim, config.num_attention_heads * config.head_dim
    assert torch.equal(half.model.embed_tokens.weight, single.model.embed_tokens.weight[V // 2:])
    qkv = half.model.layers[0].self_attn.qkv_proj.weight
    full = single.model.layers[0].self_attn.qkv_proj.weight
    assert torch.equal(qkv[: q // 2], full[q // 2: q])                 # q heads 2, 3
    assert torch.equal(qkv[q // 2: q // 2 + D], full[q + D: q + 2 * D])  # kv head 1
