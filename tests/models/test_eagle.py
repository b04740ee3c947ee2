"""EAGLE / EAGLE3 draft heads: tiny random checkpoints in the public layout, loaded and
run with the reference backend, against a forward written out by hand in plain torch.

The EAGLE3 config starts from the published Llama-3.1-8B head (configs/), shrunk; its
target hidden size differs from the head's, so fc really maps 3 * Ht -> H.
"""
from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from models.batch import KVCache, build_metadata_reference
from models.eagle import load_eagle_head, parse_eagle_config
from models.errors import MissingWeightsError, ModelConfigError, UnexpectedWeightsError
from tests.models.tiny import eagle_layer_weights, source_config
from triton_kernels import load_ops

H, HEADS, KV_HEADS, D, I, VOCAB, DRAFT_VOCAB, HT = 64, 4, 2, 16, 96, 300, 50, 48
LENS = [3, 5]                                     # two requests, prefill from position 0


def _config(kind: str) -> dict:
    raw = source_config("EAGLE3-LLaMA3.1-Instruct-8B")
    raw.update(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS,
               intermediate_size=I, vocab_size=VOCAB, draft_vocab_size=DRAFT_VOCAB,
               torch_dtype="float32")
    if kind == "eagle3":
        raw["target_hidden_size"] = HT
    else:
        raw["architectures"] = ["LlamaForCausalLMEagle"]
        raw.pop("draft_vocab_size")
    return raw


def _weights(kind: str, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def r(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    p = "midlayer." if kind == "eagle3" else "layers.0."
    w = eagle_layer_weights(kind, r, H, HEADS, KV_HEADS, D, I)
    w["embed_tokens.weight"] = r(VOCAB, H, scale=1.0)
    if kind == "eagle3":
        w.update({f"{p}input_layernorm.weight": 1 + r(H), f"{p}hidden_norm.weight": 1 + r(H),
                  "fc.weight": r(H, 3 * HT), "norm.weight": 1 + r(H),
                  "lm_head.weight": r(DRAFT_VOCAB, H),
                  "d2t": torch.randint(0, VOCAB - DRAFT_VOCAB, (DRAFT_VOCAB,), generator=gen),
                  "t2d": torch.zeros(VOCAB, dtype=torch.bool)})
    else:
        w.update({"fc.weight": r(H, 2 * H), "fc.bias": r(H), "lm_head.weight": r(VOCAB, H)})
    return w


def _save(tmp_path, kind: str, weights: dict[str, torch.Tensor]):
    (tmp_path / "config.json").write_text(json.dumps(_config(kind)))
    save_file(weights, str(tmp_path / "model.safetensors"))
    return tmp_path


# ----------------------------------------------------------------------------- by hand


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, pos, theta=10000.0):                 # x [T, heads, D], neox halves
    inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
    ang = pos.double()[:, None] * inv[None]
    cos, sin = torch.cat([ang.cos()] * 2, -1)[:, None].float(), torch.cat([ang.sin()] * 2, -1)[:, None].float()
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return x * cos + torch.cat([-x2, x1], -1) * sin


def _attention(x, w, p, pos):
    q = (x @ w[f"{p}self_attn.q_proj.weight"].T).view(-1, HEADS, D)
    k = (x @ w[f"{p}self_attn.k_proj.weight"].T).view(-1, KV_HEADS, D)
    v = (x @ w[f"{p}self_attn.v_proj.weight"].T).view(-1, KV_HEADS, D)
    q, k = _rope(q, pos), _rope(k, pos)
    k, v = k.repeat_interleave(HEADS // KV_HEADS, 1), v.repeat_interleave(HEADS // KV_HEADS, 1)
    s = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(D)
    s = s.masked_fill(torch.ones(len(x), len(x), dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", s.softmax(-1), v).reshape(len(x), HEADS * D)
    return o @ w[f"{p}self_attn.o_proj.weight"].T


def _mlp(x, w, p):
    g, u = x @ w[f"{p}mlp.gate_proj.weight"].T, x @ w[f"{p}mlp.up_proj.weight"].T
    return (torch.nn.functional.silu(g) * u) @ w[f"{p}mlp.down_proj.weight"].T


def _by_hand(kind, w, ids, feats):
    """One request: (logits of its last token, hidden of every token)."""
    pos = torch.arange(len(ids))
    e = w["embed_tokens.weight"][ids]
    if kind == "eagle3":
        p = "midlayer."
        x = feats @ w["fc.weight"].T
        a = _attention(torch.cat([_rms(e, w[f"{p}input_layernorm.weight"]),
                                  _rms(x, w[f"{p}hidden_norm.weight"])], -1), w, p, pos)
        r = x + a
        r = r + _mlp(_rms(r, w[f"{p}post_attention_layernorm.weight"]), w, p)
        return _rms(r[-1], w["norm.weight"]) @ w["lm_head.weight"].T, r
    p = "layers.0."
    x = torch.cat([e, feats], -1) @ w["fc.weight"].T + w["fc.bias"]
    r = x + _attention(x, w, p, pos)
    r = r + _mlp(_rms(r, w[f"{p}post_attention_layernorm.weight"]), w, p)
    return r[-1] @ w["lm_head.weight"].T, r


# ----------------------------------------------------------------------------- tests


def _run(head, ids_list, feats_list):
    slots = list(range(1, sum(LENS) + 1))
    req_to_token = torch.zeros(2, max(LENS), dtype=torch.int32)
    req_to_token[0, :LENS[0]] = torch.tensor(slots[:LENS[0]])
    req_to_token[1, :LENS[1]] = torch.tensor(slots[LENS[0]:])
    meta = build_metadata_reference("extend", req_to_token, [0, 1], [0, 0], LENS, slots, "cpu")
    kv = KVCache.allocate(1, sum(LENS) + 1, KV_HEADS, D, torch.float32, "cpu")
    positions = torch.cat([torch.arange(n) for n in LENS])
    return head(torch.cat(ids_list), torch.cat(feats_list), positions, meta, kv)


@pytest.mark.parametrize("kind", ["eagle", "eagle3"])
def test_loaded_head_matches_the_hand_written_forward(tmp_path, kind):
    gen = torch.Generator().manual_seed(0)
    weights = _weights(kind, gen)
    head = load_eagle_head(_save(tmp_path, kind, weights), load_ops("reference"), torch.float32, "cpu")
    feat_dim = 3 * HT if kind == "eagle3" else H
    ids_list = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENS]
    feats_list = [torch.randn(n, feat_dim, generator=gen) for n in LENS]
    logits, hidden = _run(head, ids_list, feats_list)
    assert logits.shape == (2, DRAFT_VOCAB if kind == "eagle3" else VOCAB)
    assert logits.dtype == torch.float32 and hidden.shape == (sum(LENS), H)
    start = 0
    for b, n in enumerate(LENS):
        ref_logits, ref_hidden = _by_hand(kind, weights, ids_list[b], feats_list[b])
        torch.testing.assert_close(logits[b], ref_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(hidden[start:start + n], ref_hidden, rtol=1e-4, atol=1e-4)
        start += n


def test_eagle3_next_step_takes_its_own_hidden_and_maps_ids(tmp_path):
    gen = torch.Generator().manual_seed(1)
    weights = _weights("eagle3", gen)
    head = load_eagle_head(_save(tmp_path, "eagle3", weights), load_ops("reference"), torch.float32, "cpu")
    ids = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENS]
    own = [torch.randn(n, H, generator=gen) for n in LENS]        # [T, H]: fc is skipped
    logits, _ = _run(head, ids, own)
    assert logits.shape == (2, DRAFT_VOCAB)
    draft = torch.tensor([0, 7, DRAFT_VOCAB - 1])
    assert torch.equal(head.draft_to_target(draft), draft + weights["d2t"][draft])


def test_public_eagle3_config_resolves():
    config = parse_eagle_config(source_config("EAGLE3-LLaMA3.1-Instruct-8B"))
    assert (config.kind, config.draft_vocab_size, config.target_hidden_size) == ("eagle3", 32000, 4096)
    assert config.layer.num_hidden_layers == 1 and config.layer.head_dim == 128


def test_checkpoint_errors_name_the_tensor(tmp_path):
    gen = torch.Generator().manual_seed(2)
    weights = _weights("eagle3", gen)
    weights.pop("midlayer.hidden_norm.weight")
    with pytest.raises(MissingWeightsError, match="hidden_norm"):
        load_eagle_head(_save(tmp_path, "eagle3", weights), load_ops("reference"), torch.float32, "cpu")
    weights = _weights("eagle3", gen)
    weights["layers.3.extra.weight"] = torch.zeros(2)
    with pytest.raises(UnexpectedWeightsError, match="layers.3.extra"):
        load_eagle_head(_save(tmp_path, "eagle3", weights), load_ops("reference"), torch.float32, "cpu")
    with pytest.raises(ModelConfigError, match="no EAGLE head"):
        parse_eagle_config({**_config("eagle3"), "architectures": ["LlamaForCausalLM"]})


def test_eagle_without_embedding_uses_the_targets(tmp_path):
    gen = torch.Generator().manual_seed(3)
    weights = _weights("eagle", gen)
    embed, lm_head = weights.pop("embed_tokens.weight"), weights.pop("lm_head.weight")
    head = load_eagle_head(_save(tmp_path, "eagle", weights), load_ops("reference"), torch.float32, "cpu")
    head.share_target_weights(embed, lm_head)
    ids = [torch.randint(0, VOCAB, (n,), generator=gen) for n in LENS]
    feats = [torch.randn(n, H, generator=gen) for n in LENS]
    logits, _ = _run(head, ids, feats)
    ref, _ = _by_hand("eagle", {**weights, "embed_tokens.weight": embed, "lm_head.weight": lm_head},
                      ids[1], feats[1])
    torch.testing.assert_close(logits[1], ref, rtol=1e-4, atol=1e-4)
