"""Our model vs Hugging Face transformers on the same tiny checkpoint (fp32, CPU).

1. Logits: every prompt goes through our model in ONE ragged extend batch; the
   last-token logits must match HF's (each prompt run alone, eager attention)
   within ``1e-3 * max |logit|``.
2. Greedy: prefill, then decode steps through our paged KV cache; the
   continuation must equal ``generate(do_sample=False)`` token for token.
"""
from __future__ import annotations

from pathlib import Path

import torch

import models
from tests.models.runner import PagedRunner
from tests.models.tiny import hf_greedy, hf_last_logits, load_hf, prompts
from triton_kernels import load_ops

LOGIT_RTOL = 1e-3


def check_parity(checkpoint: Path, backend: str, prompt_lens: list[int], num_new: int,
                 device: torch.device | str = "cpu") -> None:
    """Our model on `device` (fp32) vs HF on the CPU (fp32, eager)."""
    model, config = models.load_model(checkpoint, load_ops(backend), torch.float32, device)
    hf = load_hf(checkpoint)
    batch = prompts(config.vocab_size, prompt_lens)
    runner = PagedRunner(model, len(batch), max(prompt_lens) + num_new)
    logits, continuations = runner.greedy(batch, num_new)
    logits = logits.cpu()
    assert logits.dtype == torch.float32 and logits.shape == (len(batch), config.vocab_size)
    expected = torch.stack([hf_last_logits(hf, p) for p in batch])
    max_diff = (logits - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert max_diff <= LOGIT_RTOL * scale, (
        f"{config.architecture} ({backend}): max |logit diff| {max_diff:.3e} > "
        f"{LOGIT_RTOL} x max |logit| {scale:.3f}")
    for prompt, ours in zip(batch, continuations):
        theirs = hf_greedy(hf, prompt, num_new)
        assert ours == theirs, (
            f"{config.architecture} ({backend}): greedy continuation of a {len(prompt)}-token "
            f"prompt differs at step {next(i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b)}:"
            f"\nours   {ours}\nhf     {theirs}")
