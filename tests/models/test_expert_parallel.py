"""Expert parallelism of one MoE block (models/parallel.py, models/qwen_moe.py): N CPU ranks equal one.

Whole-model EP runs at tp = ep = 2 live in ``test_tensor_parallel.py``; this
file drives ``SparseMoeBlock`` alone, so it can pick the tokens and the
routing. One spawn of 4 gloo ranks runs every case in turn (the tp=2 cases on
a subgroup of ranks 0, 1); each rank builds its block from the same seeded
full weights, sliced as the loader would, and saves its output. The parent
checks that every rank of a case returned the same [T, H] and that it equals
the tp=1 block's (``RTOL * max |y|``: only the order of fp32 sums differs).

Cases cover both EP paths: all-to-all dispatch (ep == tp: 2 and 4 ranks) and
the all-reduce path (tp 4, ep 2); ragged token counts (T = 1, odd T, ranks
with no tokens at all); batches whose every token routes to the experts of
one rank (the other ranks receive nothing); Qwen2-MoE's shared expert and
Qwen3-MoE's renormalised top-k; the Triton kernels under the interpreter.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from models.config import parse_config
from models.parallel import TPGroup, shard_range
from models.qwen_moe import SparseMoeBlock
from tests.models.tiny import tiny_config
from triton_kernels import load_ops

WORLD_SIZE = 4
RTOL = 1e-5


@dataclasses.dataclass(frozen=True)
class BlockCase:
    id: str
    tiny: str                   # qwen3_moe (8 experts, top 2, renormalised) or qwen2_moe (+ shared)
    tp_size: int
    ep_size: int
    num_tokens: int
    to_ep_rank: int | None = None   # every token routes to this EP rank's experts (None: random)
    backend: str = "reference"


CASES = [
    BlockCase("qwen3_moe_tp2_ep2_T1", "qwen3_moe", 2, 2, 1),
    BlockCase("qwen3_moe_tp2_ep2_T7", "qwen3_moe", 2, 2, 7),
    BlockCase("qwen3_moe_tp2_ep2_all_to_rank1", "qwen3_moe", 2, 2, 6, to_ep_rank=1),
    BlockCase("qwen2_moe_tp2_ep2_T5_all_to_rank0", "qwen2_moe", 2, 2, 5, to_ep_rank=0),
    BlockCase("qwen2_moe_tp2_ep2_T1_all_to_rank1", "qwen2_moe", 2, 2, 1, to_ep_rank=1),
    BlockCase("qwen3_moe_tp4_ep4_T5", "qwen3_moe", 4, 4, 5),           # slices 2, 2, 1, 0
    BlockCase("qwen2_moe_tp4_ep4_T3_all_to_rank2", "qwen2_moe", 4, 4, 3, to_ep_rank=2),
    BlockCase("qwen2_moe_tp4_ep2_T5", "qwen2_moe", 4, 2, 5),           # all-reduce path
    BlockCase("qwen3_moe_tp4_ep2_all_to_rank1", "qwen3_moe", 4, 2, 4, to_ep_rank=1),
    BlockCase("triton_qwen3_moe_tp2_ep2_all_to_rank0", "qwen3_moe", 2, 2, 5, 0, "triton"),
    BlockCase("triton_qwen2_moe_tp2_ep2_T3", "qwen2_moe", 2, 2, 3, backend="triton"),
]


def _full_block(case: BlockCase) -> tuple[SparseMoeBlock, torch.Tensor]:
    """The tp=1 block with seeded weights, and the input x[T, H]. With ``to_ep_rank``
    the router sees +4 * x[:, 0] (x[:, 0] = 1) on that rank's experts and -4 on the
    others, so their top-k always lands there."""
    config = parse_config(tiny_config(case.tiny))
    block = SparseMoeBlock(load_ops(case.backend), config, torch.float32, "cpu")
    g = torch.Generator().manual_seed(sum(map(ord, case.id)))
    with torch.no_grad():
        for name, param in block.named_parameters():
            param.copy_(torch.randn(param.shape, generator=g) * 0.3)
        if block.shared_expert is not None:         # expert 1 and gate row 1 stay zero
            block.shared_expert.w13[1].zero_()
            block.shared_expert.w2[1].zero_()
            block.shared_expert_gate.weight[1].zero_()
    x = torch.randn(case.num_tokens, config.hidden_size, generator=g)
    if case.to_ep_rank is not None:
        per_rank = config.num_experts // case.ep_size
        favoured = torch.full((config.num_experts,), -4.0)
        favoured[case.to_ep_rank * per_rank:(case.to_ep_rank + 1) * per_rank] = 4.0
        with torch.no_grad():
            block.gate.weight[:, 0] = favoured
        x[:, 0] = 1.0
    return block, x


def _rank_block(full: SparseMoeBlock, case: BlockCase, tp: TPGroup) -> SparseMoeBlock:
    """This rank's block: its experts and intermediate slices of the full weights."""
    block = SparseMoeBlock(full.ops, parse_config(tiny_config(case.tiny)), torch.float32, "cpu", tp)
    e0, e1 = block.expert_start, block.expert_start + block.num_local_experts
    with torch.no_grad():
        block.gate.weight.copy_(full.gate.weight)
        block.experts.w13.copy_(_rows(full.experts.w13[e0:e1], tp.moe_tp_rank, tp.moe_tp_size))
        block.experts.w2.copy_(_cols(full.experts.w2[e0:e1], tp.moe_tp_rank, tp.moe_tp_size))
        if full.shared_expert is not None:
            block.shared_expert.w13.copy_(_rows(full.shared_expert.w13, tp.rank, tp.size))
            block.shared_expert.w2.copy_(_cols(full.shared_expert.w2, tp.rank, tp.size))
            block.shared_expert_gate.weight.copy_(full.shared_expert_gate.weight)
    return block


def _rows(w13: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """w13[E, 2I, H] -> [E, 2I/size, H]: this rank's gate rows over its up rows."""
    inter = w13.shape[1] // 2
    i0, i1 = shard_range(inter, rank, size)
    return torch.cat([w13[:, i0:i1], w13[:, inter + i0:inter + i1]], dim=1)


def _cols(w2: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    i0, i1 = shard_range(w2.shape[2], rank, size)
    return w2[:, :, i0:i1]


def _rank_main(rank: int, init_file: str, out_dir: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD_SIZE)
    groups = {WORLD_SIZE: dist.group.WORLD, 2: dist.new_group([0, 1])}
    try:
        for case in CASES:
            if rank >= case.tp_size:
                continue
            full, x = _full_block(case)
            tp = TPGroup(rank, case.tp_size, groups[case.tp_size], case.ep_size)
            y = _rank_block(full, case, tp)(x)
            torch.save({"y": y, "dispatch": tp.ep_dispatch}, out_dir / f"{case.id}.rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def block_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ep")
    mp.spawn(_rank_main, args=(str(root / "init"), root), nprocs=WORLD_SIZE, join=True)
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_moe_block_ep_equals_one_rank(case, block_runs):
    runs = [torch.load(block_runs / f"{case.id}.rank{r}.pt") for r in range(case.tp_size)]
    assert all(r["dispatch"] == (case.ep_size == case.tp_size) for r in runs)
    for r, run in enumerate(runs[1:], start=1):
        assert torch.equal(run["y"], runs[0]["y"]), f"{case.id}: rank {r} differs from rank 0"
    full, x = _full_block(case)
    if case.to_ep_rank is not None:                 # the routing really is one-sided
        _, ids = full.ops.moe_topk(full.gate(x), full.top_k, full.renormalize)
        per_rank = full.num_local_experts // case.ep_size
        assert torch.all(ids // per_rank == case.to_ep_rank), ids
    expected = full(x)
    ours = runs[0]["y"]
    assert ours.shape == expected.shape == (case.num_tokens, x.shape[1])
    max_diff = (ours - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert max_diff <= RTOL * scale, (f"{case.id}: max |y diff| {max_diff:.3e} > "
                                      f"{RTOL} x {scale:.3f}")


def test_token_slices_cover_every_token_once():
    assert [TPGroup(r, 4, ep_size=4).token_range(5) for r in range(4)] == [(0, 2), (2, 4), (4, 5),
                                                                          (5, 5)]
    assert [TPGroup(r, 2, ep_size=2).token_range(1) for r in range(2)] == [(0, 1), (1, 1)]
    assert [TPGroup(r, 2, ep_size=2).token_range(0) for r in range(2)] == [(0, 0), (0, 0)]
    assert (TPGroup(0, 2, ep_size=2).ep_dispatch, TPGroup(0, 4, ep_size=2).ep_dispatch,
            TPGroup(0, 2).ep_dispatch, TPGroup().ep_dispatch) == (True, False, False, False)
