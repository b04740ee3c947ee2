"""The vision towers of Qwen2.5-VL and Qwen3-VL: pixel patches -> embeddings in the LM's width.

Input: ``pixel_values[N, C * Tp * P * P]``, one row per patch (C channels, Tp
frames per temporal patch, P x P pixels, in that order: HF's processor
output), and ``grid_thw``, one ``(t, h, w)`` patch grid per image or video.
Patches arrive in *merge order*: the m x m patches that the merger later
folds into one LM token are consecutive (m = spatial_merge_size).

Pipeline (both towers)::

    x = patch_embed(pixels)           the Conv3d with stride = kernel is a GEMM  [N, D]
        (+ interpolated learned position embedding: Qwen3-VL)
    for each block: x += attn(norm1(x)); x += mlp(norm2(x))
        attention is non-causal within a segment (``vision_attention``) with a
        2D rotary over each patch's (row, column); segments are the frames,
        except Qwen2.5-VL's windowed blocks, whose segments are windows of
        window_size pixels (patches are reordered window by window first, and
        the merged tokens put back at the end)
    tokens = merger(x)                m*m patches -> one LM token   [N / m^2, H]
        (+ Qwen3-VL deepstack: mergers of the outputs of some blocks, added to
        the LM's hidden states after its first layers)

The index work (rotary positions, segment bounds, the window order, the
interpolation taps) depends only on ``grid_thw`` and is done on the host
with plain torch, like HF's ``vision_utils``, then uploaded once per encode
call; pixels given on the host are cast to the tower's dtype there before
the upload. On the device the tower runs only the kernel table's ops:
linear, rms_norm / fused_add_rms_norm, layer_norm / fused_add_layer_norm,
silu_and_mul, gelu, add_interpolated_pos_embed, apply_rotary, mrope_cos_sin
(the 2D rotary rows), vision_attention and embedding (row gathers). Both
towers keep the decoder's ``(out, residual)`` pair through the blocks, so
each residual add is folded into the next norm; ``residual is None`` means
``hidden`` is the whole stream.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from models.layers import MLP, Linear, RMSNorm, weight
from triton_kernels import KernelOps
from triton_kernels.rotary import build_axial_cos_sin_cache

MAX_GRID_SIDE = 4096        # rows of the 2D rotary table: patches per image side


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """vision_config of a Qwen2.5-VL / Qwen3-VL config.json, resolved."""

    kind: str                       # "qwen2_5" or "qwen3"
    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    in_channels: int
    spatial_merge_size: int
    hidden_act: str
    rope_theta: float
    window_size: int = 0                                # Qwen2.5-VL
    fullatt_block_indexes: tuple[int, ...] = ()         # Qwen2.5-VL
    num_position_embeddings: int = 0                    # Qwen3-VL
    deepstack_visual_indexes: tuple[int, ...] = ()      # Qwen3-VL

    @classmethod
    def from_dict(cls, kind: str, raw: dict[str, Any]) -> "VisionConfig":
        rope = raw.get("rope_parameters") or {}
        return cls(kind=kind, depth=int(raw["depth"]), hidden_size=int(raw["hidden_size"]),
                   intermediate_size=int(raw["intermediate_size"]), num_heads=int(raw["num_heads"]),
                   out_hidden_size=int(raw["out_hidden_size"]), patch_size=int(raw["patch_size"]),
                   temporal_patch_size=int(raw.get("temporal_patch_size", 2)),
                   in_channels=int(raw.get("in_channels", 3)),
                   spatial_merge_size=int(raw.get("spatial_merge_size", 2)),
                   hidden_act=str(raw.get("hidden_act", "silu")),
                   rope_theta=float(rope.get("rope_theta", 10000.0)),
                   window_size=int(raw.get("window_size", 0)),
                   fullatt_block_indexes=tuple(raw.get("fullatt_block_indexes") or ()),
                   num_position_embeddings=int(raw.get("num_position_embeddings", 0)),
                   deepstack_visual_indexes=tuple(raw.get("deepstack_visual_indexes") or ()))

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


@dataclasses.dataclass(frozen=True)
class VisionOutput:
    """One encode call: LM-width embeddings of every merged token, in grid order, and
    (Qwen3-VL) one deepstack tensor of the same shape per deepstack layer."""

    embeds: torch.Tensor                       # [tokens, H]
    deepstack: tuple[torch.Tensor, ...] = ()   # each [tokens, H]


# ----------------------------------------------------------------------------- host-side layout


@dataclasses.dataclass(frozen=True)
class GridLayout:
    """Index tensors of one encode call, all derived from grid_thw."""

    hw_positions: torch.Tensor        # [2, N] int64: each patch's (row, column), in block order
    rope_index: torch.Tensor          # [N] int64: 0..N-1, each patch's row of the rotary table
    cu_seqlens: torch.Tensor          # [frames + 1] int32: one segment per frame
    max_seqlen: int
    window_order: torch.Tensor | None = None      # [N] patch gather into window order
    cu_window_seqlens: torch.Tensor | None = None
    max_window_seqlen: int = 0
    merged_restore: torch.Tensor | None = None    # [N / m^2] merged tokens back to grid order
    interp_indices: torch.Tensor | None = None    # [N, 4] rows of the learned position table
    interp_weights: torch.Tensor | None = None    # [N, 4] their bilinear weights


def _merge_order(h: int, w: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, column) of each patch of an h x w grid, m x m blocks consecutive."""
    rows = torch.arange(h)[:, None].expand(h, w)
    cols = torch.arange(w)[None, :].expand(h, w)
    def block(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(h // m, m, w // m, m).permute(0, 2, 1, 3).flatten()
    return block(rows), block(cols)


def _segments(lengths: list[int], device: torch.device) -> tuple[torch.Tensor, int]:
    bounds = torch.tensor([0] + lengths).cumsum(0)
    return bounds.to(dtype=torch.int32, device=device), max(lengths)


def _windows(grids: list[tuple[int, int, int]], m: int, side: int) -> tuple[torch.Tensor, list[int]]:
    """Merged-token order window by window (side x side merged tokens a window, each
    frame tiled from its top-left corner) and the windows' lengths in merged tokens."""
    order, lengths, offset = [], [], 0
    for t, h, w in grids:
        gh, gw = h // m, w // m
        index = torch.arange(t * gh * gw).reshape(t, gh, gw)
        for frame in range(t):
            for r in range(0, gh, side):
                for c in range(0, gw, side):
                    tile = index[frame, r:r + side, c:c + side].flatten()
                    order.append(tile + offset)
                    lengths.append(tile.numel())
        offset += t * gh * gw
    return torch.cat(order), lengths


def _bilinear_taps(grids: list[tuple[int, int, int]], m: int, side: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows and weights of a side x side table resampled to each grid (bilinear,
    align_corners), patches in merge order and repeated per frame."""
    indices, weights = [], []
    for t, h, w in grids:
        rows, cols = _merge_order(h, w, m)
        def axis(x: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
            src = x.float() * (side - 1) / max(size - 1, 1)
            low = src.floor()
            taps = torch.stack((low, low + 1), dim=-1).long().clamp(0, side - 1)
            frac = src - low
            return taps, torch.stack((1 - frac, frac), dim=-1)
        (rt, rw), (ct, cw) = axis(rows, h), axis(cols, w)
        indices.append((rt[:, :, None] * side + ct[:, None, :]).reshape(-1, 4).repeat(t, 1))
        weights.append((rw[:, :, None] * cw[:, None, :]).reshape(-1, 4).repeat(t, 1))
    return torch.cat(indices), torch.cat(weights)


def grid_layout(config: VisionConfig, grid_thw: list[tuple[int, int, int]],
                device: torch.device) -> GridLayout:
    """Every index tensor one encode call needs, on `device`."""
    m = config.spatial_merge_size
    for t, h, w in grid_thw:
        if t <= 0 or h <= 0 or w <= 0 or h % m or w % m or max(h, w) > MAX_GRID_SIDE:
            raise ValueError(f"grid (t={t}, h={h}, w={w}) must be positive, h and w multiples of "
                             f"spatial_merge_size {m}, at most {MAX_GRID_SIDE}")
    hw = torch.cat([torch.stack(_merge_order(h, w, m)).repeat(1, t) for t, h, w in grid_thw], dim=1)
    cu, max_len = _segments([h * w for t, h, w in grid_thw for _ in range(t)], device)
    fields: dict[str, Any] = {}
    if config.kind == "qwen2_5":
        side = config.window_size // m // config.patch_size
        order, lengths = _windows(grid_thw, m, side)
        patch_order = (order[:, None] * m * m + torch.arange(m * m)).flatten()
        hw = hw[:, patch_order]                     # the blocks see patches window by window
        cu_window, max_window = _segments([n * m * m for n in lengths], device)
        fields.update(window_order=patch_order.to(device), cu_window_seqlens=cu_window,
                      max_window_seqlen=max_window, merged_restore=torch.argsort(order).to(device))
    else:
        side = int(config.num_position_embeddings ** 0.5)
        indices, weights = _bilinear_taps(grid_thw, m, side)
        fields.update(interp_indices=indices.to(device), interp_weights=weights.to(device))
    return GridLayout(hw_positions=hw.to(device), rope_index=torch.arange(hw.shape[1]).to(device),
                      cu_seqlens=cu, max_seqlen=max_len, **fields)


# ----------------------------------------------------------------------------- modules


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (Qwen3-VL); with ``residual`` it is the fused
    ``residual += x; norm(residual)``, as ``RMSNorm``."""

    def __init__(self, ops: KernelOps, size: int, eps: float, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = weight(size, dtype=dtype, device=device)
        self.bias = weight(size, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if residual is None:
            return self.ops.layer_norm(x, self.weight, self.bias, self.eps)
        return self.ops.fused_add_layer_norm(x, residual, self.weight, self.bias, self.eps)


class PatchEmbed(nn.Module):
    """Conv3d(kernel = stride = (Tp, P, P)) over one patch each = one GEMM over flattened patches.
    The weight keeps HF's 5-D shape [D, C, Tp, P, P] so the checkpoint copies as is."""

    def __init__(self, ops: KernelOps, c: VisionConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops = ops
        self.proj = nn.Module()
        self.proj.weight = weight(c.hidden_size, c.in_channels, c.temporal_patch_size, c.patch_size,
                                  c.patch_size, dtype=dtype, device=device)
        self.proj.bias = weight(c.hidden_size, dtype=dtype, device=device) if c.kind == "qwen3" else None

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        w = self.proj.weight
        return self.ops.linear(pixels, w.view(w.shape[0], -1), self.proj.bias)


class VisionAttention(nn.Module):
    """qkv -> 2D rotary on q, k (in place) -> attention per segment -> proj."""

    def __init__(self, ops: KernelOps, c: VisionConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops, self.num_heads, self.head_dim = ops, c.num_heads, c.head_dim
        self.qkv = Linear(ops, c.hidden_size, 3 * c.hidden_size, True, dtype, device)
        self.proj = Linear(ops, c.hidden_size, c.hidden_size, True, dtype, device)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                cu_seqlens: torch.Tensor, max_seqlen: int) -> torch.Tensor:
        N, D = x.shape
        qkv = self.qkv(x)                                              # [N, 3D]: q | k | v
        q, k, v = (qkv[:, i * D:(i + 1) * D].view(N, self.num_heads, self.head_dim) for i in range(3))
        self.ops.apply_rotary(q, k, rope[0], rope[1], True)
        o = self.ops.vision_attention(q, k, v, cu_seqlens, max_seqlen, self.head_dim ** -0.5)
        return self.proj(o.view(N, D))


class Qwen3VisionMLP(nn.Module):
    def __init__(self, ops: KernelOps, c: VisionConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops = ops
        self.approximate = "tanh" if "tanh" in c.hidden_act else "none"
        self.linear_fc1 = Linear(ops, c.hidden_size, c.intermediate_size, True, dtype, device)
        self.linear_fc2 = Linear(ops, c.intermediate_size, c.hidden_size, True, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.ops.gelu(self.linear_fc1(x), self.approximate))


class VisionBlock(nn.Module):
    """Pre-norm block, ``x += attn(norm1(x)); x += mlp(norm2(x))``, kept as the decoder's
    (out, residual) pair so each residual add fuses into the next norm (RMSNorm for
    Qwen2.5-VL, LayerNorm for Qwen3-VL)."""

    def __init__(self, ops: KernelOps, c: VisionConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        if c.kind == "qwen2_5":
            self.norm1 = RMSNorm(ops, c.hidden_size, 1e-6, dtype, device)
            self.norm2 = RMSNorm(ops, c.hidden_size, 1e-6, dtype, device)
            self.mlp = MLP(ops, c.hidden_size, c.intermediate_size, True, dtype, device)
        else:
            self.norm1 = LayerNorm(ops, c.hidden_size, 1e-6, dtype, device)
            self.norm2 = LayerNorm(ops, c.hidden_size, 1e-6, dtype, device)
            self.mlp = Qwen3VisionMLP(ops, c, dtype, device)
        self.attn = VisionAttention(ops, c, dtype, device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, rope, cu_seqlens,
                max_seqlen: int) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual, x = hidden, self.norm1(hidden)
        else:
            x = self.norm1(hidden, residual)                 # residual += hidden
        x = self.norm2(self.attn(x, rope, cu_seqlens, max_seqlen), residual)
        return self.mlp(x), residual


class PatchMerger(nn.Module):
    """m*m patches -> one LM token: norm, then a 2-layer GELU MLP over their concatenation.
    Qwen2.5-VL: ``ln_q`` (RMSNorm) + ``mlp.0``/``mlp.2``; Qwen3-VL: ``norm`` (LayerNorm, over
    the concatenation for the deepstack mergers) + ``linear_fc1``/``linear_fc2``.

    Given the blocks' pending ``residual``, the norm first adds it in (in place, so
    ``residual`` then holds the whole stream: see ``VisionTower._blocks``)."""

    def __init__(self, ops: KernelOps, c: VisionConfig, dtype: torch.dtype,
                 device: torch.device | str, postshuffle_norm: bool = False) -> None:
        super().__init__()
        self.ops, self.kind, self.postshuffle_norm = ops, c.kind, postshuffle_norm
        self.merged = c.hidden_size * c.spatial_merge_size ** 2
        if c.kind == "qwen2_5":
            self.ln_q = RMSNorm(ops, c.hidden_size, 1e-6, dtype, device)
            self.mlp = nn.Module()
            self.mlp.add_module("0", Linear(ops, self.merged, self.merged, True, dtype, device))
            self.mlp.add_module("2", Linear(ops, self.merged, c.out_hidden_size, True, dtype, device))
            return
        self.norm = LayerNorm(ops, self.merged if postshuffle_norm else c.hidden_size, 1e-6, dtype, device)
        self.linear_fc1 = Linear(ops, self.merged, self.merged, True, dtype, device)
        self.linear_fc2 = Linear(ops, self.merged, c.out_hidden_size, True, dtype, device)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        if self.kind == "qwen2_5":
            norm, first, second = self.ln_q, self.mlp.get_submodule("0"), self.mlp.get_submodule("2")
        else:
            norm, first, second = self.norm, self.linear_fc1, self.linear_fc2
        if self.postshuffle_norm:          # the norm spans the m*m patches (a row-major view)
            hidden = hidden.view(-1, self.merged)
            residual = residual.view(-1, self.merged) if residual is not None else None
        x = norm(hidden, residual)                                      # [N, D] or [N / m^2, m^2 D]
        return second(self.ops.gelu(first(x.view(-1, self.merged))))   # [N / m^2, H]


class VisionTower(nn.Module):
    """HF ``visual``: patch_embed, (pos_embed,) blocks, merger (+ deepstack_merger_list)."""

    def __init__(self, ops: KernelOps, c: VisionConfig, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        super().__init__()
        self.ops, self.config = ops, c
        self.patch_embed = PatchEmbed(ops, c, dtype, device)
        if c.kind == "qwen3":
            self.pos_embed = nn.Module()
            self.pos_embed.weight = weight(c.num_position_embeddings, c.hidden_size, dtype=dtype,
                                           device=device)
        self.blocks = nn.ModuleList([VisionBlock(ops, c, dtype, device) for _ in range(c.depth)])
        self.merger = PatchMerger(ops, c, dtype, device)
        if c.deepstack_visual_indexes:
            self.deepstack_merger_list = nn.ModuleList(
                [PatchMerger(ops, c, dtype, device, postshuffle_norm=True)
                 for _ in c.deepstack_visual_indexes])
        # fp32 like HF's vision rotary (cos/sin computed and applied in fp32)
        self.register_buffer("rope_cache", build_axial_cos_sin_cache(
            c.head_dim, MAX_GRID_SIDE, c.rope_theta, torch.float32, device), persistent=False)

    @torch.inference_mode()
    def forward(self, pixel_values: torch.Tensor, grid_thw: list[tuple[int, int, int]]) -> VisionOutput:
        c, ops = self.config, self.ops
        layout = grid_layout(c, [tuple(int(v) for v in g) for g in grid_thw], pixel_values.device)
        hidden = self.patch_embed(self._upload(pixel_values))                    # [N, D]
        if layout.interp_indices is not None:                                    # Qwen3-VL
            hidden = ops.add_interpolated_pos_embed(hidden, self.pos_embed.weight, layout.interp_indices,
                                                    layout.interp_weights)
        if layout.window_order is not None:                                      # Qwen2.5-VL
            hidden = ops.embedding(layout.window_order, hidden)
        table = ops.mrope_cos_sin(layout.hw_positions, self.rope_cache,
                                  (c.head_dim // 4, c.head_dim // 4), False)     # [N, head_dim]
        return self._blocks(hidden, (layout.rope_index, table), layout)

    def _upload(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels in the weights' dtype on their device: host pixels are cast before the
        upload (no cast kernel on the device, half the bytes copied in bf16)."""
        w = self.patch_embed.proj.weight
        if pixel_values.dtype != w.dtype and pixel_values.device.type == "cpu":
            pixel_values = pixel_values.to(w.dtype)
        if pixel_values.device != w.device:
            pixel_values = pixel_values.to(w.device)
        if pixel_values.dtype != w.dtype:       # device pixels of another dtype: a cast on the device
            pixel_values = pixel_values.to(w.dtype)
        return pixel_values

    def _blocks(self, hidden: torch.Tensor, rope, layout: GridLayout) -> VisionOutput:
        c = self.config
        residual, deepstack = None, []
        for i, block in enumerate(self.blocks):
            windowed = layout.window_order is not None and i not in c.fullatt_block_indexes
            cu, max_len = ((layout.cu_window_seqlens, layout.max_window_seqlen) if windowed
                           else (layout.cu_seqlens, layout.max_seqlen))
            hidden, residual = block(hidden, residual, rope, cu, max_len)
            if i in c.deepstack_visual_indexes:
                # the merger's norm folds the pending add into residual: the stream is whole again
                merger = self.deepstack_merger_list[c.deepstack_visual_indexes.index(i)]
                deepstack.append(merger(hidden, residual))
                hidden, residual = residual, None
        embeds = self.merger(hidden, residual)                                   # [N / m^2, H]
        if layout.merged_restore is not None:
            embeds = self.ops.embedding(layout.merged_restore, embeds)
        return VisionOutput(embeds=embeds, deepstack=tuple(deepstack))
