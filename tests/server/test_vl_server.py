"""A live ``stagewise serve`` on a tiny Qwen2.5-VL checkpoint, through the official ``openai`` client.

The checkpoint is tests/engine/vl_checkpoint.py's (random weights, byte-level BPE
tokenizer with Qwen's vision tokens). Greedy tokens equal transformers'
``generate`` for one image (a data URL), two images of odd sizes in one
message, a video sent as frames and an image-less chat, with the radix cache on
and off and with prefill chunks of 16 tokens that cut through the images; streamed and whole answers agree. The same image sent twice is served
from the multimodal cache, which /metrics and /get_server_info show. Bad media
is a 400 naming the content part, and the server goes on serving. SGLang's
native ``/generate`` takes ``image_data`` / ``video_data``; Ollama's /api/chat
and /api/generate take base64 ``images``. A fourth server, on a tiny Qwen3-VL,
answers a video sent as frames (a ``<t seconds>`` text before each temporal
step) with transformers' tokens.
"""
from __future__ import annotations

import base64
import json
import re
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

from tests.engine.vl_checkpoint import IM_END, build, picture, reference_tokens
from tests.server.conftest import running_server

NEW = 6
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = {"temperature": 0.0, "max_tokens": NEW}
NO_EOS = {"ignore_eos": True, "return_token_ids": True}


def chat_prompt(content: str) -> str:
    """The text the checkpoint's chat template renders for one user turn."""
    return f"<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n"


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def image_part(data: bytes) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data)}}


def text_part(text: str) -> dict:
    return {"type": "text", "text": text}


# case -> (content parts, the same content as template text, images, videos as frame lists)
def _cases() -> dict[str, tuple[list[dict], str, list[bytes], list[list[bytes]]]]:
    one = picture(61, 45, 1)
    two = [picture(90, 37, 2), picture(33, 71, 3)]
    frames = [picture(50, 40, seed) for seed in (4, 5, 6)]
    return {
        "one_image": ([text_part("look "), image_part(one), text_part(" what?")], f"look {IMAGE} what?", [one], []),
        "two_images": ([image_part(two[0]), text_part(" and "), image_part(two[1]), text_part(" differ?")],
                       f"{IMAGE} and {IMAGE} differ?", two, []),
        "video": ([text_part("watch "), {"type": "video", "video": [data_url(f) for f in frames]}, text_part(" now")],
                  f"watch {VIDEO} now", [], [frames]),
        "text_only": ([text_part("no picture here, just words")], "no picture here, just words", [], []),
    }


CASES = _cases()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2_5_vl")
    return path, build("qwen2_5_vl", path)


@pytest.fixture(scope="module")
def expected(checkpoint) -> dict[str, list[int]]:
    path, hf = checkpoint
    return {case: reference_tokens(hf, path, chat_prompt(text), images, videos, NEW)
            for case, (_, text, images, videos) in CASES.items()}


@pytest.fixture(scope="module", params=["radix", "no_radix", "chunk16"])
def server(request, checkpoint, tmp_path_factory):
    path, _ = checkpoint
    media_dir = tmp_path_factory.mktemp("media")
    flags = ["--allowed-local-media-path", str(media_dir)]
    if request.param == "no_radix":
        flags.append("--disable-radix-cache")
    if request.param == "chunk16":  # prefill chunks of 16 tokens cut through every image
        flags += ["--chunked-prefill-size", "16"]
    with running_server(path, tmp_path_factory.mktemp("logs") / f"{request.param}.log", *flags) as process:
        process.media_dir = media_dir
        process.radix = request.param != "no_radix"
        yield process


def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300)


def chat(server, content: list[dict], **kwargs):
    return client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": content}],
                                                  extra_body=NO_EOS, **GREEDY, **kwargs)


def post(server, path: str, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(server.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(server, path: str) -> str:
    with urllib.request.urlopen(server.url + path, timeout=60) as response:
        return response.read().decode()


def metric(text: str, name: str) -> float:
    """The sum of a series' samples in a Prometheus text page (0 when absent)."""
    return sum(float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M))


# --------------------------------------------------------------------------- OpenAI chat


@pytest.mark.parametrize("case", list(CASES))
def test_chat_greedy_tokens_equal_transformers(server, expected, case):
    content = CASES[case][0]
    whole = chat(server, content)
    assert whole.choices[0].model_extra["token_ids"] == expected[case], case
    streamed = chat(server, content, stream=True)
    text, ids = "", []
    for chunk in streamed:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            ids += chunk.choices[0].model_extra.get("token_ids") or []
    assert ids == expected[case] and text == whole.choices[0].message.content


def test_same_image_twice_is_an_mm_cache_hit_in_metrics(server, expected):
    content = [text_part("again "), image_part(picture(47, 39, 11)), text_part(" twice")]
    before = _settled_mm_counters(server)
    first, second = chat(server, content), chat(server, content)
    assert first.choices[0].model_extra["token_ids"] == second.choices[0].model_extra["token_ids"]
    after = _mm_counters(server, until=lambda c: c["encoded"] >= before["encoded"] + 1
                         and c["lookups"] >= before["lookups"] + (1 if server.radix else 2))
    assert after["encoded"] == before["encoded"] + 1  # encoded once
    if not server.radix:  # the second request re-reads the image from the multimodal cache
        assert after["hits"] == before["hits"] + 1
        assert 0.0 < after["hit_rate"] <= 1.0
    info = json.loads(get(server, "/get_server_info"))["multimodal"]
    assert info["mm_images_encoded"] == after["encoded"] and info["mm_cache_hits"] == after["hits"]


def _settled_mm_counters(server) -> dict[str, float]:
    """The counters once every earlier request's work has been published (two reads a publication apart agree)."""
    last = _mm_counters(server)
    while True:
        time.sleep(1.2)  # the runner publishes its counters once a second
        now = _mm_counters(server)
        if now == last:
            return now
        last = now


def _mm_counters(server, until=None, timeout_s: float = 10.0) -> dict[str, float]:
    """The multimodal series of /metrics; with ``until``, polled until it holds (counters come once a second)."""
    deadline = time.monotonic() + timeout_s
    while True:
        page = get(server, "/metrics")
        counters = {"encoded": metric(page, "stagewise:mm_images_encoded_total"),
                    "lookups": metric(page, "stagewise:mm_cache_lookups_total"),
                    "hits": metric(page, "stagewise:mm_cache_hits_total"),
                    "hit_rate": metric(page, "stagewise:mm_cache_hit_rate")}
        if until is None or until(counters) or time.monotonic() > deadline:
            return counters
        time.sleep(0.25)


def test_bad_media_is_a_400_naming_it_and_the_server_goes_on(server, expected):
    not_an_image = "data:image/png;base64," + base64.b64encode(b"this is text, not a picture").decode()
    bad = [text_part("look "), {"type": "image_url", "image_url": {"url": not_an_image}}]
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, bad)
    assert "messages[0].content[1]" in str(caught.value.body)
    with pytest.raises(openai.BadRequestError) as caught:
        chat(server, [text_part("x"), {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}])
    assert "base64" in str(caught.value.body)
    assert chat(server, CASES["one_image"][0]).choices[0].model_extra["token_ids"] == expected["one_image"]


# --------------------------------------------------------------------------- native /generate and Ollama


def test_native_generate_image_data(server, expected):
    _, text, images, _ = CASES["two_images"]
    sampling = {"temperature": 0.0, "max_new_tokens": NEW, "ignore_eos": True}
    body = {"text": chat_prompt(text), "sampling_params": sampling,
            "image_data": [base64.b64encode(images[0]).decode(), data_url(images[1])]}
    status, answer = post(server, "/generate", body)
    assert status == 200 and answer["output_ids"] == expected["two_images"], answer
    # a batch: one entry per prompt; the second image from a file under --allowed-local-media-path
    (Path(server.media_dir) / "one.png").write_bytes(CASES["one_image"][2][0])
    batch = {"text": [chat_prompt(CASES["one_image"][1]), chat_prompt(CASES["text_only"][1])],
             "image_data": [str(Path(server.media_dir) / "one.png"), None], "sampling_params": sampling}
    status, answers = post(server, "/generate", batch)
    assert status == 200 and [a["output_ids"] for a in answers] == [expected["one_image"], expected["text_only"]]
    # video_data: a video as a list of frames
    _, text, _, [frames] = CASES["video"]
    status, answer = post(server, "/generate", {"text": chat_prompt(text), "sampling_params": sampling,
                                                "video_data": [[data_url(f) for f in frames]]})
    assert status == 200 and answer["output_ids"] == expected["video"]
    status, error = post(server, "/generate", {"text": chat_prompt(text), "image_data": "/etc/passwd"})
    assert status == 400 and "image_data[0]" in json.dumps(error)
    status, error = post(server, "/generate", {"text": [chat_prompt(text)] * 2, "image_data": ["x"]})
    assert status == 400 and "image_data" in json.dumps(error)


def _until_eos(ids: list[int]) -> list[int]:
    return ids[:ids.index(IM_END)] if IM_END in ids else ids


def test_ollama_images(server, checkpoint, expected):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(checkpoint[0]))
    hf, path = checkpoint[1], checkpoint[0]
    image = picture(61, 45, 1)
    # Ollama puts a turn's images before its text
    want = _until_eos(reference_tokens(hf, path, chat_prompt(f"{IMAGE}what?"), [image], [], NEW))
    options = {"temperature": 0, "num_predict": NEW}
    status, answer = post(server, "/api/chat", {"model": "m", "stream": False, "options": options, "messages": [
        {"role": "user", "content": "what?", "images": [base64.b64encode(image).decode()]}]})
    assert status == 200 and answer["message"]["content"] == tokenizer.decode(want, skip_special_tokens=True)
    status, answer = post(server, "/api/generate", {"model": "m", "stream": False, "options": options,
                                                    "prompt": "what?", "images": [base64.b64encode(image).decode()]})
    assert status == 200 and answer["response"] == tokenizer.decode(want, skip_special_tokens=True)
    status, error = post(server, "/api/chat", {"model": "m", "stream": False, "messages": [
        {"role": "user", "content": "what?", "images": ["not base64!"]}]})
    assert status == 400 and "base64" in error["error"]


# --------------------------------------------------------------------------- Qwen3-VL video


@pytest.fixture(scope="module")
def qwen3_server(tmp_path_factory):
    """A tiny Qwen3-VL behind the server, prefill chunks of 16 tokens cutting through the video's steps."""
    path = tmp_path_factory.mktemp("qwen3_vl")
    hf = build("qwen3_vl", path)
    with running_server(path, tmp_path_factory.mktemp("logs") / "qwen3_vl.log",
                        "--chunked-prefill-size", "16") as process:
        process.reference = hf, path
        yield process


def test_qwen3_video_with_timestamps_equals_transformers(qwen3_server):
    """Qwen3-VL writes '<t seconds>' before each temporal step of the video; tokens equal transformers'."""
    from transformers import AutoTokenizer
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import smart_resize

    hf, path = qwen3_server.reference
    frames = [picture(64, 48, seed) for seed in range(20, 25)]  # 3 steps at 2 fps: 0.25 s, 1.25 s, 2.0 s
    want = reference_tokens(hf, path, chat_prompt(f"watch {VIDEO} now"), [], [frames], NEW)
    content = [text_part("watch "), {"type": "video", "video": [data_url(f) for f in frames]}, text_part(" now")]
    for _ in range(2):  # the second time from the radix and multimodal caches
        answer = chat(qwen3_server, content)
        assert answer.choices[0].model_extra["token_ids"] == want
    height, width = smart_resize(5, 48, 64, 2, 32, 32 * 32 * 2, 32 * 32 * 12)  # the checkpoint's pixel bounds
    pads = "<|video_pad|>" * (height // 32 * width // 32)
    steps = "".join(f"<{t} seconds><|vision_start|>{pads}<|vision_end|>" for t in ("0.2", "1.2", "2.0"))
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    assert answer.usage.prompt_tokens == len(tokenizer.encode(chat_prompt(f"watch {steps} now")))
