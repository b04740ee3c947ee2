"""Media references -> bytes (stages/ingest/media.py), and a chat with an image down to the schedule stage's input.

The HTTP fetch runs against a local aiohttp server; file:// reads are checked
against --allowed-local-media-path, symlinks included.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os

import msgspec
import numpy as np
import pytest
from aiohttp import web
from PIL import Image

from stages.ingest.convert import chat_request
from stages.ingest.errors import ApiError
from stages.ingest.media import chat_media, load_bytes, native_media
from stages.ingest.protocol import ChatCompletionRequest
from stages.multimodal.prepare import VisionModel, prepare
from stages.multimodal.processor import VisionPreprocess
from stages.tokenize import tokenize_request


def png(width: int = 40, height: int = 30) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def load(source, allowed: str = "") -> bytes:
    return asyncio.run(load_bytes(source, "messages[0].content[1]", allowed))


def test_data_url_and_bare_base64():
    assert load(data_url(png())) == png()
    assert load(base64.b64encode(png()).decode()) == png()
    with pytest.raises(ApiError, match="base64") as error:
        load("data:image/png;base64,@@@")
    assert error.value.status == 400 and error.value.param == "messages[0].content[1]"


def test_local_files_only_under_the_allowed_directory(tmp_path):
    allowed = tmp_path / "media"
    allowed.mkdir()
    (allowed / "a.png").write_bytes(png())
    (tmp_path / "secret.png").write_bytes(b"secret")
    os.symlink(tmp_path / "secret.png", allowed / "link.png")
    with pytest.raises(ApiError, match="--allowed-local-media-path"):
        load(f"file://{allowed / 'a.png'}")
    assert load(f"file://{allowed / 'a.png'}", str(allowed)) == png()
    for outside in (f"file://{tmp_path / 'secret.png'}", f"file://{allowed}/../secret.png",
                    f"file://{allowed / 'link.png'}", str(allowed / "missing.png")):
        with pytest.raises(ApiError, match="allowed media directory"):
            load(outside, str(allowed))


def _respond(body: bytes):
    async def handler(_: web.Request) -> web.Response:
        return web.Response(body=body)
    return handler


def test_http_fetch_limits(monkeypatch):
    import stages.ingest.media as media

    async def run() -> list:
        app = web.Application()
        app.router.add_get("/ok.png", _respond(png()))
        app.router.add_get("/big", _respond(b"x" * 5000))
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        results = []
        try:
            results.append(await load_bytes(f"http://127.0.0.1:{port}/ok.png", "p", ""))
            monkeypatch.setattr(media, "MAX_MEDIA_BYTES", 1000)
            for path in ("/big", "/missing"):
                try:
                    await load_bytes(f"http://127.0.0.1:{port}{path}", "p", "")
                except ApiError as error:
                    results.append(error)
        finally:
            await runner.cleanup()
        return results

    ok, big, missing = asyncio.run(run())
    assert ok == png()
    assert "5000 bytes, more than 1000" in big.message and "HTTP 404" in missing.message


def test_native_image_data_names_its_items():
    media = asyncio.run(native_media([data_url(png()), data_url(png(8, 8))], None, ""))
    assert [m.param for m in media] == ["image_data[0]", "image_data[1]"] and media[1].data == png(8, 8)


TEMPLATE = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
            "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
            "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
            "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}{{ part['text'] }}"
            "{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def vision_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders
    from transformers import PreTrainedTokenizerFast

    specials = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({ch: len(vocab) + i for i, ch in enumerate(pre_tokenizers.ByteLevel.alphabet())})
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, additional_special_tokens=specials)
    tokenizer.chat_template = TEMPLATE
    return tokenizer


def test_chat_with_an_image_reaches_the_schedule_input():
    body = msgspec.convert({"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is"}, {"type": "image_url", "image_url": {"url": data_url(png())}},
        {"type": "text", "text": "?"}]}]}, ChatCompletionRequest)
    request = chat_request(body, "r", 0.0)
    request = msgspec.structs.replace(request, media=asyncio.run(chat_media(body.messages, "")), image_urls=[])
    tokenizer = vision_tokenizer()
    pad = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    with pytest.raises(Exception, match="does not accept"):
        tokenize_request(tokenizer, request, 4096, len(tokenizer))
    (sequence,) = tokenize_request(tokenizer, request, 4096, len(tokenizer), accepts_media=True)
    assert sequence.input_ids.count(pad) == 1 and sequence.media[0].param == "messages[0].content[1]"
    rules = VisionPreprocess(min_pixels=32 * 32, max_pixels=64 * 64 * 4, patch_size=16)
    vision = VisionModel(model_type="qwen2_5_vl", image_token_id=pad, video_token_id=-1, merge_size=2,
                         tokens_per_second=2.0, rules=rules)
    out = prepare(sequence, vision, 4096)
    (item,) = out.mm_items
    assert item.grid_thw == [1, 2, 2] and item.length == 1  # 40x30 -> 32x32 pixels -> 2x2 patches -> 1 token
    assert out.input_ids[item.offset] == pad and len(out.mrope_positions[0]) == len(out.input_ids)
