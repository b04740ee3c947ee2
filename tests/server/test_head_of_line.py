"""Head-of-line work in the front end: early length refusal, release when ready, batch failure clean-up.

* A prompt whose byte length alone proves it longer than the context is
  refused with the length check's 400 before it is encoded
  (``stages.tokenize.early_length_error`` with
  ``stages.tokenizer.max_bytes_per_token``); the bound is checked against
  real token counts, and tokenizers that may drop input get no bound.
* Tokenization runs on a pool and each request leaves the tokenize stage
  when it is ready: a two-token request sent while a multi-MB prompt is being
  encoded is answered before that prompt is (ordering, not absolute time).
* When one prompt of a non-streamed batch fails, the other prompts' reads
  are cancelled and their requests aborted: nothing stays in the request
  table and no ``aclose()`` or "Task was destroyed" error reaches the log.
"""
from __future__ import annotations

import asyncio
import random
import threading
import time

import aiohttp
import pytest
from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers

from pipeline.channel import in_thread_channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, ChatMessage, ErrorOutput, GenerateRequest, SamplingParams, TextOutput,
                               TokenizeInbox)
from stages.ingest.errors import ApiError
from stages.ingest.streaming import collect
from stages.ingest.streams import RequestStream
from stages.tokenize import RequestError, TokenizeStage, early_length_error
from stages.tokenizer import max_bytes_per_token
from tests.server.conftest import running_server

BIG_CONTEXT = 10_000_000  # the ordering server's --context-length: a multi-MB prompt passes the early check
HUGE_PROMPT = "a" * (20 << 20)  # 20 MB: far past a 1024-token context by its bytes alone


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("head_of_line") / "server.log"
    with running_server(model_dir, log) as process:
        yield process


@pytest.fixture(scope="module")
def big_context_server(model_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("head_of_line_big") / "server.log"
    with running_server(model_dir, log, "--context-length", str(BIG_CONTEXT)) as process:
        yield process


# --------------------------------------------------------------------------- the byte bound


def _texts() -> list[str]:
    rng = random.Random(0)
    alphabet = "abcdefghij klmnop\n\t.,;:!?'\"0123456789 é ü — 日本語 😀 🚀 \u0301"
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 400))) for _ in range(200)]
    texts += ["a" * 5000, " " * 3000, "\n" * 1000, "😀" * 500, "ab" * 2000, "First Citizen: hear me speak. " * 50,
              "<|im_start|>" * 100, "x" + "<|begin_of_text|>" * 50]
    return texts


def test_byte_bound_never_exceeds_real_token_counts(tokenizer):
    bytes_per_token = max_bytes_per_token(tokenizer)
    assert bytes_per_token is not None and bytes_per_token >= 4
    for text in _texts():
        num_tokens = len(tokenizer.encode(text, add_special_tokens=False))
        assert num_tokens * bytes_per_token >= len(text.encode()), (text[:40], num_tokens, bytes_per_token)


class _Backend:
    """The one attribute max_bytes_per_token reads from a Hugging Face tokenizer."""

    def __init__(self, backend: Tokenizer) -> None:
        self.backend_tokenizer = backend


def _bpe(pre_tokenizer=None, normalizer=None) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2, "abab": 3}, merges=[("a", "b"), ("ab", "ab")]))
    if pre_tokenizer is not None:
        tokenizer.pre_tokenizer = pre_tokenizer
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    return tokenizer


def test_tokenizers_that_may_drop_input_get_no_bound():
    assert max_bytes_per_token(_Backend(_bpe())) == 4  # longest piece 4 bytes; an unknown character up to 4
    assert max_bytes_per_token(_Backend(_bpe(pre_tokenizers.ByteLevel()))) == 4
    assert max_bytes_per_token(_Backend(_bpe(normalizer=normalizers.NFKC()))) == 16  # NFKC may shrink 4-fold
    assert max_bytes_per_token(_Backend(_bpe(normalizer=normalizers.Replace("  ", " ")))) == 8
    assert max_bytes_per_token(_Backend(_bpe(pre_tokenizers.Whitespace()))) is None  # spaces dropped
    assert max_bytes_per_token(_Backend(_bpe(normalizer=normalizers.Strip()))) is None
    assert max_bytes_per_token(_Backend(_bpe(normalizer=normalizers.Replace(" ", "")))) is None
    wordpiece = Tokenizer(models.WordPiece(vocab={"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    assert max_bytes_per_token(_Backend(wordpiece)) is None  # a whole unknown word is one [UNK]
    stripping = _bpe()
    stripping.add_special_tokens([AddedToken("<mask>", lstrip=True)])
    assert max_bytes_per_token(_Backend(stripping)) is None  # swallows any run of spaces before it
    assert max_bytes_per_token(object()) is None  # a slow tokenizer: no bound


def test_early_length_error_by_bytes_and_by_ids():
    def request(max_new_tokens=16, **prompt) -> GenerateRequest:
        return GenerateRequest(rid="r", sampling=SamplingParams(max_new_tokens=max_new_tokens), **prompt)

    error = early_length_error(request(text="a" * 20_000), 17, 1024)
    assert isinstance(error, RequestError) and error.param == "messages_or_prompt"
    assert "at least 1177 tokens" in error.message and "context length of 1024" in error.message
    error = early_length_error(request(text="a" * 17 * 1000, max_new_tokens=100), 17, 1024)
    assert error is not None and error.param == "max_tokens"
    assert early_length_error(request(text="a" * 17 * 1000), 17, 1024) is None  # 1000 + 16 fits
    assert early_length_error(request(text="a" * 20_000), None, 1024) is None  # no bound: encode and count
    assert early_length_error(request(text="日" * 7000), 17, 1024) is not None  # 21000 bytes, not 7000 chars
    huge_chat = [ChatMessage(role="system", content="be brief"), ChatMessage(role="user", content="a" * 20_000)]
    assert early_length_error(request(messages=huge_chat), 17, 1024) is not None
    assistant_only = [ChatMessage(role="assistant", content="a" * 20_000)]  # a template may drop it
    assert early_length_error(request(messages=assistant_only), 17, 1024) is None
    client_template = GenerateRequest(rid="r", messages=huge_chat, chat_template_kwargs={"chat_template": "x"})
    assert early_length_error(client_template, 17, 1024) is None  # a client's template may render anything
    assert early_length_error(request(input_ids=[5] * 1024), 17, 1024).param == "messages_or_prompt"
    assert early_length_error(request(input_ids=[5] * 1010), 17, 1024).param == "max_tokens"  # 1010 + 16
    assert early_length_error(request(input_ids=[5] * 1010), None, 1024) is not None  # ids need no tokenizer
    assert early_length_error(request(input_ids=[5] * 10), 17, 1024) is None
    if "truncate_prompt_tokens" in SamplingParams.__struct_fields__:
        keep_last = GenerateRequest(rid="r", text="a" * 20_000, sampling=SamplingParams(truncate_prompt_tokens=100))
        assert early_length_error(keep_last, 17, 1024) is None  # the prompt is cut to its last 100 tokens


# --------------------------------------------------------------------------- release when ready, in process


class _GatedTokenizer:
    """Encodes "BIG..." only once ``gate`` is set; everything else at once (one id per character)."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def __len__(self) -> int:
        return 1000

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if text.startswith("BIG"):
            assert self.gate.wait(30), "the test never opened the gate"
        return [ord(c) % 1000 for c in text]


def test_tokenize_stage_releases_a_small_request_while_a_big_one_encodes():
    tokenizer = _GatedTokenizer()
    args = ServerArgs(model_path="/nonexistent", context_length=1 << 20)
    inbox = in_thread_channel("tokenize", TokenizeInbox, 64)
    out, errors, detok = (in_thread_channel(name, object, 64) for name in ("out", "errors", "detokenize"))
    stage = TokenizeStage(args, inbox, {"out": out, "errors": errors, "detokenize": detok}, tokenizer=tokenizer,
                          vocab_size=1000, num_workers=2)
    try:
        inbox.put(GenerateRequest(rid="big", text="BIG" + "x" * 1000, sampling=SamplingParams(max_new_tokens=1)))
        inbox.put(GenerateRequest(rid="small", text="hi", sampling=SamplingParams(max_new_tokens=1, n=2)))
        inbox.put(Abort(rid="big"))  # held until "big" itself has left
        emitted = _step_until(stage, out, lambda got: len(got) >= 2)
        assert [(type(m).__name__, m.rid) for m in emitted] == [("TokenizedRequest", "small.0"),
                                                               ("TokenizedRequest", "small.1")]
        tokenizer.gate.set()
        emitted = _step_until(stage, out, lambda got: len(got) >= 2)
        assert [(type(m).__name__, m.rid) for m in emitted] == [("TokenizedRequest", "big"), ("Abort", "big")]
        assert errors.drain(10) == []
    finally:
        tokenizer.gate.set()
        stage.close()


def _step_until(stage: TokenizeStage, out, enough, timeout_s: float = 30.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout_s
    while not enough(got):
        assert time.monotonic() < deadline, got
        stage.step()
        got += out.drain(64)
        stage.wait_for_work(0.05)
    return got


# --------------------------------------------------------------------------- a failing batch, in process


class _Table:
    """The few parts of the ingest stage a RequestStream touches."""

    def __init__(self) -> None:
        self.args = ServerArgs(model_path="m")
        self.metrics = None
        self.forgotten: list[str] = []
        self.aborted: list[str] = []

    def forget(self, rid: str) -> None:
        self.forgotten.append(rid)

    async def abort(self, rid: str) -> None:
        self.aborted.append(rid)


def test_collect_cancels_the_other_reads_when_one_prompt_fails():
    async def scenario() -> set[asyncio.Task]:
        table = _Table()
        streams = [RequestStream(table, GenerateRequest(rid=rid, sampling=SamplingParams(n=2)), "l", rid)
                   for rid in ("ok", "bad")]
        streams[0].push(TextOutput(rid="ok.0", parent_rid="ok", index=0, text_delta="x", token_ids_delta=[7],
                                   prompt_tokens=1, completion_tokens=1))
        streams[1].push(ErrorOutput(rid="bad", status_code=400, message="too long"))
        with pytest.raises(ApiError, match="too long"):
            await collect(streams)
        await asyncio.sleep(0)  # a cancelled task would finish here
        return asyncio.all_tasks() - {asyncio.current_task()}

    assert asyncio.run(scenario()) == set()  # the "ok" stream's read is not left waiting forever


# --------------------------------------------------------------------------- live server


async def _post(session: aiohttp.ClientSession, url: str, path: str, body: dict) -> tuple[int, dict, float]:
    async with session.post(url + path, json=body) as response:
        payload = await response.json()
        return response.status, payload, time.monotonic()


def test_huge_prompt_is_refused_before_tokenizing(server):
    async def send() -> list[tuple[int, dict, float]]:
        async with aiohttp.ClientSession() as session:
            return [await _post(session, server.url, "/v1/completions",
                                {"model": "m", "prompt": HUGE_PROMPT, "max_tokens": 4}),
                    await _post(session, server.url, "/v1/chat/completions",
                                {"model": "m", "messages": [{"role": "user", "content": HUGE_PROMPT}]}),
                    await _post(session, server.url, "/generate",
                                {"text": HUGE_PROMPT, "sampling_params": {"max_new_tokens": 4}})]

    for status, payload, _ in asyncio.run(send()):
        assert status == 400, payload
        error = payload["error"]
        assert error["param"] == "messages_or_prompt"
        # the bound's wording: the count comes from the bytes, not from encoding 20 MB
        assert "at least" in error["message"] and "context length of" in error["message"], error


async def _in_flight(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url + "/get_server_info") as response:
        return (await response.json())["num_requests_in_flight"]


def test_small_request_is_not_held_behind_a_big_prompt(big_context_server):
    """A 2-token request sent while a ~6 MB prompt is being tokenized is answered first."""
    url = big_context_server.url
    big_prompt = "First Citizen: Before we proceed any further, hear me speak. All: Speak, speak. " * 80_000

    async def race() -> tuple[tuple[int, dict, float], tuple[int, dict, float]]:
        async with aiohttp.ClientSession() as session:
            big = asyncio.ensure_future(_post(session, url, "/v1/completions",
                                              {"model": "m", "prompt": big_prompt, "max_tokens": 1}))
            deadline = time.monotonic() + 60
            while await _in_flight(session, url) < 1:  # the big prompt is in the pipeline (tokenizing)
                assert not big.done(), big.result()
                assert time.monotonic() < deadline
                await asyncio.sleep(0.02)
            small = await _post(session, url, "/v1/completions", {"model": "m", "prompt": "Hi", "max_tokens": 2})
            return small, await big

    (small_status, small_body, small_done), (big_status, big_body, big_done) = asyncio.run(race())
    assert small_status == 200, small_body
    assert small_body["choices"][0]["finish_reason"] == "length"
    # the big prompt was tokenized (the engine counted its tokens) and refused there, after the small one ended
    assert big_status == 400 and "context length is 1024" in big_body["error"]["message"], big_body
    assert small_done < big_done


def test_a_failed_prompt_of_a_batch_cancels_the_others(server):
    """Runs last on ``server`` (stops it, to read every line the log gets, including those at shutdown)."""
    ok_prompt, long_prompt = "Hello there", "word " * 1000  # 1000+ tokens: the exact check after encoding

    async def batches() -> tuple[list[tuple[int, dict, float]], int]:
        async with aiohttp.ClientSession() as session:
            body = {"model": "m", "prompt": [ok_prompt, long_prompt], "max_tokens": 50, "n": 2, "ignore_eos": True}
            results = await asyncio.gather(*(_post(session, server.url, "/v1/completions", body) for _ in range(30)))
            native = {"text": [ok_prompt, "a" * 40_000], "sampling_params": {"max_new_tokens": 50, "n": 2}}
            results += await asyncio.gather(*(_post(session, server.url, "/generate", native) for _ in range(10)))
            await asyncio.sleep(0.5)  # the aborts reach the engine
            return results, await _in_flight(session, server.url)

    results, in_flight = asyncio.run(batches())
    assert {status for status, _, _ in results} == {400}
    assert in_flight == 0
    assert server.stop() == 0
    log = server.log_path.read_text()
    assert "aclose" not in log and "Task was destroyed" not in log and "Traceback" not in log, log[-3000:]
