"""Speculative decoding through the graph paths of the forward stage: the same tokens as eager.

A CPU cannot capture CUDA graphs, but the graph classes run in ``eager``
mode (``ModelRunner.use_graphs(eager=True)``): the same static buffers, the
same padded (batch size, tokens per row) layouts and the same runner paths
(EAGLE drafting into the static inputs, features taken from the graph's
tensors), with the forward run directly instead of replayed. These tests
switch them on and check that greedy output still equals the plain engine's
and that the graph paths served the steps. The same checks with captured
graphs run on a GPU (``test_captured_graphs_equal_eager``).
"""
from __future__ import annotations

import pytest
import torch

from pipeline.engine import Engine
from stages.forward.graphs import pad_verify, verify_mask, verify_token_buckets
from stages.speculative.tree import build_tree_layout
from tests.engine.common import assert_pool_clean, cpu_engine
from tests.engine.test_speculative_eagle import GREEDY, _prompts, checkpoints  # noqa: F401 (fixture)
from tests.engine.test_speculative_eagle import _results


def count_launches(runner) -> dict[str, int]:
    """Wrap the runner's graphs' ``launch``: count the decode and verify steps they served."""
    counts = {"decode": 0, "verify": 0}
    for name, graphs in (("decode", runner.graphs), ("verify", runner.verify_graphs)):
        launch = graphs.launch

        def counting(*args, _launch=launch, _name=name):
            counts[_name] += 1
            return _launch(*args)

        graphs.launch = counting
    return counts


def _graph_engine(target, **kwargs) -> tuple[Engine, dict[str, int]]:
    engine = cpu_engine(target, **kwargs)
    runner = engine.stages["forward"].runner
    runner.use_graphs(eager=True)
    return engine, count_launches(runner)


CASES = [  # (algorithm, head, extra flags)
    ("NGRAM", None, dict(speculative_num_draft_tokens=5)),
    ("EAGLE", "EAGLE", dict(speculative_num_steps=3)),
    ("EAGLE3", "EAGLE3", dict(speculative_num_steps=3)),
    ("EAGLE", "echo", dict(speculative_eagle_topk=2, speculative_num_steps=4, speculative_num_draft_tokens=8)),
    ("EAGLE3", "EAGLE3", dict(speculative_eagle_topk=4, speculative_num_steps=3, speculative_num_draft_tokens=7)),
]


@pytest.mark.parametrize("arch", ["llama3.2", "mistral"])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2].get('speculative_eagle_topk', 1)}" for c in CASES])
def test_graph_paths_equal_eager(arch, case, checkpoints) -> None:
    """Decode and verify batches served by the (eager) graph paths: greedy output equals the
    plain engine's, batched, with rows of different draft counts padded into one bucket, and
    the pool is clean after."""
    algorithm, head, flags = case
    target, heads = checkpoints(arch)
    prompts = _prompts(3)
    params = {"temperature": 0.0, "max_new_tokens": 24, "ignore_eos": True}
    late = {**params, "min_new_tokens": 6}  # alone: plain decode steps (no drafts) before it drafts
    with cpu_engine(target) as engine:
        expected = _results(engine, prompts, params) + _results(engine, prompts[:1], late)
    spec = dict(speculative_algorithm=algorithm, **flags)
    if head:
        spec["speculative_draft_model_path"] = str(heads[head])
    engine, launches = _graph_engine(target, cuda_graph_max_bs=4, **spec)
    with engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, params) + _results(engine, prompts[:1], late) == expected
        assert engine.schedule.spec.total_verify_ct > 0
        assert launches["verify"] > 0 and launches["decode"] > 0, launches
        assert_pool_clean(engine, free_before)
        assert not engine.schedule.spec.states


def test_pad_verify_layout() -> None:
    """Two rows of 3 and 1 tokens in a (4 rows x 4 tokens) bucket: each row's tokens at b*4,
    padding after them at the last position with slot 0, the logits rows in the eager order
    (last tokens, then draft positions), the dummy row for the padded rows."""
    import msgspec

    from pipeline.messages import ForwardBatch
    from tests.stages.test_forward import _sampling

    sampling = msgspec.structs.replace(_sampling(2), draft_ids=[[7, 8], []])
    batch = ForwardBatch(batch_id=0, mode="extend", rids=["a", "b"], input_ids=[5, 7, 8, 9],
                         positions=[10, 11, 12, 4], out_cache_loc=[31, 32, 33, 40], req_pool_indices=[3, 6],
                         prefix_lens=[10, 4], extend_lens=[3, 1], seq_lens=[13, 5], sampling=sampling)
    packed = pad_verify(batch, 4, 4)
    T = 16
    ids, pos, slots, logits = (packed[i * T:(i + 1) * T] for i in range(4))
    rows, prefix, lens, starts, seq, masks = (packed[4 * T + i * 4: 4 * T + (i + 1) * 4] for i in range(6))
    assert ids[:8] == [5, 7, 8, 0, 9, 0, 0, 0] and ids[8:] == [0] * 8
    assert pos[:8] == [10, 11, 12, 12, 4, 4, 4, 4]
    assert slots[:8] == [31, 32, 33, 0, 40, 0, 0, 0]
    assert logits[:4] == [2, 4, 0, 1] and logits[4:] == [0] * 12
    assert rows == [3, 6, 0, 0] and prefix == [10, 4, 0, 0] and lens == [4] * 4
    assert starts == [0, 4, 8, 12] and seq == [14, 8, 4, 4] and masks == [0, 16, 32, 48]


def test_verify_mask_and_buckets() -> None:
    parents = [-1, 0, 0, 1]
    mask = verify_mask([4, 1], [parents, []], 3, 5).view(3, 5, 5)
    assert torch.equal(mask[0, :4, :4], build_tree_layout(parents).tree_mask)
    assert torch.equal(mask[0, 4], torch.ones(5, dtype=torch.bool))     # a padded node: causal
    assert torch.equal(mask[1], torch.ones(5, 5, dtype=torch.bool).tril())
    assert verify_token_buckets(8) == [2, 4, 8] and verify_token_buckets(5) == [2, 4, 5]
    assert verify_token_buckets(2) == [2]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (captured graphs)")
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{c[1]}-{c[2].get('speculative_eagle_topk', 1)}" for c in CASES])
def test_captured_graphs_equal_eager(case, checkpoints) -> None:
    """On a GPU with the Triton kernels: captured decode and verify graphs (EAGLE: and the
    head's draft graphs) give the eager engine's greedy tokens (fp32 tiny models), and the
    graphs served the steps."""
    algorithm, head, flags = case
    target, heads = checkpoints("llama3.1")
    prompts = _prompts(3)
    spec = dict(speculative_algorithm=algorithm, **flags)
    if head:
        spec["speculative_draft_model_path"] = str(heads[head])
    common = dict(device="cuda", kernel_backend="triton", dtype="float32", **spec)
    with cpu_engine(target, disable_cuda_graph=True, **common) as engine:
        expected = _results(engine, prompts, GREEDY)
    with cpu_engine(target, cuda_graph_max_bs=4, **common) as engine:
        runner = engine.stages["forward"].runner
        assert runner.graphs is not None and runner.verify_graphs is not None and runner.verify_graphs.graphs
        launches = count_launches(runner)
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, GREEDY) == expected
        assert launches["verify"] > 0, launches
        assert_pool_clean(engine, free_before)
        drafter = runner.drafter
        if drafter is not None:  # EAGLE: the head's steps replayed their captured graphs
            kind = "tree" if drafter.topk > 1 else "chain"
            assert {(1, "catch_up"), (1, kind)} <= set(drafter.graphs.graphs)
            assert drafter.graphs.replays["catch_up"] > 0 and drafter.graphs.replays[kind] > 0


# ----------------------------------------------------------------------------- the head's draft graphs
DRAFT_CASES = [  # (algorithm, head, extra flags): chains and trees, EAGLE and EAGLE3
    ("EAGLE", "echo", dict(speculative_num_steps=4)),
    ("EAGLE3", "EAGLE3", dict(speculative_num_steps=3)),
    ("EAGLE", "echo", dict(speculative_eagle_topk=3, speculative_num_steps=3, speculative_num_draft_tokens=6)),
    ("EAGLE3", "EAGLE3", dict(speculative_eagle_topk=2, speculative_num_steps=3, speculative_num_draft_tokens=5)),
]


def _record_drafts(drafter) -> list[tuple]:
    """Wrap ``drafter.draft``: record (rid, first position, drafts, parents) of every drafting row."""
    recorded, draft = [], drafter.draft

    def recording(batch, input_ids, req_to_token, *rest):
        drafted = draft(batch, input_ids, req_to_token, *rest)
        drafts, parents = drafted.host()
        start = 0
        for b, rid in enumerate(batch.rids):
            if drafts and drafts[b]:
                recorded.append((rid, batch.positions[start], list(drafts[b]), list(parents[b]) if parents else []))
            start += batch.extend_lens[b]
        return drafted

    drafter.draft = recording
    return recorded


def _run_drafting(target, spec: dict, draft_graphs: bool, prompts, params) -> tuple:
    """(outputs, recorded drafts, the draft graphs' replays, the head's KV past slot 0) of an
    engine on the (eager) graph paths, the head's steps through its draft graphs or not."""
    engine, _ = _graph_engine(target, cuda_graph_max_bs=4, disable_radix_cache=True, **spec)
    with engine:
        runner = engine.stages["forward"].runner
        drafter = runner.drafter
        assert drafter.graphs is not None and drafter.graphs.eager
        graphs = drafter.graphs
        if not draft_graphs:
            drafter.graphs = None
        recorded = _record_drafts(drafter)
        free_before = engine.schedule.kv.pool.num_free_tokens
        outputs = _results(engine, prompts, params) + _results(engine, prompts[:1], params)
        assert_pool_clean(engine, free_before)
        assert not engine.schedule.spec.states
        head_kv = [cache[1:].clone() for cache in (*drafter.kv_cache.k, *drafter.kv_cache.v)]
        order: dict[str, int] = {}  # request ids are random: number them by first draft
        drafts = [(order.setdefault(rid, len(order)), *rest) for rid, *rest in recorded]
        return outputs, drafts, dict(graphs.replays), head_kv


@pytest.mark.parametrize("case", DRAFT_CASES,
                         ids=[f"{c[0]}-{c[1]}-topk{c[2].get('speculative_eagle_topk', 1)}" for c in DRAFT_CASES])
def test_draft_graphs_equal_plain_drafting(case, checkpoints) -> None:
    """The head's steps through its (eager) draft graphs -- the catch-up padded to drafts + 1
    positions per row, the chain or tree steps of every row of the bucket at once, three
    requests in a bucket of 4 (a padding row) and then one alone (three) -- draft the same
    chains and trees, token for token, as the plain drafting path, the output equals the
    plain engine's, the pool is clean, and the head's KV outside the padding slot 0 ends
    equal (padding rows and rows past their draft count wrote nothing else)."""
    algorithm, head, flags = case
    target, heads = checkpoints("llama3.2")
    prompts = _prompts(3)
    params = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}
    with cpu_engine(target) as engine:
        expected = _results(engine, prompts, params) + _results(engine, prompts[:1], params)
    spec = dict(speculative_algorithm=algorithm, speculative_draft_model_path=str(heads[head]), **flags)
    plain = _run_drafting(target, spec, False, prompts, params)
    graphed = _run_drafting(target, spec, True, prompts, params)
    assert plain[0] == expected and graphed[0] == expected
    assert graphed[1] == plain[1] and len(plain[1]) > 0
    kind = "tree" if flags.get("speculative_eagle_topk", 1) > 1 else "chain"
    assert graphed[2]["catch_up"] > 0 and graphed[2][kind] > 0, graphed[2]
    assert plain[2] == {"catch_up": 0, "chain": 0, "tree": 0}
    for mine, theirs in zip(graphed[3], plain[3]):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)


def test_draft_graphs_pad_only_into_slot_zero(checkpoints) -> None:
    """One catch-up of a row with 2 final positions (5, 6) in a bucket of 4 rows x 4 positions,
    then its chain of 2 drafts in graphs of depth 3: the head's KV changes only at the row's
    own slots (its 2 final positions, the one draft position its chain step writes) and the
    padding slot 0 -- not at position 8, which the catch-up's padding and the chain's last
    step (past the row's draft count) would reach."""
    target, heads = checkpoints("llama3.2")
    engine, _ = _graph_engine(target, cuda_graph_max_bs=4, speculative_algorithm="EAGLE",
                              speculative_draft_model_path=str(heads["EAGLE"]), speculative_num_steps=3)
    with engine, torch.inference_mode():  # the runner's tensors are inference tensors
        drafter = engine.stages["forward"].runner.drafter
        graphs, req_to_token = drafter.graphs, drafter.graphs.req_to_token
        assert (graphs.tokens, graphs.depth) == (4, 3)
        req_to_token[2, :12] = torch.arange(40, 52, dtype=req_to_token.dtype)
        from stages.forward.speculative import _Segment

        width = graphs.feature_width
        segment = _Segment(b=1, row=2, start=5, count=2, tokens=torch.tensor([11, 12]),
                           features=torch.randn(2, width, generator=torch.Generator().manual_seed(0)))
        before = drafter.kv_cache.k[0].clone()
        graphs.catch_up(4, [segment], [[], [0, 0], [], []])
        chains = graphs.chain(4)
        changed = (drafter.kv_cache.k[0] != before).flatten(1).any(1).nonzero().flatten().tolist()
        assert set(changed) <= {0, 45, 46, 47} and {45, 46, 47} <= set(changed), changed
        assert chains.shape == (4, 3)
