"""Video files -> RGB frames, with PyAV (the optional ``video`` extra).

A video sent as a list of pictures needs nothing from here. A video file is
decoded with PyAV when it is installed (``pip install 'stagewise[video]'``);
without it the request gets a 400 that names the missing extra. Frames are
sampled at ``fps`` frames per second of video time, at most ``MAX_FRAMES``.
"""
from __future__ import annotations

import io
from typing import Any

from stages.multimodal.processor import MediaError, to_rgb

MAX_FRAMES = 64


def decode_video(data: bytes, fps: float, what: str) -> tuple[list[Any], float]:
    """(RGB frames sampled at ``fps``, the rate they were sampled at); MediaError on a bad file."""
    try:
        import av
    except ImportError:
        raise MediaError(f"{what}: video files need PyAV, the optional extra 'video' "
                         "(pip install 'stagewise[video]'); a video sent as a list of frames needs nothing") from None
    if not data:
        raise MediaError(f"{what} is empty")
    try:
        with av.open(io.BytesIO(data)) as container:
            return _sample(container, fps, what)
    except MediaError:
        raise
    except Exception as error:  # PyAV raises its own error family for broken containers
        raise MediaError(f"{what} is not a video PyAV can decode ({error})") from None


def _sample(container: Any, fps: float, what: str) -> tuple[list[Any], float]:
    if not container.streams.video:
        raise MediaError(f"{what} has no video stream")
    frames: list[Any] = []
    next_time_s = 0.0
    for frame in container.decode(video=0):
        time_s = float(frame.time or 0.0)
        if time_s + 1e-6 < next_time_s:
            continue
        frames.append(to_rgb(frame.to_image()))
        next_time_s += 1.0 / fps
        if len(frames) >= MAX_FRAMES:
            break
    if not frames:
        raise MediaError(f"{what} has no frames")
    return frames, fps
