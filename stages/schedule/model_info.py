"""What the schedule stage must know about the model and the KV pool.

The forward stage measures the pool after loading the weights and builds
this record; the engine hands it to the schedule stage at construction (the
schedule stage never imports the model).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    num_slots: int  # KV pool slots, page 0 (the padding page) included
    num_rows: int  # rows of req_to_token, row 0 (dummy) included
    context_len: int  # longest sequence (prompt + output) a request may reach
    vocab_size: int
    eos_token_ids: tuple[int, ...]  # model config + generation_config eos ids
