"""Load a local Hugging Face model directory into one of our architectures.

Inputs (one directory): ``config.json``; weights as one ``model.safetensors``
or shards listed by ``model.safetensors.index.json``; optionally
``generation_config.json`` (sampling defaults, extra eos ids; see
``ModelConfig.generation`` and ``ModelConfig.eos_token_ids``).

Steps, in order, so that a bad checkpoint fails before any byte is copied:

1. ``config.json`` -> ``ModelConfig``; ``architectures`` -> model class
   (``models/registry.py``); the model is built with empty parameters
   directly on the target device.
2. Every tensor name and shape is read from the safetensors headers and
   matched against ``model.checkpoint_layout()`` (``models/weights.py``):
   unknown names, missing names and shape mismatches raise, naming them.
3. Tensors are copied one at a time: ``safe_open(device=...)`` hands each
   tensor over on the target device, it is cast to the model dtype and copied
   into its (fused) slot. The whole model never sits in CPU memory.
   Progress (tensors, bytes) is logged every few seconds on long loads.

Tensor parallelism (``tp``, ``models/parallel.py``): the model is built with
this rank's parameter shapes and its layout names each checkpoint tensor's
slice for the rank; ``get_slice`` reads just that slice (whole tensors only
for the replicated ones), so a rank never holds another rank's weights.

``load_format="dummy"`` skips 2-3 and fills the same parameters with random
values of realistic scale on the device (normal, std 0.02; norm weights 1),
for benchmarks of shapes whose weights are not at hand. Values are drawn per
checkpoint tensor, whole, from a generator seeded by (seed, tensor name), and
each rank keeps its slice: any tp size gets the slices of the same weights.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
import zlib
from pathlib import Path

import torch
from safetensors import safe_open

from models.config import ModelConfig, load_config, read_json
from models.errors import (
    CorruptWeightsError,
    MissingWeightsError,
    ModelConfigError,
    ModelLoadError,
    ModelNotFoundError,
    UnexpectedWeightsError,
    WeightShapeError,
    name_list,
)
from models.parallel import TPGroup
from models.quantization import (
    check_ignored,
    finalize_quantized,
    init_dummy_quantized,
    load_kv_scales,
    quant_modules,
    quantized_layout,
    resolve_quantization,
)
from models.registry import model_class
from models.weights import IGNORED, Shard, dense_layout, fused_alias, held_elsewhere
from triton_kernels import KernelOps

logger = logging.getLogger(__name__)

DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16,
          "fp16": torch.float16, "half": torch.float16, "float32": torch.float32,
          "fp32": torch.float32, "float": torch.float32}
LOAD_FORMATS = ("auto", "safetensors", "dummy")
DUMMY_STD = 0.02
PROGRESS_EVERY_S = 5.0


def resolve_dtype(dtype: torch.dtype | str, config: ModelConfig) -> torch.dtype:
    """torch dtype from a dtype or a name; "auto" takes config.json's torch_dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    name = config.torch_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ModelConfigError(f"unsupported dtype {name!r}; expected auto, bfloat16, float16 or float32")
    return DTYPES[name]


def load_model(model_path: str | Path, ops: KernelOps, dtype: torch.dtype | str,
               device: torch.device | str, load_format: str = "auto", seed: int = 0,
               tp: TPGroup = TPGroup(), quantization: str = "") -> tuple[torch.nn.Module, ModelConfig]:
    """Build the model of `model_path`'s config on `device` and fill its weights
    (this rank's slice of them under tensor parallelism). `quantization`: as
    ``--quantization`` ("" = as the checkpoint says; ``models/quantization.py``)."""
    if load_format not in LOAD_FORMATS:
        raise ModelConfigError(f"unknown load_format {load_format!r}; expected {', '.join(LOAD_FORMATS)}")
    config = load_config(model_path)
    quant = resolve_quantization(config.quantization, quantization, str(model_path))
    config = dataclasses.replace(config, quantization=quant)
    if config.hidden_act != "silu":
        raise ModelConfigError(f"{model_path}: hidden_act {config.hidden_act!r} is not supported (silu only)")
    dtype = resolve_dtype(dtype, config)
    device = torch.device(device)
    files = [] if load_format == "dummy" else weight_files(Path(model_path))
    model = model_class(config.architecture)(config, ops, dtype, device, tp)
    model.eval()
    check_ignored(model, quant)
    if load_format == "dummy":
        init_dummy(model, seed)
    else:
        load_safetensors(model, files, device)
        finalize_quantized(model)       # checkpoint tensors -> the quantized kernels' layout
        load_kv_scales(model, files)    # FP8 KV cache: per-layer k_scale / v_scale, if stored
    return model, config


def checkpoint_layout(model: torch.nn.Module) -> dict[str, Shard]:
    """The model's layout, with quantized projections' own checkpoint tensors."""
    return quantized_layout(model, model.checkpoint_layout(), dense_layout, model.config, model.tp)


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a directory: the index's shards, or every *.safetensors."""
    index_path = model_dir / "model.safetensors.index.json"
    if index_path.exists():
        weight_map = read_json(index_path, "model.safetensors.index.json").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelConfigError(f"{index_path}: no 'weight_map' object")
        files = [model_dir / name for name in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.exists()]
        if absent:
            raise ModelNotFoundError(f"{model_dir}: shards listed in {index_path.name} are missing: "
                                     f"{name_list(absent)}")
        return files
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        other = sorted(p.name for p in model_dir.glob("*.bin")) + sorted(p.name for p in model_dir.glob("*.pt"))
        hint = f" (found {name_list(other)}: convert them to safetensors)" if other else ""
        raise ModelNotFoundError(f"{model_dir}: no *.safetensors weight files{hint}; "
                                 f"use load_format='dummy' for random weights")
    return files


# ----------------------------------------------------------------------------- checkpoint


class _Plan:
    """Every checkpoint tensor matched to its Shard, checked before loading."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.params = dict(model.named_parameters())
        self.layout = checkpoint_layout(model)
        self.architecture = model.config.architecture
        self.num_experts = model.config.num_experts
        self.tied = bool(model.config.tie_word_embeddings)
        self.entries: list[tuple[Path, str, Shard]] = []
        self.seen: set[str] = set()
        self.covered_patterns: list[str] = []
        self.unexpected: list[str] = []
        self.total_bytes = 0

    def add_file(self, path: Path) -> None:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                self._add(path, name, f.get_slice(name))

    def _add(self, path: Path, name: str, tensor_slice) -> None:
        shard = self.layout.get(name)
        shards = [shard] if shard is not None else []
        if shard is None:
            alias = fused_alias(name, self.layout, self.num_experts)
            if alias is None:
                if held_elsewhere(name, self.params, self.num_experts):
                    self.seen.add(name)                   # another EP rank's expert
                elif not (IGNORED.fullmatch(name) or (self.tied and name == "lm_head.weight")):
                    self.unexpected.append(name)
                return
            shards, pattern = alias
            self.covered_patterns.append(pattern)
        shape = tuple(tensor_slice.get_shape())
        for shard in shards:
            if shape != shard.shape and not shard.broadcast:
                raise WeightShapeError(f"{path.name}: tensor {name} has shape {list(shape)}, the "
                                       f"config implies {list(shard.shape)} (for {shard.param})")
            target = shard.view(self.params)
            if shard.broadcast:            # one value fills the region (a per-tensor scale)
                if math.prod(shape) != 1:
                    raise WeightShapeError(f"{path.name}: tensor {name} has shape {list(shape)}, "
                                           f"expected one value (for {shard.param})")
                self.entries.append((path, name, shard))
                continue
            assert _sliced_shape(shape, shard.source) == tuple(target.shape), (
                f"{name}{list(shape)}[{shard.source}] does not fit {shard.param}[{shard.index}] "
                f"{list(target.shape)}")
            self.entries.append((path, name, shard))
            self.total_bytes += target.numel() * _element_size(tensor_slice.get_dtype())
        self.seen.add(name)

    def check(self, model_dir: str) -> None:
        if self.unexpected:
            raise UnexpectedWeightsError(f"{model_dir}: {len(self.unexpected)} checkpoint tensors do not "
                                         f"belong to {self.architecture}: {name_list(self.unexpected)}")
        covered = re.compile("|".join(self.covered_patterns)) if self.covered_patterns else None
        missing = [n for n in self.layout if n not in self.seen
                   and not (covered and covered.fullmatch(n))]
        if missing:
            raise MissingWeightsError(f"{model_dir}: {len(missing)} tensors missing from the "
                                      f"checkpoint: {name_list(missing)}")


def _sliced_shape(shape: tuple[int, ...], source: tuple) -> tuple[int, ...]:
    """Shape of ``torch.empty(shape)[source]`` without allocating it."""
    return tuple(torch.empty(shape, device="meta")[source].shape)


def _element_size(safetensors_dtype: str) -> int:
    sizes = {"F64": 8, "F32": 4, "I64": 8, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1,
             "I8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
    return sizes.get(safetensors_dtype, 4)


def load_safetensors(model: torch.nn.Module, files: list[Path], device: torch.device) -> None:
    """Check every tensor name/shape against the model, then copy them one by one."""
    plan = _Plan(model)
    for path in files:
        try:
            plan.add_file(path)
        except ModelLoadError:
            raise
        except Exception as exc:                      # SafetensorError, OSError: a corrupt or unreadable file
            raise CorruptWeightsError(f"{path}: cannot read safetensors file: {exc}") from exc
    model_dir = str(files[0].parent)
    plan.check(model_dir)
    progress = _Progress(len(plan.entries), plan.total_bytes)
    by_file: dict[Path, list[tuple[str, Shard]]] = {}
    for path, name, shard in plan.entries:
        by_file.setdefault(path, []).append((name, shard))
    open_device = _safetensors_device(device)
    with torch.no_grad():
        for path, entries in by_file.items():
            with safe_open(str(path), framework="pt", device=open_device) as f:
                for name, shard in entries:
                    target = shard.view(plan.params)
                    # only this rank's slice is read; copy_ casts to the model dtype
                    source = f.get_slice(name)[shard.source] if shard.source else f.get_tensor(name)
                    target.copy_(source.reshape(()) if shard.broadcast else source)
                    progress.update(target.numel() * target.element_size())
    progress.done()


def _safetensors_device(device: torch.device) -> str:
    """safe_open wants an explicit index ("cuda:0")."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


class _Progress:
    """Logs tensors and bytes loaded every PROGRESS_EVERY_S seconds, and once at the end."""

    def __init__(self, total_tensors: int, total_bytes: int) -> None:
        self.total_tensors, self.total_bytes = total_tensors, total_bytes
        self.tensors = self.bytes = 0
        self.start_s = self.last_log_s = time.perf_counter()

    def update(self, num_bytes: int) -> None:
        self.tensors += 1
        self.bytes += num_bytes
        now = time.perf_counter()
        if now - self.last_log_s >= PROGRESS_EVERY_S:
            self.last_log_s = now
            logger.info("loading weights: %d/%d tensors, %.2f/%.2f GB, %.1f s", self.tensors,
                        self.total_tensors, self.bytes / 1e9, self.total_bytes / 1e9, now - self.start_s)

    def done(self) -> None:
        logger.info("loaded %d tensors (%.2f GB) in %.1f s", self.tensors, self.bytes / 1e9,
                    time.perf_counter() - self.start_s)


# ----------------------------------------------------------------------------- dummy weights

_NORM = re.compile(r".*norm\.weight")


def init_dummy(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights on the device: normal(0, 0.02), norm weights 1, untouched padding 0.

    Only the regions the checkpoint layout names are filled, so padding that
    must stay zero (the zero expert of Qwen2-MoE's shared gate, vocabulary
    padding) stays zero. Each checkpoint tensor is drawn whole from its own
    generator, seeded by `seed` and its name, and the rank keeps its slice:
    a tensor-parallel rank holds exactly the slice of the tp=1 weights.
    """
    params = dict(model.named_parameters())
    quantized = {f"{name}.{p}" for name, m in quant_modules(model).items()
                 for p, _ in m.named_parameters() if p != "bias"}
    layout = {n: s for n, s in model.checkpoint_layout().items() if s.param not in quantized}
    device = next(iter(params.values())).device
    with torch.no_grad():
        for name, shard in layout.items():
            region = shard.view(params)
            if _NORM.fullmatch(shard.param):
                region.fill_(1.0)
                continue
            generator = torch.Generator(device=device).manual_seed(
                (seed << 32) ^ zlib.crc32(name.encode()))
            whole = torch.empty(shard.shape, dtype=region.dtype, device=device)
            whole.normal_(0.0, DUMMY_STD, generator=generator)
            region.copy_(whole[shard.source] if shard.source else whole)
    init_dummy_quantized(model, seed, DUMMY_STD)     # quantized projections: quantize random weights
    logger.info("initialised %d parameters with dummy weights (seed %d)", len(params), seed)
