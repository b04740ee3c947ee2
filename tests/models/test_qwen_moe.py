"""The MoE decoders (models/qwen_moe.py) vs transformers: Qwen3-MoE and Qwen2-MoE."""
from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

import models
from models.qwen_moe import SparseMoeBlock
from tests.models.parity import check_parity
from tests.models.runner import PagedRunner
from tests.models.tiny import prompts
from triton_kernels import load_ops

PROMPT_LENS = [7, 19, 3, 12]


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_reference_backend_matches_transformers(name, tiny_checkpoint):
    check_parity(tiny_checkpoint(name), "reference", PROMPT_LENS, num_new=32)


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe"])
def test_triton_backend_matches_transformers(name, tiny_checkpoint, device):
    """Triton kernels (interpreted on CPU, compiled on a GPU): one layer, two short prompts,
    a prefill and one decode step."""
    check_parity(tiny_checkpoint(name, num_hidden_layers=1), "triton", [6, 3], num_new=2,
                 device=device)


def test_sparse_and_dense_layers_follow_mlp_only_layers(tiny_checkpoint):
    model, config = models.load_model(tiny_checkpoint("qwen2_moe"), load_ops("reference"),
                                      torch.float32, "cpu")
    assert config.mlp_only_layers == (1,) and not config.norm_topk_prob
    assert isinstance(model.model.layers[0].mlp, SparseMoeBlock)
    assert not isinstance(model.model.layers[1].mlp, SparseMoeBlock)


def test_fused_3d_expert_checkpoint_loads_like_per_expert(tiny_checkpoint, tmp_path):
    """transformers 5 in-memory form: experts.gate_up_proj [E, 2I, H], experts.down_proj [E, H, I]."""
    source = tiny_checkpoint("qwen3_moe")
    tensors = load_file(source / "model.safetensors")
    fused = {k: v for k, v in tensors.items() if ".experts." not in k}
    for layer in range(2):
        prefix = f"model.layers.{layer}.mlp.experts"
        num_experts = sum(1 for k in tensors if k.startswith(prefix) and k.endswith("down_proj.weight"))
        fused[f"{prefix}.gate_up_proj"] = torch.stack([
            torch.cat([tensors[f"{prefix}.{e}.gate_proj.weight"], tensors[f"{prefix}.{e}.up_proj.weight"]])
            for e in range(num_experts)])
        fused[f"{prefix}.down_proj"] = torch.stack(
            [tensors[f"{prefix}.{e}.down_proj.weight"] for e in range(num_experts)])
    save_file(fused, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    ops = load_ops("reference")
    logits = []
    for directory in (source, tmp_path):
        model, config = models.load_model(directory, ops, torch.float32, "cpu")
        batch = prompts(config.vocab_size, [5, 4])
        logits.append(PagedRunner(model, 2, 8).prefill(batch))
    assert torch.equal(logits[0], logits[1])
