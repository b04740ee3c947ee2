"""bf16 Triton models vs transformers on a GPU (the full sweep is tests/models/gpu_parity.py)."""
from __future__ import annotations

import pytest
import torch

from tests.models.gpu_parity import MIN_AGREEMENT, parity

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(),
                                reason="needs CUDA: bf16 parity runs the compiled Triton kernels")


@pytest.mark.parametrize("name", ["llama3.1", "qwen3", "qwen3_moe", "qwen2_moe"])
def test_bf16_top1_agreement_teacher_forced(name):
    result = parity(name, steps=500)
    for mode in ("extend", "chunked", "decode"):
        assert result[f"{mode}_top1_vs_hf_bf16"] >= MIN_AGREEMENT, result
