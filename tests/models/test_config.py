"""config.json -> ModelConfig: both spellings of renamed fields, family defaults, real configs."""
from __future__ import annotations

import pytest

from models.config import parse_config
from models.errors import ModelConfigError, UnsupportedArchitectureError
from tests.models.tiny import source_config, tiny_config

def load_config(name: str):
    return parse_config(source_config(name))


REAL = ["Llama-3.1-8B-Instruct", "Llama-3.2-1B", "Mistral-7B-Instruct-v0.3", "Qwen2.5-7B-Instruct",
        "Qwen3-0.6B", "Qwen3-8B", "Qwen3-14B", "Qwen3-30B-A3B", "Qwen1.5-MoE-A2.7B"]


@pytest.mark.parametrize("name", REAL)
def test_real_configs_resolve(name):
    config = load_config(name)
    assert config.head_dim * config.num_attention_heads >= config.hidden_size // 2
    assert config.num_attention_heads % config.num_key_value_heads == 0
    assert len(config.sliding_windows) == config.num_hidden_layers
    assert config.eos_token_ids


def test_llama31_rope_and_eos():
    config = load_config("Llama-3.1-8B-Instruct")
    assert config.rope_parameters["rope_type"] == "llama3"
    assert config.rope_parameters["factor"] == 8.0 and config.rope_theta == 500000.0
    assert config.eos_token_ids == (128001, 128008, 128009)
    assert not config.qkv_bias and not config.qk_norm


def test_family_flags():
    assert load_config("Qwen2.5-7B-Instruct").qkv_bias
    qwen3 = load_config("Qwen3-8B")
    assert qwen3.qk_norm and not qwen3.qkv_bias and qwen3.head_dim == 128
    moe = load_config("Qwen3-30B-A3B")
    assert (moe.num_experts, moe.num_experts_per_tok, moe.moe_intermediate_size) == (128, 8, 768)
    assert moe.norm_topk_prob and all(moe.is_moe_layer(i) for i in range(moe.num_hidden_layers))
    assert load_config("Llama-3.2-1B").tie_word_embeddings


def test_renamed_fields_accept_both_spellings():
    old = tiny_config("qwen3_moe", rope_theta=123.0)
    old["torch_dtype"] = "float16"
    new = dict(old)
    new["num_local_experts"] = new.pop("num_experts")
    new["rope_parameters"] = {"rope_type": "default", "rope_theta": new.pop("rope_theta")}
    new["dtype"] = new.pop("torch_dtype")
    a, b = parse_config(old), parse_config(new)
    assert (a.num_experts, a.rope_theta, a.torch_dtype) == (b.num_experts, b.rope_theta, b.torch_dtype)
    assert (b.num_experts, b.rope_theta, b.torch_dtype) == (8, 123.0, "float16")


def test_old_rope_scaling_type_key():
    config = parse_config(tiny_config("llama2", rope_scaling={"type": "linear", "factor": 2.0}))
    assert config.rope_parameters == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


def test_qwen3_head_dim_defaults_to_128():
    raw = tiny_config("qwen3")
    raw.pop("head_dim")
    assert parse_config(raw).head_dim == 128


def test_sliding_window_rules():
    assert parse_config(tiny_config("mistral", sliding_window=12)).sliding_windows == (12, 12)
    assert parse_config(tiny_config("mistral", sliding_window=None)).sliding_windows == (-1, -1)
    off = tiny_config("qwen2", sliding_window=64, use_sliding_window=False)
    assert parse_config(off).sliding_windows == (-1, -1)
    on = tiny_config("qwen2", sliding_window=64, use_sliding_window=True, max_window_layers=1)
    on.pop("layer_types", None)
    assert parse_config(on).sliding_windows == (-1, 64)


def test_missing_required_field_is_named():
    raw = tiny_config("llama3.1")
    raw.pop("hidden_size")
    with pytest.raises(ModelConfigError, match="hidden_size"):
        parse_config(raw)


def test_heads_not_multiple_of_kv_heads():
    with pytest.raises(ModelConfigError, match="num_key_value_heads"):
        parse_config(tiny_config("llama3.1", num_key_value_heads=3))


def test_missing_architectures_falls_back_to_model_type():
    raw = tiny_config("qwen3")
    raw.pop("architectures")
    assert parse_config(raw).architecture == "Qwen3ForCausalLM"
    raw["model_type"] = "gpt2"
    with pytest.raises(UnsupportedArchitectureError, match="gpt2.*LlamaForCausalLM"):
        parse_config(raw)
