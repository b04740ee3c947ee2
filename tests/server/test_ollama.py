"""Ollama's API end to end through the official ``ollama`` Python client (list, show, generate, chat;
streamed and whole), plus its raw NDJSON and its error bodies."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import ollama
import pytest

from tests.server.conftest import running_server

PROMPT = "First Citizen: Before we proceed"
OPTIONS = {"temperature": 0, "num_predict": 8, "seed": 1}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    with running_server(model_dir, tmp_path_factory.mktemp("logs") / "ollama.log") as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.url, timeout=120)


@pytest.fixture(scope="module")
def model_name(client) -> str:
    return client.list().models[0].model


def test_list_and_show(client, model_name, model_dir):
    listed = client.list().models
    assert len(listed) == 1 and listed[0].model == model_name and listed[0].details.family
    shown = client.show(model_name)
    assert shown.details.family == listed[0].details.family
    context_length = json.loads((model_dir / "config.json").read_text())["max_position_embeddings"]
    assert shown.modelinfo[f"{shown.details.family}.context_length"] == context_length
    assert "completion" in shown.capabilities
    assert client.show(f"{model_name}:latest").details.family == shown.details.family
    with pytest.raises(ollama.ResponseError) as caught:
        client.show("no-such-model")
    assert caught.value.status_code == 404 and "no-such-model" in caught.value.error


def test_generate_whole_and_streamed_agree(client, model_name):
    whole = client.generate(model=model_name, prompt=PROMPT, options=OPTIONS, stream=False)
    assert whole.done and whole.done_reason in ("stop", "length") and whole.response
    assert 0 < whole.eval_count <= 8 and whole.prompt_eval_count > 0
    assert whole.total_duration >= whole.prompt_eval_duration + whole.eval_duration > 0
    parts = list(client.generate(model=model_name, prompt=PROMPT, options=OPTIONS, stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.response for p in parts) == whole.response
    assert (parts[-1].eval_count, parts[-1].prompt_eval_count) == (whole.eval_count, whole.prompt_eval_count)


def test_generate_raw_sends_the_prompt_as_is(client, model_name, tokenizer):
    raw = client.generate(model=model_name, prompt=PROMPT, raw=True, options=OPTIONS, stream=False)
    assert raw.prompt_eval_count == len(tokenizer.encode(PROMPT))
    templated = client.generate(model=model_name, prompt=PROMPT, options=OPTIONS, stream=False)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], tokenize=False,
                                             add_generation_prompt=True)
    assert templated.prompt_eval_count == len(tokenizer.encode(rendered, add_special_tokens=False))


def test_generate_length_and_empty_prompt_load(client, model_name):
    long = client.generate(model=model_name, prompt=PROMPT, options={"num_predict": 3, "temperature": 0},
                           stream=False)
    assert long.eval_count <= 3 and (long.done_reason == "length") == (long.eval_count == 3)
    loaded = client.generate(model=model_name, prompt="", stream=False)
    assert loaded.done and loaded.done_reason == "load" and loaded.response == ""


def test_chat_whole_and_streamed_agree(client, model_name, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Speak, speak."}]
    whole = client.chat(model=model_name, messages=messages, options=OPTIONS, stream=False)
    assert whole.message.role == "assistant" and whole.message.content and whole.done
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert whole.prompt_eval_count == len(tokenizer.encode(rendered, add_special_tokens=False))
    parts = list(client.chat(model=model_name, messages=messages, options=OPTIONS, stream=True))
    assert parts[-1].done and parts[-1].done_reason == whole.done_reason
    assert "".join(p.message.content for p in parts) == whole.message.content
    history = messages + [{"role": "assistant", "content": whole.message.content},
                          {"role": "user", "content": "Again."}]
    again = client.chat(model=model_name, messages=history, options=OPTIONS, stream=False)
    assert again.prompt_eval_count > whole.prompt_eval_count + whole.eval_count


def test_format_json_is_enforced(client, model_name):
    answer = client.chat(model=model_name, messages=[{"role": "user", "content": "Give JSON."}], format="json",
                         options={"temperature": 0, "num_predict": 48}, stream=False)
    text = answer.message.content.lstrip()
    assert text.startswith("{")
    if answer.done_reason == "stop":  # finished inside the budget: a whole object
        assert isinstance(json.loads(text), dict)


@pytest.mark.parametrize("kwargs,param", [
    ({"options": {"num_thread": 4}}, "num_thread"),
    ({"options": {"temperature": "hot"}}, "options"),
    ({"options": {"temperature": -1}}, "temperature"),
    ({"think": True}, "think"),
])
def test_bad_requests_are_400_naming_the_field(client, model_name, kwargs, param):
    with pytest.raises(ollama.ResponseError) as caught:
        client.chat(model=model_name, messages=[{"role": "user", "content": "Hi"}], stream=False, **kwargs)
    assert caught.value.status_code == 400 and param in caught.value.error


def test_generate_refuses_what_it_does_not_serve(client, model_name):
    for kwargs in ({"suffix": "end"}, {"context": [1, 2]}, {"images": [b"\x89PNG"]}):
        with pytest.raises(ollama.ResponseError) as caught:
            client.generate(model=model_name, prompt=PROMPT, stream=False, **kwargs)
        assert caught.value.status_code == 400 and next(iter(kwargs)) in caught.value.error


def test_errors_are_ollama_shaped(server, model_name):
    status, body = server.post_json("/api/chat", {"model": model_name, "stream": False, "format": "yaml",
                                                  "messages": [{"role": "user", "content": "Hi"}]})
    assert status == 400 and isinstance(body["error"], str) and "format" in body["error"]
    status, body = server.post_json("/api/chat", {"model": model_name, "messages": []})
    assert status == 400 and "messages" in body["error"]
    status, body = server.post_json("/api/chat", {"model": model_name, "messages": [
        {"role": "user", "content": "Hi", "images": ["aGk="]}]})
    assert status == 400 and "images" in body["error"]
    status, body = server.post_json("/api/generate", {"prompt": "no model"})
    assert status == 400 and "model" in body["error"]


def test_stream_is_ndjson_by_default(server, model_name):
    body = json.dumps({"model": model_name, "prompt": PROMPT, "options": OPTIONS}).encode()
    request = urllib.request.Request(server.url + "/api/generate", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        assert response.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
    assert len(lines) >= 2 and lines[-1]["done"] is True and all(not line["done"] for line in lines[:-1])
    assert {"model", "created_at", "response"} <= set(lines[0])


def test_root_probe_and_version(server):
    with urllib.request.urlopen(server.url + "/", timeout=10) as response:
        assert response.read() == b"Ollama is running"
    with urllib.request.urlopen(server.url + "/api/version", timeout=10) as response:
        assert json.loads(response.read())["version"]
