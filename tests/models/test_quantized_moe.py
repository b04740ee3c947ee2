"""Quantized mixture-of-experts checkpoints: tiny random Qwen3-MoE and Qwen2-MoE models
written by the test in each published layout, experts included.

As in ``test_quantized.py`` (whose test-side quantizers this file reuses), every
projection the format quantizes (attention, each expert's ``gate_proj`` /
``up_proj`` / ``down_proj``, Qwen2-MoE's shared expert) is quantized by the test,
written under its per-expert checkpoint name
(``mlp.experts.{e}.gate_proj.{weight,weight_scale_inv}``; ``qweight``,
``qzeros``, ``scales`` (, ``g_idx``)), and the dequantized weights are written as a
plain fp32 checkpoint, the reference. The routers (``mlp.gate``) and Qwen2-MoE's
``shared_expert_gate`` stay 16-bit, as in the published checkpoints.

Tolerances: weight-only formats (AWQ, GPTQ) compute the reference's math, so
logits agree within ``WEIGHT_ONLY_RTOL * max |logit|`` and greedy tokens are
equal. W8A8 formats also quantize activations per token (per token and group
for block FP8), so the relative logit error is bounded by ``W8A8_REL_ERROR``
(a wrong expert layout gives ~1). Routing is part of the check: a token routed
differently by a small logit change would break the weight-only bound.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import models
from models.quantization import QuantExperts
from tests.models.runner import PagedRunner
from tests.models.test_quantized import FORMATS, WEIGHT_ONLY, WEIGHT_ONLY_RTOL, engine_greedy, write_quantized
from tests.models.tiny import build_hf_model, prompts, tiny_config
from triton_kernels import load_ops

# Every projection fits group 128 and 128 x 128 blocks: H 256, expert I 128, shared I 256,
# q 256 / kv 128 rows.
SIZES = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=128, num_attention_heads=4,
             num_key_value_heads=2, head_dim=64, vocab_size=512, num_hidden_layers=2, num_experts=8,
             num_experts_per_tok=2)
# ||logits - reference|| / ||reference|| of the W8A8 formats on these random MoE models.
# Higher than the dense models' bounds (0.15 / 0.05) because quantization noise also
# moves tokens to other experts where router margins are small; measured: fp8 block
# 0.09-0.12, fp8 channel 0.10, online fp8 0.12-0.18, int8 channel 0.03-0.08, online
# int8 0.03-0.05. A wrong expert layout gives ~1.
W8A8_REL_ERROR = {"fp8": 0.25, "int8": 0.12}
FAMILY_SIZES = {"qwen3_moe": SIZES, "qwen2_moe": dict(SIZES, shared_expert_intermediate_size=256)}


def write_moe_pair(tmp: Path, family: str, fmt: str, sizes: dict | None = None) -> tuple[Path, Path]:
    """(quantized checkpoint, dequantized fp32 checkpoint) of one tiny random MoE model;
    ``sizes`` replace the family's (``FAMILY_SIZES``)."""
    hf = build_hf_model(tiny_config(family, **{**FAMILY_SIZES[family], **(sizes or {})}), seed=3)
    quantize, qconfig = FORMATS[fmt]
    quant_dir, deq_dir = tmp / f"{fmt}_q", tmp / f"{fmt}_deq"
    hf.save_pretrained(deq_dir)
    state = load_file(str(deq_dir / "model.safetensors"))           # per-expert names, as on disk
    write_quantized(state, quantize, qconfig, quant_dir, deq_dir)
    return quant_dir, deq_dir


def _logits(path: Path, batch: list[list[int]], backend: str = "reference", **kw):
    model, _ = models.load_model(path, load_ops(backend), torch.float32, "cpu", **kw)
    return model, PagedRunner(model, len(batch), max(map(len, batch)) + 1).extend(batch, all_logits=True)


def _greedy(path: Path, batch: list[list[int]], num_new: int) -> list[list[int]]:
    model, _ = models.load_model(path, load_ops("reference"), torch.float32, "cpu")
    return PagedRunner(model, len(batch), max(map(len, batch)) + num_new).greedy(batch, num_new)[1]


CASES = [("qwen3_moe", f) for f in ("awq", "gptq_sym", "gptq_asym_act_order", "fp8_block",
                                     "ct_fp8_channel", "ct_int8_channel")]
CASES += [("qwen2_moe", "awq"), ("qwen2_moe", "fp8_block")]


@pytest.mark.parametrize("family,fmt", CASES)
def test_moe_checkpoint_matches_dequantized_reference(tmp_path, family, fmt):
    quant_dir, deq_dir = write_moe_pair(tmp_path, family, fmt)
    batch = prompts(SIZES["vocab_size"], [5, 17, 11, 23])
    model, ours = _logits(quant_dir, batch)
    experts = [m for m in model.modules() if isinstance(m, QuantExperts)]
    # Qwen3-MoE: routed experts in both layers; the tiny Qwen2-MoE has layer 1 dense
    # (mlp_only_layers [1]): routed + shared in layer 0
    assert len(experts) == 2
    assert not any(".experts.w13" == n[-12:] for n, _ in model.named_parameters())
    _, ref = _logits(deq_dir, batch)
    scale = ref.abs().max().item()
    if fmt in WEIGHT_ONLY:
        diff = (ours - ref).abs().max().item()
        assert diff <= WEIGHT_ONLY_RTOL * scale, f"{family} {fmt}: max |logit diff| {diff:.3e} (max {scale:.2f})"
        assert _greedy(quant_dir, batch, 5) == _greedy(deq_dir, batch, 5)
    else:
        rel = ((ours - ref).norm() / ref.norm()).item()
        bound = W8A8_REL_ERROR["int8" if "int8" in fmt else "fp8"]
        assert rel < bound, f"{family} {fmt}: relative logit error {rel:.3f} > {bound}"


@pytest.mark.parametrize("family,fmt", [("qwen2_moe", "gptq_asym_act_order"), ("qwen3_moe", "fp8_block"),
                                        ("qwen3_moe", "ct_int8_channel")])
def test_triton_kernels_match_reference_backend(tmp_path, family, fmt):
    """The quantized MoE Triton kernels (interpreter on CPU) inside the whole model."""
    quant_dir, _ = write_moe_pair(tmp_path, family, fmt)
    batch = prompts(SIZES["vocab_size"], [6, 9])
    _, ref = _logits(quant_dir, batch)
    _, tri = _logits(quant_dir, batch, backend="triton")
    close = (tri - ref).abs().amax(-1) <= 1e-3 * ref.abs().max()              # per position
    if "fp8" not in fmt:
        assert close.all()
    else:   # an e4m3 activation rounding (3 mantissa bits) can flip on the fp32 summation order
        # and carry to the later positions of that prompt; the kernels' own agreement is
        # tested exactly in tests/kernels/test_quant_moe.py
        assert close.float().mean() >= 0.6 and ((tri - ref).norm() / ref.norm()) < 0.03


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_online_fp8_quantizes_the_experts(tmp_path, family):
    _, deq_dir = write_moe_pair(tmp_path, family, "awq")           # any plain checkpoint
    batch = prompts(SIZES["vocab_size"], [9, 21, 14])
    model, ours = _logits(deq_dir, batch, quantization="fp8")
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.w13_q.dtype == torch.float8_e4m3fn
    _, ref = _logits(deq_dir, batch)
    rel = ((ours - ref).norm() / ref.norm()).item()
    assert rel < W8A8_REL_ERROR["fp8"], f"online fp8 {family}: relative logit error {rel:.3f}"


@pytest.mark.parametrize("quantization,fmt", [("fp8", None), ("", "awq"), ("", "gptq_asym_act_order"),
                                              ("", "fp8_block"), ("", "ct_fp8_tensor")])
@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe"])
def test_dummy_weights_in_each_format(tmp_path, family, quantization, fmt):
    """--load-format dummy quantizes random experts straight into the kernel layout."""
    config = tiny_config(family, **FAMILY_SIZES[family])
    if fmt:
        config["quantization_config"] = FORMATS[fmt][1]
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    model, _ = models.load_model(tmp_path, load_ops("reference"), torch.float32, "cpu",
                                 load_format="dummy", quantization=quantization)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, QuantExperts) and experts.finalized
    assert experts.w13_q.abs().float().sum() > 0 if experts.w13_q.dtype != torch.float8_e4m3fn \
        else experts.w13_q.float().abs().sum() > 0
    logits = PagedRunner(model, 1, 8).prefill([[3, 4, 5]])
    assert torch.isfinite(logits).all() and logits.abs().max() > 0


def test_engine_serves_a_quantized_moe_checkpoint(tmp_path):
    """Through the whole pipeline (schedule, chunked prefill, radix cache, decode): a GPTQ
    Qwen2-MoE checkpoint gives its dequantized checkpoint's greedy tokens."""
    quant_dir, deq_dir = write_moe_pair(tmp_path, "qwen2_moe", "gptq_sym")
    outputs = {name: engine_greedy(path, SIZES["vocab_size"]) for name, path in (("gptq", quant_dir), ("deq", deq_dir))}
    assert outputs["gptq"] == outputs["deq"]
    assert [len(o) for o in outputs["gptq"]] == [6] * 4
