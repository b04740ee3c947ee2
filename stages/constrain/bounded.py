"""Bounded JSON strings (minLength/maxLength) counted beside the automaton.

outlines renders ``{"type": "string", "maxLength": 200}`` as the bounded
repeat ``"(char){0,200}"``: its automaton has a state per count (times the
UTF-8 and escape sub-states), and outlines-core walks the whole vocabulary
from every state, so the compile takes minutes on a 150k vocabulary. Here
the token automaton (the outlines ``Index``) is built for the *unbounded*
body ``"(char)*"`` (fast), and the characters of each bounded string are
counted outside it:

* **Which string are we in?** ``schema.py`` also renders a *marked* regex in
  which bounded string N opens with ``"\\x01N\\x02``. Compiled against a
  256-token vocabulary (one token per byte: milliseconds), it gives a byte
  automaton ``M``. A walk of all of ``M`` labels every state with the bounded
  string whose body it is in (or -1) and whether the next byte starts a
  character (the lexer: ``\\`` starts a two-byte escape, a UTF-8 lead byte a
  multi-byte character). A state reached with two labels (two strings with
  one automaton state, e.g. ``anyOf`` of two bounded strings) or a marker
  that is not the only way on makes ``analyze`` raise ``BoundedUnsupported``;
  the compiler then builds the exact bounded regex as before, so the result
  is always exact.
* **Grammar state** = (Index state, ``M`` state, characters so far in the
  current bounded string). Markers are never in the text: a walk jumps over
  one as soon as it reaches a state whose only way on is a marker.
* **Mask** = the Index's allowed tokens AND the count rule. Tokens with no
  ``"`` or ``\\`` byte (most of a vocabulary) cannot leave or open a string,
  so they only add characters: per vocabulary, once, each such token's
  character count (UTF-8 continuation bytes count 0) and packed rows "count
  <= t". The few tokens with a quote or backslash are walked through ``M``
  (vectorised with numpy, once per ``M`` state): characters before leaving
  the current string, whether they leave it, and whether every string they
  open or close on the way stays within its bounds. Closing is allowed only
  at ``minLength`` or more.
* **advance** walks the one sampled token's bytes through ``M``.

Exactness needs a way out of every state: the vocabulary must hold the
printable ASCII bytes as single tokens (a character to reach minLength, a
``"`` to close at maxLength), else ``BoundedUnsupported``.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from outlines_core import Index, Vocabulary

from stages.constrain.bitmask import BITS_PER_WORD, bitmask_words
from stages.constrain.vocab import TokenVocab

QUOTE, BACKSLASH, MARK_OPEN, MARK_CLOSE = 0x22, 0x5C, 0x01, 0x02
UNBOUNDED = 1 << 62  # maxLength of a string with only a minLength
# Roles of a byte position inside a bounded body (the JSON string lexer).
LOOP, ESCAPE, PENDING_1, PENDING_2, PENDING_3 = 0, 1, 2, 3, 4


class BoundedUnsupported(ValueError):
    """The schema's bounded strings cannot be counted exactly (compile the bounded regex instead)."""


# --------------------------------------------------------------------------
# Per vocabulary: token bytes split into plain tokens and quote/backslash tokens
# --------------------------------------------------------------------------


@dataclass
class TokenTables:
    """Per-token facts of one vocabulary (built once, kept on the TokenVocab)."""

    num_words: int  # packed row length for the tokenizer's ids
    plain_rows: np.ndarray  # [max_chars + 1, num_words] uint32: plain tokens with <= t characters
    special_ids: np.ndarray  # [S] ids of tokens holding '"' or '\\', longest first
    special_bytes: np.ndarray  # [S, max_len] uint8, zero padded
    active: np.ndarray  # [max_len]: how many special tokens are longer than j bytes
    token_bytes: list[bytes | None]  # id -> bytes (None: no text)
    single_byte_ascii: bool  # every printable ASCII byte is a token of its own

    @property
    def max_chars(self) -> int:
        return self.plain_rows.shape[0] - 1


def _pack(ids: np.ndarray, num_words: int) -> np.ndarray:
    words = np.zeros(num_words, dtype=np.uint32)
    np.bitwise_or.at(words, ids // BITS_PER_WORD, (np.uint32(1) << (ids % BITS_PER_WORD).astype(np.uint32)))
    return words


def token_tables(vocab: TokenVocab) -> TokenTables:
    """The TokenTables of ``vocab``, computed on first use and cached on it."""
    return vocab.derived("bounded_token_tables", _build_token_tables)


def _build_token_tables(vocab: TokenVocab) -> TokenTables:
    num_words = bitmask_words(vocab.tokenizer_size)
    by_id: list[bytes | None] = [None] * vocab.tokenizer_size
    for data, ids in vocab.token_bytes.items():
        for token_id in ids:
            by_id[token_id] = data
    datas = list(vocab.token_bytes)
    max_len = max(len(d) for d in datas)
    matrix = np.zeros((len(datas), max_len), dtype=np.uint8)
    lengths = np.fromiter((len(d) for d in datas), dtype=np.int64, count=len(datas))
    flat = np.frombuffer(b"".join(datas), dtype=np.uint8)
    rows = np.repeat(np.arange(len(datas)), lengths)
    cols = np.arange(flat.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    matrix[rows, cols] = flat
    in_token = np.arange(max_len)[None, :] < lengths[:, None]
    special = ((matrix == QUOTE) | (matrix == BACKSLASH)).any(axis=1)
    chars = (in_token & ((matrix & 0xC0) != 0x80)).sum(axis=1)  # UTF-8 continuation bytes count 0
    counts = np.fromiter((len(vocab.token_bytes[d]) for d in datas), dtype=np.int64, count=len(datas))
    ids = np.fromiter((i for d in datas for i in vocab.token_bytes[d]), dtype=np.int64, count=int(counts.sum()))
    id_special, id_chars = np.repeat(special, counts), np.repeat(chars, counts)
    plain_ids, plain_chars = ids[~id_special], id_chars[~id_special]
    max_chars = int(plain_chars.max(initial=0))
    order = np.argsort(plain_chars, kind="stable")
    plain_rows = np.zeros((max_chars + 1, num_words), dtype=np.uint32)
    row = np.zeros(num_words, dtype=np.uint32)
    start = 0
    for t in range(max_chars + 1):  # row t = row t-1 plus the tokens of exactly t characters
        stop = int(np.searchsorted(plain_chars[order], t, side="right"))
        row |= _pack(plain_ids[order[start:stop]], num_words)
        plain_rows[t] = row
        start = stop
    special_datas = sorted((d for d, s in zip(datas, special) if s), key=len, reverse=True)
    special_ids = [i for d in special_datas for i in vocab.token_bytes[d]]
    special_data_of_id = [d for d in special_datas for _ in vocab.token_bytes[d]]
    special_bytes = np.zeros((len(special_ids), max(map(len, special_datas), default=1)), dtype=np.uint8)
    for i, data in enumerate(special_data_of_id):
        special_bytes[i, : len(data)] = np.frombuffer(data, dtype=np.uint8)
    special_lens = np.array([len(d) for d in special_data_of_id], dtype=np.int64)
    active = np.array([(special_lens > j).sum() for j in range(special_bytes.shape[1])], dtype=np.int64)
    single = all(bytes([b]) in vocab.token_bytes for b in range(0x20, 0x7F))
    return TokenTables(num_words=num_words, plain_rows=plain_rows, special_ids=np.array(special_ids, dtype=np.int64),
                       special_bytes=special_bytes, active=active, token_bytes=by_id, single_byte_ascii=single)


# --------------------------------------------------------------------------
# Per grammar: the marked byte automaton, labelled
# --------------------------------------------------------------------------


@dataclass
class BoundedStrings:
    """The labelled byte automaton ``M`` of a schema's marked regex (see the module docstring).

    Row ``dead`` of every table is a sink: a byte ``M`` forbids leads there.
    """

    transitions: np.ndarray  # [S + 1, 256] int32
    string_of: np.ndarray  # [S + 1] int32: bounded string whose body the state is in, -1 outside
    role: np.ndarray  # [S + 1] int8: lexer role inside a body (LOOP: the next byte starts a character)
    past_marker: np.ndarray  # [S + 1] int32: state after the marker that must follow, -1 if none
    min_len: np.ndarray  # [K + 1] int64 (entry K, read by index -1, is a harmless 0)
    max_len: np.ndarray  # [K + 1] int64
    initial: int
    dead: int
    tables: TokenTables
    _walks: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False)

    @property
    def num_bytes(self) -> int:
        return self.transitions.nbytes + 3 * self.string_of.nbytes

    # ------------------------------------------------------------ one token

    def advance(self, state: int, count: int, data: bytes) -> tuple[int, int] | None:
        """(state, count) after ``data``, or None if ``M`` or a bound forbids it."""
        string_of, table = self.string_of, self.transitions
        for byte in data:
            before = int(string_of[state])
            nxt = int(table[state, byte])
            if nxt == self.dead:
                return None
            if self.past_marker[nxt] >= 0:
                nxt = int(self.past_marker[nxt])
            after = int(string_of[nxt])
            if before >= 0 and after == before:
                count += int(self.role[state] == LOOP)
                if count > self.max_len[after]:
                    return None
            else:
                if before >= 0 and count < self.min_len[before]:
                    return None
                count = 0
            state = nxt
        return state, count

    # ------------------------------------------------------------ masks

    def allowed_words(self, state: int, count: int) -> np.ndarray:
        """Packed row (tokenizer ids) of the tokens the bounds allow from (state, count).

        AND it with the Index's row: this row says nothing about the grammar
        outside bounded strings except for tokens holding a quote or backslash.
        """
        tables = self.tables
        current = int(self.string_of[state])
        if current < 0:
            plain = tables.plain_rows[-1]
        else:  # an escape's second byte is no new character
            room = int(self.max_len[current]) - count + int(self.role[state] == ESCAPE)
            plain = tables.plain_rows[min(room, tables.max_chars)] if room >= 0 else None
        ok, first, leaves = self._walk(state)
        if current >= 0:
            total = count + first
            ok = ok & (total <= self.max_len[current]) & (~leaves | (total >= self.min_len[current]))
        row = _pack(tables.special_ids[ok], tables.num_words)
        if plain is not None:
            row |= plain
        return row

    def _walk(self, start: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For every quote/backslash token from ``start``: (valid, characters added to the current
        string before leaving it, leaves it). Valid: ``M`` accepts its bytes and every bounded string
        it opens later stays within bounds. Cached per state."""
        cached = self._walks.get(start)
        if cached is not None:
            return cached
        tables = self.tables
        num = tables.special_ids.size
        state = np.full(num, start, dtype=np.int64)
        in_first = np.full(num, self.string_of[start] >= 0)
        first = np.zeros(num, dtype=np.int64)
        count = np.zeros(num, dtype=np.int64)
        ok = np.ones(num, dtype=bool)
        for j, live in enumerate(tables.active):
            s = state[:live]
            before = self.string_of[s]
            nxt = self.transitions[s, tables.special_bytes[:live, j]]
            marker = self.past_marker[nxt]
            nxt = np.where(marker >= 0, marker, nxt)
            after = self.string_of[nxt]
            stays = (before >= 0) & (after == before)
            adds = stays & (self.role[s] == LOOP)
            infirst = in_first[:live]
            first[:live] += adds & infirst
            leaves_later = (before >= 0) & ~stays & ~infirst
            ok[:live] &= ~leaves_later | (count[:live] >= self.min_len[before])
            infirst &= stays
            in_first[:live] = infirst
            count[:live] = np.where(stays, count[:live] + adds, 0)
            ok[:live] &= infirst | (count[:live] <= self.max_len[after]) | (after < 0)
            ok[:live] &= nxt != self.dead
            state[:live] = nxt
        leaves = (self.string_of[start] >= 0) & ~in_first
        result = (ok, first, leaves)
        self._walks[start] = result
        return result


def _lex(role: int, byte: int) -> int | None:
    """Next lexer role inside a string body after ``byte`` (None: leaves the body or is not JSON)."""
    if role == LOOP:
        if byte == QUOTE:
            return None
        if byte == BACKSLASH:
            return ESCAPE
        if byte < 0x80:
            return LOOP
        if 0xC2 <= byte <= 0xDF:
            return PENDING_1
        if 0xE0 <= byte <= 0xEF:
            return PENDING_2
        if 0xF0 <= byte <= 0xF4:
            return PENDING_3
        raise BoundedUnsupported(f"byte {byte:#x} starts no UTF-8 character")
    if role == ESCAPE:
        return LOOP
    if 0x80 <= byte <= 0xBF:
        return LOOP if role == PENDING_1 else role - 1
    raise BoundedUnsupported(f"byte {byte:#x} inside a UTF-8 character")


def _byte_vocabulary() -> Vocabulary:
    return Vocabulary(256, {bytes([b]): [b] for b in range(256)})


def _dense_table(index: Index) -> tuple[np.ndarray, int]:
    """[S + 1, 256] byte transitions with dense state numbers (row S: dead sink), and the initial state."""
    transitions = index.get_transitions()
    initial = index.get_initial_state()
    names = sorted({initial, *transitions, *(t for row in transitions.values() for t in row.values())})
    number = {name: i for i, name in enumerate(names)}
    dead = len(names)
    table = np.full((dead + 1, 256), dead, dtype=np.int32)
    for name, row in transitions.items():
        for token, target in row.items():
            if token < 256:  # token 256 is the byte vocabulary's EOS
                table[number[name], token] = number[target]
    return table, number[initial]


def _markers(table: np.ndarray, dead: int) -> tuple[np.ndarray, np.ndarray]:
    """(string number, state past the marker) for each state whose way on is a marker, else -1."""
    marker_of = np.full(dead + 1, -1, dtype=np.int32)
    past = np.full(dead + 1, -1, dtype=np.int32)
    for state in np.nonzero(table[:, MARK_OPEN] != dead)[0]:
        if (table[state] != dead).sum() != 1:
            raise BoundedUnsupported("a bounded string shares its opening quote with other text")
        cursor, digits = int(table[state, MARK_OPEN]), ""
        while True:
            ways = np.nonzero(table[cursor] != dead)[0]
            if len(ways) != 1 or len(digits) > 9:
                raise BoundedUnsupported("two bounded strings open at one automaton state")
            byte = int(ways[0])
            cursor = int(table[cursor, byte])
            if byte == MARK_CLOSE and digits:
                break
            if not 0x30 <= byte <= 0x39:
                raise BoundedUnsupported("a bounded string marker is not followed as written")
            digits += chr(byte)
        marker_of[state], past[state] = int(digits), cursor
    return marker_of, past


def analyze(marked_regex: str, bounds: tuple[tuple[int, int | None], ...], vocab: TokenVocab) -> BoundedStrings:
    """Label the marked regex's byte automaton; BoundedUnsupported when counting would not be exact."""
    tables = token_tables(vocab)
    if not tables.single_byte_ascii:
        raise BoundedUnsupported("the vocabulary lacks single-byte ASCII tokens")
    try:
        index = Index(marked_regex, _byte_vocabulary())
    except ValueError as error:
        raise BoundedUnsupported(f"marked regex: {error}") from None
    table, initial = _dense_table(index)
    dead = table.shape[0] - 1
    marker_of, past = _markers(table, dead)
    string_of = np.full(dead + 1, -1, dtype=np.int32)
    role = np.full(dead + 1, -1, dtype=np.int8)
    labels: dict[int, tuple[int, int]] = {initial: (-1, -1)}
    frontier = [initial]
    while frontier:
        state = frontier.pop()
        current, at = labels[state]
        for byte in np.nonzero(table[state] != dead)[0].tolist():
            nxt = int(table[state, byte])
            label = (-1, -1)
            if current >= 0:
                lexed = _lex(at, byte)
                label = (current, lexed) if lexed is not None else (-1, -1)
            if label[0] < 0 and marker_of[nxt] >= 0:
                label, nxt = (int(marker_of[nxt]), LOOP), int(past[nxt])
            if nxt not in labels:
                labels[nxt] = label
                frontier.append(nxt)
            elif labels[nxt] != label:
                raise BoundedUnsupported("one automaton state lies in two different strings")
    for state, (current, at) in labels.items():
        string_of[state], role[state] = current, at
    if string_of.max(initial=-1) >= len(bounds):
        raise BoundedUnsupported("a marker names no bounded string")
    min_len = np.array([low for low, _ in bounds] + [0], dtype=np.int64)
    max_len = np.array([UNBOUNDED if high is None else high for _, high in bounds] + [UNBOUNDED], dtype=np.int64)
    return BoundedStrings(transitions=table, string_of=string_of, role=role, past_marker=past, min_len=min_len,
                          max_len=max_len, initial=initial, dead=dead, tables=tables)
