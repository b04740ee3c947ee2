"""The loader: errors that name the problem, shards, dtypes, tied embeddings, dummy weights."""
from __future__ import annotations

import json
import logging
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from models import (
    CorruptWeightsError,
    MissingWeightsError,
    ModelConfigError,
    ModelNotFoundError,
    UnexpectedWeightsError,
    UnsupportedArchitectureError,
    WeightShapeError,
)
from tests.models.runner import PagedRunner
from tests.models.tiny import build_hf_model, prompts, tiny_config
from triton_kernels import load_ops

OPS = load_ops("reference")


def _copy(source, destination):
    shutil.copytree(source, destination, dirs_exist_ok=True)
    return destination


def _rewrite_weights(directory, edit):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFoundError, match="no-such-model"):
        models.load_model(missing, OPS, torch.float32, "cpu")


def test_directory_without_config_names_config_json(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        models.load_model(tmp_path, OPS, torch.float32, "cpu")


def test_directory_without_weights_says_so(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config("llama3.1")))
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors.*pytorch_model\.bin"):
        models.load_model(tmp_path, OPS, torch.float32, "cpu")


def test_unsupported_architecture_lists_supported(tmp_path):
    config = tiny_config("llama3.1", architectures=["GPT2LMHeadModel"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UnsupportedArchitectureError) as info:
        models.load_model(tmp_path, OPS, torch.float32, "cpu")
    message = str(info.value)
    assert "GPT2LMHeadModel" in message
    for name in ("LlamaForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
        assert name in message


def test_invalid_config_json_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelConfigError, match="config.json"):
        models.load_model(tmp_path, OPS, torch.float32, "cpu")


def test_missing_tensor_is_named(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("qwen3"), tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.1.self_attn.k_norm.weight"))
    with pytest.raises(MissingWeightsError, match=r"model\.layers\.1\.self_attn\.k_norm\.weight"):
        models.load_model(directory, OPS, torch.float32, "cpu")


def test_missing_expert_tensor_is_named(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("qwen3_moe"), tmp_path)
    _rewrite_weights(directory, lambda t: t.pop("model.layers.0.mlp.experts.5.up_proj.weight"))
    with pytest.raises(MissingWeightsError, match=r"experts\.5\.up_proj\.weight"):
        models.load_model(directory, OPS, torch.float32, "cpu")


def test_unexpected_tensor_is_named(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("llama3.1"), tmp_path)
    _rewrite_weights(directory, lambda t: t.update({"model.layers.0.mlp.extra.weight": torch.zeros(2)}))
    with pytest.raises(UnexpectedWeightsError, match=r"model\.layers\.0\.mlp\.extra\.weight"):
        models.load_model(directory, OPS, torch.float32, "cpu")


def test_shape_mismatch_names_tensor_and_shapes(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("llama3.1"), tmp_path)
    name = "model.layers.0.self_attn.k_proj.weight"
    _rewrite_weights(directory, lambda t: t.update({name: torch.zeros(8, 64)}))
    with pytest.raises(WeightShapeError, match=rf"{name}.*\[8, 64\].*\[32, 64\]"):
        models.load_model(directory, OPS, torch.float32, "cpu")


def test_sharded_checkpoint_with_index_loads_the_same(tiny_checkpoint, tmp_path):
    single = tiny_checkpoint("qwen2")
    build_hf_model(tiny_config("qwen2")).save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    batch = prompts(1024, [6, 4])
    logits = [PagedRunner(models.load_model(d, OPS, torch.float32, "cpu")[0], 2, 8).prefill(batch)
              for d in (single, tmp_path)]
    assert torch.equal(logits[0], logits[1])


def test_missing_shard_is_named(tmp_path):
    build_hf_model(tiny_config("qwen2")).save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("*.safetensors"))[-1]
    shard.unlink()
    with pytest.raises(ModelNotFoundError, match=shard.name):
        models.load_model(tmp_path, OPS, torch.float32, "cpu")


def test_dtype_auto_follows_config_and_casts(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("llama3.2"), tmp_path)
    config = json.loads((directory / "config.json").read_text())
    config.pop("torch_dtype", None)
    config["dtype"] = "bfloat16"                     # transformers 5 spelling
    (directory / "config.json").write_text(json.dumps(config))
    model, _ = models.load_model(directory, OPS, "auto", "cpu")
    assert model.dtype == torch.bfloat16
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    source = load_file(directory / "model.safetensors")["model.norm.weight"]
    assert torch.equal(model.model.norm.weight, source.to(torch.bfloat16))


def test_tied_embeddings_share_one_tensor(tiny_checkpoint):
    model, config = models.load_model(tiny_checkpoint("llama3.2"), OPS, torch.float32, "cpu")
    assert config.tie_word_embeddings
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_fused_qkv_and_gate_up_hold_the_checkpoint_rows(tiny_checkpoint):
    directory = tiny_checkpoint("qwen2")
    model, config = models.load_model(directory, OPS, torch.float32, "cpu")
    tensors = load_file(directory / "model.safetensors")
    attn = model.model.layers[1].self_attn
    q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
    assert torch.equal(attn.qkv_proj.bias[q + kv:], tensors["model.layers.1.self_attn.v_proj.bias"])
    mlp = model.model.layers[1].mlp
    assert torch.equal(mlp.gate_up_proj.weight[config.intermediate_size:],
                       tensors["model.layers.1.mlp.up_proj.weight"])


def test_generation_config_adds_eos_ids_and_sampling_defaults(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("llama3.1"), tmp_path)
    (directory / "generation_config.json").write_text(json.dumps(
        {"eos_token_id": [2, 7, 9], "temperature": 0.6, "top_p": 0.9, "do_sample": True}))
    _, config = models.load_model(directory, OPS, torch.float32, "cpu")
    assert config.eos_token_ids == (2, 7, 9)
    assert config.generation.as_dict() == {"temperature": 0.6, "top_p": 0.9}


@pytest.mark.parametrize("name", ["llama3.1", "qwen2_moe"])
def test_dummy_weights_need_only_config_json(name, tmp_path, caplog):
    (tmp_path / "config.json").write_text(json.dumps(tiny_config(name)))
    with caplog.at_level(logging.INFO, logger="models.loader"):
        model, config = models.load_model(tmp_path, OPS, torch.float32, "cpu", load_format="dummy")
    assert "dummy" in caplog.text
    assert torch.equal(model.model.norm.weight, torch.ones_like(model.model.norm.weight))
    std = model.model.layers[0].self_attn.qkv_proj.weight.std().item()
    assert 0.015 < std < 0.025
    if config.shared_expert_intermediate_size:       # the zero expert must stay zero
        shared = model.model.layers[0].mlp.shared_expert
        assert not shared.w13[1].any() and shared.w13[0].any()
    logits = PagedRunner(model, 2, 8).prefill(prompts(config.vocab_size, [5, 3]))
    assert torch.isfinite(logits).all()


def test_unknown_load_format_is_rejected(tiny_checkpoint):
    with pytest.raises(ModelConfigError, match="load_format"):
        models.load_model(tiny_checkpoint("llama3.1"), OPS, torch.float32, "cpu", load_format="gguf")


def test_progress_is_logged_in_tensors_and_bytes(tiny_checkpoint, monkeypatch, caplog):
    import models.loader

    monkeypatch.setattr(models.loader, "PROGRESS_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="models.loader"):
        models.load_model(tiny_checkpoint("llama3.1"), OPS, torch.float32, "cpu")
    progress = [r.getMessage() for r in caplog.records if r.getMessage().startswith("loading weights")]
    assert progress and "tensors" in progress[-1] and "GB" in progress[-1]
    assert any(r.getMessage().startswith("loaded ") for r in caplog.records)


def test_corrupt_weight_file_is_named(tiny_checkpoint, tmp_path):
    directory = _copy(tiny_checkpoint("llama3.1"), tmp_path)
    (directory / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CorruptWeightsError, match="model.safetensors"):
        models.load_model(directory, OPS, torch.float32, "cpu")
