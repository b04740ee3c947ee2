"""The message contract: SamplingParams rules, decode-time validation, the tensor codec."""
from __future__ import annotations

import math

import msgspec
import pytest
import torch

from pipeline.messages import (ALL_MESSAGE_TYPES, MAX_N, MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS,
                               MAX_STOP_TOKEN_IDS, MAX_TOP_LOGPROBS, GenerateRequest, Logits, SamplingParams,
                               SamplingParamsError, TokenMask, decoder, encode)
from tests.pipeline.sample_messages import every_message

# (field, bad keyword arguments) for every rule SamplingParams enforces
BROKEN_RULES = [
    ("max_new_tokens", {"max_new_tokens": -1}),
    ("min_new_tokens", {"min_new_tokens": -1}),
    ("min_new_tokens", {"max_new_tokens": 4, "min_new_tokens": 5}),
    ("temperature", {"temperature": -0.1}),
    ("temperature", {"temperature": math.inf}),
    ("temperature", {"temperature": math.nan}),
    ("top_p", {"top_p": 0.0}),
    ("top_p", {"top_p": 1.5}),
    ("top_k", {"top_k": 0}),
    ("top_k", {"top_k": -2}),
    ("min_p", {"min_p": -0.1}),
    ("min_p", {"min_p": 1.1}),
    ("repetition_penalty", {"repetition_penalty": 0.0}),
    ("repetition_penalty", {"repetition_penalty": 2.5}),
    ("frequency_penalty", {"frequency_penalty": -2.5}),
    ("frequency_penalty", {"frequency_penalty": 2.5}),
    ("presence_penalty", {"presence_penalty": 3.0}),
    ("n", {"n": 0}),
    ("n", {"n": MAX_N + 1}),
    ("top_logprobs_num", {"top_logprobs_num": MAX_TOP_LOGPROBS + 1}),
    ("top_logprobs_num", {"top_logprobs_num": -1}),
    ("stop", {"stop": ["x"] * (MAX_STOP_STRINGS + 1)}),
    ("stop", {"stop": [""]}),
    ("stop", {"stop": ["x" * (MAX_STOP_STRING_CHARS + 1)]}),
    ("stop_token_ids", {"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}),
    ("stop_token_ids", {"stop_token_ids": [-1]}),
    ("regex", {"json_schema": "{}", "regex": "a+"}),
    ("choices", {"choices": []}),
    ("choices", {"choices": ["yes", ""]}),
]


@pytest.mark.parametrize(("field", "kwargs"), BROKEN_RULES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BROKEN_RULES)])
def test_each_rule_raises_sampling_params_error_naming_the_field(field: str, kwargs: dict) -> None:
    with pytest.raises(SamplingParamsError) as error:
        SamplingParams(**kwargs)
    assert error.value.field == field
    assert field in str(error.value)
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize(("field", "kwargs"), BROKEN_RULES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BROKEN_RULES)])
def test_decoding_bad_params_raises_validation_error_naming_the_field(field: str, kwargs: dict) -> None:
    wire = {"type": "GenerateRequest", "rid": "r", "text": "hi", "sampling": kwargs}
    payload = msgspec.msgpack.encode(wire)  # msgpack carries NaN/inf too
    with pytest.raises(msgspec.ValidationError) as error:
        decoder(GenerateRequest).decode(payload)
    assert f"invalid sampling parameter {field}=" in str(error.value)
    assert "$.sampling" in str(error.value)


def test_valid_params_and_defaults_pass() -> None:
    SamplingParams()
    SamplingParams(max_new_tokens=0, temperature=0.0, top_k=1, top_p=1.0, min_p=1.0, n=MAX_N,
                   stop=["a"] * MAX_STOP_STRINGS, regex="[0-9]+", top_logprobs_num=MAX_TOP_LOGPROBS)


def test_every_message_encodes_and_decodes_against_its_type() -> None:
    for message in every_message():
        back = decoder(type(message)).decode(encode(message))
        assert encode(back) == encode(message)
    assert len(every_message()) == len(ALL_MESSAGE_TYPES)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int32, torch.int64, torch.bool])
def test_tensor_codec_keeps_dtype_shape_and_values(dtype: torch.dtype) -> None:
    values = (torch.arange(12).reshape(3, 4) % 3).to(dtype)
    mask = TokenMask(batch_id=1, row_indices=[0, 1, 2], bitmask=values)
    back = decoder(TokenMask).decode(encode(mask))
    assert back.bitmask.dtype == dtype and back.bitmask.shape == (3, 4)
    assert torch.equal(back.bitmask, values)
    empty = decoder(TokenMask).decode(encode(TokenMask(batch_id=1, row_indices=[], bitmask=torch.empty(0, 4))))
    assert empty.bitmask.shape == (0, 4)
    assert decoder(TokenMask).decode(encode(TokenMask(batch_id=1, row_indices=[], bitmask=None))).bitmask is None


def test_non_contiguous_tensors_are_encoded_by_value() -> None:
    logits = torch.arange(20, dtype=torch.float32).reshape(4, 5).t()
    sent = every_message()[ALL_MESSAGE_TYPES.index(Logits)]
    sent = msgspec.structs.replace(sent, logits=logits)
    assert torch.equal(decoder(Logits).decode(encode(sent)).logits, logits)
