"""Tiny random checkpoints derived from real configs, and HF reference outputs.

Each tiny config starts from a published config.json (``configs/``), keeps everything that
selects code paths (rope type and scaling, tied embeddings, explicit head_dim,
biases, q/k norm, sliding window, expert routing flags) and shrinks the sizes:
2 layers, hidden 64-128, vocab 1000+, GQA, 8 experts top-2 for MoE. The weights
are random but not HF's init: biases and norm weights are randomised too, so
a missing bias or norm would show in the logits.

``save_tiny`` writes the checkpoint with transformers' ``save_pretrained``
(safetensors); ``hf_reference`` loads it back in fp32 with eager attention.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

# Published config.json files of public models (Qwen1.5-MoE-A2.7B is the Qwen2-MoE
# reference), kept here so the tests run on any machine without a model hub.
CONFIGS = Path(__file__).resolve().parent / "configs"


SHRINK: dict[str, Any] = dict(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                              vocab_size=1024,
                              bos_token_id=1, eos_token_id=2)
MOE_SHRINK: dict[str, Any] = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32)

# name -> (source config, overrides on top of SHRINK)
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    "llama2": ("Llama-3.1-8B-Instruct", dict(rope_scaling=None, rope_theta=10000.0,
                                             num_key_value_heads=4, head_dim=None)),
    "llama3.1": ("Llama-3.1-8B-Instruct", dict(head_dim=None)),
    "llama_bias": ("Llama-3.1-8B-Instruct", dict(head_dim=None, attention_bias=True, mlp_bias=True)),
    "llama3.2": ("Llama-3.2-1B", dict(hidden_size=96, head_dim=32)),       # explicit head_dim, tied
    "mistral": ("Mistral-7B-Instruct-v0.3", dict(sliding_window=12)),
    "qwen2": ("Qwen2.5-7B-Instruct", dict(head_dim=None, hidden_size=96, num_attention_heads=6)),
    "qwen3": ("Qwen3-8B", dict()),
    "qwen3_tied": ("Qwen3-0.6B", dict()),
    "qwen3_moe": ("Qwen3-30B-A3B", dict(MOE_SHRINK)),
    "qwen2_moe": ("Qwen1.5-MoE-A2.7B", dict(MOE_SHRINK, shared_expert_intermediate_size=96,
                                    mlp_only_layers=[1])),
}


def source_config(name: str) -> dict[str, Any]:
    """A published config.json by model name (a file of tests/models/configs)."""
    return json.loads((CONFIGS / f"{name}.json").read_text())


def tiny_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The published config of `name`'s source with sizes shrunk (and `overrides` applied)."""
    source, extra = TINY[name]
    config = source_config(source)
    config.update(SHRINK)
    config.update(extra)
    config.update(overrides)
    config = {k: v for k, v in config.items() if v is not None or k in ("rope_scaling", "sliding_window")}
    config["torch_dtype"] = "float32"
    return config


def build_hf_model(config: dict[str, Any], seed: int = 0) -> torch.nn.Module:
    """A transformers model of `config` with every parameter random (biases and norms too)."""
    import transformers

    hf_config = transformers.AutoConfig.for_model(**config)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if "norm" in name:
                param.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                param.copy_(0.1 * noise)
            else:
                param.copy_(0.06 * noise)
    return model.eval()


def save_tiny(name: str, directory: Path, seed: int = 0, **overrides: Any) -> Path:
    """Write a tiny random `name` checkpoint (config + safetensors) into `directory`."""
    model = build_hf_model(tiny_config(name, **overrides), seed)
    model.save_pretrained(directory)
    return directory


def load_hf(directory: Path) -> torch.nn.Module:
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        directory, dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None      # always generate the full length
    return model.eval()


@torch.no_grad()
def hf_last_logits(model: torch.nn.Module, prompt: list[int]) -> torch.Tensor:
    """fp32 logits of the last prompt token, [vocab]."""
    out = model(input_ids=torch.tensor([prompt]))
    return out.logits[0, -1].float()


@torch.no_grad()
def hf_greedy(model: torch.nn.Module, prompt: list[int], num_tokens: int) -> list[int]:
    """transformers generate(do_sample=False): the `num_tokens` continuation."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                         max_new_tokens=num_tokens, min_new_tokens=num_tokens, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def prompts(vocab_size: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random token prompts of the given lengths (ids from 3 up: skip bos/eos)."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab_size, (n,), generator=generator).tolist() for n in lengths]


def eagle_layer_weights(kind: str, random: Callable[..., torch.Tensor], hidden: int, heads: int, kv_heads: int,
                        head_dim: int, intermediate: int) -> dict[str, torch.Tensor]:
    """The one decoder layer of a random EAGLE ("eagle": ``layers.0.``) or EAGLE3 ("eagle3":
    ``midlayer.``, attention over [embedding, feature], 2 * hidden) head, in checkpoint names.

    ``random(*shape)`` draws each tensor (in this order, so a seeded generator gives the same head)."""
    p = "midlayer." if kind == "eagle3" else "layers.0."
    attn_in = 2 * hidden if kind == "eagle3" else hidden
    return {f"{p}self_attn.q_proj.weight": random(heads * head_dim, attn_in),
            f"{p}self_attn.k_proj.weight": random(kv_heads * head_dim, attn_in),
            f"{p}self_attn.v_proj.weight": random(kv_heads * head_dim, attn_in),
            f"{p}self_attn.o_proj.weight": random(hidden, heads * head_dim),
            f"{p}post_attention_layernorm.weight": 1 + random(hidden),
            f"{p}mlp.gate_proj.weight": random(intermediate, hidden),
            f"{p}mlp.up_proj.weight": random(intermediate, hidden),
            f"{p}mlp.down_proj.weight": random(hidden, intermediate)}
