"""Sampling kernels vs references: penalties, masks, greedy, seeded sampling
(same Philox noise, so tokens compare exactly), support sets, distribution,
batch-composition invariance, and logprobs."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import ON_GPU
from triton_kernels import sampling

VOCAB = 1000  # not a multiple of 32 or of any block
BIG_VOCAB = 151936


def _logits(batch: int, vocab: int, device: torch.device, seed: int, scale: float = 3.0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, vocab, generator=gen) * scale).to(device)


def _params(batch: int, device: torch.device, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    def full(value, dtype):
        return torch.full((batch,), value, dtype=dtype, device=device)
    return (full(temperature, torch.float32), full(top_k, torch.int32), full(top_p, torch.float32),
            full(min_p, torch.float32))


def test_apply_penalties(device):
    logits = _logits(3, VOCAB, device, seed=0)
    gen = torch.Generator().manual_seed(1)
    counts = (torch.randint(0, 4, (3, VOCAB), generator=gen) * (torch.rand(3, VOCAB, generator=gen) < 0.1)).int().to(device)
    rep = torch.tensor([1.0, 1.3, 0.8], device=device)
    freq = torch.tensor([0.0, 0.5, -0.2], device=device)
    pres = torch.tensor([0.0, 0.25, 1.0], device=device)
    expected = logits.clone()
    sampling.apply_penalties(logits, counts, rep, freq, pres)
    sampling.apply_penalties_reference(expected, counts, rep, freq, pres)
    torch.testing.assert_close(logits, expected, rtol=1e-6, atol=1e-6)
    untouched = counts[0] == 0
    assert torch.equal(logits[0][untouched], _logits(3, VOCAB, device, seed=0)[0][untouched])


def test_apply_token_bitmask(device):
    logits = _logits(4, VOCAB, device, seed=2)
    words = (VOCAB + 31) // 32
    gen = torch.Generator().manual_seed(3)
    bitmask = torch.randint(-2**31, 2**31 - 1, (2, words), generator=gen, dtype=torch.int64)
    bitmask = bitmask.to(torch.int32).to(device)
    rows = torch.tensor([3, 1], device=device)
    expected = logits.clone()
    sampling.apply_token_bitmask(logits, bitmask, rows)
    sampling.apply_token_bitmask_reference(expected, bitmask, rows)
    assert torch.equal(logits, expected)
    token = 32 * 5 + 31  # the sign bit of word 5 of row 3's mask
    assert torch.isinf(logits[3, token]) == (int(bitmask[0, 5]) >= 0)
    assert not torch.isinf(logits[0]).any() and not torch.isinf(logits[2]).any()


def test_greedy_rows(device):
    logits = _logits(5, VOCAB, device, seed=4)
    params = _params(5, device, temperature=0.0, top_k=3, top_p=0.5)
    seeds = torch.arange(5, device=device)
    tokens = sampling.sample(logits, *params, seeds, seeds)
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))


@pytest.mark.parametrize("vocab", [1, 31, VOCAB, 4099])
def test_greedy_split_argmax(device, vocab):
    """The all-greedy path (rows split over chunks) equals torch.argmax, ties and -inf rows too."""
    logits = _logits(3, vocab, device, seed=6)
    logits[1] = float("-inf")                      # a fully masked row: index 0, like torch
    if vocab > 40:
        logits[2, 7] = logits[2, vocab - 3] = logits[2].max() + 1.0  # a tie across chunks
    tokens = sampling.greedy(logits)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, sampling.greedy_reference(logits))
    assert torch.equal(tokens, torch.argmax(logits, dim=-1))
    if vocab > 40:
        assert int(tokens[2]) == 7


# (temperature, top_k, top_p, min_p)
SAMPLE_CASES = [(1.0, 0, 1.0, 0.0), (0.7, 20, 1.0, 0.0), (1.0, 0, 0.8, 0.0),
                (1.3, 50, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (2.0, 8, 0.95, 0.02)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", SAMPLE_CASES)
def test_sample_matches_reference(device, temperature, top_k, top_p, min_p):
    batch = 8
    logits = _logits(1, VOCAB, device, seed=5).expand(batch, -1).contiguous()
    params = _params(batch, device, temperature, top_k, top_p, min_p)
    seeds = torch.arange(batch, device=device) * 1000003 + 12345
    steps = torch.arange(batch, device=device) + (1 << 33)  # a step past 32 bits
    tokens = sampling.sample(logits, *params, seeds, steps)
    expected = sampling.sample_reference(logits, *params, seeds, steps)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [(1.0, 30, 1.0, 0.0), (0.9, 0, 0.7, 0.0),
                                                           (1.2, 40, 0.8, 0.01)])
def test_rows_past_candidate_capacity(device, temperature, top_k, top_p, min_p):
    """With a scratch of 8 candidates the kernels fall back to the full row: same result."""
    batch = 3
    logits = _logits(batch, VOCAB, device, seed=10)
    params = _params(batch, device, temperature, top_k, top_p, min_p)
    seeds = torch.tensor([3, 5, 7], device=device)
    tokens = sampling.launch_sample(logits, *params, seeds, seeds, 8)
    assert torch.equal(tokens, sampling.sample_reference(logits, *params, seeds, seeds))
    assert torch.equal(tokens, sampling.sample(logits, *params, seeds, seeds))
    _, top_ids, top_lp = sampling.launch_compute_logprobs(logits, tokens, 20, 8)
    _, ref_ids, ref_lp = sampling.compute_logprobs_reference(logits, tokens, 20)
    assert torch.equal(top_ids, ref_ids)
    torch.testing.assert_close(top_lp, ref_lp, rtol=1e-5, atol=1e-5)


def test_support_sets_are_exact(device):
    """Every allowed token is drawn over many seeds, and nothing else is."""
    batch = 32
    logits = _logits(1, VOCAB, device, seed=6, scale=0.3).expand(batch, -1).contiguous()
    seeds = torch.arange(batch, device=device)
    top_k_tokens = set(torch.topk(logits[0], 4).indices.tolist())
    tokens = sampling.sample(logits, *_params(batch, device, 5.0, top_k=4), seeds, seeds)
    assert set(tokens.tolist()) == top_k_tokens
    # top-p: the smallest top set with mass >= p
    probs = torch.softmax(logits[0].double() * 0.2, 0)
    ordered = torch.sort(probs, descending=True)
    needed = int(torch.searchsorted(ordered.values.cumsum(0), torch.tensor(0.006, dtype=torch.float64, device=device))) + 1
    nucleus = set(ordered.indices[:needed].tolist())
    tokens = sampling.sample(logits, *_params(batch, device, 5.0, top_p=0.006), seeds, seeds)
    assert set(tokens.tolist()) <= nucleus and len(set(tokens.tolist())) >= min(len(nucleus), 3)


def test_distribution_matches_softmax(device):
    """Frequencies over 2048 seeds stay within 5 sigma of softmax(logits / T).

    On CPU the interpreter draws the first 16 (equal to the reference, token for
    token) and the reference, which uses the same Philox noise, draws the rest."""
    batch, temperature = 2048, 0.8
    row = torch.tensor([0.0, 1.0, -1.0, 2.0, 0.5, -3.0, 1.5])
    logits = row.expand(batch, -1).contiguous().to(device)
    seeds = torch.arange(batch, device=device) + 77
    params = _params(batch, device, temperature)
    if ON_GPU:
        tokens = sampling.sample(logits, *params, seeds, seeds * 0)
    else:
        head = sampling.sample(logits[:16], *(p[:16] for p in params), seeds[:16], seeds[:16] * 0)
        tokens = sampling.sample_reference(logits, *params, seeds, seeds * 0)
        assert torch.equal(head, tokens[:16])
    freq = torch.bincount(tokens.cpu(), minlength=7).double() / batch
    probs = torch.softmax(row.double() / temperature, 0)
    sigma = (probs * (1 - probs) / batch).sqrt()
    assert ((freq - probs).abs() <= 5 * sigma + 1e-9).all(), (freq, probs)


def test_same_seed_same_token_regardless_of_batch(device):
    logits = _logits(4, VOCAB, device, seed=7)
    params = _params(4, device, 1.0, top_k=100, top_p=0.9)
    seeds = torch.tensor([11, 22, 33, 44], device=device)
    steps = torch.tensor([0, 1, 2, 3], device=device)
    full = sampling.sample(logits, *params, seeds, steps)
    alone = sampling.sample(logits[2:3].contiguous(), *(p[2:3] for p in params), seeds[2:3], steps[2:3])
    assert int(alone[0]) == int(full[2])
    again = sampling.sample(logits, *params, seeds, steps)
    assert torch.equal(full, again)
    other_step = sampling.sample(logits, *params, seeds, steps + 1)
    assert not torch.equal(full, other_step)


@pytest.mark.parametrize("top_n", [0, 1, 5])
def test_compute_logprobs(device, top_n):
    logits = _logits(3, VOCAB, device, seed=8)
    logits[1, 100:200] = float("-inf")  # masked tokens
    token_ids = torch.tensor([5, 7, 999], device=device)
    token_lp, top_ids, top_lp = sampling.compute_logprobs(logits, token_ids, top_n)
    ref_token_lp, ref_top_ids, ref_top_lp = sampling.compute_logprobs_reference(logits, token_ids, top_n)
    torch.testing.assert_close(token_lp, ref_token_lp, rtol=1e-5, atol=1e-5)
    assert top_ids.shape == (3, top_n) and torch.equal(top_ids, ref_top_ids)
    torch.testing.assert_close(top_lp, ref_top_lp, rtol=1e-5, atol=1e-5)


def test_token_ranks(device):
    """Rank 1 for the row's maximum, ties not counted above, masked tokens rank last."""
    logits = _logits(4, VOCAB, device, seed=9)
    logits[1, 100:200] = float("-inf")
    top = logits[0].argmax()
    logits[2, 11] = logits[2, 12] = logits[2].max() + 1.0                # a tie at the top
    token_ids = torch.stack([top, torch.tensor(150, device=device), torch.tensor(12, device=device),
                             torch.tensor(3, device=device)])
    ranks = sampling.token_ranks(logits, token_ids)
    assert torch.equal(ranks, sampling.token_ranks_reference(logits, token_ids))
    assert ranks[0] == 1 and ranks[2] == 1 and ranks[1] == VOCAB - 100 + 1


@pytest.mark.skipif(not ON_GPU, reason="a 151936-token vocabulary needs CUDA (interpreter too slow)")
def test_full_vocab_on_gpu(device):
    batch = 16
    logits = _logits(batch, BIG_VOCAB, device, seed=9)
    params = _params(batch, device, 0.9, top_k=40, top_p=0.9, min_p=0.01)
    seeds = torch.arange(batch, device=device)
    assert torch.equal(sampling.sample(logits, *params, seeds, seeds),
                       sampling.sample_reference(logits, *params, seeds, seeds))
    token_lp, top_ids, _ = sampling.compute_logprobs(logits, seeds, 20)
    ref = sampling.compute_logprobs_reference(logits, seeds, 20)
    assert torch.equal(top_ids, ref[1])
    torch.testing.assert_close(token_lp, ref[0], rtol=1e-5, atol=1e-4)


def test_bad_inputs_raise(device):
    with pytest.raises(ValueError, match="empty batch"):
        sampling.sample(torch.zeros(0, 10, device=device), *_params(0, device),
                        torch.zeros(0, device=device), torch.zeros(0, device=device))
    logits = torch.zeros(2, 10, device=device)
    with pytest.raises(ValueError, match="top_ks"):
        sampling.sample(logits, torch.ones(2, device=device), torch.ones(3, device=device),
                        *_params(2, device)[2:], torch.ones(2, device=device),
                        torch.ones(2, device=device))
    with pytest.raises(ValueError, match="bitmask"):
        sampling.apply_token_bitmask(logits, torch.zeros(1, 2, dtype=torch.int32, device=device),
                                     torch.zeros(1, dtype=torch.int64, device=device))
    with pytest.raises(ValueError, match="logits"):
        sampling.compute_logprobs(logits.half(), torch.zeros(2, dtype=torch.int64, device=device), 1)


def test_uniform_noise_stays_inside_the_open_interval():
    """Every 32-bit draw maps strictly inside (0, 1): u == 1.0 would make the Gumbel noise +inf."""
    from triton_kernels.sampling.reference import uniform_from_bits_reference

    extremes = torch.tensor([0, 1, (1 << 9) - 1, 1 << 31, (1 << 32) - 512, (1 << 32) - 1], dtype=torch.int64)
    u = uniform_from_bits_reference(extremes)
    assert bool((u > 0).all()) and bool((u < 1).all()), u.tolist()
    noise = -torch.log(-torch.log(u))
    assert bool(torch.isfinite(noise).all())


def test_masked_tokens_are_never_sampled(device):
    """Rows that allow only a few tokens (-inf elsewhere, as a grammar mask leaves them)."""
    batch, vocab_size = 8, 300
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(batch, vocab_size, generator=gen) * 3
    allowed = [torch.randperm(vocab_size, generator=gen)[: 1 + row % 3] for row in range(batch)]
    masked = torch.full_like(logits, float("-inf"))
    for row, ids in enumerate(allowed):
        masked[row, ids] = logits[row, ids]
    masked = masked.to(device)
    temperatures = torch.tensor([0.7, 1.0, 2.0, 1.0, 0.5, 1.5, 1.0, 3.0], device=device)
    params = dict(temperatures=temperatures,
                  top_ks=torch.full((batch,), -1, dtype=torch.int64, device=device),
                  top_ps=torch.ones(batch, device=device), min_ps=torch.zeros(batch, device=device))
    for step in range(6):
        seeds = torch.arange(batch, dtype=torch.int64, device=device) + 1000 * step
        steps = torch.full((batch,), step, dtype=torch.int64, device=device)
        for sample in (sampling.sample, sampling.sample_reference):
            picked = sample(masked, params["temperatures"], params["top_ks"], params["top_ps"],
                            params["min_ps"], seeds, steps).tolist()
            assert all(p in ids.tolist() for p, ids in zip(picked, allowed)), (sample.__name__, step)
