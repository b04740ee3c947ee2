"""What the engine tests share: tiny checkpoints by architecture, a CPU engine, the clean-pool check.

``tiny_checkpoints`` builds each tiny architecture (``tests/models/tiny.py``)
once per test module, with the tiny tokenizer beside it; ``cpu_engine`` is the
Engine on the reference kernels on CPU; ``assert_pool_clean`` checks that a
run left the KV pool as it found it (every page free again once the cache is
flushed, nothing protected or held).
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from pipeline.engine import Engine
from tests.models.tiny import save_tiny
from tests.server.tiny_model import save_tiny_tokenizer

# the dense and MoE decoders of tests/models/tiny.py that the engine variants are checked on
ARCHITECTURES = ["llama3.1", "llama3.2", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe"]


def tiny_checkpoints(tmp_path_factory: Any, prefix: str, tokenizer_vocab: int,
                     **overrides: Any) -> Callable[[str], Path]:
    """``make(arch)``: the tiny ``arch`` checkpoint (config ``overrides`` applied) with a
    ``tokenizer_vocab``-token tokenizer, saved on first use."""
    made: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in made:
            path = save_tiny(arch, tmp_path_factory.mktemp(f"{prefix}_{arch.replace('.', '_')}"), **overrides)
            save_tiny_tokenizer(path, tokenizer_vocab)
            made[arch] = path
        return made[arch]

    return make


def cpu_engine(path: Path | str, **kwargs: Any) -> Engine:
    """An Engine on CPU with the reference kernels and a 4096-token pool (unless ``kwargs`` say otherwise)."""
    kwargs.setdefault("max_total_tokens", 4096)
    kwargs.setdefault("kernel_backend", "reference")
    kwargs.setdefault("device", "cpu")
    return Engine(str(path), **kwargs)


def assert_pool_clean(engine: Engine, free_before: int) -> None:
    """Once the step planned ahead has come back: integrity holds and a flush frees every page."""
    deadline = time.monotonic() + 10
    while engine.schedule.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    engine.check_integrity()
    kv = engine.schedule.kv
    kv.flush()
    assert kv.pool.num_free_tokens == free_before
    assert kv.tree.protected_size == 0 and not kv.holders
