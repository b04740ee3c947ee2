"""Rotary position embedding (RoPE), applied in place to q and k.

For token t at position p and rotary pair i (0 <= i < rotary_dim/2) with
angle ``p * inv_freq[i]``::

    x1' = x1 * cos - x2 * sin
    x2' = x2 * cos + x1 * sin

Pairs are ``(x[i], x[i + rotary_dim/2])`` in the neox style (HF
``rotate_half``; Llama, Qwen) and ``(x[2i], x[2i+1])`` in the interleaved
GPT-J style. Only the first ``rotary_dim`` dims of each head rotate (partial
rotary); the rest are left as they are.

Shapes: ``q[T, Hq, D]``, ``k[T, Hk, D]`` (views into a fused qkv output are
fine: only the last dim must be contiguous), ``positions[T]`` int64/int32,
``cos_sin_cache[P, rotary_dim]`` with cos in the first half of each row and sin
in the second (built once by ``build_cos_sin_cache``, which reproduces HF's
rope scaling types). Math in fp32, one rounding at the store. Positions are
not range-checked on the device (that would need a host sync): they must lie
in ``[0, P)``.

Roofline: memory-bound, ``2*T*(Hq+Hk)*rotary_dim`` elements read and written
plus one cache row per token. One program rotates a block of heads of one
token (q heads first, then k heads), so the cos/sin row is loaded once per
program and reused across heads.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@triton.jit
def _rotate_heads(x_ptr, token, heads, num_heads, stride_t, stride_h, cos, sin, pair,
                  HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """Rotate rows ``heads`` of one token in place; cos/sin are [1, BLOCK_HALF]."""
    mask = (heads[:, None] < num_heads) & (pair[None, :] < HALF)
    base = x_ptr + token * stride_t + heads[:, None] * stride_h
    if IS_NEOX:
        first = base + pair[None, :]
        second = first + HALF
    else:
        first = base + 2 * pair[None, :]
        second = first + 1
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(second, mask=mask, other=0.0).to(tl.float32)
    tl.store(first, (x1 * cos - x2 * sin).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(second, (x2 * cos + x1 * sin).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, pos_ptr, cache_ptr, num_q_heads, num_k_heads,
                   stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                   HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HEADS: tl.constexpr,
                   IS_NEOX: tl.constexpr):
    token = tl.program_id(0).to(tl.int64)
    head_block = tl.program_id(1)
    pair = tl.arange(0, BLOCK_HALF)
    pos = tl.load(pos_ptr + token).to(tl.int64)
    cos = tl.load(cache_ptr + pos * stride_cache + pair, mask=pair < HALF, other=0.0)
    sin = tl.load(cache_ptr + pos * stride_cache + HALF + pair, mask=pair < HALF, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    num_q_blocks = tl.cdiv(num_q_heads, BLOCK_HEADS)
    if head_block < num_q_blocks:
        heads = head_block * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        _rotate_heads(q_ptr, token, heads, num_q_heads, stride_qt, stride_qh, cos, sin, pair,
                      HALF, IS_NEOX)
    else:
        heads = (head_block - num_q_blocks) * BLOCK_HEADS + tl.arange(0, BLOCK_HEADS)
        _rotate_heads(k_ptr, token, heads, num_k_heads, stride_kt, stride_kh, cos, sin, pair,
                      HALF, IS_NEOX)


def _check_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                  cos_sin_cache: torch.Tensor) -> int:
    """Validate; return rotary_dim."""
    for name, t in (("q", q), ("k", k)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [T, heads, head_dim], got {tuple(getattr(t, 'shape', ()))}")
        if t.dtype not in _DTYPES:
            raise ValueError(f"{name} dtype {t.dtype} not supported")
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in head_dim (stride {t.stride(-1)})")
    T = q.shape[0]
    if T == 0:
        raise ValueError("q has no tokens: empty batch")
    if k.shape[0] != T or k.shape[2] != q.shape[2] or k.dtype != q.dtype or k.device != q.device:
        raise ValueError(f"k {tuple(k.shape)} {k.dtype} does not match q {tuple(q.shape)} {q.dtype}")
    if positions.dim() != 1 or positions.shape[0] != T:
        raise ValueError(f"positions shape {tuple(positions.shape)} != ({T},)")
    if positions.dtype not in (torch.int64, torch.int32) or positions.device != q.device:
        raise ValueError(f"positions must be int64/int32 on {q.device}, got {positions.dtype}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.stride(-1) != 1:
        raise ValueError(f"cos_sin_cache must be a contiguous [P, rotary_dim] tensor")
    if cos_sin_cache.device != q.device:
        raise ValueError(f"cos_sin_cache is on {cos_sin_cache.device}, q on {q.device}")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or rotary_dim > q.shape[2] or rotary_dim == 0:
        raise ValueError(f"cos_sin_cache rotary_dim {rotary_dim} must be even and <= head_dim {q.shape[2]}")
    return rotary_dim


def apply_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                 cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Rotate the first rotary_dim dims of every q and k head in place."""
    rotary_dim = _check_rotary(q, k, positions, cos_sin_cache)
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    num_q_heads, num_k_heads = q.shape[1], k.shape[1]
    block_heads = min(triton.next_power_of_2(max(num_q_heads, num_k_heads)),
                      max(1, 2048 // block_half))
    num_blocks = triton.cdiv(num_q_heads, block_heads) + triton.cdiv(num_k_heads, block_heads)
    _rotary_kernel[(q.shape[0], num_blocks)](
        q, k, positions, cos_sin_cache, num_q_heads, num_k_heads,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_HEADS=block_heads, IS_NEOX=bool(is_neox),
        num_warps=4)


def _rotate_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, is_neox: bool) -> None:
    rotary_dim = 2 * cos.shape[-1]
    rot = x[..., :rotary_dim].float()
    if is_neox:
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    out1, out2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    if is_neox:
        out = torch.cat((out1, out2), dim=-1)
    else:
        out = torch.stack((out1, out2), dim=-1).flatten(-2)
    x[..., :rotary_dim] = out.to(x.dtype)


def apply_rotary_reference(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor,
                           cos_sin_cache: torch.Tensor, is_neox: bool) -> None:
    """Plain PyTorch, same math (fp32), in place."""
    rotary_dim = _check_rotary(q, k, positions, cos_sin_cache)
    rows = cos_sin_cache[positions.long()].float()          # [T, rotary_dim]
    cos = rows[:, None, : rotary_dim // 2]                  # [T, 1, rotary_dim/2]
    sin = rows[:, None, rotary_dim // 2:]
    _rotate_reference(q, cos, sin, is_neox)
    _rotate_reference(k, cos, sin, is_neox)


def flops_bytes(num_tokens: int, num_q_heads: int, num_k_heads: int, rotary_dim: int,
                dtype: torch.dtype = torch.bfloat16, cache_dtype: torch.dtype = torch.float32
                ) -> tuple[int, int]:
    """(FLOPs, minimum bytes moved): rotated q/k read and written + one cache row per token."""
    size = torch.empty((), dtype=dtype).element_size()
    cache_size = torch.empty((), dtype=cache_dtype).element_size()
    elements = num_tokens * (num_q_heads + num_k_heads) * rotary_dim
    return 3 * elements, 2 * size * elements + cache_size * num_tokens * rotary_dim



# ----------------------------------------------------------------------------- multi-section rows
#
# M-RoPE (Qwen2-VL and later): a token has one position per section (time,
# height, width), ``positions[S, T]``, and rotary pair i takes its angle from
# the position of the section that owns i. ``mrope_cos_sin`` gathers, per
# token, the cos/sin row that mixes the sections, ``rows[T, rotary_dim]``;
# ``apply_rotary`` / ``qk_norm_rope_store`` then rotate with
# ``positions = arange(T)`` and ``rows`` as the cache. Which section owns pair i
# (``sections = (s0, s1, s2)``, summing to rotary_dim / 2):
#
# * contiguous (Qwen2-VL, Qwen2.5-VL): [0, s0) time, [s0, s0+s1) height, rest width;
# * interleaved (Qwen3-VL): i % 3 == 1 and i < 3*s1 height, i % 3 == 2 and
#   i < 3*s2 width, every other pair time.
#
# A text token has the same position in every section, so its row equals the
# plain ``cos_sin_cache[p]``. The vision towers' 2D rotary is the same gather
# with two sections (height, width) over a table whose halves repeat the
# frequencies (``build_axial_cos_sin_cache``).


@triton.jit
def _mrope_cos_sin_kernel(pos_ptr, cache_ptr, out_ptr, num_tokens, stride_ps, stride_cache,
                          stride_out, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr,
                          BLOCK_T: tl.constexpr, SECTION0: tl.constexpr, SECTION1: tl.constexpr,
                          SECTION2: tl.constexpr, INTERLEAVED: tl.constexpr):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    pair = tl.arange(0, BLOCK_HALF)
    if INTERLEAVED:
        phase = pair % 3
        section = tl.where((phase == 1) & (pair < 3 * SECTION1), 1,
                           tl.where((phase == 2) & (pair < 3 * SECTION2), 2, 0))
    else:
        section = (pair >= SECTION0).to(tl.int32) + (pair >= SECTION0 + SECTION1).to(tl.int32)
    mask = (tokens[:, None] < num_tokens) & (pair[None, :] < HALF)
    pos = tl.load(pos_ptr + section[None, :] * stride_ps + tokens[:, None], mask=mask, other=0)
    row = cache_ptr + pos.to(tl.int64) * stride_cache + pair[None, :]
    out = out_ptr + tokens[:, None].to(tl.int64) * stride_out + pair[None, :]
    tl.store(out, tl.load(row, mask=mask, other=0.0), mask=mask)
    tl.store(out + HALF, tl.load(row + HALF, mask=mask, other=0.0), mask=mask)


def _check_mrope(positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                 sections: tuple[int, ...], interleaved: bool) -> tuple[int, int, int]:
    """Validate; return the three section sizes (0 for an absent third)."""
    if positions.dim() != 2 or positions.shape[1] == 0 or positions.stride(1) != 1:
        raise ValueError(f"positions must be a [sections, T] tensor with contiguous rows, got "
                         f"{tuple(positions.shape)}")
    if positions.dtype not in (torch.int64, torch.int32) or positions.device != cos_sin_cache.device:
        raise ValueError(f"positions must be int64/int32 on {cos_sin_cache.device}, got "
                         f"{positions.dtype} on {positions.device}")
    if cos_sin_cache.dim() != 2 or cos_sin_cache.stride(-1) != 1:
        raise ValueError("cos_sin_cache must be a contiguous [P, rotary_dim] tensor")
    sizes = tuple(int(s) for s in sections) + (0,) * (3 - len(sections))
    if len(sections) != positions.shape[0] or len(sizes) != 3 or min(sizes) < 0:
        raise ValueError(f"sections {tuple(sections)} must give one size per row of positions "
                         f"({positions.shape[0]} rows, at most 3)")
    if 2 * sum(sizes) != cos_sin_cache.shape[1]:
        raise ValueError(f"sections {tuple(sections)} must sum to rotary_dim / 2 = "
                         f"{cos_sin_cache.shape[1] // 2}")
    if interleaved and len(sections) != 3:
        raise ValueError("interleaved sections need 3 rows of positions (time, height, width)")
    return sizes


def mrope_cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor, sections: tuple[int, ...],
                  interleaved: bool) -> torch.Tensor:
    """rows[T, rotary_dim]: each token's cos/sin row mixed from its per-section positions."""
    s0, s1, s2 = _check_mrope(positions, cos_sin_cache, sections, interleaved)
    T, rotary_dim = positions.shape[1], cos_sin_cache.shape[1]
    out = torch.empty((T, rotary_dim), dtype=cos_sin_cache.dtype, device=cos_sin_cache.device)
    half = rotary_dim // 2
    block_half = triton.next_power_of_2(half)
    block_t = max(1, min(64, 4096 // block_half))
    _mrope_cos_sin_kernel[(triton.cdiv(T, block_t),)](
        positions, cos_sin_cache, out, T, positions.stride(0), cos_sin_cache.stride(0), out.stride(0),
        HALF=half, BLOCK_HALF=block_half, BLOCK_T=block_t, SECTION0=s0, SECTION1=s1, SECTION2=s2,
        INTERLEAVED=bool(interleaved), num_warps=4)
    return out


def mrope_section_of_pairs(half: int, sizes: tuple[int, int, int], interleaved: bool) -> torch.Tensor:
    """Which section owns each rotary pair, [half] int64 (the reference's table)."""
    pair = torch.arange(half)
    if interleaved:
        phase = pair % 3
        return torch.where((phase == 1) & (pair < 3 * sizes[1]), 1,
                           torch.where((phase == 2) & (pair < 3 * sizes[2]), 2, 0))
    return (pair >= sizes[0]).long() + (pair >= sizes[0] + sizes[1]).long()


def mrope_cos_sin_reference(positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                            sections: tuple[int, ...], interleaved: bool) -> torch.Tensor:
    """Plain PyTorch, same gather."""
    sizes = _check_mrope(positions, cos_sin_cache, sections, interleaved)
    half = cos_sin_cache.shape[1] // 2
    owner = mrope_section_of_pairs(half, sizes, interleaved).to(positions.device)      # [half]
    pos = positions.long()[owner].t()                                                  # [T, half]
    pair = torch.arange(half, device=positions.device)
    return torch.cat((cos_sin_cache[pos, pair], cos_sin_cache[pos, half + pair]), dim=-1)


def build_axial_cos_sin_cache(head_dim: int, max_position: int, base: float, dtype: torch.dtype,
                              device: torch.device | str) -> torch.Tensor:
    """[max_position, head_dim] table of the vision towers' 2D rotary (HF "axial" rope):
    frequencies over head_dim / 2, each half holding them twice, so that
    ``mrope_cos_sin`` with sections (head_dim/4, head_dim/4) over (height,
    width) positions yields HF's ``cat(freqs_h, freqs_w)`` rows."""
    if head_dim % 4:
        raise ValueError(f"head_dim must be a multiple of 4 for 2D rotary, got {head_dim}")
    spatial = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, spatial, 2, dtype=torch.float) / spatial))
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float), inv_freq)   # [P, D/4]
    cos, sin = freqs.cos(), freqs.sin()
    return torch.cat((cos, cos, sin, sin), dim=-1).to(dtype=dtype, device=device)


# ----------------------------------------------------------------------------- cos/sin cache
#
# Init-time, plain torch (not the hot path). Each function returns
# (inv_freq[rotary_dim/2] fp32, attention_factor) exactly as transformers'
# ROPE_INIT_FUNCTIONS do; the cache row for position p is
# [cos(p*inv_freq) * attention_factor, sin(p*inv_freq) * attention_factor].


def _default_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim))


def _linear_params(dim: int, base: float, params: dict, original_max: int, seq_len: int):
    return _default_inv_freq(dim, base) / params["factor"], 1.0


def _dynamic_params(dim: int, base: float, params: dict, original_max: int, seq_len: int):
    """NTK-aware base stretch for a sequence of ``seq_len`` (HF recomputes
    inv_freq once positions pass the original length; a cache built for a
    maximum length uses that length)."""
    factor = params["factor"]
    # HF's forward passes seq_len as an int64 tensor, so the stretched base is
    # computed in fp32 tensor arithmetic; doing the same keeps us bit-equal.
    seq_len_t = torch.maximum(torch.tensor(seq_len), torch.tensor(original_max))
    base_t = base * ((factor * seq_len_t / original_max) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base_t ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)), 1.0


def _llama3_params(dim: int, base: float, params: dict, original_max: int, seq_len: int):
    inv_freq = _default_inv_freq(dim, base)
    factor = params["factor"]
    low_freq_factor, high_freq_factor = params["low_freq_factor"], params["high_freq_factor"]
    old_context_len = params.get("original_max_position_embeddings", original_max)
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama), 1.0


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_params(dim: int, base: float, params: dict, original_max: int, seq_len: int):
    """YaRN: blend interpolated and extrapolated frequencies over a linear ramp
    of dims, and scale cos/sin by the attention factor (mscale)."""
    original = params.get("original_max_position_embeddings") or original_max
    factor = params.get("factor")
    if factor is None:
        factor = original_max / original
    attention_factor = params.get("attention_factor")
    mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(_yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(dtype=torch.float) / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, attention_factor


_ROPE_PARAMS = {
    "default": lambda dim, base, params, original_max, seq_len: (_default_inv_freq(dim, base), 1.0),
    "linear": _linear_params,
    "dynamic": _dynamic_params,
    "llama3": _llama3_params,
    "yarn": _yarn_params,
}


def rope_type_of(rope_scaling: dict | None) -> str:
    """The rope type of a config dict in any spelling (``type``/``rope_type``)."""
    if not rope_scaling:
        return "default"
    return rope_scaling.get("rope_type", rope_scaling.get("type", "default"))


def build_cos_sin_cache(rotary_dim: int, max_position: int, base: float,
                        rope_scaling: dict | None, dtype: torch.dtype, device: torch.device | str,
                        original_max_position: int | None = None) -> torch.Tensor:
    """[max_position, rotary_dim] table: cos in the first half, sin in the second.

    ``rope_scaling`` is the config's ``rope_scaling`` (``type`` or
    ``rope_type`` key) or transformers 5's ``rope_parameters`` (whose
    ``rope_theta``, when present, overrides ``base``). ``original_max_position``
    is the config's ``max_position_embeddings`` (used by dynamic, and by
    llama3/yarn when the dict lacks ``original_max_position_embeddings``);
    it defaults to ``max_position``.
    """
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be a positive even number, got {rotary_dim}")
    if max_position <= 0:
        raise ValueError(f"max_position must be positive, got {max_position}")
    params = dict(rope_scaling or {})
    rope_type = rope_type_of(params)
    if rope_type not in _ROPE_PARAMS:
        raise ValueError(f"unsupported rope type {rope_type!r}; expected one of {sorted(_ROPE_PARAMS)}")
    base = float(params.get("rope_theta", base))
    original_max = original_max_position or max_position
    inv_freq, attention_factor = _ROPE_PARAMS[rope_type](rotary_dim, base, params, original_max,
                                                         max_position)
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = torch.outer(positions, inv_freq.float())        # [P, rotary_dim/2], fp32 like HF
    cache = torch.cat((freqs.cos() * attention_factor, freqs.sin() * attention_factor), dim=-1)
    return cache.to(dtype=dtype, device=device)
