"""vision_attention (varlen, non-causal) and mrope_cos_sin vs float64 math and their references."""
from __future__ import annotations

import pytest
import torch

from tests.kernels.util import DTYPES, ON_GPU, assert_close
from triton_kernels import rotary
from triton_kernels.vision_attention import vision_attention, vision_attention_reference


def _segments_float64(q, k, v, lens, sm_scale):
    """Attention of each segment over itself, from scratch in float64."""
    out, start = [], 0
    for n in lens:
        qs, ks, vs = (t[start:start + n].double().cpu().transpose(0, 1) for t in (q, k, v))
        w = torch.softmax(qs @ ks.transpose(1, 2) * sm_scale, dim=-1)
        out.append((w @ vs).transpose(0, 1))
        start += n
    return torch.cat(out)


CASES = [  # (segment lengths, heads, head_dim): odd lengths, a segment past one block, D=80 (Qwen2.5-VL)
    ([5], 1, 16), ([17, 3, 70], 2, 80), ([64, 1, 65], 3, 40), ([9, 9, 9, 9], 2, 32),
] + ([([1024, 4096, 333], 16, 80), ([256] * 16, 16, 72)] if ON_GPU else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_vision_attention(device, dtype, case):
    lens, heads, head_dim = case
    gen = torch.Generator().manual_seed(sum(lens) + head_dim)
    N = sum(lens)
    # q, k, v as views of one fused qkv row [N, 3 * H * D], as the tower hands them over
    qkv = torch.randn(N, 3 * heads * head_dim, generator=gen).to(dtype=dtype, device=device)
    q, k, v = (qkv[:, i * heads * head_dim:(i + 1) * heads * head_dim].view(N, heads, head_dim)
               for i in range(3))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    scale = head_dim ** -0.5
    expect = _segments_float64(q, k, v, lens, scale)
    out = vision_attention(q, k, v, cu, max(lens), scale)
    assert out.dtype == dtype and out.is_contiguous()
    assert_close(out, expect, dtype, "vision_attention")
    assert_close(vision_attention_reference(q, k, v, cu, max(lens), scale), expect, dtype, "reference")


def test_vision_attention_segments_do_not_mix(device):
    """Changing one segment's keys leaves every other segment's output unchanged."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(30, 2, 16, generator=gen).to(device) for _ in range(3))
    cu = torch.tensor([0, 11, 30], dtype=torch.int32, device=device)
    before = vision_attention(q, k, v, cu, 19, 0.25)
    k2 = k.clone()
    k2[11:] += 1.0
    after = vision_attention(q, k2, v, cu, 19, 0.25)
    assert torch.equal(before[:11], after[:11])
    assert not torch.allclose(before[11:], after[11:])


def test_vision_attention_rejects_bad_inputs(device):
    q = torch.zeros(4, 2, 16, device=device)
    with pytest.raises(ValueError, match="cu_seqlens"):
        vision_attention(q, q, q, torch.tensor([0, 4], device=device), 4, 1.0)   # int64
    with pytest.raises(ValueError, match="k"):
        vision_attention(q, q[:, :1], q, torch.tensor([0, 4], dtype=torch.int32, device=device), 4, 1.0)


def _mrope_float64(positions, cache, sizes, interleaved):
    """Row of token t, pair i: the cache row at the position of the section owning pair i."""
    half = cache.shape[1] // 2
    rows = torch.empty(positions.shape[1], 2 * half, dtype=cache.dtype)
    for i in range(half):
        if interleaved:
            owner = 1 if i % 3 == 1 and i < 3 * sizes[1] else 2 if i % 3 == 2 and i < 3 * sizes[2] else 0
        else:
            owner = 0 if i < sizes[0] else 1 if i < sizes[0] + sizes[1] else 2
        pos = positions[owner].cpu().long()
        rows[:, i], rows[:, half + i] = cache.cpu()[pos, i], cache.cpu()[pos, half + i]
    return rows


MROPE_CASES = [  # (tokens, sections, interleaved)
    (7, (2, 3, 3), False), (7, (2, 3, 3), True), (33, (16, 24, 24), False), (33, (24, 20, 20), True),
    (5, (4, 4), False),                       # the vision towers' 2D rotary: (height, width)
] + ([(4099, (16, 24, 24), False), (4099, (24, 20, 20), True)] if ON_GPU else [])


@pytest.mark.parametrize("case", MROPE_CASES, ids=str)
def test_mrope_cos_sin(device, case):
    tokens, sections, interleaved = case
    rotary_dim = 2 * sum(sections)
    cache = rotary.build_cos_sin_cache(rotary_dim, 100, 10000.0, None, torch.float32, device)
    gen = torch.Generator().manual_seed(tokens)
    positions = torch.randint(0, 100, (len(sections), tokens), generator=gen).to(device)
    expect = _mrope_float64(positions, cache, sections + (0,) * (3 - len(sections)), interleaved)
    out = rotary.mrope_cos_sin(positions, cache, sections, interleaved)
    assert torch.equal(out.cpu(), expect)
    assert torch.equal(rotary.mrope_cos_sin_reference(positions, cache, sections, interleaved).cpu(),
                       expect)


def test_mrope_of_text_positions_is_the_plain_row(device):
    """All sections at one position: the mixed row is the cache row itself (decode needs no gather)."""
    cache = rotary.build_cos_sin_cache(16, 50, 10000.0, None, torch.float32, device)
    pos = torch.tensor([3, 0, 49], device=device)
    for interleaved in (False, True):
        rows = rotary.mrope_cos_sin(pos.expand(3, -1).contiguous(), cache, (2, 3, 3), interleaved)
        assert torch.equal(rows, cache[pos])


def test_axial_cache_matches_hf_vision_rotary():
    """build_axial_cos_sin_cache + mrope gather == HF's 2D rotary (cat(freqs_h, freqs_w), twice)."""
    head_dim, theta = 16, 10000.0
    hw = torch.tensor([[0, 1, 5, 7], [2, 0, 3, 7]])
    inv = 1.0 / (theta ** (torch.arange(0, head_dim // 2, 2, dtype=torch.float) / (head_dim // 2)))
    freqs = hw.t()[..., None].float() * inv                                     # [N, 2, D/4]
    hf = torch.cat([freqs[:, 0], freqs[:, 1]], dim=-1)                          # [N, D/2]
    cache = rotary.build_axial_cos_sin_cache(head_dim, 8, theta, torch.float32, "cpu")
    rows = rotary.mrope_cos_sin_reference(hw, cache, (head_dim // 4, head_dim // 4), False)
    assert torch.allclose(rows[:, : head_dim // 2], hf.cos()) and torch.allclose(rows[:, head_dim // 2:], hf.sin())


def test_mrope_rejects_sections_that_do_not_fill_the_row():
    cache = torch.zeros(10, 16)
    with pytest.raises(ValueError, match="sum to"):
        rotary.mrope_cos_sin_reference(torch.zeros(3, 2, dtype=torch.long), cache, (2, 2, 2), False)
