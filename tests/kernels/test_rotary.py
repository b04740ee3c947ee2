"""apply_rotary vs reference and float64; build_cos_sin_cache vs transformers."""
from __future__ import annotations

import math

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import rotary

MAX_POSITION = 64


def _rotate_float64(x: torch.Tensor, positions: torch.Tensor, rotary_dim: int, base: float,
                    is_neox: bool) -> torch.Tensor:
    """Rotation computed from scratch in float64 (angles too)."""
    x64 = x.double().cpu().clone()
    half = rotary_dim // 2
    inv_freq = base ** (-torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = positions.cpu().double()[:, None] * inv_freq[None, :]
    cos, sin = angles.cos()[:, None, :], angles.sin()[:, None, :]
    idx1 = torch.arange(half) if is_neox else torch.arange(0, rotary_dim, 2)
    idx2 = idx1 + half if is_neox else idx1 + 1
    x1, x2 = x64[..., idx1].clone(), x64[..., idx2].clone()
    x64[..., idx1] = x1 * cos - x2 * sin
    x64[..., idx2] = x2 * cos + x1 * sin
    return x64


CASES = [  # (tokens, q heads, k heads, head_dim, rotary_dim)
    (1, 2, 1, 64, 64), (5, 3, 1, 128, 128), (7, 4, 2, 96, 48), (3, 2, 2, 256, 64),
] + ([(513, 32, 8, 128, 128), (33, 40, 8, 128, 64)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("is_neox", [True, False])
def test_apply_rotary(device, dtype, case, is_neox):
    tokens, hq, hk, head_dim, rotary_dim = case
    base = 10000.0
    gen = torch.Generator().manual_seed(tokens * 13 + head_dim)
    # q and k are views into one fused qkv row, as the model hands them over.
    qkv = torch.randn(tokens, (hq + 2 * hk) * head_dim, generator=gen).to(dtype=dtype, device=device)
    q = qkv[:, : hq * head_dim].view(tokens, hq, head_dim)
    k = qkv[:, hq * head_dim: (hq + hk) * head_dim].view(tokens, hk, head_dim)
    positions = torch.randint(0, MAX_POSITION, (tokens,), generator=gen).to(device)
    cache = rotary.build_cos_sin_cache(rotary_dim, MAX_POSITION, base, None, torch.float32, device)
    q_expect = _rotate_float64(q, positions, rotary_dim, base, is_neox)
    k_expect = _rotate_float64(k, positions, rotary_dim, base, is_neox)
    q_ref, k_ref = q.clone(), k.clone()
    v_before = qkv[:, (hq + hk) * head_dim:].clone()
    rotary.apply_rotary(q, k, positions, cache, is_neox)
    rotary.apply_rotary_reference(q_ref, k_ref, positions, cache, is_neox)
    assert_close(q, q_expect, dtype, "q vs float64")
    assert_close(k, k_expect, dtype, "k vs float64")
    assert_close(q, q_ref, dtype, "q vs reference")
    assert_close(k, k_ref, dtype, "k vs reference")
    assert torch.equal(q[..., rotary_dim:].cpu(), q_expect[..., rotary_dim:].to(dtype)), "pass-through dims changed"
    assert torch.equal(qkv[:, (hq + hk) * head_dim:], v_before), "v was written"


def test_apply_rotary_bad_inputs(device):
    q = torch.randn(2, 2, 64, device=device)
    k = torch.randn(2, 1, 64, device=device)
    pos = torch.zeros(2, dtype=torch.int64, device=device)
    cache = rotary.build_cos_sin_cache(64, 8, 10000.0, None, torch.float32, device)
    with pytest.raises(ValueError, match="positions"):
        rotary.apply_rotary(q, k, pos.float(), cache, True)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary.apply_rotary(q, k, pos, torch.zeros(8, 66, device=device), True)
    with pytest.raises(ValueError, match="empty batch"):
        rotary.apply_rotary(q[:0], k[:0], pos[:0], cache, True)
    with pytest.raises(ValueError, match="k"):
        rotary.apply_rotary(q, k[:1], pos, cache, True)
    with pytest.raises(ValueError, match="unsupported rope type"):
        rotary.build_cos_sin_cache(64, 8, 10000.0, {"rope_type": "bogus"}, torch.float32, "cpu")


# --------------------------------------------------------------------------- cos/sin cache vs HF

ROPE_CONFIGS = [  # (rope dict as a config writes it, spelling key)
    None,
    {"rope_type": "default"},
    {"type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 2.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 32},
    {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
     "beta_fast": 16, "beta_slow": 2, "mscale": 1.0, "mscale_all_dim": 0.5},
    {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.3, "truncate": False,
     "original_max_position_embeddings": 64},
]


@pytest.mark.parametrize("rope", ROPE_CONFIGS, ids=lambda r: str(r and (r.get("rope_type") or r.get("type"))))
@pytest.mark.parametrize("partial", [1.0, 0.5])
def test_cos_sin_cache_matches_transformers(rope, partial):
    # GPT-NeoX's rotary module honours partial_rotary_factor for every rope type.
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXRotaryEmbedding

    head_dim, max_pos_emb, base = 64, 64, 50000.0
    rope_parameters = dict(rope or {}, rope_theta=base, partial_rotary_factor=partial)
    rope_parameters.setdefault("rope_type", rope_parameters.pop("type", "default"))
    config = GPTNeoXConfig(hidden_size=head_dim * 4, num_attention_heads=4,
                           max_position_embeddings=max_pos_emb, rope_parameters=rope_parameters)
    # Past max_position_embeddings so that dynamic NTK recomputes for this length.
    num_positions = 150
    hf = GPTNeoXRotaryEmbedding(config)
    cos_hf, sin_hf = hf(torch.zeros(1, num_positions, head_dim), torch.arange(num_positions)[None])
    rotary_dim = int(head_dim * partial)
    half = rotary_dim // 2
    # The same dict as the old `rope_scaling` spelling, theta passed separately.
    cache = rotary.build_cos_sin_cache(rotary_dim, num_positions, base, rope, torch.float32, "cpu",
                                       original_max_position=max_pos_emb)
    assert cache.shape == (num_positions, rotary_dim)
    torch.testing.assert_close(cache[:, :half], cos_hf[0, :, :half], atol=1e-6, rtol=0)
    torch.testing.assert_close(cache[:, half:], sin_hf[0, :, :half], atol=1e-6, rtol=0)
    # transformers 5 spelling: rope_parameters with rope_theta inside overrides `base`.
    cache5 = rotary.build_cos_sin_cache(rotary_dim, num_positions, 1.0, rope_parameters,
                                        torch.float32, "cpu", original_max_position=max_pos_emb)
    torch.testing.assert_close(cache5, cache, atol=0, rtol=0)


def test_yarn_attention_factor_scales_cos_and_sin():
    plain = rotary.build_cos_sin_cache(32, 16, 10000.0, None, torch.float32, "cpu")
    yarn = rotary.build_cos_sin_cache(32, 16, 10000.0, {"rope_type": "yarn", "factor": 4.0},
                                      torch.float32, "cpu")
    mscale = 0.1 * math.log(4.0) + 1.0
    norms = (yarn[:, :16] ** 2 + yarn[:, 16:] ** 2).sqrt()
    torch.testing.assert_close(norms, torch.full_like(norms, mscale), atol=1e-5, rtol=0)
    assert torch.equal(plain[0, :16], torch.ones(16))
