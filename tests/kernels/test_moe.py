"""moe_topk, moe_align_block_size and fused_moe vs references and float64."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import moe


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


# (tokens, experts, top_k, renormalize): Qwen2-MoE (60, 4, raw) and Qwen3-MoE (128, 8, renorm)
TOPK_CASES = [(37, 60, 4, False), (1, 128, 8, True), (5, 8, 8, True)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,top_k,renormalize", TOPK_CASES)
def test_moe_topk(device, dtype, tokens, experts, top_k, renormalize):
    logits = _randn(tokens, experts, seed=tokens).to(device, dtype)
    weights, ids = moe.moe_topk(logits, top_k, renormalize)
    ref_weights, ref_ids = moe.moe_topk_reference(logits, top_k, renormalize)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32
    if dtype == torch.float32:
        assert torch.equal(ids, ref_ids)
    else:  # half-precision logits tie; any tied expert is right
        probs = torch.softmax(logits.float(), -1)
        ref_probs = probs.gather(1, ref_ids.long())
        assert torch.equal(probs.gather(1, ids.long()), ref_probs)
        assert all(len(set(row)) == top_k for row in ids.tolist())
    assert_close(weights, ref_weights, torch.float32, "topk weights")
    if renormalize:
        assert torch.allclose(weights.sum(-1), torch.ones(tokens, device=device))


@pytest.mark.parametrize("tokens,experts,top_k,block_m", [(7, 8, 3, 16), (1, 128, 8, 16),
                                                          (300, 5, 2, 64)])
def test_moe_align_block_size(device, tokens, experts, top_k, block_m):
    ids = torch.stack([torch.randperm(experts, generator=torch.Generator().manual_seed(t))[:top_k]
                       for t in range(tokens)]).int().to(device)
    sorted_ids, expert_ids, num_padded = moe.moe_align_block_size(ids, experts, block_m)
    ref = moe.moe_align_block_size_reference(ids, experts, block_m)
    n = int(num_padded)
    assert n == int(ref[2]) and n % block_m == 0
    assert torch.equal(sorted_ids[:n], ref[0][:n])
    assert torch.equal(expert_ids[: n // block_m], ref[1][: n // block_m])
    flat = ids.reshape(-1).long().cpu()
    pairs = sorted_ids[:n].long().cpu()
    real = pairs[pairs < flat.numel()]
    assert torch.equal(torch.sort(real).values, torch.arange(flat.numel())), "each pair once"
    block_of = torch.arange(n) // block_m
    owner = expert_ids.long().cpu()[block_of]
    assert torch.equal(owner[pairs < flat.numel()], flat[real]), "pair in its expert's block"


# (tokens, experts, hidden, inter, top_k): the first two take the decode path (T * k <= 32),
# the third the grouped GEMMs.
MOE_CASES = [(5, 8, 72, 40, 2), (1, 4, 64, 32, 4), (9, 8, 72, 40, 4)] + (
    [(300, 16, 256, 96, 4), (33, 128, 2048, 768, 8), (1, 128, 2048, 768, 8), (4, 128, 2048, 768, 8)]
    if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,experts,hidden,inter,top_k", MOE_CASES)
def test_fused_moe(device, dtype, tokens, experts, hidden, inter, top_k):
    x = _randn(tokens, hidden, seed=1).to(device, dtype)
    w13 = _randn(experts, 2 * inter, hidden, seed=2, scale=hidden ** -0.5).to(device, dtype)
    w2 = _randn(experts, hidden, inter, seed=3, scale=inter ** -0.5).to(device, dtype)
    weights, ids = moe.moe_topk_reference(_randn(tokens, experts, seed=4).to(device), top_k, True)
    out = moe.fused_moe(x, w13, w2, weights, ids)
    ref = moe.fused_moe_reference(x, w13, w2, weights, ids)
    f64 = moe.fused_moe_reference(x.double(), w13.double(), w2.double(), weights, ids)
    assert_close(out, ref, dtype, "fused_moe vs reference")
    assert_close(out, f64, dtype, "fused_moe vs float64")


@pytest.mark.parametrize("config_name", ["default", "CUDA_CONFIG"])
@pytest.mark.parametrize("tokens,top_k", [(1, 8), (3, 2)])
@pytest.mark.parametrize("hidden,inter,dtype", [(96, 48, torch.float32), (512, 256, torch.float16)],
                         ids=["ragged-fp32", "even-fp16"])
def test_decode_path_equals_the_grouped_gemms(device, tokens, top_k, config_name, hidden, inter, dtype):
    """The two-launch decode path and the aligned grouped GEMMs give the same tokens' outputs,
    with the device's default config and with the CUDA one on any device (so the sm90 compile
    check compiles what the GPU launches), with K ragged and a multiple of the K step."""
    from triton_kernels.moe import decode
    from triton_kernels.moe.gemm import launch_fused_moe

    experts = 16
    assert tokens * top_k <= decode.DECODE_MAX_PAIRS
    x = _randn(tokens, hidden, seed=5).to(device, dtype)
    w13 = _randn(experts, 2 * inter, hidden, seed=6, scale=hidden ** -0.5).to(device, dtype)
    w2 = _randn(experts, hidden, inter, seed=7, scale=inter ** -0.5).to(device, dtype)
    weights, ids = moe.moe_topk_reference(_randn(tokens, experts, seed=8).to(device), top_k, True)
    grouped = launch_fused_moe(x, w13, w2, weights, ids, config=None)
    config = getattr(decode, config_name, None)
    assert_close(decode.fused_moe_decode(x, w13, w2, weights, ids, config=config), grouped, dtype,
                 "decode vs grouped")


def test_bad_inputs_raise(device):
    x = torch.zeros(2, 64, device=device)
    w13, w2 = torch.zeros(4, 64, 64, device=device), torch.zeros(4, 64, 32, device=device)
    ids = torch.zeros(2, 2, dtype=torch.int32, device=device)
    weights = torch.zeros(2, 2, device=device)
    with pytest.raises(ValueError, match="top_k"):
        moe.moe_topk(torch.zeros(2, 4, device=device), 5, True)
    with pytest.raises(ValueError, match="int32"):
        moe.fused_moe(x, w13, w2, weights, ids.long())
    with pytest.raises(ValueError, match="w2"):
        moe.fused_moe(x, w13, w2[:, :, :16], weights, ids)
    with pytest.raises(ValueError, match="empty"):
        moe.fused_moe(x[:0], w13, w2, weights[:0], ids[:0])
