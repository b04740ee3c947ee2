"""The vision towers compute only through KernelOps (as tests/models/test_hot_path.py for the decoders).

The index tensors of an encode call (``grid_layout``: rotary positions,
segments, window order, interpolation taps) are host work done once per call
and uploaded; they are built before the recorder starts. Everything the
tower then does on its input must be a kernel op, a view or a slice: no
torch arithmetic, no indexing kernels, no dtype casts of device tensors.
Both towers: Qwen2.5-VL (windows, RMSNorm, SwiGLU, GELU merger) and
Qwen3-VL (LayerNorm, tanh GELU, the learned position table, deepstack).
"""
from __future__ import annotations

import pytest
import torch

import models.vision as vision
from tests.models.test_hot_path import ALLOWED, _Recorder, _wrapped_ops

BASE = dict(depth=3, hidden_size=32, intermediate_size=48, num_heads=2, out_hidden_size=40, spatial_merge_size=2,
            temporal_patch_size=2, in_channels=3)
CONFIGS = {
    "qwen2_5": dict(BASE, patch_size=14, hidden_act="silu", window_size=56, fullatt_block_indexes=[1]),
    "qwen3": dict(BASE, patch_size=16, hidden_act="gelu_pytorch_tanh", num_position_embeddings=36,
                  deepstack_visual_indexes=[0, 2]),
}


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_tower_calls_only_kernel_ops(kind, monkeypatch):
    config = vision.VisionConfig.from_dict(kind, CONFIGS[kind])
    recorder = _Recorder()
    tower = vision.VisionTower(_wrapped_ops(recorder), config, torch.float32, "cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in tower.parameters():
            p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    grids = [(1, 6, 8), (2, 4, 10)]
    layout = vision.grid_layout(config, grids, torch.device("cpu"))       # host work, before recording
    monkeypatch.setattr(vision, "grid_layout", lambda *args: layout)
    patch_dim = 3 * 2 * config.patch_size ** 2
    pixels = torch.randn(sum(t * h * w for t, h, w in grids), patch_dim, generator=gen)
    with recorder:
        out = tower(pixels, grids)
    tokens = sum(t * h * w for t, h, w in grids) // 4
    assert out.embeds.shape == (tokens, 40)
    assert len(out.deepstack) == len(config.deepstack_visual_indexes)
    assert "aten.view.default" in recorder.outside      # the recorder sees the tower's code
    extra = set(recorder.outside) - ALLOWED
    assert not extra, f"the vision tower computes outside KernelOps: {sorted(extra)}"
