"""Test-wide setup.

On a machine without a GPU the Triton kernels run under the interpreter
(``TRITON_INTERPRET=1``), which must be set before any ``@triton.jit`` function
is defined, so it happens here, before the project is imported. On a GPU the
kernels run compiled and the ``device`` fixture hands tests ``cuda``.
"""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture
def device() -> torch.device:
    """The device kernels under test run on: cuda when present, else cpu (interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
