"""The bundled demo model (models/demo/) as any Hugging Face user would load it.

These tests use transformers' own AutoTokenizer / AutoModelForCausalLM, unchanged,
so they check the files on disk, not stagewise's loader: the directory fits the
size budget that keeps it in git, the tokenizer round-trips text and renders the
ChatML template, and the weights are trained (a randomly initialised model of
the same shape fails the loss and the word checks below).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

DEMO_DIR = Path(__file__).resolve().parents[2] / "models" / "demo"
SIZE_BUDGET_BYTES = 25_000_000
WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEMO_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEMO_DIR, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def training_words() -> set[str]:
    return set(WORD.findall((DEMO_DIR / "tinyshakespeare.txt").read_text(encoding="utf-8").lower()))


def test_demo_directory_fits_size_budget() -> None:
    files = [p for p in DEMO_DIR.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    names = {p.name for p in files}
    for required in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                     "generation_config.json", "train.py", "README.md"):
        assert required in names, f"models/demo/ lacks {required}"
    total_bytes = sum(p.stat().st_size for p in files)
    assert total_bytes <= SIZE_BUDGET_BYTES, f"models/demo/ holds {total_bytes} bytes"


def test_config_is_small_gqa_llama(tokenizer) -> None:
    config = json.loads((DEMO_DIR / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_key_value_heads"] < config["num_attention_heads"]
    assert config["tie_word_embeddings"] is True
    assert config["vocab_size"] == len(tokenizer)


@pytest.mark.parametrize("text", [
    "ROMEO:\nBut, soft! what light through yonder window breaks?",
    "  leading spaces,\ttabs and\r\nCRLF  ",
    "naïve café — 日本語 🎭 <not special>",
])
def test_tokenizer_round_trips_text(tokenizer, text: str) -> None:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    with_bos = tokenizer(text).input_ids
    assert with_bos[0] == tokenizer.bos_token_id and with_bos[1:] == ids


def test_chat_template_renders_chatml(tokenizer) -> None:
    messages = [
        {"role": "system", "content": "Speak as a player."},
        {"role": "user", "content": "Good morrow."},
    ]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert rendered == (
        "<|begin_of_text|><|im_start|>system\nSpeak as a player.<|im_end|>\n"
        "<|im_start|>user\nGood morrow.<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.convert_tokens_to_ids("<|im_end|>")) == 2


def test_generation_config_stops_on_im_end(tokenizer) -> None:
    generation = json.loads((DEMO_DIR / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
    assert tokenizer.eos_token_id in generation["eos_token_id"]


def test_held_out_loss_is_far_below_chance(tokenizer, model) -> None:
    text = (DEMO_DIR / "tinyshakespeare.txt").read_text(encoding="utf-8")
    held_out = text[-3000:]  # inside the last 5%, never trained on
    ids = torch.tensor([tokenizer(held_out).input_ids[:512]])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    chance = torch.log(torch.tensor(float(len(tokenizer)))).item()  # 8.3 nats for 4096 tokens
    assert loss < 5.5 < chance, f"held-out loss {loss:.2f} nats/token"


def test_greedy_continuation_is_shakespearean_english(tokenizer, model, training_words) -> None:
    prompt = tokenizer("ROMEO:\n", return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=40, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    continuation = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True)
    words = WORD.findall(continuation.lower())
    known = [w for w in words if w in training_words]
    assert len(words) >= 15, continuation
    assert len(known) >= 0.7 * len(words), continuation


def test_chat_answer_ends_with_im_end(tokenizer, model) -> None:
    messages = [{"role": "user", "content": "What is your name?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)["input_ids"]
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=80, do_sample=False, eos_token_id=[im_end],
                             pad_token_id=tokenizer.pad_token_id)
    answer = out[0, prompt.shape[1]:].tolist()
    assert answer[-1] == im_end, tokenizer.decode(answer)
    assert len(answer) >= 3
