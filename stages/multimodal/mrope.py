"""M-RoPE position ids: three rows (time, height, width) per prompt token.

Qwen-VL models rotate each attention head's dimensions in three sections,
each by its own position. A text token has the same position in all three
rows, one more than the token before it. An image or video's pad tokens
(``t x h x w`` after the 2x2 merge, in row-major order) take

    time   = start + k * interval     (k: the token's temporal index)
    height = start + row
    width  = start + column

where ``start`` is the position the text before them reached, and the text
after them continues from ``start + max(h, w)``. ``interval`` is 1 for an
image; for a Qwen2.5-VL video it is ``tokens_per_second * second_per_grid_t``
truncated to an integer per step. This is Hugging Face's ``get_rope_index``
(transformers 5); ``rope_index`` below gives the same numbers without the
model. Qwen3-VL splits a video into one item per temporal step (its frames
are separated by timestamp text), so each of its items has ``t == 1``.

The decode position of sequence index ``i >= len(input_ids)`` is
``i + delta`` in all three rows, with ``delta = max(position) + 1 - len(input_ids)``.
"""
from __future__ import annotations

import numpy as np


def vision_positions(start: int, grid_thw: list[int], merge_size: int, interval: float = 1.0) -> np.ndarray:
    """[3, t*h*w/merge^2] positions of one item's pad tokens, offset by ``start``."""
    t, h, w = grid_thw[0], grid_thw[1] // merge_size, grid_thw[2] // merge_size
    time = (np.arange(t, dtype=np.float64) * interval).astype(np.int64) + start
    rows = np.arange(h, dtype=np.int64) + start
    cols = np.arange(w, dtype=np.int64) + start
    grid = np.stack(np.meshgrid(time, rows, cols, indexing="ij"))  # [3, t, h, w]
    return grid.reshape(3, -1)


def rope_index(num_tokens: int, spans: list[tuple[int, list[int], float]],
               merge_size: int) -> tuple[list[list[int]], int]:
    """M-RoPE positions of a prompt and its decode delta.

    ``spans``: per vision item, in prompt order, (offset of its first pad token,
    grid_thw, temporal interval); its pad tokens are ``offset .. offset + t*h*w/merge^2``.
    """
    pieces: list[np.ndarray] = []
    position = cursor = 0
    for offset, grid_thw, interval in sorted(spans, key=lambda span: span[0]):
        if offset < cursor:
            raise ValueError(f"vision items overlap at token {offset}")
        text_len = offset - cursor
        pieces.append(np.broadcast_to(np.arange(text_len, dtype=np.int64) + position, (3, text_len)))
        position += text_len
        block = vision_positions(position, grid_thw, merge_size, interval)
        pieces.append(block)
        cursor = offset + block.shape[1]
        position += max(grid_thw[1], grid_thw[2]) // merge_size
    if cursor > num_tokens:
        raise ValueError(f"vision items run past the prompt's {num_tokens} tokens")
    tail = num_tokens - cursor
    pieces.append(np.broadcast_to(np.arange(tail, dtype=np.int64) + position, (3, tail)))
    positions = np.concatenate(pieces, axis=1)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions.tolist(), delta
