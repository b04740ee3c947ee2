"""``--kv-cache-dtype fp8_e4m3`` through the Engine (CPU, reference kernels).

The trained demo model (models/demo) with an FP8 KV pool against the same model
with its fp32 pool:

* teacher-forced next-token agreement over Shakespeare prompts, prefilled in
  chunks of 4 tokens so that almost every key a position attends to is read
  back from the FP8 pool (the path decode takes);
* the FP8 engine's own greedy continuations, re-scored by the fp32 engine:
  its argmax must be the token the FP8 engine chose;
* the radix cache and chunked prefill leave FP8 outputs unchanged, and the
  pool is allocated as float8_e4m3fn.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

import models
from pipeline.engine import Engine

DEMO = Path(models.__file__).resolve().parent / "demo"
TOP1_AGREEMENT = 0.98
GREEDY = {"temperature": 0.0, "max_new_tokens": 16, "ignore_eos": True}
SCORE = {"temperature": 0.0, "max_new_tokens": 1, "return_logprob": True, "logprob_start_len": 0,
         "prompt_top_logprobs_num": 1}


def _engine(**kwargs) -> Engine:
    kwargs.setdefault("max_total_tokens", 4096)
    return Engine(str(DEMO), kernel_backend="reference", device="cpu", dtype="float32", **kwargs)


def _prompts(count: int, length: int) -> list[list[int]]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEMO / "tokenizer.json"))
    ids = tokenizer.encode((DEMO / "tinyshakespeare.txt").read_text()[:100_000]).ids
    step = len(ids) // count
    return [ids[i * step: i * step + length] for i in range(count)]


def _prompt_argmaxes(engine: Engine, prompts: list[list[int]]) -> list[list[int]]:
    """Each prompt position's top-1 next token (teacher-forced on the prompt)."""
    results = engine.generate(input_ids=prompts, sampling_params=[SCORE] * len(prompts))
    return [[top[0][1] for top in r["meta_info"]["input_top_logprobs"] if top] for r in results]


def _agreement(a: list[list[int]], b: list[list[int]]) -> float:
    pairs = [(x, y) for row_a, row_b in zip(a, b) for x, y in zip(row_a, row_b, strict=True)]
    return sum(x == y for x, y in pairs) / len(pairs)


@pytest.fixture(scope="module")
def fp32_engine():
    with _engine(chunked_prefill_size=4) as engine:
        yield engine


def test_fp8_pool_is_allocated_as_float8(fp32_engine) -> None:
    runner_dtype = None
    with _engine(kv_cache_dtype="fp8_e4m3", max_total_tokens=64) as engine:
        outputs = engine.generate(input_ids=_prompts(2, 9), sampling_params=GREEDY)
        runner_dtype = engine.stages["forward"].runner.kv_cache.k[0].dtype
    assert runner_dtype == torch.float8_e4m3fn
    assert all(len(o["output_ids"]) == GREEDY["max_new_tokens"] for o in outputs)


def _calibrated_checkpoint(tmp_path: Path, prompts: list[list[int]]) -> Path:
    """The demo checkpoint plus per-layer ``k_scale`` / ``v_scale`` = max |k|, |v| / 448 over
    the prompts (k measured after RoPE), stored as FP8 checkpoints store them."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(DEMO), dtype=torch.float32).eval()
    amax: dict[str, float] = {}

    def hook(name: str):
        def record(module, args, out):
            amax[name] = max(amax.get(name, 0.0), float(out.abs().max()))
        return record

    for i, layer in enumerate(hf.model.layers):
        layer.self_attn.k_proj.register_forward_hook(hook(f"model.layers.{i}.self_attn.k_proj.k_scale"))
        layer.self_attn.v_proj.register_forward_hook(hook(f"model.layers.{i}.self_attn.v_proj.v_scale"))
    with torch.no_grad():
        for p in prompts:
            hf(torch.tensor([p]))
    out = tmp_path / "demo_kv_scales"
    out.mkdir()
    for f in DEMO.iterdir():
        if f.is_file():
            (out / f.name).symlink_to(f)
    # RoPE rotates pairs of k: up to sqrt(2) x the largest pre-rotation value.
    scales = {name: torch.tensor(value * (1.5 if name.endswith("k_scale") else 1.0) / 448.0)
              for name, value in amax.items()}
    save_file(scales, str(out / "kv_scales.safetensors"))
    return out


def test_teacher_forced_top1_agreement(fp32_engine, tmp_path) -> None:
    """Unit scales (SGLang's default without checkpoint scales) push small K/V values into
    e4m3's subnormals; checkpoint scales use the whole range. Both are measured, the
    calibrated one must reach TOP1_AGREEMENT, the unit one a looser 0.95."""
    prompts = _prompts(32, 64)
    reference = _prompt_argmaxes(fp32_engine, prompts)
    with _engine(kv_cache_dtype="fp8_e4m3", chunked_prefill_size=4) as engine:
        unit = _agreement(_prompt_argmaxes(engine, prompts), reference)
    calibrated_dir = _calibrated_checkpoint(tmp_path, prompts)
    with Engine(str(calibrated_dir), kernel_backend="reference", device="cpu", dtype="float32",
                kv_cache_dtype="fp8_e4m3", chunked_prefill_size=4, max_total_tokens=4096) as engine:
        attn = engine.stages["forward"].runner.model.model.layers[2].self_attn
        assert attn.k_scale != 1.0 and attn.v_scale != 1.0, "checkpoint scales not loaded"
        calibrated = _agreement(_prompt_argmaxes(engine, prompts), reference)
    print(f"top-1 agreement: unit scales {unit:.3f}, checkpoint scales {calibrated:.3f}")
    assert unit >= 0.95, f"unit scales: top-1 agreement {unit:.3f}"
    assert calibrated >= TOP1_AGREEMENT, f"checkpoint scales: top-1 agreement {calibrated:.3f}"


def test_fp8_decode_choices_are_fp32_argmaxes(fp32_engine) -> None:
    prompts = _prompts(12, 24)
    with _engine(kv_cache_dtype="fp8_e4m3") as engine:
        outs = [r["output_ids"] for r in engine.generate(input_ids=prompts,
                                                         sampling_params=[GREEDY] * len(prompts))]
        again = [r["output_ids"] for r in engine.generate(input_ids=prompts,
                                                          sampling_params=[GREEDY] * len(prompts))]
        assert again == outs, "radix-cache hits (prefixes read from the FP8 pool) change outputs"
    with _engine(kv_cache_dtype="fp8_e4m3", chunked_prefill_size=8, disable_radix_cache=True) as engine:
        chunked = [r["output_ids"] for r in engine.generate(input_ids=prompts,
                                                            sampling_params=[GREEDY] * len(prompts))]
    same = sum(a == b for a, b in zip(chunked, outs))
    assert same >= len(prompts) - 1, f"chunked prefill changed {len(prompts) - same} FP8 continuations"
    # The fp32 engine's argmax after prompt + the FP8 tokens so far, at each decoded position.
    rescored = _prompt_argmaxes(fp32_engine, [p + o for p, o in zip(prompts, outs)])
    chosen = [o[1:] for o in outs]
    theirs = [r[len(p):] for r, p in zip(rescored, prompts)]
    agreement = _agreement(chosen, theirs)
    assert agreement >= TOP1_AGREEMENT, f"decode top-1 agreement {agreement:.3f}"


def test_unserved_kv_cache_dtype_is_refused() -> None:
    with pytest.raises((ValueError, TypeError, SystemExit), match="fp8_e5m2|kv_cache_dtype"):
        _engine(kv_cache_dtype="fp8_e5m2")
