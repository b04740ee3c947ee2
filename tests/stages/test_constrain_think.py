"""The constrain stage leaves the think block free and applies the grammar after ``</think>``.

Driven through the harness with a tiny tokenizer that has ``<think>`` and
``</think>`` as single tokens; the test plays the sample stage and picks each
token itself, so every phase change is deterministic.
"""
from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken

from pipeline.config import ServerArgs
from pipeline.harness import drive, wiring
from pipeline.messages import ConstrainInbox, GrammarCompile, SampledTokens
from stages.constrain.bitmask import unpack_bitmask
from stages.constrain.stage import ConstrainStage
from stages.constrain.think_gate import ThinkPhase, starting_phase, think_tokens
from tests.stages.test_constrain import train_tiny_tokenizer
from tests.stages.test_constrain_stage import forward_batch, model_info, wait_ready

SCHEMA = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]})


@pytest.fixture(scope="module")
def think_tokenizer():
    tokenizer = train_tiny_tokenizer()
    tokenizer.add_tokens([AddedToken("</think>", special=False)])
    return tokenizer


def make_stage(tokenizer, reasoning_parser: str) -> ConstrainStage:
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    inbox, outboxes = wiring(ConstrainInbox, "sample", "schedule")
    return ConstrainStage(ServerArgs(reasoning_parser=reasoning_parser), inbox, outboxes, tokenizer=tokenizer,
                          model_info=model_info(len(tokenizer), (tokenizer.eos_token_id, im_end)), max_workers=0)


class Player:
    """Steps one constrained request: returns each batch's allowed ids (None: no mask), feeds the token."""

    def __init__(self, stage: ConstrainStage, after_reasoning: bool = True, tail: list[int] | None = None) -> None:
        self.stage, self.batch_id = stage, 0
        self.driver = drive(stage, GrammarCompile(rid="r", kind="json_schema", spec=SCHEMA,
                                                  after_reasoning=after_reasoning, prompt_tail_ids=tail or []))
        wait_ready(self.driver, 1)

    def allowed(self) -> set[int] | None:
        self.batch_id += 1
        self.driver.feed(forward_batch(self.batch_id, ["r"], [True]))
        (mask,) = self.driver.step()["sample"]
        if not mask.row_indices:
            return None
        return set(unpack_bitmask(mask.bitmask, self.stage.vocab_size)[0].nonzero().flatten().tolist())

    def sample(self, token_id: int) -> None:
        self.driver.feed(SampledTokens(batch_id=self.batch_id, rids=["r"], token_ids=[token_id]))
        self.driver.step()

    def text_token(self, text: str) -> int:
        return self.stage.vocab.token_bytes[text.encode()][0]


def ids(tokenizer, *tokens: str) -> list[int]:
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def test_deepseek_r1_thinks_freely_then_follows_the_grammar(think_tokenizer):
    stage = make_stage(think_tokenizer, "deepseek-r1")
    start_id, end_id = ids(think_tokenizer, "<think>", "</think>")
    player = Player(stage)
    for text in ("H", "m", "{", "\n"):  # reasoning: no mask, and the grammar does not advance
        assert player.allowed() is None
        player.sample(player.text_token(text))
    assert player.allowed() is None
    player.sample(end_id)
    allowed = player.allowed()
    assert allowed is not None and player.text_token("{") in allowed
    assert end_id not in allowed and start_id not in allowed and player.text_token("H") not in allowed
    player.sample(player.text_token("{"))
    assert player.text_token("{") not in player.allowed()  # the grammar advanced by "{", from its start
    stage.close()


def test_qwen3_may_think_or_answer_at_once(think_tokenizer):
    start_id, end_id = ids(think_tokenizer, "<think>", "</think>")
    stage = make_stage(think_tokenizer, "qwen3")
    thinker = Player(stage)
    first = thinker.allowed()
    assert first is not None and start_id in first and thinker.text_token("{") in first
    assert thinker.text_token("H") not in first
    thinker.sample(start_id)
    assert thinker.allowed() is None
    thinker.sample(end_id)
    assert thinker.text_token("{") in thinker.allowed()

    answerer = Player(stage)  # same rid again: a fresh request
    assert start_id in answerer.allowed()
    answerer.sample(answerer.text_token("{"))
    after = answerer.allowed()
    assert start_id not in after and answerer.text_token("{") not in after
    stage.close()


def test_grammar_from_the_first_token_when_thinking_is_off_or_closed(think_tokenizer):
    start_id, end_id = ids(think_tokenizer, "<think>", "</think>")
    newline = think_tokenizer.encode("\n\n", add_special_tokens=False)
    for parser, after, tail in [("", True, []), ("deepseek-r1", False, []),
                                ("deepseek-r1", True, [start_id, *newline, end_id, *newline]),
                                ("qwen3", True, [7, start_id, end_id])]:
        stage = make_stage(think_tokenizer, parser)
        player = Player(stage, after_reasoning=after, tail=tail)
        allowed = player.allowed()
        assert allowed is not None and start_id not in allowed and player.text_token("{") in allowed, parser
        stage.close()


def test_starting_phase_reads_the_prompt_tail(think_tokenizer):
    stage = make_stage(think_tokenizer, "qwen3")
    tokens = think_tokens(think_tokenizer, stage.vocab)
    newline = think_tokenizer.encode("\n", add_special_tokens=False)
    assert tokens.start_id is not None and tokens.end_id is not None and set(newline) <= tokens.blank_ids
    assert starting_phase(tokens, "qwen3", True, [5, tokens.start_id, *newline]) is ThinkPhase.THINKING
    assert starting_phase(tokens, "qwen3", True, [5]) is ThinkPhase.MAY_THINK
    assert starting_phase(tokens, "deepseek-r1", True, [5]) is ThinkPhase.THINKING
    assert starting_phase(tokens, "deepseek-r1", True, [tokens.end_id, *newline]) is ThinkPhase.GRAMMAR
    no_end = think_tokens(train_tiny_tokenizer(), stage.vocab)  # "</think>" is several tokens: no gating
    assert starting_phase(no_end, "deepseek-r1", True, [5]) is ThinkPhase.GRAMMAR
    stage.close()
