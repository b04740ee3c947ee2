"""EAGLE / EAGLE3 speculative decoding through the Engine and the server: the same tokens as without it.

Each tiny target gets tiny random EAGLE and EAGLE3 heads of its hidden size
and vocabulary (EAGLE3 with a smaller draft vocabulary mapped through d2t).
Random heads rarely guess right, so exactness is checked twice: the greedy
output equals the plain engine's, and the drafts the engine verified equal
the drafts of the head recomputed from scratch over the whole sequence (so
the head's incremental KV and feature bookkeeping is exact, not merely
harmless).
"""
from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pipeline.config import ConfigError
from pipeline.engine import Engine
from stages.forward.speculative import eagle3_layers
from tests.engine.common import ARCHITECTURES, assert_pool_clean, cpu_engine
from tests.models.tiny import eagle_layer_weights, save_tiny, source_config
from tests.server.conftest import running_server
from tests.server.tiny_model import save_tiny_tokenizer

GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
VOCAB, DRAFT_VOCAB, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 400, 64, 4, 2, 16, 96


def save_head(directory: Path, kind: str, hidden: int, seed: int = 0, echo: bool = False,
              own_embed: bool = False) -> Path:
    """A random EAGLE ("eagle") or EAGLE3 ("eagle3") head for a target of ``hidden`` size and
    VOCAB tokens (embed_tokens, and EAGLE's lm_head, come from the target).

    ``echo`` (EAGLE): the layer adds nothing (o_proj and down_proj zero) and fc passes the
    token's embedding through, so the logits are lm_head . embed(token): with tied
    embeddings the head mostly drafts its input token again, which a tiny random target's
    repetitive output accepts now and then."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    raw = source_config("EAGLE3-LLaMA3.1-Instruct-8B")
    raw.update(hidden_size=hidden, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,
               intermediate_size=INTERMEDIATE, vocab_size=VOCAB, torch_dtype="float32",
               max_position_embeddings=16)  # shorter than the sequences served, as published heads are
    H, p = hidden, ("midlayer." if kind == "eagle3" else "layers.0.")
    w = eagle_layer_weights(kind, r, H, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE)
    if kind == "eagle3":
        raw.update(draft_vocab_size=DRAFT_VOCAB, target_hidden_size=H)
        w.update({f"{p}input_layernorm.weight": 1 + r(H), f"{p}hidden_norm.weight": 1 + r(H),
                  "fc.weight": r(H, 3 * H), "norm.weight": 1 + r(H), "lm_head.weight": r(DRAFT_VOCAB, H),
                  "d2t": torch.randint(0, VOCAB - DRAFT_VOCAB, (DRAFT_VOCAB,), generator=gen),
                  "t2d": torch.zeros(VOCAB, dtype=torch.bool)})
    else:
        raw["architectures"] = ["LlamaForCausalLMEagle"]
        raw.pop("draft_vocab_size")
        w.update({"fc.weight": r(H, 2 * H), "fc.bias": r(H)})
        if echo:
            w.update({"fc.weight": torch.cat([torch.eye(H), torch.zeros(H, H)], dim=1), "fc.bias": torch.zeros(H),
                      f"{p}self_attn.o_proj.weight": torch.zeros(H, HEADS * HEAD_DIM),
                      f"{p}mlp.down_proj.weight": torch.zeros(H, INTERMEDIATE)})
    if own_embed:
        w["embed_tokens.weight"] = r(VOCAB, H, scale=1.0)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    save_file(w, str(directory / "model.safetensors"))
    return directory


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (target path, {"EAGLE": head path, "EAGLE3": head path})."""
    made: dict[str, tuple[Path, dict[str, Path]]] = {}

    def make(arch: str):
        if arch not in made:
            root = tmp_path_factory.mktemp(f"eagle_{arch}")
            target = save_tiny(arch, root / "target", vocab_size=VOCAB)
            save_tiny_tokenizer(target, VOCAB)
            hidden = json.loads((target / "config.json").read_text())["hidden_size"]
            made[arch] = (target, {"EAGLE": save_head(root / "eagle", "eagle", hidden),
                                   "EAGLE3": save_head(root / "eagle3", "eagle3", hidden, seed=1),
                                   "echo": save_head(root / "echo", "eagle", hidden, echo=True)})
        return made[arch]

    return make


def _prompts(count: int) -> list[list[int]]:
    return [[3 + (13 * i + 7 * j * j) % 390 for j in range(6 + 5 * i)] for i in range(count)]


def _engine(target: Path, algorithm: str = "", head: Path | None = None, **kwargs) -> Engine:
    if algorithm:
        kwargs.update(speculative_algorithm=algorithm, speculative_draft_model_path=str(head) if head else "")
        kwargs.setdefault("speculative_num_steps", 3)
    return cpu_engine(target, **kwargs)


def _results(engine: Engine, prompts, params=GREEDY) -> list[tuple]:
    params = params if isinstance(params, list) else [params] * len(prompts)
    out = engine.generate(input_ids=prompts, sampling_params=params)
    return [(r["output_ids"], r["finish_reason"]["type"], r["text"]) for r in out]


def _assert_clean(engine: Engine, free_before: int) -> None:
    assert_pool_clean(engine, free_before)
    assert not engine.schedule.spec.states


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_equals_greedy_without_speculation(arch, checkpoints) -> None:
    target, heads = checkpoints(arch)
    prompts = _prompts(3)
    with _engine(target) as engine:
        expected = _results(engine, prompts)
        decoder = engine.stages["forward"].runner.model.model
        assert decoder.capture_layers == () and decoder.captured == []  # no features kept without EAGLE
    for algorithm in ("EAGLE", "EAGLE3"):
        with _engine(target, algorithm, heads[algorithm]) as engine:
            free_before = engine.schedule.kv.pool.num_free_tokens
            assert _results(engine, prompts) == expected, algorithm
            assert engine.schedule.spec.total_verify_ct > 0, algorithm  # drafts were verified
            _assert_clean(engine, free_before)


def test_seeded_sampling_emits_the_same_tokens(checkpoints) -> None:
    """A chain of greedy head drafts is deterministic, so the chain verification serves
    sampled rows too: each position drawn with the seed and step of the plain sampler."""
    target, heads = checkpoints("qwen3")
    prompts = _prompts(3)
    params = [{"temperature": 0.8, "top_k": 30, "top_p": 0.95, "seed": 7 + i, "max_new_tokens": 16,
               "ignore_eos": True} for i in range(3)]
    with _engine(target) as engine:
        expected = [(r["output_ids"], r["text"]) for r in engine.generate(input_ids=prompts, sampling_params=params)]
    with _engine(target, "EAGLE3", heads["EAGLE3"]) as engine:
        got = [(r["output_ids"], r["text"]) for r in engine.generate(input_ids=prompts, sampling_params=params)]
        assert got == expected
        assert engine.schedule.spec.total_verify_ct > 0


@pytest.mark.parametrize("page_size", [1, 4])
def test_retraction_small_pool_and_radix_cache(checkpoints, page_size) -> None:
    """Under KV pressure rows draft less or are retracted and resumed (their head features
    are dropped and rebuilt); a radix hit reuses the head's K/V with the target's slots."""
    target, heads = checkpoints("llama3.1")
    prompts = [[3 + (11 * i + 5 * j * j) % 390 for j in range(8 + 5 * i)] for i in range(8)]
    params = {"temperature": 0.0, "max_new_tokens": 20, "ignore_eos": True}
    with _engine(target, page_size=page_size) as engine:
        alone = _results(engine, prompts, params)
    with _engine(target, "EAGLE", heads["EAGLE"], max_total_tokens=128, chunked_prefill_size=32,
                 page_size=page_size) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        assert _results(engine, prompts, params) == alone
        assert engine.schedule.num_retractions > 0
        engine.generate(input_ids=prompts[0], sampling_params=params)
        again = engine.generate(input_ids=prompts[0], sampling_params=params)  # a radix cache hit
        assert again["output_ids"] == alone[0][0] and again["meta_info"]["cached_tokens"] > 0
        _assert_clean(engine, free_before)


def test_rows_that_may_not_draft_beside_drafting_rows(checkpoints) -> None:
    """Penalty, logprob and min_new_tokens rows share batches (and overlap steps when no row
    may draft) with EAGLE rows, and every row comes out as without speculation."""
    target, heads = checkpoints("qwen3")
    prompts = _prompts(4)
    params = [dict(GREEDY) for _ in range(4)]
    params[1] = {"temperature": 1.0, "seed": 3, "max_new_tokens": 16, "repetition_penalty": 1.3,
                 "frequency_penalty": 0.4}
    params[2] = {"temperature": 0.0, "max_new_tokens": 10, "return_logprob": True, "top_logprobs_num": 2,
                 "logprob_start_len": 2}
    params[3] = {"temperature": 0.0, "max_new_tokens": 14, "min_new_tokens": 6}
    with _engine(target) as engine:
        expected = _results(engine, prompts, params)
    with _engine(target, "EAGLE", heads["EAGLE"]) as engine:
        out = engine.generate(input_ids=prompts, sampling_params=params)
        assert [(r["output_ids"], r["finish_reason"]["type"], r["text"]) for r in out] == expected
        assert "spec_verify_ct" not in out[2]["meta_info"] and out[0]["meta_info"]["spec_verify_ct"] > 0


def test_eagle3_layers_follow_sglang() -> None:
    """The inputs of layers 2, L/2 and L-3 (the config's aux layer ids + 1), clamped for tiny models."""
    assert eagle3_layers(32) == (2, 16, 29)
    assert eagle3_layers(32, [1, 15, 28]) == (2, 16, 29)
    assert eagle3_layers(2) == (1, 1, 0)


def test_head_rotary_table_covers_the_target_context(tmp_path) -> None:
    """A head stating 16 positions serves a longer context: its table grows, rows 0..15 unchanged."""
    from models.eagle import load_eagle_head
    from triton_kernels import load_ops

    head = load_eagle_head(save_head(tmp_path / "head", "eagle3", 64), load_ops("reference"), torch.float32, "cpu")
    before = head.cos_sin_cache.clone()
    head.cover_positions(64)
    assert head.cos_sin_cache.shape[0] == 64 and head.layer.self_attn.cos_sin_cache is head.cos_sin_cache
    assert torch.equal(head.cos_sin_cache[:16], before)


def test_head_with_its_own_embedding_keeps_it(checkpoints, tmp_path) -> None:
    """Only tensors the draft checkpoint lacks come from the target."""
    from safetensors.torch import load_file

    target, _ = checkpoints("qwen3")
    hidden = json.loads((target / "config.json").read_text())["hidden_size"]
    head_path = save_head(tmp_path / "own", "eagle3", hidden, seed=2, own_embed=True)
    prompts = _prompts(2)
    with _engine(target) as engine:
        expected = _results(engine, prompts)
    with _engine(target, "EAGLE3", head_path) as engine:
        head = engine.stages["forward"].runner.drafter.head
        assert torch.equal(head.embed_tokens.weight, load_file(str(head_path / "model.safetensors"))["embed_tokens.weight"])
        assert _results(engine, prompts) == expected


def _post(url: str, body: dict) -> list[dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def test_server_greedy_equals_plain(checkpoints, tmp_path) -> None:
    """Through HTTP /generate: EAGLE3 greedy tokens and text equal the plain engine's, verify
    steps counted in meta_info."""
    target, heads = checkpoints("qwen2")
    prompts = _prompts(3)
    with _engine(target) as engine:
        expected = _results(engine, prompts)
    with running_server(target, tmp_path / "eagle3.log", "--speculative-algorithm", "EAGLE3",
                        "--speculative-draft-model-path", str(heads["EAGLE3"]),
                        "--speculative-num-steps", "3", "--kernel-backend", "reference",
                        "--max-total-tokens", "4096") as server:
        out = _post(server.url + "/generate", {"input_ids": prompts, "sampling_params": GREEDY})
    assert [(r["output_ids"], r["meta_info"]["finish_reason"]["type"], r["text"]) for r in out] == expected
    assert all(r["meta_info"]["spec_verify_ct"] > 0 for r in out)


def test_wrong_or_missing_head_is_refused(checkpoints) -> None:
    target, heads = checkpoints("llama3.1")
    with pytest.raises(ConfigError, match="speculative-draft-model-path"):
        _engine(target, "EAGLE", None)
    with pytest.raises(ConfigError, match="tp-size"):
        _engine(target, "EAGLE3", heads["EAGLE3"], tp_size=2)
    with pytest.raises(ConfigError, match="speculative-eagle-topk"):
        _engine(target, "EAGLE", heads["EAGLE"], speculative_eagle_topk=0)
    with pytest.raises(ConfigError, match="kv-cache-dtype"):  # tree attention reads the model dtype
        _engine(target, "EAGLE", heads["EAGLE"], speculative_eagle_topk=2, kv_cache_dtype="fp8_e4m3")


# ----------------------------------------------------------------------------- drafts from scratch


def _reference_catch_up(model, drafter, seq: list[int], root: int, length: int):
    """The target over x_0..x_{root-1} (its captured features), then the head over (x_{i+1}, f_i)
    for i < root, in fresh KV caches of ``length`` positions -> (head logits, head hidden states,
    req_to_token [1, length], the head's KV cache)."""
    from models.batch import KVCache, build_metadata_reference

    device, head = model.device, drafter.head
    req_to_token = torch.arange(1, length + 1, dtype=torch.int32, device=device).view(1, length)
    target_kv = KVCache.allocate(model.num_layers, length + 1, model.num_kv_heads, model.head_dim,
                                 model.dtype, device)
    meta = build_metadata_reference("extend", req_to_token, [0], [0], [root], list(range(1, root + 1)), device)
    model.forward(torch.tensor(seq[:root], device=device), torch.arange(root, device=device), meta, target_kv)
    by_layer = dict(zip(model.model.capture_layers, model.model.captured))
    features = torch.cat([by_layer[i] for i in drafter.layers], dim=-1)
    c = head.config.layer
    head_kv = KVCache.allocate(1, length + 1, c.num_key_value_heads, c.head_dim, model.dtype, device)
    logits, hidden = head(torch.tensor(seq[1:root + 1], device=device), features,
                          torch.arange(root, device=device), meta, head_kv)
    return logits, hidden, req_to_token, head_kv


def _reference_chain(model, drafter, seq: list[int], root: int, depth: int) -> list[int]:
    """The chain the head drafts when everything is recomputed from position 0: target
    features of x_0..x_{root-1}, the head over (x_{i+1}, f_i) for i < root, then ``depth - 1``
    draft steps on its own hidden state."""
    from models.batch import build_metadata_reference

    device, head = model.device, drafter.head
    logits, hidden, req_to_token, head_kv = _reference_catch_up(model, drafter, seq, root, root + depth)
    chain, hidden = [int(head.draft_to_target(logits.argmax(-1))[0])], hidden[-1:]
    for step in range(1, depth):
        pos = root - 1 + step
        meta = build_metadata_reference("decode", req_to_token, [0], [pos], [1], [pos + 1], device)
        logits, hidden = head(torch.tensor(chain[-1:], device=device), hidden,
                              torch.tensor([pos], device=device), meta, head_kv)
        chain.append(int(head.draft_to_target(logits.argmax(-1))[0]))
    return chain


@pytest.mark.parametrize("arch,head", [("qwen3", "EAGLE"), ("qwen3", "EAGLE3"), ("llama3.2", "echo")])
def test_drafts_equal_the_head_recomputed_from_scratch(arch, head, checkpoints) -> None:
    """Every chain the engine verified (batched rows, several steps, chunked prefill) is the
    chain of the head run from position 0 over the final tokens; with the echo head most
    drafts are accepted, so the catch-up over accepted drafts is covered too."""
    target, heads = checkpoints(arch)
    prompts = _prompts(3)
    with _engine(target) as engine:
        expected = [r[0] for r in _results(engine, prompts)]
    algorithm = "EAGLE3" if head == "EAGLE3" else "EAGLE"
    with _engine(target, algorithm, heads[head], disable_radix_cache=True,
                 chunked_prefill_size=8) as engine:
        runner = engine.stages["forward"].runner
        drafter, recorded = runner.drafter, []
        draft = drafter.draft

        def recording(batch, input_ids, req_to_token, *rest):
            drafted = draft(batch, input_ids, req_to_token, *rest)
            drafts, _ = drafted.host()
            starts = [sum(batch.extend_lens[:b]) for b in range(len(batch.rids))]
            recorded.extend((rid, batch.positions[s], list(d)) for rid, s, d in zip(batch.rids, starts, drafts) if d)
            return drafted

        drafter.draft = recording
        rids = [engine.submit(input_ids=p, sampling_params=GREEDY) for p in prompts]
        outputs = [engine.wait(rid)[0]["output_ids"] for rid in rids]
        assert outputs == expected
        if head == "echo":
            assert engine.schedule.spec.total_accepted > engine.schedule.spec.total_verify_ct
        sequences = {rid: p + out for rid, p, out in zip(rids, prompts, outputs)}
        assert len({rid for rid, _, _ in recorded}) == len(prompts)
        for rid, root, chain in recorded:
            seq = next(s for r, s in sequences.items() if rid.split(".")[0] == r)
            assert chain == _reference_chain(runner.model, drafter, seq, root, len(chain)), (rid, root)


# ----------------------------------------------------------------------------- draft trees
TREE_TOPKS = [2, 4]


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_tree_greedy_equals_greedy_without_speculation(arch, checkpoints) -> None:
    """--speculative-eagle-topk 2 and 4: a draft tree per row (pruned to 6 draft tokens over 3
    steps), verified in one target forward with tree attention; batched greedy output equals
    the plain engine's, token for token, EAGLE and EAGLE3, and the pool is clean after."""
    target, heads = checkpoints(arch)
    prompts = _prompts(3)
    with _engine(target) as engine:
        expected = _results(engine, prompts)
    for topk in TREE_TOPKS:
        for algorithm in ("EAGLE", "EAGLE3"):
            with _engine(target, algorithm, heads[algorithm], speculative_eagle_topk=topk,
                         speculative_num_draft_tokens=7) as engine:
                free_before = engine.schedule.kv.pool.num_free_tokens
                assert _results(engine, prompts) == expected, (algorithm, topk)
                assert engine.schedule.spec.total_verify_ct > 0, (algorithm, topk)
                _assert_clean(engine, free_before)


def _count_moved_paths(engine: Engine) -> list[int]:
    """Wrap the schedule stage's take_kept: count the accepted tree paths whose K/V had to move."""
    spec, moved = engine.schedule.spec, [0]
    take = spec.take_kept

    def counting():
        kept = take()
        moved[0] += len(kept)
        return kept

    spec.take_kept = counting
    return moved


@pytest.mark.parametrize("topk", TREE_TOPKS)
def test_tree_paths_off_the_first_nodes(checkpoints, topk) -> None:
    """The echo head drafts what the repetitive tiny target often says, so trees accept paths
    through later siblings: their K/V is moved into place and the head catches up over the
    path's features. Greedy output still equals the plain engine's, with a small pool
    (page size 4) and a radix hit afterwards, and the pool is clean."""
    target, heads = checkpoints("llama3.2")
    prompts = _prompts(4)
    params = {"temperature": 0.0, "max_new_tokens": 40, "ignore_eos": True}
    with _engine(target, page_size=4) as engine:
        expected = _results(engine, prompts, params)
    with _engine(target, "EAGLE", heads["echo"], speculative_eagle_topk=topk, speculative_num_steps=4,
                 speculative_num_draft_tokens=8, page_size=4) as engine:
        free_before = engine.schedule.kv.pool.num_free_tokens
        moved = _count_moved_paths(engine)
        assert _results(engine, prompts, params) == expected
        spec = engine.schedule.spec
        assert spec.total_accepted > 0 and moved[0] > 0, (spec.total_accepted, moved[0])
        again = engine.generate(input_ids=prompts[1], sampling_params=params)  # a radix hit over moved K/V
        assert again["output_ids"] == expected[1][0] and again["meta_info"]["cached_tokens"] > 0
        _assert_clean(engine, free_before)


def test_tree_seeded_sampling_emits_the_same_tokens(checkpoints) -> None:
    """Sampled rows walk the tree with the seed and step of each depth: same tokens as plain."""
    target, heads = checkpoints("qwen3")
    prompts = _prompts(3)
    params = [{"temperature": 0.8, "top_k": 30, "top_p": 0.95, "seed": 7 + i, "max_new_tokens": 16,
               "ignore_eos": True} for i in range(3)]
    with _engine(target) as engine:
        expected = [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=params)]
    with _engine(target, "EAGLE3", heads["EAGLE3"], speculative_eagle_topk=4) as engine:
        got = [r["output_ids"] for r in engine.generate(input_ids=prompts, sampling_params=params)]
        assert got == expected
        assert engine.schedule.spec.total_verify_ct > 0


def _reference_tree(model, drafter, seq: list[int], root: int, num_nodes: int) -> tuple[list[int], list[int]]:
    """The tree the head drafts when everything is recomputed from position 0: the catch-up of
    ``_reference_chain``, then EAGLE-2's expansion (``stages/speculative/tree.expand_top_k``)
    where each frontier node's log-probs come from the head run step by step down its own
    path, and the pruning to ``num_nodes`` -> (tokens root first, parents)."""
    from models.batch import build_metadata_reference
    from stages.speculative.tree import CandidateTree, expand_top_k, path_to, prune_tree

    device, head = model.device, drafter.head
    logits, hidden, req_to_token, head_kv = _reference_catch_up(model, drafter, seq, root,
                                                                root + drafter.steps + 1)
    tree = expand_top_k(CandidateTree.rooted_at(seq[root]), torch.log_softmax(logits.float(), -1), drafter.topk)
    target_id = {}  # candidate node -> its target token id

    def target(node: int) -> int:
        if node not in target_id:
            target_id[node] = int(head.draft_to_target(torch.tensor([tree.tokens[node]], device=device))[0])
        return target_id[node]

    for _ in range(1, drafter.steps):
        rows = []
        for node in tree.frontier:
            h = hidden[-1:].clone()  # EAGLE3's layer adds into its input hidden in place
            for depth, step_node in enumerate(path_to(tree.parents, node)[1:], start=1):
                pos = root - 1 + depth
                meta = build_metadata_reference("decode", req_to_token, [0], [pos], [1], [pos + 1], device)
                step_logits, h = head(torch.tensor([target(step_node)], device=device), h,
                                      torch.tensor([pos], device=device), meta, head_kv)
            rows.append(torch.log_softmax(step_logits.float(), -1))
        tree = expand_top_k(tree, torch.cat(rows), drafter.topk)
    tokens = [seq[root]] + [target(i) for i in range(1, len(tree.tokens))]
    kept_tokens, kept_parents, _ = prune_tree(tokens, tree.parents, tree.scores, num_nodes)
    return kept_tokens, kept_parents


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-paths"])
@pytest.mark.parametrize("arch,head", [("qwen3", "EAGLE"), ("llama3.1", "EAGLE3"), ("llama3.2", "echo")])
def test_trees_equal_the_head_recomputed_from_scratch(arch, head, graphs, checkpoints) -> None:
    """Every tree the engine verified (topk 3 over 3 steps, pruned to 7 drafts; batched rows,
    chunked prefill, accepted paths off the first nodes with the echo head) is the tree of the
    head expanded from position 0 over the final tokens, each node's log-probs computed
    down its own path: the batched tree steps (tree attention over recomputed frontiers) and
    the catch-up over a verified path's features are exact -- also when the decode and verify
    steps take the graph paths (eager graphs on CPU: padded rows, features from the graph's
    tensors; tests/engine/test_speculative_graphs.py)."""
    target, heads = checkpoints(arch)
    prompts = _prompts(3)
    with _engine(target) as engine:
        expected = [r[0] for r in _results(engine, prompts)]
    algorithm = "EAGLE3" if head == "EAGLE3" else "EAGLE"
    with _engine(target, algorithm, heads[head], disable_radix_cache=True, chunked_prefill_size=8,
                 speculative_eagle_topk=3, speculative_num_steps=3, speculative_num_draft_tokens=8,
                 cuda_graph_max_bs=4) as engine:
        runner = engine.stages["forward"].runner
        if graphs:
            runner.use_graphs(eager=True)
        drafter, recorded = runner.drafter, []
        draft = drafter.draft

        def recording(batch, input_ids, req_to_token, *rest):
            drafted = draft(batch, input_ids, req_to_token, *rest)
            drafts, parents = drafted.host()
            starts = [sum(batch.extend_lens[:b]) for b in range(len(batch.rids))]
            for b, (rid, s) in enumerate(zip(batch.rids, starts)):
                if parents and parents[b]:
                    recorded.append((rid, batch.positions[s], list(drafts[b]), list(parents[b])))
            return drafted

        drafter.draft = recording
        moved = _count_moved_paths(engine)
        rids = [engine.submit(input_ids=p, sampling_params=GREEDY) for p in prompts]
        outputs = [engine.wait(rid)[0]["output_ids"] for rid in rids]
        assert outputs == expected
        if head == "echo":
            assert moved[0] > 0
        sequences = {rid: p + out for rid, p, out in zip(rids, prompts, outputs)}
        assert len({rid for rid, *_ in recorded}) == len(prompts)
        for rid, root, drafts, parents in recorded:
            seq = next(s for r, s in sequences.items() if rid.split(".")[0] == r)
            tokens, ref_parents = _reference_tree(runner.model, drafter, seq, root, len(drafts) + 1)
            assert (drafts, parents) == (tokens[1:], ref_parents), (rid, root)


# ----------------------------------------------------------------------------- no host syncs, compact masks
DRAFTING_FILES = ("stages/forward/speculative.py", "stages/forward/graphs.py", "triton_kernels/draft_tree.py")


class _HostCopyGuard:
    """Records every device -> host read (tolist, item, bool/int/float of a tensor, cpu, numpy)
    made directly by the drafting code while ``active``."""

    METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "cpu", "numpy")

    def __init__(self) -> None:
        self.active, self.calls, self.saved = False, [], {}

    def __enter__(self) -> "_HostCopyGuard":
        import sys

        for name in self.METHODS:
            original = self.saved[name] = getattr(torch.Tensor, name)

            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if self.active and caller.endswith(DRAFTING_FILES):
                    self.calls.append((_name, caller, sys._getframe(1).f_lineno))
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc) -> None:
        for name, original in self.saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "graph-paths"])
@pytest.mark.parametrize("topk", [1, 3])
def test_drafting_reads_nothing_back_before_the_verify_forward(checkpoints, topk, graphs) -> None:
    """From the start of drafting to the verify forward's launch the drafting code copies nothing
    from the device to the host (chains and trees, eager and graph paths); the drafts reach
    the host after the launch. Greedy output equals the plain engine's."""
    target, heads = checkpoints("llama3.2")
    prompts = _prompts(3)
    with _engine(target) as engine:
        expected = _results(engine, prompts)
    with _engine(target, "EAGLE", heads["echo"], speculative_eagle_topk=topk, speculative_num_draft_tokens=6,
                 cuda_graph_max_bs=4) as engine:
        runner = engine.stages["forward"].runner
        if graphs:
            runner.use_graphs(eager=True)
        drafter, guard, drafted_steps = runner.drafter, _HostCopyGuard(), [0]
        draft, forward = drafter.draft, runner.model.forward

        def guarded_draft(*args, **kwargs):
            guard.active = True
            drafted = draft(*args, **kwargs)
            drafted_steps[0] += bool(drafted.rows)
            return drafted

        def forward_ends_the_guard(*args, **kwargs):
            guard.active = False
            return forward(*args, **kwargs)

        drafter.draft, runner.model.forward = guarded_draft, forward_ends_the_guard
        with guard:
            assert _results(engine, prompts) == expected
        assert drafted_steps[0] > 0
        assert guard.calls == [], guard.calls[:5]


def test_mixed_chunk_rows_beside_trees_take_no_mask(checkpoints) -> None:
    """--enable-mixed-chunk: a prefill chunk batched with draft trees attends causally
    (mask_start_loc -1) and the batch's mask holds only the trees' blocks (one square of the
    largest tree's size per tree row); greedy output equals the plain engine's."""
    target, heads = checkpoints("qwen3")
    prompts = _prompts(4)
    params = [dict(GREEDY, max_new_tokens=24 - 4 * i) for i in range(4)]
    with _engine(target, chunked_prefill_size=8, enable_mixed_chunk=True) as engine:
        expected = _results(engine, prompts, params)
    with _engine(target, "EAGLE", heads["EAGLE"], speculative_eagle_topk=2, speculative_num_draft_tokens=6,
                 chunked_prefill_size=8, enable_mixed_chunk=True) as engine:
        runner = engine.stages["forward"].runner
        forward, mixed = runner.model.forward, []

        def recording(input_ids, positions, meta, kv_cache, **kwargs):
            if meta.tree_mask is not None:
                lens, starts = meta.extend_lens.tolist(), meta.mask_start_loc.tolist()
                trees = [n for n, s in zip(lens, starts) if s >= 0]
                if len(trees) < len(lens):
                    mixed.append((lens, starts, meta.tree_mask.numel(), len(trees) * max(trees) ** 2))
            return forward(input_ids, positions, meta, kv_cache, **kwargs)

        runner.model.forward = recording
        # the long prompt's chunks ride along the short ones' trees once those decode
        rids = [engine.submit(input_ids=p, sampling_params=q) for p, q in zip(prompts[:3], params[:3])]
        rids.append(engine.submit(input_ids=prompts[3] * 4, sampling_params=params[3]))
        outputs = [engine.wait(rid)[0] for rid in rids]
    with _engine(target, chunked_prefill_size=8, enable_mixed_chunk=True) as engine:
        plain_last = engine.generate(input_ids=prompts[3] * 4, sampling_params=params[3])["output_ids"]
    assert [o["output_ids"] for o in outputs[:3]] == [e[0] for e in expected[:3]]
    assert outputs[3]["output_ids"] == plain_last
    assert mixed, "no prefill chunk was batched with draft trees"
    for lens, starts, numel, tree_area in mixed:
        assert numel == tree_area, (lens, starts, numel)
