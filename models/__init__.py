"""Model architectures, their configs and the weight loader.

Public entry point::

    model, config = models.load_model(model_path, ops, dtype, device, load_format="auto")
    logits = model.forward(input_ids, positions, attn_meta, kv_cache)   # [B, vocab] fp32

``model.num_layers``, ``num_kv_heads``, ``head_dim`` and ``dtype`` size the KV
pool (``models.batch.KVCache.allocate``). Tensor parallelism: each rank calls
``load_model(..., tp=TPGroup(rank, size, group, ep_size))`` (``models.parallel``),
gets its slice of the weights, and ``num_kv_heads`` is then the rank's count;
every rank runs the same forward in lockstep and returns the full logits. Errors are ``ModelLoadError``
subclasses (``models.errors``). Imports are lazy: ``import models.batch``
stays cheap for stages that never build a model.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from models.errors import (
    CorruptWeightsError,
    MissingWeightsError,
    ModelConfigError,
    ModelLoadError,
    ModelNotFoundError,
    UnexpectedWeightsError,
    UnsupportedArchitectureError,
    WeightShapeError,
)

if TYPE_CHECKING:
    import torch

    from models.config import ModelConfig
    from models.parallel import TPGroup
    from triton_kernels import KernelOps

__all__ = [
    "load_model", "load_config", "supported_architectures", "TPGroup",
    "ModelLoadError", "ModelNotFoundError", "ModelConfigError", "UnsupportedArchitectureError",
    "MissingWeightsError", "UnexpectedWeightsError", "WeightShapeError", "CorruptWeightsError",
]


def load_model(model_path: Any, ops: "KernelOps", dtype: "torch.dtype | str", device: Any,
               load_format: str = "auto", seed: int = 0, tp: "TPGroup | None" = None,
               quantization: str = "") -> "tuple[torch.nn.Module, ModelConfig]":
    """Build and fill the model of a local HF directory (see ``models.loader``);
    with `tp`, this rank's slice of it (see ``models.parallel``); `quantization`
    as ``--quantization`` (see ``models.quantization``)."""
    from models.loader import load_model as _load_model
    from models.parallel import TPGroup
    return _load_model(model_path, ops, dtype, device, load_format=load_format, seed=seed,
                       tp=tp if tp is not None else TPGroup(), quantization=quantization)


def __getattr__(name: str) -> Any:
    if name == "TPGroup":                     # lazy, like the rest of the package
        from models.parallel import TPGroup
        return TPGroup
    raise AttributeError(f"module 'models' has no attribute {name!r}")


def load_config(model_path: Any) -> "ModelConfig":
    """config.json (+ generation_config.json) of a local HF directory, resolved."""
    from models.config import load_config as _load_config
    return _load_config(model_path)


def supported_architectures() -> list[str]:
    from models.registry import supported_architectures as _supported
    return _supported()
