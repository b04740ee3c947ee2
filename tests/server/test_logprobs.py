"""Prompt logprobs and the logprob options, end to end.

* the engine alone (in-process, a tiny Llama): prompt logprobs equal the
  log-softmax of Hugging Face transformers' logits, whatever the chunk size
  and whether the prompt came from the radix cache;
* a live server: SGLang's /generate (logprob_start_len, input_token_logprobs,
  input_top_logprobs, token_ids_logprob, return_text_in_logprobs), OpenAI's
  /v1/completions with echo + logprobs (the prompt's tokens first, the first
  one null), ``logprobs: 0``, vLLM's prompt_logprobs (completions and chat),
  chat ``top_logprobs: 0``, and refused values.
"""
from __future__ import annotations

import asyncio
import json
import random

import aiohttp
import openai
import pytest
import torch

from tests.server.conftest import running_server

PROMPT = "First Citizen: Before we proceed any further, hear me speak."
JSON_HEADERS = {"Content-Type": "application/json"}


# --------------------------------------------------------------------------- the engine alone


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from tests.server.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_logprobs"))


def _hf_logprobs(model_dir, prompt: list[int]) -> torch.Tensor:
    from tests.models.tiny import load_hf

    with torch.no_grad():
        logits = load_hf(model_dir)(input_ids=torch.tensor([prompt])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def _prompt_logprobs(engine, prompt: list[int], **params):
    rid = engine.submit(input_ids=prompt, sampling_params=dict(temperature=0.0, return_logprob=True, **params))
    outputs = list(engine.stream(rid, timeout=120))
    found = [o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None]
    assert len(found) == 1, "the first output carries the prompt logprobs, once"
    return found[0], outputs


@pytest.mark.parametrize("chunk, logit_rows, backend", [(8, 2048, "reference"), (0, 2048, "reference"),
                                                        (0, 10, "reference"), (8, 2048, "triton")])
def test_engine_prompt_logprobs_match_transformers(tiny_dir, chunk, logit_rows, backend, monkeypatch):
    """Chunks of 8, one whole prompt, and whole prompts cut to 10 tokens per step for their logits rows
    (the Triton kernels run under the interpreter on a CPU)."""
    from pipeline.engine import Engine

    monkeypatch.setattr("stages.schedule.batch.PROMPT_LOGPROB_ROWS", logit_rows)
    rng = random.Random(chunk)
    prompt = [rng.randrange(2, 400) for _ in range(37)]
    reference = _hf_logprobs(tiny_dir, prompt)
    with Engine(str(tiny_dir), max_total_tokens=4096, kernel_backend=backend, device="cpu", page_size=1,
                chunked_prefill_size=chunk) as engine:
        for k, start in enumerate((0, 5, 36, 0)):  # the later requests find the prompt in the radix cache
            first_batch = engine.schedule.next_batch_id
            got, outputs = _prompt_logprobs(engine, prompt, max_new_tokens=2, logprob_start_len=start,
                                            prompt_top_logprobs_num=3, token_ids_logprob=[5, 7])
            if k == 0:  # prefill steps (37 tokens, at most chunk / logit_rows a step) + one decode
                per_step = min(chunk or len(prompt), logit_rows)
                assert engine.schedule.next_batch_id - first_batch == -(-len(prompt) // per_step) + 1
            assert got.start == start and got.token_ids == prompt[start:]
            assert len(got.logprobs) == len(prompt) - start
            for i, (token, logprob) in enumerate(zip(got.token_ids, got.logprobs)):
                position = start + i
                if position == 0:
                    assert logprob is None and got.top_token_ids[i] == [] and got.ids_logprobs[i] == []
                    continue
                row = reference[position - 1]
                assert logprob == pytest.approx(row[token].item(), abs=1e-3)
                assert got.ranks[i] == int((row > row[token]).sum()) + 1
                assert got.top_token_ids[i] == torch.topk(row, 3).indices.tolist()
                assert got.ids_logprobs[i] == pytest.approx([row[5].item(), row[7].item()], abs=1e-3)
            assert [len(o.ids_logprobs) for o in outputs if o.token_ids_delta] == [1, 1]
        engine.check_integrity()


def test_engine_generate_returns_input_logprobs(tiny_dir):
    from pipeline.engine import Engine

    prompt = list(range(40, 60))
    with Engine(str(tiny_dir), max_total_tokens=4096, kernel_backend="reference", device="cpu") as engine:
        result = engine.generate(input_ids=prompt, sampling_params=dict(
            max_new_tokens=2, temperature=0.0, return_logprob=True, logprob_start_len=3, prompt_top_logprobs_num=2))
    meta = result["meta_info"]
    assert [tid for _, tid in meta["input_token_logprobs"]] == prompt[3:]
    assert all(lp < 0.0 for lp, _ in meta["input_token_logprobs"])
    assert [len(tops) for tops in meta["input_top_logprobs"]] == [2] * (len(prompt) - 3)


def test_engine_max_new_tokens_zero_still_scores_the_prompt(tiny_dir):
    from pipeline.engine import Engine

    prompt = list(range(10, 30))
    with Engine(str(tiny_dir), max_total_tokens=4096, kernel_backend="reference", device="cpu") as engine:
        got, outputs = _prompt_logprobs(engine, prompt, max_new_tokens=0, logprob_start_len=0)
        assert len(got.logprobs) == len(prompt) and got.logprobs[0] is None
        assert all(lp is not None for lp in got.logprobs[1:])
        assert outputs[-1].finish_reason.type == "length"
        assert not any(o.token_ids_delta for o in outputs)
        engine.check_integrity()


# --------------------------------------------------------------------------- a live server


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "logprobs.log"
    with running_server(model_dir, log, "--placement", "single", "--chunked-prefill-size", "16") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path: str, body: dict) -> tuple[int, dict]:
    async def go():
        async with aiohttp.ClientSession() as session:
            async with session.post(server.url + path, data=json.dumps(body).encode(),
                                    headers=JSON_HEADERS) as response:
                return response.status, await response.json(content_type=None)

    return asyncio.run(go())


def generate(server, **body) -> dict:
    status, reply = post(server, "/generate", dict(text=PROMPT, **body))
    assert status == 200, reply
    return reply


GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


def test_generate_input_logprobs_shapes_and_text(server, tokenizer):
    wanted = [5, 17]
    reply = generate(server, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0, top_logprobs_num=3,
                     return_text_in_logprobs=True, token_ids_logprob=wanted)
    meta = reply["meta_info"]
    prompt_ids = tokenizer.encode(PROMPT)
    assert meta["prompt_tokens"] == len(prompt_ids) == len(meta["input_token_logprobs"])
    first, rest = meta["input_token_logprobs"][0], meta["input_token_logprobs"][1:]
    assert first[0] is None and first[1] == prompt_ids[0]
    assert [entry[1] for entry in meta["input_token_logprobs"]] == prompt_ids
    assert "".join(entry[2] for entry in meta["input_token_logprobs"]).endswith(PROMPT)
    assert all(entry[0] <= 0.0 for entry in rest)
    assert meta["input_top_logprobs"][0] is None
    for entry, tops in zip(rest, meta["input_top_logprobs"][1:]):
        values = [t[0] for t in tops]
        assert len(tops) == 3 and values == sorted(values, reverse=True) and values[0] >= entry[0] - 1e-6
        assert all(isinstance(t[2], str) for t in tops)
    assert meta["input_token_ids_logprobs"][0] is None
    assert all([t[1] for t in row] == wanted for row in meta["input_token_ids_logprobs"][1:])
    assert len(meta["output_token_logprobs"]) == len(meta["output_token_ids_logprobs"]) == 4
    assert reply["text"] == "".join(entry[2] for entry in meta["output_token_logprobs"])
    assert all([t[1] for t in row] == wanted for row in meta["output_token_ids_logprobs"])


def test_generate_logprob_start_len_and_default(server):
    reply = generate(server, sampling_params=GREEDY, return_logprob=True, logprob_start_len=5)
    meta = reply["meta_info"]
    assert meta["prompt_tokens"] == 5 + len(meta["input_token_logprobs"])
    assert all(entry[0] is not None and entry[2] is None for entry in meta["input_token_logprobs"])
    assert all(tops == [] for tops in meta["input_top_logprobs"])
    default = generate(server, sampling_params=GREEDY, return_logprob=True)["meta_info"]
    assert default["input_token_logprobs"] == [] and len(default["output_token_logprobs"]) == 4


def test_input_logprobs_match_output_logprobs_of_the_same_tokens(server, tokenizer):
    """Score prompt + generated tokens as a prompt: the generated tokens get the logprobs they had."""
    first = generate(server, sampling_params=dict(GREEDY, max_new_tokens=6), return_logprob=True)
    prompt_ids = tokenizer.encode(PROMPT)
    output_ids = [entry[1] for entry in first["meta_info"]["output_token_logprobs"]]
    status, again = post(server, "/generate", dict(input_ids=prompt_ids + output_ids, return_logprob=True,
                                                   logprob_start_len=len(prompt_ids),
                                                   sampling_params=dict(GREEDY, max_new_tokens=1)))
    assert status == 200, again
    scored = again["meta_info"]["input_token_logprobs"]
    assert [entry[1] for entry in scored] == output_ids
    expected = [entry[0] for entry in first["meta_info"]["output_token_logprobs"]]
    assert [entry[0] for entry in scored] == pytest.approx(expected, abs=2e-3)


def test_completion_echo_logprobs_cover_the_prompt(client, server):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2,
                                      extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    logprobs = choice.logprobs
    num_prompt = reply.usage.prompt_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == num_prompt + 3
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(lp is not None for lp in logprobs.token_logprobs[1:])
    assert all(2 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[0] == 0 and logprobs.text_offset == sorted(logprobs.text_offset)
    assert choice.text.startswith(PROMPT)
    native = generate(server, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)
    native_lps = [entry[0] for entry in native["meta_info"]["input_token_logprobs"]]
    assert logprobs.token_logprobs[1:num_prompt] == pytest.approx(native_lps[1:], abs=1e-4)


def test_completion_echo_max_tokens_zero_scores_only_the_prompt(client):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=0, echo=True, logprobs=1)
    logprobs = reply.choices[0].logprobs
    assert reply.usage.completion_tokens == 0 and reply.choices[0].text == PROMPT
    assert len(logprobs.token_logprobs) == reply.usage.prompt_tokens and logprobs.token_logprobs[0] is None


def test_completion_echo_logprobs_streamed(client):
    stream = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                       logprobs=1, stream=True, extra_body={"ignore_eos": True})
    chunks = [c for c in stream if c.choices]
    token_logprobs = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    whole = client.completions.create(model="m", prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                      extra_body={"ignore_eos": True})
    assert token_logprobs[0] is None
    assert token_logprobs[1:] == pytest.approx(whole.choices[0].logprobs.token_logprobs[1:], abs=1e-4)


def test_completion_logprobs_zero_gives_one_entry_dicts(client):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=4, temperature=0, logprobs=0,
                                      extra_body={"ignore_eos": True})
    logprobs = reply.choices[0].logprobs
    assert logprobs.top_logprobs is not None and len(logprobs.top_logprobs) == 4
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert top == {token: logprob}


def test_completion_prompt_logprobs_vllm_shape(client, server, tokenizer):
    reply = client.completions.create(model="m", prompt=PROMPT, max_tokens=2, temperature=0,
                                      extra_body={"prompt_logprobs": 2})
    prompt_logprobs = reply.choices[0].model_extra["prompt_logprobs"]
    prompt_ids = tokenizer.encode(PROMPT)
    assert len(prompt_logprobs) == len(prompt_ids) and prompt_logprobs[0] is None
    native = generate(server, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)
    for token_id, entry, expected in zip(prompt_ids[1:], prompt_logprobs[1:],
                                         native["meta_info"]["input_token_logprobs"][1:]):
        assert str(token_id) in entry and 2 <= len(entry) <= 3
        mine = entry[str(token_id)]
        assert mine["logprob"] == pytest.approx(expected[0], abs=1e-4)
        assert mine["rank"] >= 1 and isinstance(mine["decoded_token"], str)
        assert {1, 2} <= {v["rank"] for v in entry.values()}
    assert reply.choices[0].logprobs is None  # only asked for the prompt's


def test_chat_prompt_logprobs_and_top_logprobs_zero(client):
    messages = [{"role": "user", "content": "Speak, speak."}]
    reply = client.chat.completions.create(model="m", messages=messages, max_tokens=3, temperature=0, logprobs=True,
                                           top_logprobs=0, extra_body={"prompt_logprobs": 1, "ignore_eos": True})
    prompt_logprobs = reply.model_extra["prompt_logprobs"]
    assert prompt_logprobs[0] is None and reply.usage.prompt_tokens == len(prompt_logprobs)
    assert all(entry and all("logprob" in v for v in entry.values()) for entry in prompt_logprobs[1:])
    content = reply.choices[0].logprobs.content
    assert len(content) == 3
    assert all(item.top_logprobs == [] and item.logprob <= 0.0 for item in content)


@pytest.mark.parametrize("body, param", [
    (dict(return_logprob=True, logprob_start_len=-2), "logprob_start_len"),
    (dict(return_logprob=True, logprob_start_len=10_000), "logprob_start_len"),
    (dict(return_logprob=True, token_ids_logprob=[10 ** 7]), "token_ids_logprob"),
    (dict(return_logprob=True, token_ids_logprob=[-1]), "token_ids_logprob"),
    (dict(return_logprob=True, top_logprobs_num=21), "top_logprobs_num"),
])
def test_generate_refuses_bad_logprob_options(server, body, param):
    status, reply = post(server, "/generate", dict(text=PROMPT, sampling_params=GREEDY, **body))
    assert status == 400 and param in reply["error"]["message"] and reply["error"]["param"].endswith(param), reply


@pytest.mark.parametrize("extra", [{"prompt_logprobs": 21}, {"prompt_logprobs": -1}])
def test_completion_refuses_bad_prompt_logprobs(client, extra):
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="m", prompt=PROMPT, max_tokens=1, extra_body=extra)
    assert "prompt_logprobs" in str(caught.value)


def test_streamed_prompt_logprobs_refused(client):
    with pytest.raises(openai.BadRequestError) as caught:
        list(client.completions.create(model="m", prompt=PROMPT, max_tokens=1, stream=True,
                                       extra_body={"prompt_logprobs": 1}))
    assert "prompt_logprobs" in str(caught.value)
