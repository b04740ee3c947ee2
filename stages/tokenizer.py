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
* ``max_bytes_per_token(tokenizer)``: the most prompt bytes one token can
  cover, or None when the tokenizer may drop input or fold an unbounded run
  of it into one token; the tokenize stage refuses a prompt whose byte length
  alone proves it too long before encoding it.
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


# --------------------------------------------------------------------------- bytes per token (early length check)
# A prompt of B bytes has at least ceil(B / k) tokens when no token can stand for more than k bytes
# of the prompt. That bound lets the tokenize stage refuse a prompt far past the context length
# before spending seconds encoding it. It holds only when the tokenizer never drops input or folds
# an unbounded run of it into one token, so every part of the pipeline is checked and anything not
# known to be safe gives None (no early check; the exact check after encoding still applies).

UNICODE_NORMALIZERS = {"NFC", "NFD", "NFKC", "NFKD", "Lowercase"}  # may shrink a character's bytes...
UNICODE_SHRINK = 4  # ...at most 4-fold (a 4-byte code point becomes one ASCII byte, e.g. NFKC of U+1D400)
SAFE_PRE_TOKENIZERS = {"ByteLevel", "Metaspace", "Digits", "Punctuation", "UnicodeScripts", "Split"}
MAX_CHAR_BYTES = 4  # an unknown character (one unk token) is at most 4 UTF-8 bytes


def max_bytes_per_token(tokenizer: Any) -> int | None:
    """Most prompt bytes one token can stand for (times any shrink by normalization), or None if unbounded.

    Token strings are measured as stored in the vocabulary (byte-level
    ``Ġ``, ``▁``, ``<0x41>``, ``##``), which is never less than the bytes of
    prompt they match.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return None
    try:
        spec = json.loads(backend.to_str())
    except Exception:  # a tokenizer that cannot serialize: no bound
        return None
    shrink = _normalizer_shrink(spec.get("normalizer"))
    longest = _longest_token_bytes(spec.get("model") or {})
    added = spec.get("added_tokens") or []
    if (shrink is None or longest is None or not _pre_tokenizer_keeps_bytes(spec.get("pre_tokenizer"))
            or any(token.get("lstrip") or token.get("rstrip") for token in added)):
        return None  # a stripping added token swallows any run of whitespace
    longest = max([longest, MAX_CHAR_BYTES] + [len(token["content"].encode()) for token in added])
    return longest * shrink


def _normalizer_shrink(normalizer: dict | None) -> int | None:
    """How many times fewer bytes the normalized text can have (1: never fewer), or None if unbounded."""
    if normalizer is None:
        return 1
    kind = normalizer.get("type")
    if kind == "Sequence":
        shrink = 1
        for part in normalizer.get("normalizers", []):
            part_shrink = _normalizer_shrink(part)
            if part_shrink is None:
                return None
            shrink *= part_shrink
        return shrink
    if kind in UNICODE_NORMALIZERS:
        return UNICODE_SHRINK
    if kind == "Prepend":
        return 1
    if kind == "Replace":
        pattern, content = normalizer.get("pattern", {}).get("String"), normalizer.get("content", "")
        if pattern is None or not content:  # a regex, or a deletion: no bound
            return None
        return max(1, -(-len(pattern.encode()) // len(content.encode())))
    return None  # Strip, StripAccents, BertNormalizer, Precompiled...: may delete input


def _pre_tokenizer_keeps_bytes(pre_tokenizer: dict | None) -> bool:
    """Whether the pre-tokenizer keeps every byte (Whitespace and friends drop spaces)."""
    if pre_tokenizer is None:
        return True
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return all(_pre_tokenizer_keeps_bytes(part) for part in pre_tokenizer.get("pretokenizers", []))
    return kind in SAFE_PRE_TOKENIZERS and pre_tokenizer.get("behavior") != "Removed"


def _longest_token_bytes(model: dict) -> int | None:
    """UTF-8 length of the longest vocabulary string; None where unknown text folds into one token."""
    kind = model.get("type")
    if kind == "BPE":
        if model.get("fuse_unk") and model.get("unk_token") is not None:
            return None
        pieces = list(model.get("vocab", {}))
    elif kind == "Unigram":
        if model.get("unk_id") is not None and not model.get("byte_fallback"):
            return None  # a run of unknown characters becomes one unk piece
        pieces = [piece for piece, _ in model.get("vocab", [])]
    else:  # WordPiece and WordLevel map a whole unknown word to one [UNK]
        return None
    return max((len(piece.encode()) for piece in pieces), default=None)
