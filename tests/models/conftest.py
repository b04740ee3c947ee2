"""Session-wide tiny checkpoints: each (architecture, overrides) is saved once."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pytest

from tests.models.tiny import save_tiny


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """make(name, **config_overrides) -> directory of a tiny random HF checkpoint."""
    saved: dict[str, Path] = {}

    def make(name: str, **overrides: Any) -> Path:
        key = f"{name}:{sorted(overrides.items())!r}"
        if key not in saved:
            saved[key] = save_tiny(name, tmp_path_factory.mktemp(name.replace(".", "_")), **overrides)
        return saved[key]

    return make
