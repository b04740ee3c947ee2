"""config.json -> one frozen ``ModelConfig``, every field resolved.

Hugging Face configs are written by many versions of transformers and leave
out any field that equals the class default, so reading one needs the
defaults of its family and both spellings of renamed fields:

* ``num_experts`` / ``num_local_experts`` (transformers 5 writes the latter),
* top-level ``rope_theta`` + ``rope_scaling`` / ``rope_parameters{rope_theta,
  rope_type, ...}``,
* ``torch_dtype`` / ``dtype``.

``ModelConfig`` carries what the architectures need, already resolved: the
head dim, whether q/k/v/o have biases, whether q and k are normed per head,
the sliding window of each layer (-1 = full attention), which layers are
MoE. The family differences live here, as flags, so the model files stay
free of ``config.get(...)`` chains. ``generation_config.json`` adds default
sampling parameters and extra end-of-sequence ids.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from models.errors import ModelConfigError, ModelNotFoundError
from models.quantization import QuantConfig, parse_checkpoint_quantization
from models.registry import family_of

DEFAULT_ROPE_THETA = 10_000.0


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """Sampling defaults from generation_config.json (None: not set by the model)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Only the fields the model sets, e.g. {"temperature": 0.6, "top_p": 0.95}."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Everything an architecture needs, read once from config.json (do not mutate)."""

    architecture: str
    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    hidden_act: str
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_parameters: dict[str, Any]       # rope_type, rope_theta, scaling keys (read-only)
    partial_rotary_factor: float
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool
    sliding_windows: tuple[int, ...]      # per layer; -1 = full attention
    torch_dtype: str
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]        # config.json and generation_config.json, merged
    generation: GenerationDefaults
    # mixture of experts (num_experts == 0: dense)
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_intermediate_size: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    # quantized weights (models/quantization.py); None: the checkpoint's dtype
    quantization: QuantConfig | None = None
    # vision-language models: vision_config, token ids, M-RoPE layout (None: text only)
    multimodal: dict[str, Any] | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def context_length(self) -> int:
        return self.max_position_embeddings

    def is_moe_layer(self, layer_idx: int) -> bool:
        """HF rule: MoE unless listed in mlp_only_layers, every decoder_sparse_step-th layer."""
        if self.num_experts <= 0 or layer_idx in self.mlp_only_layers:
            return False
        return (layer_idx + 1) % self.decoder_sparse_step == 0


# ----------------------------------------------------------------------------- reading


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Parse one JSON object, naming the file on failure."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ModelNotFoundError(f"{what} not found: {path}") from exc
    except (OSError, ValueError) as exc:
        raise ModelConfigError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ModelConfigError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read config.json (+ generation_config.json if present) of a model directory."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise ModelNotFoundError(f"model directory not found: {model_dir}")
    raw = read_json(model_dir / "config.json", f"config.json in {model_dir}")
    generation_path = model_dir / "generation_config.json"
    generation = read_json(generation_path, "generation_config.json") if generation_path.exists() else {}
    return parse_config(raw, generation, source=str(model_dir / "config.json"))


def parse_config(raw: dict[str, Any], generation: dict[str, Any] | None = None,
                 source: str = "config.json") -> ModelConfig:
    """Resolve a config.json dict (and a generation_config.json dict) into a ModelConfig."""
    raw, multimodal = _split_multimodal(raw)
    field = _FieldReader(raw, source)
    architectures = raw.get("architectures") or []
    if isinstance(architectures, str):
        architectures = [architectures]
    architecture, family = family_of(list(architectures), source, raw.get("model_type"))
    hidden_size = field.int("hidden_size")
    num_heads = field.int("num_attention_heads")
    num_layers = field.int("num_hidden_layers")
    head_dim = field.int("head_dim", 128 if family in ("qwen3", "qwen3_moe") else 0) or hidden_size // num_heads
    num_kv_heads = field.int("num_key_value_heads", 0) or num_heads
    if num_heads % num_kv_heads:
        raise ModelConfigError(f"{source}: num_attention_heads {num_heads} is not a multiple of "
                               f"num_key_value_heads {num_kv_heads}")
    rope_theta, rope_parameters = _rope(raw, field)
    generation = generation or {}
    return ModelConfig(
        architecture=architecture, family=family,
        vocab_size=field.int("vocab_size"), hidden_size=hidden_size,
        intermediate_size=field.int("intermediate_size", 0),
        num_hidden_layers=num_layers, num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads, head_dim=head_dim,
        hidden_act=str(raw.get("hidden_act") or "silu"),
        rms_norm_eps=field.float("rms_norm_eps", 1e-6),
        max_position_embeddings=field.int("max_position_embeddings", 4096),
        rope_theta=rope_theta, rope_parameters=rope_parameters,
        partial_rotary_factor=float(rope_parameters.get("partial_rotary_factor", 1.0)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        sliding_windows=_sliding_windows(raw, family, num_layers),
        torch_dtype=str(raw.get("torch_dtype") or raw.get("dtype") or "bfloat16"),
        bos_token_id=_first_int(generation.get("bos_token_id", raw.get("bos_token_id"))),
        eos_token_ids=_eos_ids(raw.get("eos_token_id"), generation.get("eos_token_id")),
        generation=_generation_defaults(generation),
        **_bias_flags(raw, family), **_moe_fields(raw, family, field), multimodal=multimodal,
        quantization=parse_checkpoint_quantization(raw.get("quantization_config"), source),
    )


_MULTIMODAL_KEYS = ("image_token_id", "video_token_id", "vision_start_token_id",
                    "vision_end_token_id")


def _split_multimodal(raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """A vision-language config.json (``text_config`` + ``vision_config``) -> the language
    model's fields as a text config (the top level's architectures, dtype and tying win)
    and the multimodal part: vision_config, the token ids, and the M-RoPE sections."""
    text, vision = raw.get("text_config"), raw.get("vision_config")
    if not isinstance(vision, dict):
        return raw, None
    if not isinstance(text, dict):      # the older flat layout (Qwen2.5-VL's published configs)
        text = {key: value for key, value in raw.items() if key != "vision_config"}
    merged = dict(text)
    for key in ("architectures", "model_type", "tie_word_embeddings", "torch_dtype", "dtype",
                "quantization_config"):
        if key in raw:
            merged[key] = raw[key]
    if str(raw.get("model_type", "")).endswith("_moe"):
        merged.setdefault("norm_topk_prob", True)        # the VL MoE router always renormalises
    rope = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    if rope.get("rope_type", rope.get("type")) == "mrope":     # older spelling of plain M-RoPE
        merged["rope_parameters"] = {k: v for k, v in rope.items() if k != "type"} | {"rope_type": "default"}
        merged.pop("rope_scaling", None)
    multimodal = {key: raw[key] for key in _MULTIMODAL_KEYS if key in raw}
    multimodal.update(vision_config=dict(vision), mrope_section=list(rope.get("mrope_section") or ()),
                      mrope_interleaved=bool(rope.get("mrope_interleaved", False)))
    return merged, multimodal


class _FieldReader:
    """Typed access to config fields with errors naming the file and the field."""

    def __init__(self, raw: dict[str, Any], source: str) -> None:
        self.raw, self.source = raw, source

    def _get(self, name: str, default: Any) -> Any:
        value = self.raw.get(name, default)
        if value is None:
            value = default
        if value is _REQUIRED:
            raise ModelConfigError(f"{self.source}: required field {name!r} is missing")
        return value

    def int(self, name: str, default: Any = None) -> int:
        value = self._get(name, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ModelConfigError(f"{self.source}: {name!r} must be a non-negative integer, got {value!r}")
        return value

    def float(self, name: str, default: float) -> float:
        value = self._get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ModelConfigError(f"{self.source}: {name!r} must be a number, got {value!r}")
        return float(value)


_REQUIRED = object()


def _rope(raw: dict[str, Any], field: _FieldReader) -> tuple[float, dict[str, Any]]:
    """Merge rope_parameters (transformers 5) and rope_theta + rope_scaling (older)."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    params["rope_type"] = params.get("rope_type", params.pop("type", "default"))
    theta = params.get("rope_theta", raw.get("rope_theta"))
    params["rope_theta"] = float(theta if theta is not None else DEFAULT_ROPE_THETA)
    if "partial_rotary_factor" not in params and raw.get("partial_rotary_factor") is not None:
        params["partial_rotary_factor"] = float(raw["partial_rotary_factor"])
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings",
                          field.int("max_position_embeddings", 4096))
    return params["rope_theta"], params


def _bias_flags(raw: dict[str, Any], family: str) -> dict[str, Any]:
    """Which projections carry a bias, and whether q/k get a per-head RMSNorm."""
    attention_bias = bool(raw.get("attention_bias", False))
    if family in ("qwen2", "qwen2_moe"):
        qkv_bias = family == "qwen2" or bool(raw.get("qkv_bias", True))
        return dict(qkv_bias=qkv_bias, o_proj_bias=False, mlp_bias=False, qk_norm=False)
    if family == "mistral":
        return dict(qkv_bias=False, o_proj_bias=False, mlp_bias=False, qk_norm=False)
    return dict(qkv_bias=attention_bias, o_proj_bias=attention_bias,
                mlp_bias=family == "llama" and bool(raw.get("mlp_bias", False)),
                qk_norm=family in ("qwen3", "qwen3_moe"))


def _sliding_windows(raw: dict[str, Any], family: str, num_layers: int) -> tuple[int, ...]:
    """Per-layer window, following each HF family's config rules (-1 = full attention)."""
    full = (-1,) * num_layers
    if family == "llama":
        return full
    if family == "mistral":
        window = raw.get("sliding_window", 4096)
        return (int(window),) * num_layers if window else full
    if not raw.get("use_sliding_window", False):
        return full
    window = int(raw.get("sliding_window") or 4096)
    layer_types = raw.get("layer_types")
    if family == "qwen3_moe" and not layer_types:
        return (window,) * num_layers
    if not layer_types:
        max_window_layers = int(raw.get("max_window_layers", 28))
        if family == "qwen2_moe":
            layer_types = ["sliding_attention" if (i + 1) % 2 and i < max_window_layers else "full"
                           for i in range(num_layers)]
        else:
            layer_types = ["sliding_attention" if i >= max_window_layers else "full"
                           for i in range(num_layers)]
    return tuple(window if kind == "sliding_attention" else -1 for kind in layer_types[:num_layers])


def _moe_fields(raw: dict[str, Any], family: str, field: _FieldReader) -> dict[str, Any]:
    if family not in ("qwen3_moe", "qwen2_moe"):
        return {}
    qwen2 = family == "qwen2_moe"
    num_experts = raw.get("num_experts", raw.get("num_local_experts"))
    return dict(
        num_experts=int(num_experts if num_experts is not None else (60 if qwen2 else 128)),
        num_experts_per_tok=field.int("num_experts_per_tok", 4 if qwen2 else 8),
        moe_intermediate_size=field.int("moe_intermediate_size", 1408 if qwen2 else 768),
        norm_topk_prob=bool(raw.get("norm_topk_prob", False)),
        shared_expert_intermediate_size=field.int("shared_expert_intermediate_size", 5632) if qwen2 else 0,
        decoder_sparse_step=max(1, field.int("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(int(i) for i in raw.get("mlp_only_layers") or ()),
    )


def _first_int(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return int(value) if isinstance(value, int) else None


def _eos_ids(*values: Any) -> tuple[int, ...]:
    """Union of eos ids from config.json and generation_config.json, in order."""
    ids: list[int] = []
    for value in values:
        for item in (value if isinstance(value, list) else [value]):
            if isinstance(item, int) and item not in ids:
                ids.append(item)
    return tuple(ids)


def _generation_defaults(generation: dict[str, Any]) -> GenerationDefaults:
    names = [f.name for f in dataclasses.fields(GenerationDefaults)]
    return GenerationDefaults(**{n: generation[n] for n in names if generation.get(n) is not None})
