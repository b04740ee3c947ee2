"""Detokenize stage: UTF-8-safe incremental decoding, special tokens, stop strings and the stop Abort."""
from __future__ import annotations

import random

import pytest

from pipeline.channel import in_thread_channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, ErrorOutput, FinishReason, SamplingParams, TextOutput, TokenizedRequest,
                               TokenOutput, TokenOutputBatch)
from stages.detokenize import DetokenizeStage, IncrementalDetokenizer, StopRegexMatcher, StopStringMatcher, decode_ids
from stages.tokenizer import load_tokenizer
from tests.server.tiny_model import TRAINING_LINES, save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    save_tiny_tokenizer(path)
    return load_tokenizer(path)


def test_multibyte_characters_never_split(tokenizer):
    text = "Caf\u00e9 \u65e5\u672c\u8a9e \U0001F600\U0001F680 na\u00efve"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) > len(text.split()), "the test needs characters split over several tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    deltas = [detokenizer.add([token_id]) for token_id in ids] + [detokenizer.finish()]
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_concatenate_to_full_decode(tokenizer, seed):
    rng = random.Random(seed)
    ids = [rng.randrange(len(tokenizer)) for _ in range(200)]
    for skip, spaces in [(True, True), (False, True), (False, False)]:
        detokenizer = IncrementalDetokenizer(tokenizer, skip, spaces)
        pieces, i = [], 0
        while i < len(ids):
            step = rng.randint(1, 4)
            pieces.append(detokenizer.add(ids[i:i + step]))
            i += step
        pieces.append(detokenizer.finish())
        assert "".join(pieces) == decode_ids(tokenizer, ids, skip, spaces)
        if skip or not spaces:
            assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_kept_with_spaces(tokenizer):
    ids = tokenizer.encode("hear me", add_special_tokens=False) + [3]
    assert decode_ids(tokenizer, ids, skip_special_tokens=True) == "hear me"
    assert decode_ids(tokenizer, ids, False, True) == "hear me <|im_end|>"
    assert decode_ids(tokenizer, ids, False, False) == "hear me<|im_end|>"


def test_stop_matcher_holds_prefix_and_cuts():
    matcher = StopStringMatcher(["STOP", "xy"])
    assert matcher.feed("abc S") == ("abc ", None)
    assert matcher.feed("TO") == ("", None)
    assert matcher.feed("Px") == ("", "STOP")
    matcher = StopStringMatcher(["STOP"])
    assert matcher.feed("abc ST") == ("abc ", None)
    assert matcher.feed("ay") == ("STay", None)
    assert matcher.feed("S") == ("", None)
    assert matcher.flush() == "S"
    keep = StopStringMatcher(["xy", "abcx"], no_stop_trim=True)
    assert keep.feed("..abcxy!") == ("..abcx", "abcx")  # the earliest match wins


def make_stage(tokenizer):
    inbox = in_thread_channel("detokenize", object, 64)
    out = in_thread_channel("ingest", object, 256)
    abort = in_thread_channel("schedule", object, 64)
    stage = DetokenizeStage(ServerArgs(model_path="/nonexistent"), inbox, {"out": out, "abort": abort},
                            tokenizer=tokenizer)
    return stage, inbox, out, abort


def token_output(rid: str, ids: list[int], done: int, finish: FinishReason | None = None) -> TokenOutput:
    return TokenOutput(rid=rid, parent_rid=rid, new_token_ids=ids, finish_reason=finish, prompt_tokens=3,
                       completion_tokens=done)


def feed_one_by_one(stage, inbox, rid: str, ids: list[int], finish: FinishReason | None) -> None:
    for i, token_id in enumerate(ids):
        last = i == len(ids) - 1
        inbox.put(TokenOutputBatch(outputs=[token_output(rid, [token_id], i + 1, finish if last else None)]))
        stage.step()


def test_stage_stop_string_aborts_and_ignores_rest(tokenizer):
    stage, inbox, out, abort = make_stage(tokenizer)
    inbox.put(TokenizedRequest(rid="r", parent_rid="r", input_ids=[0],
                               sampling=SamplingParams(stop=["speak"])))
    ids = tokenizer.encode(TRAINING_LINES[0], add_special_tokens=False)
    feed_one_by_one(stage, inbox, "r", ids, None)  # tokens after the stop string are ignored
    outputs = out.drain(1000)
    assert all(isinstance(o, TextOutput) for o in outputs)
    text = "".join(o.text_delta for o in outputs)
    assert text == TRAINING_LINES[0].split("speak")[0]
    assert outputs[-1].finish_reason == FinishReason(type="stop", matched="speak")
    assert [o.finish_reason for o in outputs[:-1]] == [None] * (len(outputs) - 1)
    assert abort.drain(10) == [Abort(rid="r", reason="stop")]
    assert "r" not in stage.sequences and "r" in stage.stopped
    # the engine's final output (abort) is swallowed and the rid forgotten
    inbox.put(TokenOutputBatch(outputs=[token_output("r", [5], 99, FinishReason(type="abort"))]))
    stage.step()
    assert out.drain(10) == [] and "r" not in stage.stopped


def test_stage_streams_utf8_and_trims_stop_token(tokenizer):
    stage, inbox, out, abort = make_stage(tokenizer)
    text = TRAINING_LINES[2]
    ids = tokenizer.encode(text, add_special_tokens=False) + [3]
    feed_one_by_one(stage, inbox, "u", ids, FinishReason(type="stop", matched=3))
    outputs = out.drain(1000)
    assert all("\ufffd" not in o.text_delta for o in outputs)
    assert "".join(o.text_delta for o in outputs) == text
    assert outputs[-1].finish_reason == FinishReason(type="stop", matched=3)
    assert sum(len(o.token_ids_delta) for o in outputs) == len(ids)
    assert abort.drain(10) == []
    assert stage.sequences == {}


def test_no_stop_trim_keeps_stop_string_and_errors_pass(tokenizer):
    stage, inbox, out, abort = make_stage(tokenizer)
    inbox.put(TokenizedRequest(rid="k", parent_rid="k", input_ids=[0],
                               sampling=SamplingParams(stop=["fox"], no_stop_trim=True)))
    ids = tokenizer.encode(TRAINING_LINES[3], add_special_tokens=False)
    feed_one_by_one(stage, inbox, "k", ids, None)
    text = "".join(o.text_delta for o in out.drain(1000))
    assert text == "The quick brown fox"
    error = ErrorOutput(rid="e", status_code=400, message="bad")
    inbox.put(error)
    stage.step()
    assert out.drain(10) == [error]


def test_stop_regex_matches_across_deltas_and_cuts_only_unreleased_text():
    matcher = StopRegexMatcher([r"\d+\.", "never"])
    assert matcher.feed("count 12") == ("count 12", None)  # a regex holds nothing back
    assert matcher.feed("3. more") == ("", r"\d+\.")  # the match began in released text: cut at the boundary
    kept = StopRegexMatcher([r"[A-Z]{2}"], no_stop_trim=True)
    assert kept.feed("abc DEf") == ("abc DE", "[A-Z]{2}")
    anchored = StopRegexMatcher([r"^x", r"\bend"], lookback_chars=4)
    assert anchored.feed("abcdefgh") == ("abcdefgh", None)
    assert anchored.feed("x") == ("x", None)  # ^ stays the start of the output, not of the lookback window
    assert anchored.feed(" end") == (" ", r"\bend")
