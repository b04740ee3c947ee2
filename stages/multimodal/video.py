"""Video files -> RGB frames, with PyAV (the optional ``video`` extra).

A video sent as a list of pictures needs nothing from here. A video file is
decoded with PyAV when it is installed (``pip install 'stagewise[video]'``);
without it the request gets a 400 that names the missing extra. Frames are
sampled at ``fps`` frames per second of video time, at most ``MAX_FRAMES``
(Hugging Face's video processors instead take evenly spaced frames, at least
four; for a video file the sampled frames may differ from theirs).

Qwen3-VL writes the time of each temporal step of a video into the prompt
(``<1.5 seconds>``): ``step_times`` gives them as its processor does from
each frame's time (a decoded frame's presentation time; frame ``i`` of a
list taken at ``fps`` at ``i / fps``), the frames padded to a multiple of the
temporal patch with the last one, each step the mean of its first and last
frame's time.
"""
from __future__ import annotations

import io
from typing import Any

from stages.multimodal.processor import MediaError, to_rgb

MAX_FRAMES = 64


def decode_video(data: bytes, fps: float, what: str) -> tuple[list[Any], list[float]]:
    """(RGB frames sampled at ``fps``, the time of each in seconds); MediaError on a bad file."""
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


def _sample(container: Any, fps: float, what: str) -> tuple[list[Any], list[float]]:
    if not container.streams.video:
        raise MediaError(f"{what} has no video stream")
    frames: list[Any] = []
    times: list[float] = []
    next_time_s = 0.0
    for frame in container.decode(video=0):
        time_s = float(frame.time or 0.0)
        if time_s + 1e-6 < next_time_s:
            continue
        frames.append(to_rgb(frame.to_image()))
        times.append(time_s)
        next_time_s += 1.0 / fps
        if len(frames) >= MAX_FRAMES:
            break
    if not frames:
        raise MediaError(f"{what} has no frames")
    return frames, times


def step_times(frame_times: list[float], temporal_patch_size: int) -> list[float]:
    """Seconds of each temporal grid step of a video whose frames were taken at ``frame_times``."""
    times = list(frame_times) + [frame_times[-1]] * (-len(frame_times) % temporal_patch_size)
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def timestamp_text(seconds: float) -> str:
    """The text Qwen3-VL writes before a temporal step's frames."""
    return f"<{seconds:.1f} seconds>"
