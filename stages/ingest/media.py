"""Images and videos named in a request -> bytes, under size and time limits (ingest side).

A chat request names its pictures by URL (``image_url`` / ``video_url``
content parts, ``{"type": "video", "video": [url, ...]}`` for a video sent as
frames); the native ``/generate`` has ``image_data`` / ``video_data``. Each
becomes a ``MediaInput`` carrying the encoded bytes; decoding and resizing
happen later, in the multimodal stage, off this event loop.

Sources accepted:

* ``data:<mime>;base64,<payload>`` (and bare base64, as SGLang's native API);
* ``http(s)://`` fetched with aiohttp, at most ``MAX_MEDIA_BYTES`` and
  ``FETCH_TIMEOUT_S``; any failure is a 400 naming the URL's field;
* a local path or ``file://`` URL only under ``--allowed-local-media-path``,
  resolved with symlinks followed, never outside that directory.
"""
from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import aiohttp

from pipeline.messages import MediaInput
from stages.ingest.errors import ApiError, bad_request

MAX_MEDIA_BYTES = 32 * 1024 * 1024  # one image or video file
MAX_MEDIA_ITEMS = 64  # per request
FETCH_TIMEOUT_S = 10.0


async def load_bytes(source: Any, param: str, allowed_dir: str, session: aiohttp.ClientSession | None = None) -> bytes:
    """The bytes one media reference names (raises a 400 ApiError naming ``param``)."""
    if not isinstance(source, str) or not source:
        raise bad_request("an image or video reference must be a non-empty string (a URL or base64 data)", param)
    if source.startswith("data:"):
        return _data_url(source, param)
    scheme = urlparse(source).scheme.lower()
    if scheme in ("http", "https"):
        return await _fetch(source, param, session)
    if scheme == "file" or source.startswith("/") or source.startswith("."):
        return _local_file(source, param, allowed_dir)
    return _base64(source, param)


def _data_url(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma or ";base64" not in header:
        raise bad_request("a data URL must be data:<mime type>;base64,<data>", param)
    return _base64(payload, param)


def _base64(payload: str, param: str) -> bytes:
    if len(payload) > MAX_MEDIA_BYTES * 4 // 3 + 4:
        raise bad_request(f"the image or video is larger than {MAX_MEDIA_BYTES} bytes", param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("not a URL and not valid base64 data (send an http(s) URL or data:<mime>;base64,...)",
                          param) from None


async def _fetch(url: str, param: str, session: aiohttp.ClientSession | None) -> bytes:
    own = session is None
    session = session or aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S))
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT_S)) as response:
            if response.status != 200:
                raise bad_request(f"fetching {url} gave HTTP {response.status}", param)
            if (response.content_length or 0) > MAX_MEDIA_BYTES:
                raise bad_request(f"{url} is {response.content_length} bytes, more than {MAX_MEDIA_BYTES}", param)
            data = bytearray()
            async for chunk in response.content.iter_chunked(1 << 16):
                data += chunk
                if len(data) > MAX_MEDIA_BYTES:
                    raise bad_request(f"{url} is more than {MAX_MEDIA_BYTES} bytes", param)
            return bytes(data)
    except ApiError:
        raise
    except TimeoutError:
        raise bad_request(f"fetching {url} took more than {FETCH_TIMEOUT_S:g} s", param) from None
    except (aiohttp.ClientError, ValueError) as error:
        raise bad_request(f"could not fetch {url}: {error}", param) from None
    finally:
        if own:
            await session.close()


def _local_file(source: str, param: str, allowed_dir: str) -> bytes:
    if not allowed_dir:
        raise bad_request("local files are not served; start the server with --allowed-local-media-path DIR "
                          "to allow files under DIR", param)
    path = Path(unquote(urlparse(source).path) if source.startswith("file:") else source)
    root = Path(allowed_dir).resolve()
    try:
        resolved = path.resolve(strict=True)
    except (OSError, RuntimeError):
        raise bad_request(f"no such file under the allowed media directory: {source}", param) from None
    if not resolved.is_relative_to(root) or not resolved.is_file():
        raise bad_request(f"{source} is not a file under the allowed media directory", param)
    if resolved.stat().st_size > MAX_MEDIA_BYTES:
        raise bad_request(f"{source} is larger than {MAX_MEDIA_BYTES} bytes", param)
    return resolved.read_bytes()


def base64_media(payload: Any, param: str) -> MediaInput:
    """One image sent as base64 text (Ollama's ``images``), never a URL or a path."""
    if not isinstance(payload, str) or not payload:
        raise bad_request("an image must be non-empty base64 text", param)
    return MediaInput(modality="image", data=_base64(payload, param), param=param)


# --------------------------------------------------------------------------- chat content parts


def part_source(part: Any) -> tuple[str, Any] | None:
    """(modality, URL or list of frame URLs) of one chat content part; None for a text part."""
    kind = getattr(part, "type", None)
    if kind == "image_url":
        return "image", (getattr(part, "image_url", None) or {}).get("url")
    if kind == "video_url":
        return "video", (getattr(part, "video_url", None) or {}).get("url")
    if kind == "video":
        return "video", getattr(part, "video", None)
    return None


async def chat_media(messages: list[Any], allowed_dir: str) -> list[MediaInput]:
    """Every image and video of a chat request, in prompt order, as bytes."""
    found = [(f"messages[{i}].content[{j}]", source) for i, message in enumerate(messages)
             if isinstance(message.content, list) for j, part in enumerate(message.content)
             if (source := part_source(part)) is not None]
    if len(found) > MAX_MEDIA_ITEMS:
        raise bad_request(f"{len(found)} images/videos in one request; at most {MAX_MEDIA_ITEMS}", "messages")
    async with aiohttp.ClientSession() as session:
        return [await media_input(modality, source, param, allowed_dir, session)
                for param, (modality, source) in found]


async def media_input(modality: str, source: Any, param: str, allowed_dir: str,
                      session: aiohttp.ClientSession | None = None) -> MediaInput:
    """One image, video file or list of video frames -> MediaInput."""
    if modality == "video" and isinstance(source, list):
        if not source or len(source) > 256:
            raise bad_request("a video given as frames needs 1 to 256 of them", param)
        frames = [await load_bytes(frame, f"{param}[{k}]", allowed_dir, session) for k, frame in enumerate(source)]
        return MediaInput(modality="video", frames=frames, param=param)
    return MediaInput(modality=modality, data=await load_bytes(source, param, allowed_dir, session), param=param)


async def native_media(image_data: Any, video_data: Any, allowed_dir: str, where: str = "") -> list[MediaInput]:
    """One prompt's SGLang /generate ``image_data`` / ``video_data`` (a reference or a list) -> MediaInputs.

    A video is one reference (a file) or a list of frame references; ``where`` is the prompt's index
    in a batch (``"[2]"``), so that a 400 names ``image_data[2][0]``.
    """
    media: list[MediaInput] = []
    for name, modality, value in (("image_data", "image", image_data), ("video_data", "video", video_data)):
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if len(items) > MAX_MEDIA_ITEMS:
            raise bad_request(f"at most {MAX_MEDIA_ITEMS} items", name + where)
        async with aiohttp.ClientSession() as session:
            media += [await media_input(modality, item, f"{name}{where}[{k}]", allowed_dir, session)
                      for k, item in enumerate(items)]
    return media


async def native_prompt_media(image_data: Any, video_data: Any, num_prompts: int, batched: bool,
                              allowed_dir: str) -> list[list[MediaInput]]:
    """The media of each prompt of a /generate request, as SGLang shapes them.

    One prompt: ``image_data`` is one reference or a list of them (in the order of the prompt's
    placeholders). A batch (``text`` a list, or ``input_ids`` a list of lists): a list with one
    entry per prompt, each one reference, a list or null.
    """
    if not batched:
        return [await native_media(image_data, video_data, allowed_dir)]
    per_prompt = [_per_prompt(value, num_prompts, name)
                  for name, value in (("image_data", image_data), ("video_data", video_data))]
    return [await native_media(images, videos, allowed_dir, f"[{k}]")
            for k, (images, videos) in enumerate(zip(*per_prompt))]


def _per_prompt(value: Any, num_prompts: int, name: str) -> list[Any]:
    if value is None:
        return [None] * num_prompts
    if not isinstance(value, list) or len(value) != num_prompts:
        raise bad_request(f"a batch of {num_prompts} prompts needs a list of {num_prompts} entries "
                          "(one per prompt: a reference, a list of them, or null)", name)
    return value
