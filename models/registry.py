"""Which architectures the runtime implements: ``config.architectures`` -> model class.

One row per Hugging Face class name: the family (which selects the config
rules in ``models/config.py``) and where the class lives. Modules are imported
only when a model of that family is built, so importing the registry is free.
Llama, Mistral, Qwen2 and Qwen3 share one dense decoder (``models/llama.py``)
and differ by config flags; the two Qwen MoE families share ``models/qwen_moe.py``.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

from models.errors import UnsupportedArchitectureError


class Architecture(NamedTuple):
    family: str        # config rules: "llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe"
    module: str        # import path of the module defining the class
    class_name: str


ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("llama", "models.llama", "LlamaForCausalLM"),
    "MistralForCausalLM": Architecture("mistral", "models.llama", "MistralForCausalLM"),
    "Qwen2ForCausalLM": Architecture("qwen2", "models.llama", "Qwen2ForCausalLM"),
    "Qwen3ForCausalLM": Architecture("qwen3", "models.llama", "Qwen3ForCausalLM"),
    "Qwen3MoeForCausalLM": Architecture("qwen3_moe", "models.qwen_moe", "Qwen3MoeForCausalLM"),
    "Qwen2MoeForCausalLM": Architecture("qwen2_moe", "models.qwen_moe", "Qwen2MoeForCausalLM"),
    # vision-language: the language model's family, plus a vision tower (models/qwen_vl.py)
    "Qwen2_5_VLForConditionalGeneration": Architecture("qwen2", "models.qwen_vl",
                                                       "Qwen2_5_VLForConditionalGeneration"),
    "Qwen3VLForConditionalGeneration": Architecture("qwen3", "models.qwen_vl",
                                                    "Qwen3VLForConditionalGeneration"),
    "Qwen3VLMoeForConditionalGeneration": Architecture("qwen3_moe", "models.qwen_vl",
                                                       "Qwen3VLMoeForConditionalGeneration"),
}


# config.model_type -> class, for configs that omit "architectures" (as transformers allows).
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration", "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "qwen3_vl_moe": "Qwen3VLMoeForConditionalGeneration",
}


def supported_architectures() -> list[str]:
    return sorted(ARCHITECTURES)


def family_of(architectures: list[str], source: str = "config.json",
              model_type: str | None = None) -> tuple[str, str]:
    """(architecture, family) of the first supported name in config.architectures
    (or, when the config lists none, of its model_type)."""
    if not architectures and model_type in MODEL_TYPES:
        architectures = [MODEL_TYPES[model_type]]
    for name in architectures:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name].family
    listed = ", ".join(map(str, architectures)) or f"none (model_type {model_type!r})"
    raise UnsupportedArchitectureError(
        f"{source}: unsupported architecture ({listed}); supported: "
        f"{', '.join(supported_architectures())}")


def model_class(architecture: str) -> type:
    """Import the module of `architecture` and return its model class."""
    if architecture not in ARCHITECTURES:
        family_of([architecture])        # raises with the supported list
    entry = ARCHITECTURES[architecture]
    return getattr(importlib.import_module(entry.module), entry.class_name)
