"""Grammars: from a request's json_schema / regex / choices to a per-request token automaton.

Three steps, each cheap to reason about:

1. ``grammar_regex(kind, spec)``: every grammar becomes one regex. A JSON
   schema goes through outlines-core's ``build_regex_from_schema`` (one
   optional space as whitespace, so a model cannot stall in a whitespace
   loop) plus our numeric bounds (``schema.py``); choices become an
   alternation of escaped literals; an EBNF grammar without recursive rules
   is inlined into one regex (``ebnf.py``).
2. ``GrammarCompiler.compile``: regex + ``TokenVocab`` -> outlines-core
   ``Index``, a DFA over *token ids* (which tokens lead from which state to
   which). This is the expensive part (seconds for a large schema on a 150k
   vocabulary), so it runs on a thread pool (outlines releases the GIL) and is
   cached by ``(kind, spec, vocabulary fingerprint)``; the same schema sent by
   many requests compiles once. A schema's strings with minLength/maxLength
   are indexed unbounded and their characters counted beside the Index
   (``bounded.py``: a bounded repeat costs a state per count, minutes at
   150k tokens), unless counting cannot be exact; then the bounds stay in the
   regex.
3. ``GrammarState``: one request's cursor in the Index (an outlines
   ``Guide``). Each step it writes its allowed-token row into the batch
   bitmask and advances by the sampled token. The EOS ids are allowed exactly
   in accepting states; with counted strings the row is the Index's row AND
   the length rule, and the state adds the count. Rows are cached per (grammar, state) in the
   compiler's ``MaskRowCache``: outlines walks every allowed token to write a
   row (~0.8 ms inside a JSON string at 150k tokens), a cached row is a copy.

``response_format_to_sampling`` is the OpenAI ``response_format`` -> sampling
params translation the ingest stage calls.
"""
from __future__ import annotations

import itertools
import json
import pickle
import re
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from outlines_core import Guide, Index

from stages.constrain.bitmask import BITS_PER_WORD, MaskRowCache, bitmask_words
from stages.constrain.bounded import BoundedStrings, BoundedUnsupported, analyze
from stages.constrain.ebnf import EbnfError, ebnf_to_regex, escape_literal
from stages.constrain.sandbox import CompileBudgetError, CompileCancelled, CompileSandbox
from stages.constrain.schema import SchemaError, SchemaRegexes, schema_regexes
from stages.constrain.vocab import TokenVocab

GrammarKind = Literal["json_schema", "regex", "choices", "ebnf"]
GRAMMAR_KINDS: tuple[str, ...] = ("json_schema", "regex", "choices", "ebnf")

# OpenAI's response_format {"type": "json_object"}: any JSON object whose values are
# scalars, or arrays/objects of scalars. outlines' unbounded {"type": "object"}
# nests deeper and compiles ~40x slower (27 s on a 700-token vocabulary); this one
# compiles in ~10 s on 150k tokens, once per tokenizer (cached).
_SCALARS: list[dict[str, Any]] = [{"type": "string"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"}]
JSON_OBJECT_SCHEMA = json.dumps({"type": "object", "additionalProperties": {"anyOf": [
    *_SCALARS, {"type": "array", "items": {"anyOf": _SCALARS}},
    {"type": "object", "additionalProperties": {"anyOf": _SCALARS}}]}})


class GrammarError(ValueError):
    """A grammar could not be compiled; ``str(error)`` is the reason for the client (HTTP 400)."""


# --------------------------------------------------------------------------
# Step 1: every grammar is a regex
# --------------------------------------------------------------------------

def choices_regex(choices: list[str]) -> str:
    """An alternation matching exactly one of ``choices``."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise GrammarError("choices must be a non-empty list of non-empty strings")
    return "(" + "|".join(escape_literal(choice) for choice in choices) + ")"


def json_schema_regex(schema: str) -> str:
    """outlines-core's regex for a JSON schema (a JSON text), string lengths bounded in the regex."""
    return json_schema_regexes(schema).exact


def json_schema_regexes(schema: str) -> SchemaRegexes:
    """Exact, unbounded and marked regexes of a JSON schema (a JSON text); see ``schema.py``."""
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as error:
        raise GrammarError(f"json_schema is not valid JSON: {error}") from None
    if not isinstance(parsed, (dict, bool)):
        raise GrammarError(f"json_schema must be a JSON object, got {type(parsed).__name__}")
    if parsed == {"type": "object"}:  # any object: the bounded-depth form (see JSON_OBJECT_SCHEMA)
        parsed = json.loads(JSON_OBJECT_SCHEMA)
    try:
        return schema_regexes(parsed)
    except SchemaError as error:
        raise GrammarError(str(error)) from None


def grammar_regex(kind: str, spec: str) -> str:
    """The regex of a grammar given as in ``GrammarCompile`` (choices: a JSON list)."""
    if kind == "json_schema":
        return json_schema_regex(spec)
    if kind == "regex":
        if not spec:
            raise GrammarError("regex must be a non-empty string")
        return spec
    if kind == "choices":
        try:
            choices = json.loads(spec)
        except json.JSONDecodeError as error:
            raise GrammarError(f"choices spec is not a JSON list: {error}") from None
        if not isinstance(choices, list):
            raise GrammarError("choices spec must be a JSON list of strings")
        return choices_regex(choices)
    if kind == "ebnf":
        try:
            return ebnf_to_regex(spec)
        except EbnfError as error:
            raise GrammarError(f"ebnf: {error}") from None
    raise GrammarError(f"unknown grammar kind {kind!r}; expected one of {GRAMMAR_KINDS}")


def grammar_of_sampling(json_schema: str | None, regex: str | None,
                        choices: list[str] | None) -> tuple[GrammarKind, str] | None:
    """(kind, spec) for a GrammarCompile from SamplingParams fields, or None if unconstrained."""
    if json_schema is not None:
        return "json_schema", json_schema
    if regex is not None:
        return "regex", regex
    if choices is not None:
        return "choices", json.dumps(choices)
    return None


def response_format_to_sampling(response_format: dict[str, Any] | None) -> dict[str, str]:
    """OpenAI ``response_format`` -> the sampling-params fields to set (maybe none).

    ``{"type": "text"}`` -> {}; ``{"type": "json_object"}`` -> any JSON object;
    ``{"type": "json_schema", "json_schema": {"name", "schema", "strict"}}`` ->
    that schema (strict or not, the output is constrained to it). Raises
    GrammarError naming the bad field.
    """
    if response_format is None:
        return {}
    if not isinstance(response_format, dict):
        raise GrammarError("response_format must be an object")
    kind = response_format.get("type")
    if kind == "text":
        return {}
    if kind == "json_object":
        return {"json_schema": JSON_OBJECT_SCHEMA}
    if kind != "json_schema":
        raise GrammarError(f"response_format.type must be text, json_object or json_schema, got {kind!r}")
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise GrammarError("response_format.json_schema must be an object with a 'schema'")
    schema = spec.get("schema", spec.get("schema_"))
    if not isinstance(schema, (dict, bool)):
        raise GrammarError("response_format.json_schema.schema must be a JSON schema object")
    return {"json_schema": json.dumps(schema)}


# --------------------------------------------------------------------------
# Step 2: regex -> Index, off the loop, cached
# --------------------------------------------------------------------------


def build_index(regex: str, vocab: TokenVocab, sandbox: CompileSandbox | None = None,
                cancel: threading.Event | None = None) -> Index:
    """Compile ``regex`` against ``vocab`` (slow: seconds for big schemas on big vocabularies)."""
    return build_index_sized(regex, vocab, sandbox, cancel)[0]


def build_index_sized(regex: str, vocab: TokenVocab, sandbox: CompileSandbox | None = None,
                      cancel: threading.Event | None = None) -> tuple[Index, int]:
    """(Index, its serialized size in bytes), the size standing for its memory in the grammar cache.

    With a ``sandbox`` the build runs in one of its child processes under a
    time and memory budget (``sandbox.py``); a grammar past the budget is a
    GrammarError; ``cancel`` set ends the build early (CompileCancelled).
    """
    try:
        if sandbox is not None:
            return sandbox.build_index_sized(regex, cancel)
        index = Index(regex, vocab.outlines_vocabulary())
        return index, len(pickle.dumps(index))
    except ValueError as error:
        raise GrammarError(_index_error_reason(regex, str(error))) from None
    except CompileBudgetError as error:
        raise GrammarError(str(error)) from None


def _index_error_reason(regex: str, message: str) -> str:
    if "Failed to build DFA" not in message:
        return message
    try:
        re.compile(regex)
    except re.error as error:
        return f"invalid regex: {error}"
    return ("regex uses a feature the grammar compiler does not support (lookaround, "
            f"backreferences, anchors): {message}")


@dataclass(frozen=True)
class CompiledGrammar:
    """An Index plus the shared cache of its packed mask rows (``grammar_id`` keys the cache)."""

    grammar_id: int
    index: Index
    mask_cache: MaskRowCache | None = None
    num_bytes: int = 0  # serialized Index size: the cache's estimate of its memory
    bounded: BoundedStrings | None = None  # string lengths counted beside ``index`` (``bounded.py``)


@dataclass
class _CacheEntry:
    future: Future
    cancel: threading.Event
    waiters: int = 0
    num_bytes: int = 0


class GrammarCompiler:
    """Compiles grammars for one vocabulary on a thread pool, with a cache bounded in entries and bytes.

    ``submit`` returns a Future resolving to a ``CompiledGrammar`` or raising
    ``GrammarError``; concurrent submits of the same grammar share one
    compile, and ``release`` says one waiter left: a compile nobody waits for
    is cancelled (its sandbox worker killed) and forgotten. Failures are
    cached too (a bad schema fails fast the next time). The cache keeps the
    most recently used grammars while their Index sizes sum to at most
    ``cache_bytes`` (the newest one always stays); ``clear`` empties it.
    Grammars in use by requests stay alive through their states either way.
    """

    def __init__(self, vocab: TokenVocab, max_workers: int = 2, cache_size: int = 256,
                 sandbox: CompileSandbox | None = None, cache_bytes: int = 256 << 20) -> None:
        """``max_workers=0``: compile inline, in the caller's thread (futures come back done).

        ``sandbox``: build indexes in child processes under a time/memory budget
        (the serving path; a pathological grammar then costs a 400, not the server).
        """
        self.vocab = vocab
        self.sandbox = sandbox
        self.cache_size = cache_size
        self.cache_bytes = cache_bytes
        self._executor = ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grammar") \
            if max_workers > 0 else None
        self._cache: OrderedDict[tuple[str, str, str], _CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self.num_compiles = 0
        self.num_bytes = 0  # sum of num_bytes over finished cached entries
        self._grammar_ids = itertools.count()
        self.mask_cache = MaskRowCache()

    def submit(self, kind: str, spec: str) -> Future[CompiledGrammar]:
        key = (kind, spec, self.vocab.key)
        with self._lock:
            entry = self._cache.get(key)
            if entry is not None:
                self._cache.move_to_end(key)
                entry.waiters += 1
                return entry.future
            entry = _CacheEntry(future=Future(), cancel=threading.Event(), waiters=1)
            self._cache[key] = entry
        if self._executor is not None:
            entry.future = self._executor.submit(self._compile, kind, spec, entry.cancel)
        else:
            entry.future = _run_inline(self._compile, kind, spec, entry.cancel)
        entry.future.add_done_callback(lambda future: self._account(key, entry, future))
        return entry.future

    def release(self, future: Future) -> None:
        """One waiter of ``future`` is gone; with none left, a compile still running is cancelled."""
        with self._lock:
            for key, entry in self._cache.items():
                if entry.future is future:
                    break
            else:
                return
            entry.waiters = max(0, entry.waiters - 1)
            if entry.waiters or future.done():
                return
            del self._cache[key]
        entry.cancel.set()
        future.cancel()  # still queued: never starts; running: the sandbox sees the event

    def _account(self, key: tuple[str, str, str], entry: _CacheEntry, future: Future) -> None:
        """A compile finished: count its bytes, then evict least recently used entries over the bounds."""
        if not future.cancelled() and future.exception() is None:
            entry.num_bytes = future.result().num_bytes
        with self._lock:
            if self._cache.get(key) is not entry:
                return  # released or cleared meanwhile
            if future.cancelled() or isinstance(future.exception(), CompileCancelled):
                del self._cache[key]
                return
            self.num_bytes += entry.num_bytes
            self._evict()

    def _evict(self) -> None:
        for key in list(self._cache):
            if len(self._cache) <= self.cache_size and self.num_bytes <= self.cache_bytes:
                return
            entry = self._cache[key]
            if not entry.future.done() or key == next(reversed(self._cache)):
                continue  # in flight, or the newest (kept even when alone over the bound)
            del self._cache[key]
            self.num_bytes -= entry.num_bytes

    def clear(self) -> None:
        """Forget every finished grammar and every cached mask row (FlushCache); compiles in flight stay."""
        with self._lock:
            for key, entry in list(self._cache.items()):
                if entry.future.done():
                    del self._cache[key]
            self.num_bytes = 0
            self.mask_cache.clear()

    def compile(self, kind: str, spec: str) -> CompiledGrammar:
        """Blocking compile (through the cache)."""
        return self.submit(kind, spec).result()

    def _compile(self, kind: str, spec: str, cancel: threading.Event | None = None) -> CompiledGrammar:
        grammar_id = next(self._grammar_ids)  # atomic under the GIL
        self.num_compiles += 1
        regexes = json_schema_regexes(spec) if kind == "json_schema" else None
        if regexes is None or not regexes.bounds:
            regex = regexes.exact if regexes is not None else grammar_regex(kind, spec)
            index, num_bytes = build_index_sized(regex, self.vocab, self.sandbox, cancel)
            return CompiledGrammar(grammar_id=grammar_id, index=index, mask_cache=self.mask_cache,
                                   num_bytes=num_bytes)
        # Bounded strings: index the unbounded regex (in the sandbox, so a pathological schema fails
        # there first), then label its marked twin; if counting cannot be exact, index the bounded regex.
        index, num_bytes = build_index_sized(regexes.unbounded, self.vocab, self.sandbox, cancel)
        try:
            bounded = analyze(regexes.marked, regexes.bounds, self.vocab)
        except BoundedUnsupported:
            index, num_bytes = build_index_sized(regexes.exact, self.vocab, self.sandbox, cancel)
            return CompiledGrammar(grammar_id=grammar_id, index=index, mask_cache=self.mask_cache,
                                   num_bytes=num_bytes)
        return CompiledGrammar(grammar_id=grammar_id, index=index, mask_cache=self.mask_cache,
                               num_bytes=num_bytes + bounded.num_bytes, bounded=bounded)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
        if self.sandbox is not None:
            self.sandbox.close()


def _run_inline(function: Any, *args: Any) -> Future:
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as error:  # noqa: BLE001 - delivered through the future, as the pool does
        future.set_exception(error)
    return future


# --------------------------------------------------------------------------
# Step 3: one request's cursor
# --------------------------------------------------------------------------


class GrammarState:
    """A request's position in its grammar: writes its mask row, advances by sampled tokens.

    ``finished`` becomes True once a stop token was accepted; ``broken`` when a
    token the grammar forbids was fed (then only the stop tokens stay allowed,
    so the request ends instead of producing invalid output).
    """

    def __init__(self, grammar: CompiledGrammar, vocab: TokenVocab) -> None:
        self.grammar = grammar
        self.guide = Guide(grammar.index, max_rollback=0)
        self.vocab = vocab
        self.finished = False
        self.broken = False
        self.num_tokens = 0
        bounded = grammar.bounded
        self.string_state = bounded.initial if bounded is not None else -1  # state of the marked byte automaton
        self.string_len = 0  # characters so far in the bounded string being written

    @property
    def accepting(self) -> bool:
        """True when the text so far is a complete match (stop tokens allowed)."""
        return self.broken or self.guide.is_finished()

    def write_mask(self, row: torch.Tensor | np.ndarray, vocab_size: int) -> None:
        """Fill ``row`` (contiguous CPU int32/uint32, ceil(vocab_size/32) words) with the allowed tokens.

        Ids at or past ``vocab_size`` stay cleared even if the tokenizer knows them.
        A numpy row (a view of the batch bitmask) skips torch's per-view overhead.
        """
        bits = (row.numpy() if isinstance(row, torch.Tensor) else row).view(np.uint32)
        if not bits.flags.c_contiguous or bits.size * BITS_PER_WORD < vocab_size:
            raise ValueError(f"mask row must be contiguous with >= {bitmask_words(vocab_size)} words, "
                             f"got {bits.size}")
        if self.broken or self.finished:
            bits[:] = 0
        else:
            self._write_grammar_bits(bits, vocab_size)
        if self.accepting or self.finished:
            for stop_id in self.vocab.stop_token_ids:
                if stop_id < vocab_size:
                    bits[stop_id // BITS_PER_WORD] |= np.uint32(1 << (stop_id % BITS_PER_WORD))

    def _write_grammar_bits(self, bits: np.ndarray, vocab_size: int) -> None:
        cache = self.grammar.mask_cache
        bounded = self.grammar.bounded
        key = (self.grammar.grammar_id, self._state_key(), vocab_size)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            bits[:] = cached
            return
        tokenizer_words = bitmask_words(self.vocab.tokenizer_size)
        if bounded is not None:  # the Index's row (cached per Index state) AND the length rule
            allowed = self._index_bits(tokenizer_words) & bounded.allowed_words(self.string_state, self.string_len)
            words = min(bits.size, tokenizer_words)
            bits[:words] = allowed[:words]
            bits[words:] = 0
        elif bits.size >= tokenizer_words:
            self.guide.write_mask_into(bits.ctypes.data, bits.size, 4)
        else:  # outlines writes by token id: give it room for every id, keep the model's part
            scratch = np.empty(tokenizer_words, dtype=np.uint32)
            self.guide.write_mask_into(scratch.ctypes.data, scratch.size, 4)
            bits[:] = scratch[: bits.size]
        if self.vocab.tokenizer_size > vocab_size:
            _clear_from(bits, vocab_size)
        if cache is not None:
            cache.put(key, bits)

    def _state_key(self) -> Any:
        """What the mask row depends on: the Index state, plus the bounded-string state and count."""
        bounded = self.grammar.bounded
        if bounded is None:
            return self.guide.get_state()
        current = int(bounded.string_of[self.string_state])
        length = self.string_len if current >= 0 else 0
        if current >= 0 and bounded.max_len[current] == bounded.max_len[-1]:  # no maxLength: only min matters
            length = min(length, int(bounded.min_len[current]))
        return self.guide.get_state(), self.string_state, length

    def _index_bits(self, words: int) -> np.ndarray:
        """The Index's packed row for the tokenizer's ids (cached per Index state)."""
        cache = self.grammar.mask_cache
        key = (self.grammar.grammar_id, ("index", self.guide.get_state()), -1)
        cached = cache.get(key) if cache is not None else None
        if cached is not None:
            return cached
        row = np.empty(words, dtype=np.uint32)
        self.guide.write_mask_into(row.ctypes.data, row.size, 4)
        if cache is not None:
            cache.put(key, row)
        return row

    def advance(self, token_id: int) -> None:
        """Feed the sampled token (a stop token in an accepting state finishes the grammar)."""
        if self.finished or self.broken:
            return
        self.num_tokens += 1
        if token_id in self.vocab.stop_token_ids and self.guide.is_finished():
            self.finished = True
            return
        try:  # return_tokens=False: the default builds a list of every allowed id (ms at 150k)
            self.guide.advance(token_id, return_tokens=False)
        except ValueError:
            self.broken = True
            return
        bounded = self.grammar.bounded
        if bounded is not None:
            data = bounded.tables.token_bytes[token_id] if token_id < len(bounded.tables.token_bytes) else None
            walked = bounded.advance(self.string_state, self.string_len, data) if data is not None else None
            if walked is None:  # a token the length rule forbids (never one from our mask)
                self.broken = True
            else:
                self.string_state, self.string_len = walked

    def allowed_token_ids(self) -> list[int]:
        """Allowed ids in the current state (slow path for tests and debugging)."""
        if self.broken or self.finished:
            return list(self.vocab.stop_token_ids)
        if self.grammar.bounded is not None:
            row = np.zeros(bitmask_words(self.vocab.tokenizer_size), dtype=np.uint32)
            self.write_mask(row, self.vocab.tokenizer_size)
            bits = np.unpackbits(row.view(np.uint8), bitorder="little")
            return np.nonzero(bits)[0].tolist()
        allowed = set(self.guide.get_tokens())
        allowed.discard(self.vocab.eos_token_id)
        if self.guide.is_finished():
            allowed.update(self.vocab.stop_token_ids)
        return sorted(allowed)


def _clear_from(bits: np.ndarray, first_token_id: int) -> None:
    """Clear every bit for ids >= first_token_id in a uint32 word view."""
    word, bit = divmod(first_token_id, BITS_PER_WORD)
    if bit:
        bits[word] &= np.uint32((1 << bit) - 1)
        word += 1
    bits[word:] = 0
