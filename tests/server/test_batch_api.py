"""/v1/files and /v1/batches through the official openai client, against a live server (tiny model)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import openai
import pytest

from tests.server.conftest import running_server

STORE_MB = 1  # the server's --file-store-max-mb


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "batch.log"
    with running_server(model_dir, log, "--placement", "single", "--file-store-max-mb", str(STORE_MB)) as process:
        yield process


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def jsonl(*lines) -> bytes:
    return b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines)


def chat_line(custom_id: str, content: str, **body) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": dict(
        {"model": "m", "messages": [{"role": "user", "content": content}], "max_tokens": 4, "temperature": 0}, **body)}


def upload(client, data: bytes):
    return client.files.create(file=("input.jsonl", data), purpose="batch")


def wait_for(client, batch_id: str, statuses=("completed", "failed", "cancelled"), timeout_s: float = 120.0):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        time.sleep(0.1)
    raise TimeoutError(f"batch {batch_id} still {batch.status}")


def read_lines(client, file_id: str) -> list[dict]:
    return [json.loads(line) for line in client.files.content(file_id).read().splitlines()]


def test_chat_batch_writes_output_and_error_files(client):
    data = jsonl(chat_line("a", "Speak, speak."), b"{not json", chat_line("b", "Who goes there?"),
                 {"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "x"}},
                 chat_line("bad", "x", max_tokens=-1), chat_line("a", "again"),
                 dict(chat_line("c", "x"), url="/v1/completions"), b"   ")
    uploaded = upload(client, data)
    assert (uploaded.bytes, uploaded.purpose, uploaded.filename) == (len(data), "batch", "input.jsonl")
    assert client.files.content(uploaded.id).read() == data
    created = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/chat/completions",
                                    completion_window="24h", metadata={"job": "t"})
    assert created.status == "validating" and created.metadata == {"job": "t"}
    batch = wait_for(client, created.id)
    assert batch.status == "completed" and batch.in_progress_at and batch.completed_at
    assert (batch.request_counts.total, batch.request_counts.completed, batch.request_counts.failed) == (7, 2, 5)
    output = read_lines(client, batch.output_file_id)
    assert [line["custom_id"] for line in output] == ["a", "b"]
    for line, content in zip(output, ["Speak, speak.", "Who goes there?"]):
        direct = client.chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                max_tokens=4, temperature=0)
        assert line["response"]["status_code"] == 200 and line["error"] is None
        assert line["response"]["body"]["choices"][0]["message"]["content"] == direct.choices[0].message.content
        assert line["response"]["body"]["object"] == "chat.completion"
    assert batch.usage.output_tokens == sum(line["response"]["body"]["usage"]["completion_tokens"] for line in output)
    errors = {line["custom_id"]: line for line in read_lines(client, batch.error_file_id)}
    assert set(errors) == {None, "e", "bad", "a", "c"}
    assert errors[None]["response"] is None and errors[None]["error"]["code"] == "invalid_request"
    assert "not supported" in errors["e"]["error"]["message"]
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["param"] == "max_tokens"
    assert errors["a"]["error"]["code"] == "duplicate_custom_id"
    assert errors["c"]["error"]["code"] == "invalid_url"
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"


def test_completions_batch_and_listing(client):
    lines = [{"custom_id": f"p{k}", "method": "POST", "url": "/v1/completions",
              "body": {"model": "m", "prompt": f"To be {k}", "max_tokens": 3, "temperature": 0}} for k in range(3)]
    batch = client.batches.create(input_file_id=upload(client, jsonl(*lines)).id, endpoint="/v1/completions",
                                  completion_window="24h")
    batch = wait_for(client, batch.id)
    assert batch.status == "completed" and batch.error_file_id is None
    output = read_lines(client, batch.output_file_id)
    direct = client.completions.create(model="m", prompt="To be 1", max_tokens=3, temperature=0)
    assert output[1]["response"]["body"]["choices"][0]["text"] == direct.choices[0].text
    listed = [b.id for b in client.batches.list(limit=100)]
    assert listed[0] == batch.id  # newest first
    page = client.batches.list(limit=1)
    assert len(page.data) == 1 and page.has_more


def test_cancel_keeps_what_finished(client):
    lines = [chat_line(f"long{k}", "Speak.", max_tokens=300, ignore_eos=True) for k in range(40)]
    batch = client.batches.create(input_file_id=upload(client, jsonl(*lines)).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")
    wait_for(client, batch.id, statuses=("in_progress",), timeout_s=30)
    cancelling = client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at
    batch = wait_for(client, batch.id, timeout_s=30)
    assert batch.status == "cancelled" and batch.cancelled_at
    assert batch.request_counts.total == 40 and batch.request_counts.completed < 40
    if batch.request_counts.completed:
        assert len(read_lines(client, batch.output_file_id)) == batch.request_counts.completed
    with pytest.raises(openai.BadRequestError):
        client.batches.cancel(batch.id)


def test_bad_requests(client):
    with pytest.raises(openai.APIStatusError) as caught:
        upload(client, b"x" * (STORE_MB * 1024 * 1024 + 1))
    assert caught.value.status_code == 413 and "file store is full" in caught.value.message
    with pytest.raises(openai.BadRequestError) as caught:
        client.files.create(file=("a.jsonl", b"{}\n"), purpose="fine-tune")
    assert caught.value.body["param"] == "purpose"
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve("file_nope")
    with pytest.raises(openai.NotFoundError):
        client.batches.create(input_file_id="file_nope", endpoint="/v1/chat/completions", completion_window="24h")
    uploaded = upload(client, jsonl(chat_line("a", "x")))
    for extra, param in [({"endpoint": "/v1/moderations"}, "endpoint"), ({"completion_window": "1h"},
                                                                         "completion_window")]:
        body = dict({"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions", "completion_window": "24h"},
                    **extra)
        with pytest.raises(openai.BadRequestError) as caught:
            client.post("/batches", body=body, cast_to=object)
        assert caught.value.body["param"] == param
    with pytest.raises(openai.NotFoundError):
        client.batches.retrieve("batch_nope")
    assert client.files.delete(uploaded.id).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.content(uploaded.id)
    empty = client.batches.create(input_file_id=upload(client, b"\n\n").id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    failed = wait_for(client, empty.id)
    assert failed.status == "failed" and "no requests" in failed.errors.data[0].message


def test_files_live_in_a_temp_dir_removed_at_exit(model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    with running_server(model_dir, tmp_path / "server.log", "--placement", "single") as process:
        client = openai.OpenAI(base_url=process.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        uploaded = upload(client, jsonl(chat_line("a", "x")))
        [directory] = list(Path(tmp_path).glob("stagewise-files-*"))
        assert [p.name for p in directory.iterdir()] == [uploaded.id]
    assert process.process.returncode == 0
    assert not directory.exists()


def test_file_listing_pages_and_orders(client):
    uploaded = [upload(client, jsonl(chat_line(f"f{k}", "hi"))).id for k in range(3)]
    newest_first = [f.id for f in client.files.list(purpose="batch").data]
    assert [i for i in newest_first if i in uploaded] == uploaded[::-1]
    oldest_first = [f.id for f in client.files.list(purpose="batch", order="asc").data]
    assert [i for i in oldest_first if i in uploaded] == uploaded
    page = client.files.list(purpose="batch", order="asc", limit=1, after=uploaded[0])
    assert [f.id for f in page.data] == [uploaded[1]] and page.has_more
    with pytest.raises(openai.BadRequestError, match="order"):
        client.files.list(order="sideways")
