"""Plain-PyTorch references of the sampling launchers (same signatures).

``sample_reference`` finds its thresholds by sorting and draws with the same
Philox4x32-10 noise as the kernel (``philox_uniform_reference``), so tokens
compare exactly. These are also the CPU backend of the sample stage.
"""
from __future__ import annotations

import torch

_ROUND_A = 0xD2511F53
_ROUND_B = 0xCD9E8D57
_KEY_A = 0x9E3779B9
_KEY_B = 0xBB67AE85


def apply_penalties_reference(logits, token_counts, repetition_penalties, frequency_penalties,
                              presence_penalties) -> None:
    """Reference of `apply_penalties` (in place)."""
    seen = token_counts > 0
    rep = repetition_penalties.float()[:, None]
    penalized = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalized, logits)
                 - token_counts.float() * frequency_penalties.float()[:, None]
                 - seen.float() * presence_penalties.float()[:, None])


def apply_token_bitmask_reference(logits, bitmask, row_indices) -> None:
    """Reference of `apply_token_bitmask` (in place)."""
    vocab_size = logits.shape[1]
    tokens = torch.arange(vocab_size, device=logits.device)
    words = bitmask[:, tokens // 32]
    allowed = ((words >> (tokens % 32)) & 1) != 0
    rows = row_indices.long()
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def greedy_reference(logits) -> torch.Tensor:
    """Reference of `greedy`: argmax per row (torch returns the lowest index on ties)."""
    return torch.argmax(logits, dim=-1)


def philox_uniform_reference(seed: int, step: int, num: int, device=None) -> torch.Tensor:
    """The kernel's Philox4x32-10 uniforms for tokens 0..num-1, in int64 PyTorch."""
    mask32 = 0xFFFFFFFF

    def mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b_hi, b_lo = b >> 16, b & 0xFFFF
        mid = a * b_hi
        hi = (mid + ((a * b_lo) >> 16)) >> 16
        lo = (((mid & 0xFFFF) << 16) + a * b_lo) & mask32
        return hi, lo

    c0 = torch.arange(num, dtype=torch.int64, device=device)
    c1 = torch.full_like(c0, step & mask32)
    c2 = torch.full_like(c0, (step >> 32) & mask32)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & mask32, (seed >> 32) & mask32
    for _ in range(10):
        hi_b, lo_b = mulhilo(_ROUND_B, c2)
        hi_a, lo_a = mulhilo(_ROUND_A, c0)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & mask32, (k1 + _KEY_B) & mask32
    return uniform_from_bits_reference(c0)


def uniform_from_bits_reference(bits: torch.Tensor) -> torch.Tensor:
    """32 random bits -> fp32 uniform strictly inside (0, 1), as the kernel computes it.

    23 bits: (k + 0.5) / 2**23 is exact in fp32. With 24 bits the top value
    rounds to 1.0, whose Gumbel noise is +inf (and a masked -inf logit plus
    +inf is NaN, which argmax picks).
    """
    return ((bits >> 9).float() + 0.5) * (1.0 / 8388608.0)


def _kth_largest(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(x, k).values[-1]


def _top_p_threshold(x: torch.Tensor, top_p: float) -> torch.Tensor:
    """Value of the last token (descending) needed to reach mass top_p (x: kept logits)."""
    ordered = torch.sort(x, descending=True).values
    probs = torch.softmax(ordered.double(), dim=0)
    needed = int(torch.searchsorted(torch.cumsum(probs, 0), torch.tensor(top_p, dtype=torch.float64,
                                                                         device=x.device)))
    return ordered[min(needed, ordered.numel() - 1)]


def sample_reference(logits, temperatures, top_ks, top_ps, min_ps, seeds, steps) -> torch.Tensor:
    """Reference of `sample`: sort-based thresholds, the same Philox noise."""
    batch, vocab_size = logits.shape
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    for b in range(batch):
        temperature = float(temperatures[b])
        if temperature <= 0:
            out[b] = torch.argmax(logits[b])
            continue
        x = logits[b] * (1.0 / temperature)
        floor = torch.tensor(float("-inf"), device=x.device)
        top_k, top_p, min_p = int(top_ks[b]), float(top_ps[b]), float(min_ps[b])
        if 0 < top_k < vocab_size:
            floor = _kth_largest(x, top_k)
        if top_p < 1.0:
            floor = torch.maximum(floor, _top_p_threshold(x[x >= floor], top_p))
        if min_p > 0:
            floor = torch.maximum(floor, x.max() + torch.log(torch.tensor(min_p)))
        noise = -torch.log(-torch.log(philox_uniform_reference(int(seeds[b]), int(steps[b]),
                                                               vocab_size, x.device)))
        keep = (x >= floor) & (x > float("-inf"))  # masked tokens stay out whatever the noise
        out[b] = torch.argmax(torch.where(keep, x + noise, float("-inf")))
    return out


def compute_logprobs_reference(logits, token_ids, top_n):
    """Reference of `compute_logprobs`."""
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    token_lp = logprobs.gather(1, token_ids.long()[:, None])[:, 0].float()
    top_lp, top_ids = torch.topk(logprobs, top_n, dim=-1)
    return token_lp, top_ids, top_lp.float()


def token_ranks_reference(logits, token_ids):
    """Reference of `token_ranks`."""
    chosen = logits.gather(1, token_ids.long()[:, None])
    return (logits > chosen).sum(dim=1) + 1


def sampling_bytes(batch: int, vocab_size: int, passes: int = 10) -> float:
    """Bytes a sample call streams: `passes` reads of the fp32 logits."""
    return float(passes * batch * vocab_size * 4)
