"""Pixels for a Qwen-VL vision encoder: decode, smart resize, normalise, patchify.

The rules are Qwen2-VL's image processor's (Qwen2.5-VL and Qwen3-VL share
them), read from the model's ``preprocessor_config.json``:

1. **decode** with Pillow; RGB, a transparent image laid on white.
2. **smart resize** (``smart_resize``): each side rounded to a multiple of
   ``factor = patch_size * merge_size``, the area brought inside
   ``[min_pixels, max_pixels]`` with the aspect ratio kept; bicubic.
3. **normalise**: ``(x / 255 - mean) / std`` per channel, float32.
4. **patchify**: ``[C, H, W]`` -> ``[t * h * w, C * temporal_patch * patch * patch]``
   with ``h = H / patch``, ``w = W / patch``; rows are ordered by merge window
   (each 2x2 window of patches is 4 consecutive rows), the layout the vision
   encoder's patch merger expects. An image repeats itself ``temporal_patch``
   times along time (``t = 1``); a video stacks ``temporal_patch`` frames per
   time step (the last frame repeated to fill the last step). Qwen3-VL's video
   processor bounds the pixels of the whole video rather than of one frame
   (``smart_resize_video``).

The number of pad tokens an item takes in the prompt is
``t * h * w // merge_size**2``. Everything here is plain NumPy + Pillow and
runs on the multimodal stage's worker threads; a bad picture raises
``MediaError`` naming the problem.
"""
from __future__ import annotations

import io
import json
import math
import warnings
from pathlib import Path
from typing import Any

import msgspec
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200  # Qwen's smart resize refuses anything longer and thinner
MAX_DECODE_PIXELS = 64 * 1024 * 1024  # pictures larger than this (before resizing) are refused
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


class MediaError(ValueError):
    """An image or video cannot be used; the message names the problem, ``param`` the request field."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class VisionPreprocess(msgspec.Struct, frozen=True, kw_only=True):
    """The model's preprocessing rules (preprocessor_config.json, defaults as Hugging Face's)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    # Videos (a video_preprocessor_config.json when there is one, else the image rules).
    video_min_pixels: int = 0
    video_max_pixels: int = 0
    video_fps: float = 2.0  # frames per second a frame list is assumed to be sampled at

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    def tokens_for(self, grid_thw: list[int]) -> int:
        """Pad tokens an item with this patch grid takes in the prompt."""
        return grid_thw[0] * grid_thw[1] * grid_thw[2] // self.merge_size ** 2


def _pixel_bounds(config: dict[str, Any], default_min: int, default_max: int) -> tuple[int, int]:
    """(min_pixels, max_pixels): the explicit keys win over ``size`` (as Hugging Face's processor)."""
    size = config.get("size") or {}
    low = config.get("min_pixels") or size.get("shortest_edge") or size.get("min_pixels") or default_min
    high = config.get("max_pixels") or size.get("longest_edge") or size.get("max_pixels") or default_max
    return int(low), int(high)


def load_preprocess(model_dir: str | Path, vision_config: dict[str, Any]) -> VisionPreprocess:
    """Read preprocessor_config.json (and video_preprocessor_config.json) beside the model."""
    model_dir = Path(model_dir)
    image = _read_json(model_dir / "preprocessor_config.json")
    video = _read_json(model_dir / "video_preprocessor_config.json") or image
    defaults = VisionPreprocess()
    patch = int(image.get("patch_size") or vision_config.get("patch_size") or defaults.patch_size)
    merge = int(image.get("merge_size") or vision_config.get("spatial_merge_size") or defaults.merge_size)
    temporal = int(image.get("temporal_patch_size") or vision_config.get("temporal_patch_size")
                   or defaults.temporal_patch_size)
    low, high = _pixel_bounds(image, defaults.min_pixels, defaults.max_pixels)
    video_low, video_high = _pixel_bounds(video, low, high)
    return VisionPreprocess(
        min_pixels=low, max_pixels=high, patch_size=patch, temporal_patch_size=temporal, merge_size=merge,
        image_mean=tuple(image.get("image_mean") or CLIP_MEAN), image_std=tuple(image.get("image_std") or CLIP_STD),
        rescale_factor=float(image.get("rescale_factor") or 1 / 255),
        video_min_pixels=video_low, video_max_pixels=video_high, video_fps=float(video.get("fps") or 2.0))


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


# --------------------------------------------------------------------------- decode


def open_image(data: bytes, what: str) -> Any:
    """Decode one encoded picture to an RGB ``PIL.Image`` (raises MediaError naming ``what``'s problem)."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise MediaError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.width, image.height, what)
            if image.format not in IMAGE_FORMATS:
                raise MediaError(f"{what} is a {image.format} image; send PNG, JPEG, WebP, GIF or BMP")
            image.load()
    except MediaError:
        raise
    except UnidentifiedImageError:
        raise MediaError(f"{what} is not an image Pillow can read (PNG, JPEG, WebP, GIF or BMP)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise MediaError(f"{what} could not be decoded ({error}); is it truncated?") from None
    return to_rgb(image)


def _check_size(width: int, height: int, what: str) -> None:
    if width <= 0 or height <= 0:
        raise MediaError(f"{what} has no pixels ({width}x{height})")
    if width * height > MAX_DECODE_PIXELS:
        raise MediaError(f"{what} has {width}x{height} = {width * height} pixels, more than the "
                         f"{MAX_DECODE_PIXELS} this server decodes")
    if max(width, height) / min(width, height) > MAX_ASPECT_RATIO:
        raise MediaError(f"{what} is {width}x{height}: its aspect ratio is over {MAX_ASPECT_RATIO}")


def to_rgb(image: Any) -> Any:
    """RGB, with a transparent picture composited onto white (as Hugging Face's convert_rgb)."""
    from PIL import Image

    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


# --------------------------------------------------------------------------- resize, normalise, patchify


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen's target size: sides multiples of ``factor``, area in [min_pixels, max_pixels], ratio kept."""
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def normalized(image: Any, height: int, width: int, rules: VisionPreprocess) -> np.ndarray:
    """The RGB picture resized (bicubic) to height x width and normalised: float32 [3, H, W]."""
    from PIL import Image

    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), resample=Image.Resampling.BICUBIC)
    pixels = (np.asarray(image, dtype=np.float64) * rules.rescale_factor).astype(np.float32)
    mean = np.asarray(rules.image_mean, dtype=np.float32)
    std = np.asarray(rules.image_std, dtype=np.float32)
    return ((pixels - mean) / std).transpose(2, 0, 1)  # [H, W, 3] -> [3, H, W]


def patchify(frames: np.ndarray, rules: VisionPreprocess) -> tuple[np.ndarray, list[int]]:
    """[T, C, H, W] (T a multiple of temporal_patch) -> ([t*h*w, C*tp*p*p] float32, [t, h, w])."""
    T, C, H, W = frames.shape
    p, m, tp = rules.patch_size, rules.merge_size, rules.temporal_patch_size
    t, h, w = T // tp, H // p, W // p
    patches = frames.reshape(t, tp, C, h // m, m, p, w // m, m, p)
    # (t, h/m, w/m, m, m, C, tp, p, p): merge windows outermost, one patch's pixels innermost
    patches = patches.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return np.ascontiguousarray(patches.reshape(t * h * w, C * tp * p * p), dtype=np.float32), [t, h, w]


def image_patches(image: Any, rules: VisionPreprocess) -> tuple[np.ndarray, list[int]]:
    """One RGB picture -> its pixel patches and grid [1, h, w]."""
    height, width = smart_resize(image.height, image.width, rules.factor, rules.min_pixels, rules.max_pixels)
    pixels = normalized(image, height, width, rules)
    frames = np.broadcast_to(pixels[None], (rules.temporal_patch_size, *pixels.shape))
    return patchify(frames, rules)


def smart_resize_video(num_frames: int, height: int, width: int, factor: int, temporal_factor: int,
                       min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen3-VL's video size: as ``smart_resize`` but the bounds hold for the pixels of all frames
    (``frames * height * width``, frames rounded to a multiple of ``temporal_factor``), and a side
    shorter than ``factor`` is first scaled up to it. Fewer frames than ``temporal_factor`` count as
    ``temporal_factor`` (the last frame is repeated to fill the step)."""
    num_frames = max(num_frames, temporal_factor)
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise MediaError(f"aspect ratio must be at most {MAX_ASPECT_RATIO}, got {height}x{width}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt(num_frames * height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def video_patches(frames: list[Any], rules: VisionPreprocess,
                  whole_video_bounds: bool = False) -> tuple[np.ndarray, list[int]]:
    """RGB frames of one video -> pixel patches and grid [t, h, w] (all frames resized alike).

    ``whole_video_bounds``: the pixel bounds hold for all frames together (Qwen3-VL's video
    processor, ``smart_resize_video``) rather than for one frame (Qwen2-VL's).
    """
    if not frames:
        raise MediaError("a video needs at least one frame")
    first = frames[0]
    low = rules.video_min_pixels or rules.min_pixels
    high = rules.video_max_pixels or rules.max_pixels
    if whole_video_bounds:
        height, width = smart_resize_video(len(frames), first.height, first.width, rules.factor,
                                           rules.temporal_patch_size, low, high)
    else:
        height, width = smart_resize(first.height, first.width, rules.factor, low, high)
    stack = [normalized(frame, height, width, rules) for frame in frames]
    while len(stack) % rules.temporal_patch_size:
        stack.append(stack[-1])
    return patchify(np.stack(stack), rules)
