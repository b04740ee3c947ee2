"""The dense decoder (models/llama.py) vs transformers: Llama 2/3.1/3.2, Mistral, Qwen2, Qwen3."""
from __future__ import annotations

import pytest
import torch

import models
from tests.models.parity import LOGIT_RTOL, check_parity
from tests.models.runner import PagedRunner
from tests.models.tiny import load_hf, prompts
from triton_kernels import load_ops

# Lengths differ so the ragged batch mixes short and long rows; 19 + 32 tokens
# pass Mistral's tiny 12-token sliding window.
PROMPT_LENS = [7, 19, 3, 12]


@pytest.mark.parametrize("name", ["llama2", "llama3.1", "llama_bias", "llama3.2", "mistral", "qwen2",
                                  "qwen3", "qwen3_tied"])
def test_reference_backend_matches_transformers(name, tiny_checkpoint):
    check_parity(tiny_checkpoint(name), "reference", PROMPT_LENS, num_new=32)


@pytest.mark.parametrize("name", ["llama3.1", "mistral", "qwen2", "qwen3"])
def test_triton_backend_matches_transformers(name, tiny_checkpoint, device):
    """Triton kernels (interpreted on CPU, compiled on a GPU): one layer, two short prompts,
    a prefill and one decode step."""
    overrides = dict(num_hidden_layers=1)
    if name == "mistral":
        overrides["sliding_window"] = 4                 # shorter than the 6-token prompt
    check_parity(tiny_checkpoint(name, **overrides), "triton", [6, 3], num_new=2, device=device)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_chunked_prefill_then_decode_match_every_position(backend, tiny_checkpoint, device):
    """Chunk 1 (5 tokens), chunk 2 after the cached prefix (4), then 2 decode steps:
    the logits of all 11 positions equal HF's on the whole sequence."""
    directory = tiny_checkpoint("qwen3", num_hidden_layers=1)
    model, config = models.load_model(directory, load_ops(backend), torch.float32,
                                      device if backend == "triton" else "cpu")
    seqs = prompts(config.vocab_size, [11, 11], seed=3)
    runner = PagedRunner(model, len(seqs), 11)
    first = runner.extend([s[:5] for s in seqs], all_logits=True).cpu().view(2, 5, -1)
    second = runner.extend([s[5:9] for s in seqs], all_logits=True).cpu().view(2, 4, -1)
    steps = torch.stack([runner.decode([s[t] for s in seqs]).cpu() for t in range(9, 11)], dim=1)
    ours = torch.cat([first, second, steps], dim=1)                       # [2, 11, vocab]
    with torch.no_grad():
        expected = load_hf(directory)(input_ids=torch.tensor(seqs)).logits.float()
    max_diff = (ours - expected).abs().max().item()
    assert max_diff <= LOGIT_RTOL * expected.abs().max().item(), max_diff
