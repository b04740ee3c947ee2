"""Detokenize stage: token ids -> text deltas, UTF-8 safe, with stop strings.

Inbox ``DetokenizeInbox``: TokenOutputBatch and ErrorOutput from schedule,
``TokenizedRequest`` copies from the tokenize stage (they register each
sequence's stop strings and decoding options before its first token) and
EngineStats and ProcessCounters to relay; outboxes (``DetokenizeOutboxes``):

* ``out`` -> ingest: one ``TextOutput`` per sequence per step (the last one
  carries ``finish_reason``); every ``ErrorOutput``, ``EngineStats`` (the
  schedule stage's snapshot) and ``ProcessCounters`` (each process runner's)
  passed through;
* ``abort`` -> tokenize (and on, down the request path, to schedule):
  ``Abort(rid, reason="stop")`` the moment a stop string matches, so the
  engine stops spending steps (and frees the KV) on a sequence whose client
  already has its answer.

Incremental decoding (the offset-window method of vLLM/SGLang)
----------------------------------------------------------------
A token may end in the middle of a multi-byte character (byte-level BPE splits
``"😀"`` into 4 byte tokens). Each step decodes a short window of ids twice::

    ids:            ... | prefix_offset ........ read_offset ........ len(ids)
    prefix_text  = decode(ids[prefix_offset:read_offset])      # already sent
    window_text  = decode(ids[prefix_offset:])                 # sent + new
    delta        = window_text[len(prefix_text):]

If ``window_text`` ends in U+FFFD the last character is incomplete: send
nothing and wait for more ids. Decoding from ``prefix_offset`` (one emission
back) instead of ``read_offset`` keeps tokenizers that drop a leading space at
the start of a decode (SentencePiece) correct. Each step costs a window of a
few tokens, not the whole sequence; when the sequence ends, the remainder is
taken from one full decode, so the deltas concatenate exactly to
``decode(all ids)``.

Stop strings
------------
Text that could be the start of a stop string is held back (never streamed)
until it either completes a stop string or stops matching. On a match the
output is cut before the stop string (kept with ``no_stop_trim``), the
sequence finishes with ``FinishReason(type="stop", matched=stop_string)``, an
``Abort`` goes to the schedule stage, and later outputs for that sequence are
ignored. A stop *token* (``matched`` an int) is dropped from the text unless
``no_stop_trim``.

Stop regexes (``stop_regex``) are searched on the released text the same
way; a match ends the sequence with ``matched`` set to the pattern and cuts
the text at the match (kept with ``no_stop_trim``). Text is not held back
for them (see ``StopRegexMatcher``).

State owned: one ``SequenceState`` per live sequence, the registered decoding
options, and a bounded set of sequences finished here by a stop string. The
tokenizer is the one the assembly loaded; this stage never loads one.
"""
from __future__ import annotations

import dataclasses
import re
from collections import OrderedDict
from typing import Any

import msgspec

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, DetokenizeInbox, EngineStats, ErrorOutput, FinishReason, ProcessCounters,
                               SamplingParams, TextOutput, TokenizedRequest, TokenOutput, TokenOutputBatch)
from pipeline.stage import Outbox, Outboxes, Stage
from stages.tokenizer import special_token_ids

REPLACEMENT_CHAR = "\ufffd"
MAX_REMEMBERED_STOPPED = 65536


class DecodeOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The part of SamplingParams the detokenizer needs."""

    stop: list[str] = []
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False
    stop_regex: list[str] = []

    @classmethod
    def from_sampling(cls, sampling: SamplingParams) -> "DecodeOptions":
        return cls(stop=list(sampling.stop), skip_special_tokens=sampling.skip_special_tokens,
                   spaces_between_special_tokens=sampling.spaces_between_special_tokens,
                   no_stop_trim=sampling.no_stop_trim, stop_regex=list(sampling.stop_regex))


def decode_ids(tokenizer: Any, ids: list[int], skip_special_tokens: bool = True,
               spaces_between_special_tokens: bool = True, special_ids: frozenset[int] | None = None) -> str:
    """The reference decode that the incremental detokenizer reproduces delta by delta.

    With special tokens kept and ``spaces_between_special_tokens``, each special
    token and each run of ordinary tokens are decoded apart and joined by one
    space (SGLang/vLLM behaviour); otherwise it is ``tokenizer.decode``.
    """
    if skip_special_tokens or not spaces_between_special_tokens:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    special_ids = special_token_ids(tokenizer) if special_ids is None else special_ids
    parts, run = [], []
    for token_id in ids:
        if token_id in special_ids:
            if run:
                parts.append(tokenizer.decode(run))
                run = []
            parts.append(tokenizer.decode([token_id], skip_special_tokens=False))
        else:
            run.append(token_id)
    if run:
        parts.append(tokenizer.decode(run))
    return " ".join(parts)


class IncrementalDetokenizer:
    """Ids in, text deltas out; never emits half a character (usable without any stage)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, special_ids: frozenset[int] | None = None) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.spaces_between_special_tokens = spaces_between_special_tokens
        self.special_ids = special_token_ids(tokenizer) if special_ids is None else special_ids
        self.ids: list[int] = []
        self.prefix_offset = 0  # start of the decode window
        self.read_offset = 0  # ids before this are already in self.text
        self.text = ""  # everything emitted so far

    def _decode(self, ids: list[int]) -> str:
        return decode_ids(self.tokenizer, ids, self.skip_special_tokens, self.spaces_between_special_tokens,
                          self.special_ids)

    def add(self, new_ids: list[int]) -> str:
        """Append ids; return the newly complete text ("" while a character is incomplete)."""
        self.ids.extend(new_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset:self.read_offset])
        window_text = self._decode(self.ids[self.prefix_offset:])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""
        if not window_text.startswith(prefix_text):  # a decoder rewrote earlier text: resync on finish
            return ""
        delta = window_text[len(prefix_text):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        self.text += delta
        return delta

    def finish(self) -> str:
        """The rest of the text, so that all deltas together equal decode(all ids)."""
        full_text = self._decode(self.ids)
        if full_text.startswith(self.text):
            delta = full_text[len(self.text):]
        else:  # cannot happen for prefix-consistent decoders; never resend text
            window_text = self._decode(self.ids[self.prefix_offset:])
            delta = window_text[len(self._decode(self.ids[self.prefix_offset:self.read_offset])):]
        self.text += delta
        self.prefix_offset = self.read_offset = len(self.ids)
        return delta


class StopStringMatcher:
    """Finds the first stop string in streamed text; holds back a possible stop-string prefix."""

    def __init__(self, stop: list[str], no_stop_trim: bool = False) -> None:
        self.stop = list(stop)
        self.no_stop_trim = no_stop_trim
        self.held = ""  # text not yet released: it may start a stop string

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to release, matched stop string or None)."""
        if not self.stop:
            return text, None
        pending = self.held + text
        match_at, matched = _first_match(pending, self.stop)
        if matched is not None:
            self.held = ""
            end = match_at + len(matched) if self.no_stop_trim else match_at
            return pending[:end], matched
        hold = _longest_stop_prefix_suffix(pending, self.stop)
        self.held = pending[len(pending) - hold:] if hold else ""
        return pending[:len(pending) - hold], None

    def flush(self) -> str:
        """The held text, released when the sequence ends for another reason."""
        held, self.held = self.held, ""
        return held


class StopRegexMatcher:
    """Finds the first match of any stop regex in the text generated so far (SGLang's stop_regex).

    Each new piece of text is searched together with the text before it, up
    to ``lookback_chars`` back, so a match may span several deltas. Unlike a
    stop string, nothing is held back: a regex has no finite set of prefixes,
    so text already released stays released even when a later match starts
    inside it (only the unreleased part can still be trimmed).
    """

    def __init__(self, patterns: list[str], no_stop_trim: bool = False, lookback_chars: int = 1024) -> None:
        self.patterns = [(pattern, re.compile(pattern)) for pattern in patterns]
        self.no_stop_trim = no_stop_trim
        self.lookback_chars = lookback_chars
        self.tail = ""  # the last released text: lookback_chars of it, plus one char once cut
        self.cut = False  # tail starts inside the text (its first char only gives context to ^ and \b)

    def feed(self, text: str) -> tuple[str, str | None]:
        """Return (text safe to release, the pattern that matched or None)."""
        if not self.patterns or not text:
            return text, None
        released = len(self.tail)
        whole = self.tail + text
        best: tuple[int, int, str] | None = None
        for pattern, compiled in self.patterns:
            found = compiled.search(whole, 1 if self.cut else 0)
            if found is not None and found.end() > released and (best is None or found.start() < best[0]):
                best = (found.start(), found.end(), pattern)
        end = len(whole) if best is None else best[1] if self.no_stop_trim else max(best[0], released)
        self._keep(whole[:end])
        return whole[released:end], None if best is None else best[2]

    def _keep(self, text: str) -> None:
        if len(text) > self.lookback_chars + 1:
            text, self.cut = text[-(self.lookback_chars + 1):], True
        self.tail = text


def _first_match(text: str, stops: list[str]) -> tuple[int, str | None]:
    best_at, best = len(text) + 1, None
    for stop in stops:
        at = text.find(stop)
        if at != -1 and at < best_at:
            best_at, best = at, stop
    return best_at, best


def _longest_stop_prefix_suffix(text: str, stops: list[str]) -> int:
    """Length of the longest suffix of text that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


class SequenceState:
    """Decoding state of one live sequence."""

    def __init__(self, tokenizer: Any, options: DecodeOptions, special_ids: frozenset[int]) -> None:
        self.options = options
        self.detokenizer = IncrementalDetokenizer(tokenizer, options.skip_special_tokens,
                                                  options.spaces_between_special_tokens, special_ids)
        self.stops = StopStringMatcher(options.stop, options.no_stop_trim)
        self.regexes = StopRegexMatcher(options.stop_regex, options.no_stop_trim)

    def step(self, output: TokenOutput) -> tuple[str, FinishReason | None]:
        """Text to release for this output and the (possibly new) finish reason."""
        finish = output.finish_reason
        ids = list(output.new_token_ids)
        if (finish is not None and finish.type == "stop" and isinstance(finish.matched, int)
                and not self.options.no_stop_trim and ids and ids[-1] == finish.matched):
            ids = ids[:-1]  # the stop token is not part of the answer
        text = self.detokenizer.add(ids)
        if finish is not None:
            text += self.detokenizer.finish()
        released, matched = self.stops.feed(text)
        if finish is not None and matched is None:
            released += self.stops.flush()
        released, matched_regex = self.regexes.feed(released)
        if matched_regex is not None:
            return released, FinishReason(type="stop", matched=matched_regex)
        if matched is not None:
            return released, FinishReason(type="stop", matched=matched)
        return released, finish


@dataclasses.dataclass(frozen=True)
class DetokenizeOutboxes(Outboxes):
    out: Outbox[TextOutput | ErrorOutput | EngineStats | ProcessCounters]  # -> ingest
    abort: Outbox[Abort]  # -> tokenize: a stop string ended the sequence


class DetokenizeStage(Stage):
    """TokenOutputBatch -> TextOutput per sequence; stop strings -> Abort(reason="stop") upstream."""

    Inbox = DetokenizeInbox
    Outboxes = DetokenizeOutboxes
    outboxes: DetokenizeOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: DetokenizeOutboxes | dict[str, Channel | None], *, tokenizer: Any) -> None:
        super().__init__("detokenize", inbox, outboxes)
        self.tokenizer = tokenizer
        self.special_ids = special_token_ids(tokenizer)
        self.options: dict[str, DecodeOptions] = {}
        self.prompt_ids: dict[str, list[int]] = {}  # return_token_ids: sent with the first output
        self.sequences: dict[str, SequenceState] = {}
        self.stopped: OrderedDict[str, None] = OrderedDict()  # finished here; ignore later outputs

    def register(self, rid: str, sampling: SamplingParams, prompt_ids: list[int] | None = None) -> None:
        """Remember a sequence's stop strings and decoding options (before its first token), and its
        prompt ids when ``return_token_ids`` asks for them on the first output."""
        self.options[rid] = DecodeOptions.from_sampling(sampling)
        if sampling.return_token_ids and prompt_ids is not None:
            self.prompt_ids[rid] = list(prompt_ids)

    def handle(self, message: DetokenizeInbox) -> None:
        match message:
            case TokenOutputBatch():
                for output in message.outputs:
                    self._handle_output(output)
            case ErrorOutput():
                self._forget(message.rid)
                self.outboxes.out.put(message)
            case EngineStats() | ProcessCounters():  # snapshots riding this channel to ingest
                self.outboxes.out.put(message)
            case TokenizedRequest():
                self.register(message.rid, message.sampling, message.input_ids)
            case _:
                raise TypeError(f"detokenize stage got an unexpected {type(message).__name__}")

    def _handle_output(self, output: TokenOutput) -> None:
        if output.rid in self.stopped:
            if output.finish_reason is not None:
                del self.stopped[output.rid]
            return
        state = self.sequences.get(output.rid)
        if len(output.new_token_ids) > 1 and not output.token_logprobs and _watches_text(
                state.options if state is not None else self.options.get(output.rid)):
            for single in _one_token_each(output):  # a stop string cuts a multi-token output exactly
                self._handle_output(single)
            return
        if state is None:
            options = self.options.pop(output.rid, None) or DecodeOptions()
            state = self.sequences[output.rid] = SequenceState(self.tokenizer, options, self.special_ids)
        text, finish = state.step(output)
        self.outboxes.out.put(_text_output(output, text, finish, self.prompt_ids.pop(output.rid, [])))
        if finish is not None:
            del self.sequences[output.rid]
            if output.finish_reason is None:  # we ended it: tell the engine, ignore the rest
                self._remember_stopped(output.rid)
                self.outboxes.abort.put(Abort(rid=output.rid, reason="stop"))

    def _remember_stopped(self, rid: str) -> None:
        self.stopped[rid] = None
        while len(self.stopped) > MAX_REMEMBERED_STOPPED:
            self.stopped.popitem(last=False)

    def _forget(self, rid: str) -> None:
        for table in (self.options, self.sequences, self.prompt_ids):
            for key in [k for k in table if k == rid or k.startswith(rid + ".")]:
                del table[key]

    def close(self) -> None:
        self.sequences.clear()
        self.options.clear()
        self.prompt_ids.clear()


def _watches_text(options: DecodeOptions | None) -> bool:
    return options is not None and bool(options.stop or options.stop_regex)


def _one_token_each(output: TokenOutput) -> list[TokenOutput]:
    """A multi-token output (a verified speculative run) as one output per token; the last
    keeps the finish reason."""
    ids = output.new_token_ids
    return [msgspec.structs.replace(output, new_token_ids=[token], completion_tokens=output.completion_tokens
                                    - (len(ids) - 1 - k), finish_reason=output.finish_reason
                                    if k == len(ids) - 1 else None)
            for k, token in enumerate(ids)]


def _text_output(output: TokenOutput, text: str, finish: FinishReason | None,
                 prompt_ids: list[int]) -> TextOutput:
    return TextOutput(
        rid=output.rid, parent_rid=output.parent_rid, index=output.index, text_delta=text,
        token_ids_delta=list(output.new_token_ids), finish_reason=finish, prompt_tokens=output.prompt_tokens,
        completion_tokens=output.completion_tokens, cached_tokens=output.cached_tokens,
        token_logprobs=list(output.token_logprobs), top_token_ids=[list(t) for t in output.top_token_ids],
        top_logprobs=[list(t) for t in output.top_logprobs], prompt_token_ids=prompt_ids,
        prompt_logprobs=output.prompt_logprobs, ids_logprobs=[list(v) for v in output.ids_logprobs],
        spec_verify_ct=output.spec_verify_ct, spec_accepted_tokens=output.spec_accepted_tokens)
