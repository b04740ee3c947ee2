"""Tiny random models (Llama and Qwen3) saved as Hugging Face directories, once per session.

Weights use a larger init scale than a real model so greedy decoding wanders
over the vocabulary instead of repeating one token: a test comparing two runs
then compares many different tokens.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.server.tiny_model import save_tiny_tokenizer

VOCAB = 400


def _save(model_cls, config, path: Path) -> Path:
    from transformers import GenerationConfig

    path.mkdir(parents=True, exist_ok=True)
    save_tiny_tokenizer(path, VOCAB)
    torch.manual_seed(0)
    model = model_cls(config).to(torch.float32)
    model.save_pretrained(str(path), safe_serialization=True)
    GenerationConfig(bos_token_id=0, eos_token_id=[1, 3], pad_token_id=1).save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, rms_norm_eps=1e-5, rope_theta=10000.0,
                         initializer_range=0.15, tie_word_embeddings=False, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return _save(LlamaForCausalLM, config, tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> Path:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1000000.0,
                         initializer_range=0.15, tie_word_embeddings=True, bos_token_id=0,
                         eos_token_id=1, pad_token_id=1)
    return _save(Qwen3ForCausalLM, config, tmp_path_factory.mktemp("tiny_qwen3"))


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuation of each prompt by Hugging Face transformers (fp32, one at a time)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=None, pad_token_id=1, min_new_tokens=max_new_tokens)
            outs.append(out[0, len(ids):].tolist())
    return outs


def random_prompts(count: int, seed: int, low: int = 3, high: int = 40) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(low, high, (count,), generator=gen).tolist()
    return [[0] + torch.randint(4, VOCAB, (n - 1,), generator=gen).tolist() for n in lengths]
