"""Tokenize stage: prompt -> ids, chat template, length check, n fan-out, abort ordering, errors."""
from __future__ import annotations

import time

import pytest

from pipeline.channel import in_thread_channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, ChatMessage, ErrorOutput, GenerateRequest, SamplingParams, TokenizedRequest,
                               TokenizeInbox)
from stages.tokenize import RequestError, TokenizeStage, check_length, prompt_ids, tokenize_request
from stages.tokenizer import load_tokenizer
from tests.server.tiny_model import save_tiny_tokenizer


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory):
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    save_tiny_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


def make_stage(tokenizer, context_length: int = 64, num_workers: int = 0):
    args = ServerArgs(model_path="/nonexistent", context_length=context_length)
    inbox = in_thread_channel("tokenize", TokenizeInbox, 64)
    out = in_thread_channel("multimodal", object, 64)
    errors = in_thread_channel("ingest", object, 64)
    detok = in_thread_channel("detokenize", object, 64)
    stage = TokenizeStage(args, inbox, {"out": out, "errors": errors, "detokenize": detok}, tokenizer=tokenizer,
                          vocab_size=len(tokenizer), num_workers=num_workers)
    return stage, inbox, out, errors, detok


def run_until_idle(stage, timeout_s: float = 60.0) -> None:
    """Step until idle. A deadline, not a step count: while a later request is tokenized but an earlier
    one is not, wait_for_work returns at once, and a loaded machine may take many such rounds."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stage.step()
        if not stage.busy:
            return
        stage.wait_for_work(0.1)
        time.sleep(0.001)
    raise AssertionError("tokenize stage never went idle")


def test_text_prompt_gets_bos(tokenizer):
    ids = prompt_ids(tokenizer, GenerateRequest(rid="a", text="Speak, speak."), vocab_size=len(tokenizer))
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Speak, speak."


def test_chat_template_renders_generation_prompt(tokenizer):
    request = GenerateRequest(rid="a", messages=[ChatMessage(role="user", content="hear me speak")])
    ids = prompt_ids(tokenizer, request, len(tokenizer))
    text = tokenizer.decode(ids, skip_special_tokens=False)
    assert text == "<|begin_of_text|><|im_start|>user\nhear me speak<|im_end|>\n<|im_start|>assistant\n"
    no_prompt = msgspec_replace(request, add_generation_prompt=False)
    assert not tokenizer.decode(prompt_ids(tokenizer, no_prompt, len(tokenizer)), skip_special_tokens=False
                                ).endswith("assistant\n")


def msgspec_replace(struct, **changes):
    import msgspec

    return msgspec.structs.replace(struct, **changes)


@pytest.mark.parametrize("request_kwargs, param, words", [
    ({"text": ""}, "prompt", "empty"),
    ({"messages": []}, "messages", "empty"),
    ({"input_ids": []}, "input_ids", "empty"),
    ({"input_ids": [1, 99999]}, "input_ids", "input_ids[1]=99999"),
    ({"input_ids": [-1]}, "input_ids", "outside the vocabulary"),
    ({}, None, "exactly one"),
    ({"text": "a", "input_ids": [1]}, None, "exactly one"),
])
def test_bad_prompts_raise_request_error(tokenizer, request_kwargs, param, words):
    with pytest.raises(RequestError) as caught:
        prompt_ids(tokenizer, GenerateRequest(rid="a", **request_kwargs), len(tokenizer))
    assert caught.value.param == param
    assert words in caught.value.message


def test_length_check_names_the_numbers():
    check_length(10, 54, 64)
    with pytest.raises(RequestError, match="10 prompt tokens \\+ 55 max_tokens = 65 tokens.*64"):
        check_length(10, 55, 64)
    with pytest.raises(RequestError, match="prompt has 64 tokens"):
        check_length(64, 0, 64)


def test_no_max_tokens_means_up_to_the_context_length(tokenizer):
    request = GenerateRequest(rid="m", text="hear me speak", sampling=SamplingParams(max_new_tokens=None))
    check_length(63, None, 64)  # any prompt shorter than the context fits
    (sequence,) = tokenize_request(tokenizer, request, 64, len(tokenizer))
    assert sequence.sampling.max_new_tokens == 64 - len(sequence.input_ids)
    with pytest.raises(RequestError):
        check_length(64, None, 64)


def test_fan_out_n_and_seeds(tokenizer):
    request = GenerateRequest(rid="p", text="hear me", sampling=SamplingParams(n=3, seed=7, max_new_tokens=4))
    sequences = tokenize_request(tokenizer, request, 64, len(tokenizer))
    assert [s.rid for s in sequences] == ["p.0", "p.1", "p.2"]
    assert [s.index for s in sequences] == [0, 1, 2]
    assert {s.parent_rid for s in sequences} == {"p"}
    assert [s.sampling.seed for s in sequences] == [7, 8, 9]
    assert all(s.sampling.n == 1 and s.input_ids == sequences[0].input_ids for s in sequences)
    single = tokenize_request(tokenizer, GenerateRequest(rid="q", text="hear me"), 256, len(tokenizer))
    assert [(s.rid, s.parent_rid, s.index) for s in single] == [("q", "q", 0)]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_stage_emits_requests_errors_and_ordered_aborts(tokenizer, num_workers):
    stage, inbox, out, errors, detok = make_stage(tokenizer, num_workers=num_workers)
    inbox.put(GenerateRequest(rid="ok", text="hear me", sampling=SamplingParams(max_new_tokens=8, n=2)))
    inbox.put(Abort(rid="ok"))
    inbox.put(GenerateRequest(rid="long", text="hear me " * 40, sampling=SamplingParams(max_new_tokens=8)))
    inbox.put(Abort(rid="unknown"))
    run_until_idle(stage)
    emitted = out.drain(100)
    kinds = [(type(m).__name__, m.rid) for m in emitted]
    assert ("Abort", "unknown") in kinds
    # the abort of "ok" comes after both of its sequences
    assert kinds.index(("Abort", "ok")) > kinds.index(("TokenizedRequest", "ok.1"))
    assert [m.rid for m in detok.drain(100)] == ["ok.0", "ok.1"]
    [error] = errors.drain(10)
    assert isinstance(error, ErrorOutput) and error.rid == "long" and error.status_code == 400
    assert "context length of 64" in error.message
    stage.close()


def test_big_prompt_tokenizes_on_worker_thread(tokenizer):
    import threading

    seen_threads = []
    real_encode = tokenizer.encode

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __len__(self):
            return len(tokenizer)

        def encode(self, *args, **kwargs):
            seen_threads.append(threading.current_thread().name)
            return real_encode(*args, **kwargs)

    stage, inbox, out, _, _ = make_stage(Spy(), context_length=1 << 20, num_workers=1)
    inbox.put(GenerateRequest(rid="big", text="Speak, speak. " * 20000, sampling=SamplingParams(max_new_tokens=1)))
    run_until_idle(stage)
    [request] = out.drain(10)
    assert isinstance(request, TokenizedRequest) and len(request.input_ids) > 20000
    assert seen_threads and seen_threads[0].startswith("tokenize")
    stage.close()


def test_tools_and_template_kwargs_reach_the_template(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = ("{% if tools %}[{{ tools | length }} tools: {{ tools[0]['function']['name'] }}]"
                               "{% endif %}{% if shout %}!{% endif %}"
                               "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }};{% endfor %}")
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    request = GenerateRequest(rid="t", messages=[ChatMessage(role="user", content="hi")], tools=tools,
                              chat_template_kwargs={"shout": True})
    text = tokenizer.decode(prompt_ids(tokenizer, request, len(tokenizer)), skip_special_tokens=False)
    assert text == "[1 tools: get_weather]!user:hi;"


def test_template_error_is_a_request_error(tokenizer_dir):
    tokenizer = load_tokenizer(tokenizer_dir)
    tokenizer.chat_template = "{{ raise_exception('roles must alternate user/assistant') }}"
    with pytest.raises(RequestError, match="roles must alternate"):
        prompt_ids(tokenizer, GenerateRequest(rid="t", messages=[ChatMessage(role="user", content="hi")]), 10)


@pytest.mark.parametrize("allowed", [False, True])
def test_a_client_chat_template_needs_the_server_flag(tokenizer, allowed):
    """chat_template_kwargs.chat_template is refused (400 naming it) unless --allow-request-chat-template."""
    stage, inbox, out, errors, _ = make_stage(tokenizer)
    stage.allow_request_chat_template = allowed
    template = "{% for m in messages %}<{{ m['content'] }}>{% endfor %}"
    inbox.put(GenerateRequest(rid="t", messages=[ChatMessage(role="user", content="hi")],
                              sampling=SamplingParams(max_new_tokens=2),
                              chat_template_kwargs={"chat_template": template}))
    run_until_idle(stage)
    if allowed:
        [request] = [m for m in out.drain(10) if isinstance(m, TokenizedRequest)]
        assert tokenizer.decode(request.input_ids) == "<hi>"
        assert errors.drain(10) == []
    else:
        [error] = errors.drain(10)
        assert error.status_code == 400 and error.param == "chat_template_kwargs.chat_template"
        assert "--allow-request-chat-template" in error.message
        assert out.drain(10) == []
