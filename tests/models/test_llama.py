"""The dense decoder (models/llama.py) vs transformers: Llama 2/3.1/3.2, Mistral, Qwen2, Qwen3."""
from __future__ import annotations

import pytest

from tests.models.parity import check_parity

# Lengths differ so the ragged batch mixes short and long rows; 19 + 32 tokens
# pass Mistral's tiny 12-token sliding window.
PROMPT_LENS = [7, 19, 3, 12]


@pytest.mark.parametrize("name", ["llama2", "llama3.1", "llama3.2", "mistral", "qwen2", "qwen3",
                                  "qwen3_tied"])
def test_reference_backend_matches_transformers(name, tiny_checkpoint):
    check_parity(tiny_checkpoint(name), "reference", PROMPT_LENS, num_new=32)


@pytest.mark.parametrize("name", ["llama3.1", "mistral", "qwen2", "qwen3"])
def test_triton_backend_matches_transformers(name, tiny_checkpoint):
    """Triton kernels (interpreted on CPU): one layer, two short prompts, three tokens."""
    overrides = dict(num_hidden_layers=1)
    if name == "mistral":
        overrides["sliding_window"] = 4                 # shorter than the 6-token prompt
    check_parity(tiny_checkpoint(name, **overrides), "triton", [6, 3], num_new=3)
