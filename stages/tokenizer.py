"""The tokenizer and the model facts around it, shared by several stages and the assembly.

The assembly loads the tokenizer once per process (``load_tokenizer``) and
hands the same object to every stage that needs it (tokenize, constrain,
detokenize, ingest); no stage loads one itself. This module is not a stage:
it holds only plain functions over a Hugging Face tokenizer and a local
model directory.

* ``load_tokenizer(path)``: the tokenizer of a local directory (no hub access).
* ``model_vocab_size(model_path)``: ``vocab_size`` from config.json; the
  embedding (and so the logits) may be padded past the tokenizer's size.
* ``vocab_size(tokenizer, model_path)``: the id space a request may use,
  ``max(len(tokenizer), model_vocab_size(model_path))``.
* ``special_token_ids(tokenizer)``: ids of BOS/EOS/chat markers and every
  other token the tokenizer marks special (the detokenizer skips them).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def load_tokenizer(path: str | Path) -> Any:
    """The Hugging Face tokenizer of a local model directory (no hub access)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)


def model_vocab_size(model_path: str | Path) -> int:
    """``vocab_size`` from the model's config.json (0 when absent): the embedding may be padded."""
    config_path = Path(model_path) / "config.json"
    if not config_path.is_file():
        return 0
    config = json.loads(config_path.read_text())
    text_config = config.get("text_config", config)
    return int(text_config.get("vocab_size", 0) or 0)


def vocab_size(tokenizer: Any, model_path: str | Path) -> int:
    """Ids a request may hold: the tokenizer's and the model's (padded) vocabulary, whichever is larger."""
    return max(len(tokenizer), model_vocab_size(model_path))


def special_token_ids(tokenizer: Any) -> frozenset[int]:
    """Ids of every special token (BOS/EOS/chat markers) of a Hugging Face tokenizer."""
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return frozenset(ids)
