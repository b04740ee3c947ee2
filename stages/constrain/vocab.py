"""The bytes each token really produces: the vocabulary a grammar is compiled against.

A grammar (regex, JSON schema) speaks about *text*; the model speaks in token
ids. To know which tokens may come next, the grammar compiler needs, for
every token id, the exact bytes that token appends to the output. The
tokenizer's vocabulary does not store those bytes directly:

* **byte-level BPE** (GPT-2, Llama 3, Qwen): each of the 256 byte values is
  spelled with one printable unicode character (the GPT-2 byte table: space is
  ``Ġ``, newline ``Ċ``); a token string is decoded character by character
  back to bytes. A token may hold half of a multi-byte UTF-8 character.
* **SentencePiece** (Llama 2, Mistral): ``▁`` stands for a space, and byte
  fallback pieces ``<0x0A>`` stand for one raw byte each.
* **added tokens** that are not special (``<think>``, ``<tool_call>``) are
  stored verbatim: their bytes are their UTF-8 text.
* **special tokens** (BOS, EOS, ``<|im_end|>``) produce no text; they are left
  out of the map (the EOS id is handed to the compiler separately, which
  allows it exactly in accepting states).

``TokenVocab`` holds the map ``{token_bytes: [ids]}`` in the shape
outlines-core's ``Vocabulary(eos_id, map)`` takes, the EOS ids, the
tokenizer's size, and a fingerprint that keys the grammar cache.
``vocab_for_tokenizer`` builds it once per tokenizer object and caches it.
"""
from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Literal

import msgspec
from outlines_core import Vocabulary

TokenizerKind = Literal["byte_level", "sentencepiece", "plain"]
SPACE_PIECE = "\u2581"  # SentencePiece's "▁"


class VocabularyError(ValueError):
    """The tokenizer cannot be turned into a byte vocabulary (the message says why)."""


def gpt2_byte_table() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character table (256 entries).

    Printable Latin-1 bytes map to themselves; the other 68 bytes (controls,
    space, 0x7F-0xA0, 0xAD) map to U+0100 onwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {byte: chr(byte) for byte in printable}
    next_code = 256
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(next_code)
            next_code += 1
    return table


# str.translate table: unicode char of the GPT-2 table -> the Latin-1 char of its byte,
# so ``piece.translate(_BYTE_LEVEL_DECODE).encode("latin-1")`` gives the bytes in C speed.
_BYTE_LEVEL_DECODE = {ord(char): byte for byte, char in gpt2_byte_table().items()}
_BYTE_LEVEL_CHARS = frozenset(gpt2_byte_table().values())


def byte_level_piece_bytes(piece: str) -> bytes | None:
    """Bytes of a byte-level BPE piece, or None if it has a char outside the byte table."""
    if not _BYTE_LEVEL_CHARS.issuperset(piece):
        return None
    return piece.translate(_BYTE_LEVEL_DECODE).encode("latin-1")


def sentencepiece_piece_bytes(piece: str) -> bytes:
    """Bytes of a SentencePiece piece: ``<0xNN>`` is one byte, ``▁`` is a space."""
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        try:
            return bytes([int(piece[3:5], 16)])
        except ValueError:
            pass
    return piece.replace(SPACE_PIECE, " ").encode("utf-8")


@dataclass
class TokenVocab:
    """Token bytes of one tokenizer, ready for outlines-core.

    ``token_bytes`` maps each byte string to the ids producing it (never the
    EOS ids, never special tokens); ``tokenizer_size`` is one past the
    largest id the tokenizer knows; ``key`` fingerprints the map and EOS ids.
    """

    token_bytes: dict[bytes, list[int]]
    eos_token_id: int
    stop_token_ids: tuple[int, ...]
    tokenizer_size: int
    kind: TokenizerKind
    key: str = ""
    _outlines: Vocabulary | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _derived: dict[str, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.key:
            self.key = _fingerprint(self.token_bytes, self.stop_token_ids)

    @property
    def num_text_tokens(self) -> int:
        return sum(len(ids) for ids in self.token_bytes.values())

    def outlines_vocabulary(self) -> Vocabulary:
        """The outlines-core Vocabulary (built once, shared by every compile)."""
        with self._lock:
            if self._outlines is None:
                self._outlines = Vocabulary(self.eos_token_id, self.token_bytes)
            return self._outlines

    def derived(self, name: str, build: Callable[[TokenVocab], Any]) -> Any:
        """``build(self)``, computed once per vocabulary and kept (e.g. per-token tables of ``bounded.py``)."""
        with self._lock:
            if name not in self._derived:
                self._derived[name] = build(self)
            return self._derived[name]


def _fingerprint(token_bytes: dict[bytes, list[int]], stop_token_ids: tuple[int, ...]) -> str:
    """sha1 of the sorted map and the stop ids (the tokenizer's dict order is not stable)."""
    entries = sorted(token_bytes.items())
    return hashlib.sha1(msgspec.msgpack.encode([list(stop_token_ids), entries])).hexdigest()


# --------------------------------------------------------------------------
# Reading a tokenizer (transformers or tokenizers)
# --------------------------------------------------------------------------


def _backend(tokenizer: Any) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, or HF's backend), if any."""
    if hasattr(tokenizer, "get_added_tokens_decoder") and hasattr(tokenizer, "decoder") \
            and hasattr(tokenizer, "to_str"):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


def _decoder_description(tokenizer: Any) -> str:
    backend = _backend(tokenizer)
    decoder = getattr(backend, "decoder", None) if backend is not None else None
    if decoder is None:
        return ""
    try:
        state = decoder.__getstate__()
        return state.decode() if isinstance(state, bytes) else json.dumps(state)
    except (AttributeError, TypeError, ValueError):
        return type(decoder).__name__


def detect_kind(tokenizer: Any, pieces: Iterable[str]) -> TokenizerKind:
    """Byte-level or SentencePiece: from the tokenizer's decoder, else from the pieces."""
    decoder = _decoder_description(tokenizer)
    if "ByteLevel" in decoder:
        return "byte_level"
    if "ByteFallback" in decoder or "Metaspace" in decoder or SPACE_PIECE in decoder:
        return "sentencepiece"
    num_byte_level = num_sentencepiece = 0
    for piece in pieces:
        num_byte_level += "Ġ" in piece or "Ċ" in piece
        num_sentencepiece += piece.startswith(SPACE_PIECE)
    if num_byte_level == num_sentencepiece == 0:
        return "plain"
    return "byte_level" if num_byte_level >= num_sentencepiece else "sentencepiece"


def _vocab_and_added(tokenizer: Any) -> tuple[dict[str, int], dict[int, tuple[str, bool]]]:
    """(piece -> id for the whole vocabulary, id -> (content, special) for added tokens)."""
    backend = _backend(tokenizer)
    if backend is not None:
        vocab = backend.get_vocab(with_added_tokens=True)
        added = {i: (t.content, bool(t.special)) for i, t in backend.get_added_tokens_decoder().items()}
    elif hasattr(tokenizer, "get_vocab"):
        vocab = dict(tokenizer.get_vocab())
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        added = {i: (str(getattr(t, "content", t)), bool(getattr(t, "special", True))) for i, t in decoder.items()}
    else:
        raise VocabularyError(f"{type(tokenizer).__name__} has neither a tokenizers backend nor get_vocab()")
    for special_id in getattr(tokenizer, "all_special_ids", []) or []:
        content = added.get(special_id, ("", True))[0]
        added[int(special_id)] = (content, True)
    return vocab, added


def _eos_ids(tokenizer: Any, eos_token_ids: Iterable[int] | None) -> tuple[int, ...]:
    ids = [int(i) for i in eos_token_ids] if eos_token_ids is not None else []
    tokenizer_eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(tokenizer_eos, int) and tokenizer_eos not in ids:
        ids.insert(0, tokenizer_eos)
    if not ids:
        raise VocabularyError("the tokenizer has no eos_token_id and no eos_token_ids were given")
    return tuple(ids)


def build_token_vocab(tokenizer: Any, eos_token_ids: Iterable[int] | None = None) -> TokenVocab:
    """Map every text-producing token of ``tokenizer`` to its bytes (see the module docstring).

    ``eos_token_ids``: ids that end generation (the first is outlines' EOS;
    all are allowed exactly in accepting states). Defaults to the
    tokenizer's ``eos_token_id``.
    """
    stop_ids = _eos_ids(tokenizer, eos_token_ids)
    vocab, added = _vocab_and_added(tokenizer)
    kind = detect_kind(tokenizer, vocab)
    piece_bytes = byte_level_piece_bytes if kind == "byte_level" else (
        sentencepiece_piece_bytes if kind == "sentencepiece" else (lambda piece: piece.encode("utf-8")))
    excluded = set(stop_ids) | {i for i, (_, special) in added.items() if special}
    token_bytes: dict[bytes, list[int]] = {}
    for piece, token_id in vocab.items():
        if token_id in excluded:
            continue
        data = added[token_id][0].encode("utf-8") if token_id in added else piece_bytes(piece)
        if data:
            token_bytes.setdefault(data, []).append(token_id)
    for ids in token_bytes.values():
        ids.sort()
    tokenizer_size = max([*vocab.values(), *added.keys(), *stop_ids]) + 1
    return TokenVocab(token_bytes=token_bytes, eos_token_id=stop_ids[0], stop_token_ids=stop_ids,
                      tokenizer_size=tokenizer_size, kind=kind)


# One vocabulary per live tokenizer object: building one costs ~0.3 s at 150k tokens.
# The entry keeps the tokenizer alive so its id() cannot be reused by another object.
_VOCAB_CACHE: dict[tuple[int, tuple[int, ...] | None], tuple[Any, TokenVocab]] = {}
_VOCAB_CACHE_LOCK = threading.Lock()
_VOCAB_CACHE_SIZE = 8


def vocab_for_tokenizer(tokenizer: Any, eos_token_ids: Iterable[int] | None = None) -> TokenVocab:
    """``build_token_vocab``, cached per tokenizer object (and EOS ids)."""
    eos_key = tuple(eos_token_ids) if eos_token_ids is not None else None
    cache_key = (id(tokenizer), eos_key)
    with _VOCAB_CACHE_LOCK:
        hit = _VOCAB_CACHE.get(cache_key)
        if hit is not None and hit[0] is tokenizer:
            return hit[1]
    vocab = build_token_vocab(tokenizer, eos_key)
    with _VOCAB_CACHE_LOCK:
        if len(_VOCAB_CACHE) >= _VOCAB_CACHE_SIZE:
            _VOCAB_CACHE.pop(next(iter(_VOCAB_CACHE)))
        _VOCAB_CACHE[cache_key] = (tokenizer, vocab)
    return vocab
