"""Images and videos given to the Python ``Engine`` -> ``MediaInput`` bytes.

The Engine runs in the caller's process, so its media come as Python values
rather than over HTTP: ``bytes`` of an encoded file, a path to one, a
``data:`` URL or bare base64 text, or a Pillow image (saved as PNG). A video
is one of those naming a video file, or a list of frames (each an image as
above). ``image_data`` / ``video_data`` are SGLang's Engine argument names;
each is one value or a list, in the order the prompt's placeholders appear.
Reading a local path is the caller's own business here (no
``--allowed-local-media-path``: that guards the HTTP server).
"""
from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

from pipeline.messages import MediaInput


class MediaArgumentError(ValueError):
    """A media argument the Engine cannot read; ``param`` names it (``image_data[1]``)."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


def engine_media(image_data: Any = None, video_data: Any = None) -> list[MediaInput]:
    """MediaInputs of SGLang-shaped ``image_data`` / ``video_data`` (None: none)."""
    media: list[MediaInput] = []
    for name, modality, value in (("image_data", "image", image_data), ("video_data", "video", video_data)):
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        for k, item in enumerate(items):
            param = f"{name}[{k}]"
            if modality == "video" and isinstance(item, (list, tuple)):
                frames = [_bytes_of(frame, f"{param}[{j}]") for j, frame in enumerate(item)]
                media.append(MediaInput(modality="video", frames=frames, param=param))
            else:
                media.append(MediaInput(modality=modality, data=_bytes_of(item, param), param=param))
    return media


def _bytes_of(value: Any, param: str) -> bytes:
    """Encoded file bytes of one image/video argument."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if hasattr(value, "save") and hasattr(value, "size"):  # a Pillow image
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(value, Path):
        return _read(value, param)
    if not isinstance(value, str):
        raise MediaArgumentError(f"expected bytes, a path, a data URL, base64 text or a PIL image, "
                                 f"got {type(value).__name__}", param)
    if value.startswith("data:"):
        _, _, value = value.partition(",")
        return _b64(value, param)
    if value.startswith("file://"):
        return _read(Path(value[len("file://"):]), param)
    path = Path(value)
    if len(value) < 4096 and path.is_file():
        return _read(path, param)
    return _b64(value, param)


def _read(path: Path, param: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as error:
        raise MediaArgumentError(f"cannot read {path}: {error.strerror}", param) from None


def _b64(text: str, param: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise MediaArgumentError("not a readable file path, a data URL or base64 text", param) from None
