"""Quantized linear layers: which checkpoint formats we serve and how each becomes a kernel's layout.

A checkpoint says how it is quantized in ``config.json``'s
``quantization_config``; ``--quantization`` may ask for online quantization of
a 16-bit checkpoint. Either way one ``QuantConfig`` results, and every
projection of the decoder (``qkv_proj``, ``o_proj``, ``gate_up_proj``,
``down_proj``) is built as a ``QuantLinear`` of its scheme. The embedding and
the LM head stay in the model dtype (as in every format served here).

=====================  ===========================================  ==========================
format                 checkpoint tensors per projection            kernel (triton_kernels/)
=====================  ===========================================  ==========================
fp8, block-wise        ``weight`` fp8 [N, K],                       quant_w8a8.fp8_block_linear
(``quant_method: fp8``  ``weight_scale_inv`` fp32 [N/bn, K/bk]
+ weight_block_size)   (W = weight * weight_scale_inv per block)
compressed-tensors     ``weight`` fp8 or int8 [N, K],               quant_w8a8.w8a8_linear
W8A8 (fp8 / int8)      ``weight_scale`` [N, 1] (channel) or [1]
                       (tensor: expanded to every row)
AWQ (GEMM, 4-bit)      ``qweight`` int32 [K, N/8], ``qzeros``       quant_w4a16.w4a16_linear
                       int32 [K/g, N/8], ``scales`` [K/g, N]
GPTQ (4-bit)           ``qweight`` int32 [K/8, N], ``qzeros``       quant_w4a16.w4a16_linear
                       [K/g, N/8] (stored z - 1), ``scales``
                       [K/g, N], ``g_idx`` int32 [K]
online fp8 / int8      ``weight`` 16-bit [N, K], quantized per      quant_w8a8.w8a8_linear
                       output channel after loading
=====================  ===========================================  ==========================

Packing (4 bits, 8 values per int32). GPTQ packs along K: input row ``k`` is
nibble ``k % 8`` of ``qweight[k // 8]`` (that is also our kernel layout), and
``qzeros`` packs along N the same way. AWQ packs along N in the interleaved
order of its GEMM kernel: output column ``8c + j`` of a packed word sits at
bit ``4 * AWQ_ORDER.index(j)``, AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7). Loading
keeps the checkpoint's own tensors (fused along the output axis like the
16-bit weights); ``finalize_quantized`` then converts them once into the
kernel's tensors (module buffers: ``named_parameters`` lists only biases).

MoE experts (Qwen3-MoE, Qwen2-MoE) read the same per-projection tensors under
their per-expert names (``mlp.experts.{e}.gate_proj.qweight``, ...; Qwen2-MoE's
``mlp.shared_expert.*`` too) into a ``QuantExperts`` module: stacked along E, gate
over up, then converted once to ``triton_kernels/quant_moe.py``'s layout
(``fused_moe_w8a8`` for fp8 block / channel and online, ``fused_moe_w4a16`` for
AWQ / GPTQ). Routers (``mlp.gate``) and ``shared_expert_gate`` stay 16-bit.
Under tensor / expert parallelism they shard as the 16-bit experts
(``ExpertSlice``): a rank reads only its experts, each cut to its intermediate
rows (gate and up rows, down's input rows) in whole fp8 blocks, int4 groups and
packed words; a split that would cut one is refused, naming the tensor.

Activations (W8A8) are quantized dynamically per token, in the GEMM or by
``quant_w8a8.quantize_rows`` before it; on CUDA a decode step (few rows) leaves
them in 16 bits and multiplies the 8-bit weights as 16-bit ones
(``triton_kernels/quant_w8a8.py`` says why). Checkpoints whose activations use
static scales are refused, as are formats and options not listed above, each
with an error naming it.

On ``--kernel-backend reference`` each kernel's PyTorch reference runs the
same math (dequantize, then the fp32 matmul; W8A8 quantizes the activations
the same way), so CPU tests cover every format.
"""
from __future__ import annotations

import dataclasses
import importlib
import re
from typing import Any, Callable

import torch
from torch import nn

from models.errors import ModelConfigError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)      # packed slot i holds column AWQ_ORDER[i] of the 8
ONLINE = ("fp8", "w8a8_fp8", "w8a8_int8")
CHECKPOINT_METHODS = ("fp8", "compressed-tensors", "awq", "gptq")
QUANTIZATION_CHOICES = ("", *ONLINE, "awq", "gptq", "compressed-tensors")


@dataclasses.dataclass(frozen=True)
class QuantConfig:
    """One served quantization scheme, resolved from config.json and/or --quantization.

    ``scheme``: ``fp8_block`` | ``w8a8`` | ``w4a16`` | ``online``.
    ``weight_dtype``: torch dtype of the 8-bit weight (w8a8, online).
    ``weight_strategy``: ``channel`` or ``tensor`` (w8a8 checkpoints).
    ``packing``: ``awq`` | ``gptq`` (w4a16); ``zero_offset`` is added to stored zeros.
    ``ignore``: module names / ``re:`` patterns left unquantized by the checkpoint.
    """

    method: str
    scheme: str
    weight_dtype: Any = torch.float8_e4m3fn
    block_size: tuple[int, int] = (128, 128)
    weight_strategy: str = "channel"
    packing: str = ""
    group_size: int = 128
    desc_act: bool = False
    zero_offset: int = 0
    ignore: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- config


def parse_checkpoint_quantization(raw: Any, source: str) -> QuantConfig | None:
    """config.json's ``quantization_config`` -> QuantConfig (None: not quantized)."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ModelConfigError(f"{source}: quantization_config must be an object, got {type(raw).__name__}")
    method = str(raw.get("quant_method", "")).lower()
    parsers = {"fp8": _parse_fp8, "compressed-tensors": _parse_compressed_tensors,
               "awq": _parse_awq, "gptq": _parse_gptq}
    if method not in parsers:
        raise ModelConfigError(f"{source}: quantization method {method!r} is not served; served: "
                               f"{', '.join(CHECKPOINT_METHODS)}")
    return parsers[method](raw, source)


def _ignore_list(raw: dict, *keys: str) -> tuple[str, ...]:
    names: list[str] = []
    for key in keys:
        names += [str(n) for n in raw.get(key) or ()]
    return tuple(names)


def _parse_fp8(raw: dict, source: str) -> QuantConfig:
    if raw.get("activation_scheme", "dynamic") != "dynamic":
        raise ModelConfigError(f"{source}: fp8 activation_scheme {raw.get('activation_scheme')!r} is not "
                               "served (dynamic only)")
    fmt = raw.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ModelConfigError(f"{source}: fp8 fmt {fmt!r} is not served (e4m3 only)")
    block = raw.get("weight_block_size")
    ignore = _ignore_list(raw, "ignored_layers", "modules_to_not_convert")
    if block is None:    # per-tensor fp8 weights (weight_scale [1]), dynamic activations
        return QuantConfig("fp8", "w8a8", weight_strategy="tensor", ignore=ignore)
    if (not isinstance(block, list) or len(block) != 2 or not all(isinstance(b, int) for b in block)
            or block[1] < 16 or block[1] & (block[1] - 1)):
        raise ModelConfigError(f"{source}: weight_block_size {block!r} is not served "
                               "([bn, bk] with bk a power of 2 >= 16)")
    return QuantConfig("fp8", "fp8_block", block_size=(block[0], block[1]), ignore=ignore)


def _parse_compressed_tensors(raw: dict, source: str) -> QuantConfig:
    groups = raw.get("config_groups") or {}
    if raw.get("format") not in ("float-quantized", "int-quantized", "naive-quantized") or len(groups) != 1:
        raise ModelConfigError(f"{source}: compressed-tensors format {raw.get('format')!r} with "
                               f"{len(groups)} config groups is not served (one float-/int-quantized group)")
    group = next(iter(groups.values()))
    weights, acts = group.get("weights") or {}, group.get("input_activations") or {}
    kind = weights.get("type")
    if weights.get("num_bits") != 8 or kind not in ("float", "int") or not weights.get("symmetric", True):
        raise ModelConfigError(f"{source}: compressed-tensors weights {weights!r} are not served "
                               "(symmetric 8-bit float or int)")
    if weights.get("strategy") not in ("channel", "tensor"):
        raise ModelConfigError(f"{source}: compressed-tensors weight strategy {weights.get('strategy')!r} "
                               "is not served (channel, tensor)")
    if not acts or not acts.get("dynamic") or acts.get("strategy") != "token" or acts.get("num_bits") != 8:
        raise ModelConfigError(f"{source}: compressed-tensors input_activations {acts!r} are not served "
                               "(dynamic 8-bit per token)")
    dtype = torch.float8_e4m3fn if kind == "float" else torch.int8
    return QuantConfig("compressed-tensors", "w8a8", weight_dtype=dtype,
                       weight_strategy=weights["strategy"], ignore=_ignore_list(raw, "ignore"))


def _group_size(raw: dict, source: str) -> int:
    group = raw.get("group_size", raw.get("q_group_size", 128))
    if not isinstance(group, int) or (group < 8 and group != -1) or (group > 0 and group % 8):
        raise ModelConfigError(f"{source}: group_size {group!r} is not served (-1 or a multiple of 8)")
    return group


def _parse_awq(raw: dict, source: str) -> QuantConfig:
    bits = raw.get("bits", raw.get("w_bit"))
    version = str(raw.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or not raw.get("zero_point", True):
        raise ModelConfigError(f"{source}: AWQ bits={bits!r} version={version!r} zero_point="
                               f"{raw.get('zero_point')!r} is not served (4-bit GEMM with zero points)")
    return QuantConfig("awq", "w4a16", packing="awq", group_size=_group_size(raw, source),
                       ignore=_ignore_list(raw, "modules_to_not_convert"))


def _parse_gptq(raw: dict, source: str) -> QuantConfig:
    bits = raw.get("bits")
    fmt = str(raw.get("checkpoint_format", "gptq")).lower()
    if bits != 4 or fmt not in ("gptq", "gptq_v2"):
        raise ModelConfigError(f"{source}: GPTQ bits={bits!r} checkpoint_format={fmt!r} is not served "
                               "(4-bit, gptq or gptq_v2)")
    return QuantConfig("gptq", "w4a16", packing="gptq", group_size=_group_size(raw, source),
                       desc_act=bool(raw.get("desc_act", False)), zero_offset=1 if fmt == "gptq" else 0,
                       ignore=_ignore_list(raw, "modules_to_not_convert"))


def resolve_quantization(checkpoint: QuantConfig | None, requested: str, source: str) -> QuantConfig | None:
    """Combine the checkpoint's quantization with ``--quantization`` ("" = as the checkpoint)."""
    if requested not in QUANTIZATION_CHOICES:
        raise ModelConfigError(f"--quantization {requested!r} is not served; choose from "
                               f"{', '.join(c for c in QUANTIZATION_CHOICES if c)}")
    if not requested:
        return checkpoint
    if checkpoint is not None:
        if requested in (checkpoint.method, "w8a8_fp8" if checkpoint.method == "fp8" else None):
            return checkpoint
        raise ModelConfigError(f"{source}: --quantization {requested} conflicts with the checkpoint's "
                               f"quantization_config (quant_method {checkpoint.method!r})")
    if requested not in ONLINE:
        raise ModelConfigError(f"{source}: --quantization {requested} needs a checkpoint in that format "
                               f"(config.json has no quantization_config); online: {', '.join(ONLINE)}")
    dtype = torch.int8 if requested == "w8a8_int8" else torch.float8_e4m3fn
    return QuantConfig(requested, "online", weight_dtype=dtype)


# ----------------------------------------------------------------------------- parameters


@dataclasses.dataclass(frozen=True)
class LoadParam:
    """A checkpoint tensor of one projection: its local shape rule and where the output
    (N) and input (K) dimensions sit in it, in units of ``out_unit`` / ``in_unit``
    elements (a packed int32 holds 8 columns; a scale row covers a group;
    ``in_unit`` 0: one row covers all of K, as GPTQ's group_size -1).
    ``broadcast``: one checkpoint value fills every row (per-tensor scales)."""

    suffix: str
    dtype: Any
    out_axis: int | None
    out_unit: int
    in_axis: int | None
    in_unit: int
    ndim: int = 2
    broadcast: bool = False

    def local_shape(self, N: int, K: int) -> tuple[int, ...]:
        shape = [1] * self.ndim
        if self.out_axis is not None:
            shape[self.out_axis] = -(-N // self.out_unit)
        if self.in_axis is not None:
            shape[self.in_axis] = -(-K // self.in_unit) if self.in_unit else 1
        return tuple(shape)


def load_params(quant: QuantConfig, dtype: torch.dtype) -> list[LoadParam]:
    """The checkpoint tensors (besides ``bias``) one projection of this scheme reads."""
    if quant.scheme == "fp8_block":
        bn, bk = quant.block_size
        return [LoadParam("weight", torch.float8_e4m3fn, 0, 1, 1, 1),
                LoadParam("weight_scale_inv", torch.float32, 0, bn, 1, bk)]
    if quant.scheme == "w8a8":
        scale = (LoadParam("weight_scale", torch.float32, 0, 1, None, 1, broadcast=True, ndim=1)
                 if quant.weight_strategy == "tensor" else LoadParam("weight_scale", torch.float32, 0, 1, None, 1))
        return [LoadParam("weight", quant.weight_dtype, 0, 1, 1, 1), scale]
    if quant.scheme == "online":
        return [LoadParam("weight", dtype, 0, 1, 1, 1)]
    g = max(quant.group_size, 0)          # 0: one group over all of K (group_size -1)
    if quant.packing == "awq":
        return [LoadParam("qweight", torch.int32, 1, 8, 0, 1), LoadParam("qzeros", torch.int32, 1, 8, 0, g),
                LoadParam("scales", dtype, 1, 1, 0, g)]
    return [LoadParam("qweight", torch.int32, 1, 1, 0, 8), LoadParam("qzeros", torch.int32, 1, 8, 0, g),
            LoadParam("scales", dtype, 1, 1, 0, g), LoadParam("g_idx", torch.int32, None, 1, 0, 1, ndim=1)]


GROUP_TABLES = ("scales", "qzeros")     # 4-bit tensors with one row per group of input rows


def _kernel(backend: str, family: str, name: str) -> Callable:
    module = importlib.import_module(f"triton_kernels.{family}")
    return getattr(module, name + ("_reference" if backend == "reference" else ""))


class QuantLinear(nn.Module):
    """y = x @ W^T (+ bias) with W stored quantized; ``tp`` set: a row-parallel layer
    (bias on rank 0, partial sums reduced), as ``RowParallelLinear``.

    Before ``finalize()`` the module holds the checkpoint's tensors as parameters
    (``load_params``); after, the kernel's tensors as buffers.
    """

    def __init__(self, ops: Any, quant: QuantConfig, in_features: int, out_features: int, bias: bool,
                 dtype: torch.dtype, device: torch.device | str, tp: Any = None) -> None:
        super().__init__()
        self.quant, self.dtype, self.tp = quant, dtype, tp
        self.in_features, self.out_features = in_features, out_features
        self._check_shape(in_features, out_features)
        for p in load_params(quant, dtype):
            shape = p.local_shape(out_features, self.full_groups_k if p.suffix in GROUP_TABLES else in_features)
            setattr(self, p.suffix, nn.Parameter(torch.zeros(shape, dtype=p.dtype, device=device),
                                                 requires_grad=False))
        self.bias = (nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
                     if bias else None)
        family, name = (("quant_w4a16", "w4a16_linear") if quant.scheme == "w4a16" else
                        ("quant_w8a8", "fp8_block_linear") if quant.scheme == "fp8_block" else
                        ("quant_w8a8", "w8a8_linear"))
        self.kernel = _kernel(ops.backend, family, name)
        self.finalized = False

    def _check_shape(self, K: int, N: int) -> None:
        q = self.quant
        if q.scheme == "w4a16" and (K % 8 or N % 8 or (q.group_size > 0 and K % q.group_size)):
            raise ModelConfigError(f"a [{N}, {K}] projection does not fit 4-bit packing with group size "
                                   f"{q.group_size} (K and N multiples of 8, K of the group size)")

    @property
    def group_size(self) -> int:
        return self.quant.group_size if self.quant.group_size > 0 else self.in_features

    @property
    def groups_replicated(self) -> bool:
        """Act-order GPTQ in a row-parallel layer: this rank's input rows belong to any group, so it
        holds every group's scales and zeros (``g_idx`` keeps the checkpoint's group ids)."""
        return self.tp is not None and self.quant.desc_act

    @property
    def full_groups_k(self) -> int:
        """The K that sizes ``scales`` / ``qzeros``: the whole layer's when groups are replicated."""
        return self.in_features * self.tp.size if self.groups_replicated else self.in_features

    def finalize(self) -> None:
        """Checkpoint tensors -> kernel tensors (once, after loading)."""
        if self.finalized:
            return
        q = self.quant
        if q.scheme == "w4a16":
            unpack = awq_to_kernel if q.packing == "awq" else gptq_to_kernel
            tensors = unpack(self, q)
        elif q.scheme == "online":
            wq, ws = quantize_per_channel(self.weight.data, q.weight_dtype)
            tensors = {"weight_q": wq, "weight_scale_q": ws}
        elif q.scheme == "w8a8":
            tensors = {"weight_q": self.weight.data, "weight_scale_q": self.weight_scale.data.float().reshape(-1)
                       .expand(self.out_features).contiguous()}
        else:
            tensors = {"weight_q": self.weight.data, "weight_scale_q": self.weight_scale_inv.data}
        self.set_kernel_tensors(tensors)

    def set_kernel_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for p in load_params(self.quant, self.dtype):
            delattr(self, p.suffix)
        for name, t in tensors.items():
            self.register_buffer(name, t, persistent=False)
        self.finalized = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = self.bias if self.tp is None or self.tp.rank == 0 else None
        if self.quant.scheme == "w4a16":
            y = self.kernel(x, self.qweight_k, self.scales_k, self.zeros_k, self.g_idx_k, self.group_size, bias)
        elif self.quant.scheme == "fp8_block":
            y = self.kernel(x, self.weight_q, self.weight_scale_q, self.quant.block_size, bias)
        else:
            y = self.kernel(x, self.weight_q, self.weight_scale_q, bias)
        return y if self.tp is None else self.tp.all_reduce(y)


# ----------------------------------------------------------------------------- MoE experts

EXPERT_PROJ = ("gate", "up", "down")


@dataclasses.dataclass(frozen=True)
class ExpertSlice:
    """The part of an MoE layer's experts one rank holds (``models/parallel.py``): experts
    ``[first_expert, first_expert + E_local)`` (expert parallelism) and intermediate rows
    ``[inter_start, inter_start + I_local)`` of ``inter_full`` (tensor parallelism; 0: whole)."""

    first_expert: int = 0
    inter_start: int = 0
    inter_full: int = 0


class QuantExperts(nn.Module):
    """Quantized experts of an MoE block: ``forward(x, topk_weights, topk_ids)`` is
    ``fused_moe`` over quantized weights (``triton_kernels/quant_moe.py``).

    Before ``finalize()`` it holds the checkpoint's per-expert tensors of the scheme
    (``load_params``) stacked along a leading E axis, gate over up along the output
    axis: ``w13_<suffix>`` (N = 2I, K = H) and ``w2_<suffix>`` (N = H, K = I), e.g.
    ``w13_weight_scale_inv [E, 2*ceil(I/bn), ceil(H/bk)]``. After, the kernel's
    tensors as buffers (``w13_q``, ``w13_s``, ``w13_z``, ``w13_g`` and w2's).
    ``shared``: Qwen2-MoE's shared expert, read into expert 0 of 2 (expert 1 stays
    zero: zero scales give zero weights, see models/qwen_moe.py).

    Sharding (``part``), as the 16-bit ``Experts``: ``num_experts`` and ``inter_size``
    are this rank's; w13 keeps rows ``[i0, i1)`` of gate and of up, w2 the same input
    rows, and every scale / zero / ``g_idx`` tensor the matching whole blocks, groups
    and packed words (``layout``; a cut unit is refused, naming the tensor). Act-order
    GPTQ keeps w2's scales and zeros of every group, as a row-parallel ``QuantLinear``.
    """

    def __init__(self, ops: Any, quant: QuantConfig, num_experts: int, hidden_size: int, inter_size: int,
                 dtype: torch.dtype, device: torch.device | str, shared: bool = False,
                 part: ExpertSlice = ExpertSlice()) -> None:
        super().__init__()
        self.quant, self.dtype, self.shared, self.part = quant, dtype, shared, part
        self.num_experts, self.hidden_size, self.inter_size = num_experts, hidden_size, inter_size
        self.inter_full = part.inter_full or inter_size
        self._check_packing()
        for p in load_params(quant, dtype):
            for which in ("w13", "w2"):
                shape = (num_experts, *self._stacked_shape(p, which))
                setattr(self, f"{which}_{p.suffix}",
                        nn.Parameter(torch.zeros(shape, dtype=p.dtype, device=device), requires_grad=False))
        name = "fused_moe_w4a16" if quant.scheme == "w4a16" else "fused_moe_w8a8"
        self.kernel = _kernel(ops.backend, "quant_moe", name)
        self.finalized = False

    def _check_packing(self) -> None:
        q, H, I = self.quant, self.hidden_size, self.inter_size
        if q.scheme == "w4a16" and (H % 8 or I % 8 or (q.group_size > 0 and (H % q.group_size or (
                I % q.group_size and not self.groups_replicated)))):
            of = f" (this rank's {I} of {self.inter_full})" if self.sharded else ""
            raise ModelConfigError(f"experts of hidden size {H} and intermediate size {I}{of} do not fit "
                                   f"4-bit packing with group size {q.group_size}")

    @property
    def sharded(self) -> bool:
        """This rank holds a slice of the intermediate size (tensor parallelism)."""
        return self.inter_size != self.inter_full

    @property
    def groups_replicated(self) -> bool:
        """Act-order GPTQ with a sharded w2: its input rows belong to any group, so the rank
        holds every group's scales and zeros (``g_idx`` keeps the checkpoint's group ids)."""
        return self.quant.desc_act and self.sharded

    def _proj_shape(self, p: LoadParam, proj: str, inter: int | None = None) -> tuple[int, ...]:
        """One expert's checkpoint tensor of ``proj`` (gate / up: [I, H], down: [H, I]); ``inter``:
        the I to size it by (default this rank's; w2's replicated group tables: the whole)."""
        inter = inter or (self.inter_full if proj == "down" and self._whole_groups(p) else self.inter_size)
        N, K = (self.hidden_size, inter) if proj == "down" else (inter, self.hidden_size)
        return p.local_shape(N, K)

    def _whole_groups(self, p: LoadParam) -> bool:
        return self.groups_replicated and p.suffix in GROUP_TABLES

    def _stacked_shape(self, p: LoadParam, which: str) -> tuple[int, ...]:
        if which == "w2":
            return self._proj_shape(p, "down")
        shape = list(self._proj_shape(p, "gate"))
        if p.out_axis is not None:
            shape[p.out_axis] *= 2
        return tuple(shape)

    def checkpoint_names(self, module_name: str) -> list[tuple[int, str]]:
        """(local expert slot, checkpoint module name) of every projection this module reads:
        under expert parallelism only this rank's experts (global ids in the names)."""
        if self.shared:
            return [(0, f"{module_name}.{proj}_proj") for proj in EXPERT_PROJ]
        first = self.part.first_expert
        return [(e, f"{module_name}.{first + e}.{proj}_proj") for e in range(self.num_experts)
                for proj in EXPERT_PROJ]

    def layout(self, module_name: str, shard_type: Callable) -> dict:
        """Checkpoint name -> Shard of every per-expert tensor this rank reads: its experts,
        cut to its intermediate rows (``_source``)."""
        out = {}
        for e, base in self.checkpoint_names(module_name):
            proj = base.rpartition(".")[2].removesuffix("_proj")
            which = "w2" if proj == "down" else "w13"
            for p in load_params(self.quant, self.dtype):
                what = f"{base}.{p.suffix}"
                shape = self._proj_shape(p, proj)
                index = [slice(None)] * p.ndim
                if p.out_axis is not None and which == "w13":
                    rows = shape[p.out_axis]
                    index[p.out_axis] = slice(0, rows) if proj == "gate" else slice(rows, 2 * rows)
                whole = (1,) if p.broadcast else self._proj_shape(p, proj, self.inter_full)
                out[what] = shard_type(f"{module_name}.{which}_{p.suffix}", (e, *index),
                                       self._source(p, proj, what), whole, broadcast=p.broadcast)
        return out

    def _source(self, p: LoadParam, proj: str, what: str) -> tuple:
        """The region of one checkpoint tensor this rank reads: the intermediate rows
        [i0, i1) in the tensor's units along I's axis (gate / up: output, down: input)."""
        if not self.sharded or p.broadcast or (proj == "down" and self._whole_groups(p)):
            return ()
        axis, unit = (p.in_axis, p.in_unit) if proj == "down" else (p.out_axis, p.out_unit)
        if axis is None:
            return ()
        source = [slice(None)] * p.ndim
        i0 = self.part.inter_start
        source[axis] = _scaled(slice(i0, i0 + self.inter_size), unit, self.inter_full, what)
        return tuple(source)

    def finalize(self) -> None:
        """Checkpoint tensors -> kernel tensors (once, after loading)."""
        if self.finalized:
            return
        q = self.quant
        if q.scheme == "online":
            self.set_kernel_tensors(self.from_dense(self.w13_weight.data, self.w2_weight.data))
            return
        tensors = {}
        for which in ("w13", "w2"):
            get = {p.suffix: getattr(self, f"{which}_{p.suffix}").data for p in load_params(q, self.dtype)}
            tensors.update({f"{which}_{k}": v for k, v in self._to_kernel(get, which).items()})
        self.set_kernel_tensors(tensors)

    def _to_kernel(self, t: dict[str, torch.Tensor], which: str) -> dict[str, torch.Tensor]:
        """One GEMM's stacked checkpoint tensors -> {q, s, z, g} of the kernel."""
        q = self.quant
        if q.scheme == "fp8_block":
            return {"q": t["weight"].contiguous(), "s": t["weight_scale_inv"].contiguous()}
        if q.scheme == "w8a8":
            E, N = t["weight"].shape[:2]
            return {"q": t["weight"].contiguous(), "s": t["weight_scale"].float().reshape(E, N).contiguous()}
        E, _, N = t["scales"].shape
        packed_zeros = t["qzeros"].reshape(-1, t["qzeros"].shape[-1])
        if q.packing == "awq":
            cols = _unpack_cols(t["qweight"].reshape(-1, t["qweight"].shape[-1]), AWQ_ORDER)   # [E*K, N]
            qweight = _pack_rows(cols).view(E, -1, N)
            zeros = _unpack_cols(packed_zeros, AWQ_ORDER)
        else:
            qweight = t["qweight"].contiguous()
            zeros = _unpack_cols(packed_zeros)
        zeros = (zeros + q.zero_offset).to(torch.uint8).view(E, -1, N)
        return {"q": qweight, "s": t["scales"].contiguous(), "z": zeros,
                "g": self._g_idx(t.get("g_idx"), 8 * qweight.shape[1], which == "w2")}

    def _g_idx(self, g_idx: torch.Tensor | None, K: int, down: bool) -> torch.Tensor | None:
        """[E, K] act-order groups, or None where every expert's rows are in plain order.
        A sharded w2 (``down``) holds rows from ``i0`` on: its plain groups start at
        ``i0 / group``; with replicated groups the checkpoint's ids index every group."""
        if g_idx is None:
            return None
        g_idx = g_idx.to(torch.int32)
        if down and self.groups_replicated:
            return g_idx.contiguous()
        group = self.quant.group_size if self.quant.group_size > 0 else K
        first = self.part.inter_start // group if down and self.quant.group_size > 0 else 0
        plain = torch.arange(K, device=g_idx.device, dtype=torch.int32) // group + first
        used = g_idx[: 1 if self.shared else self.num_experts]
        if torch.equal(used, plain.expand_as(used)):
            return None
        if down and self.sharded:
            raise ModelConfigError(f"down_proj g_idx is not in plain order while desc_act is false: "
                                   f"not served with the intermediate size split ({self.inter_size} of "
                                   f"{self.inter_full} per rank)")
        return g_idx.contiguous()

    def from_dense(self, w13: torch.Tensor, w2: torch.Tensor) -> dict[str, torch.Tensor]:
        """16-bit experts w13 [E, 2I, H], w2 [E, H, I] quantized into the kernel tensors
        (online quantization and dummy weights)."""
        q, I = self.quant, self.inter_size
        out: dict[str, torch.Tensor] = {}
        for which, w in (("w13", w13), ("w2", w2)):
            E, N, K = w.shape
            if q.scheme == "w4a16":
                group = q.group_size if q.group_size > 0 else K
                qw, s, z = (torch.stack(t) for t in zip(*(quantize_int4_groups(we, group) for we in w)))
                out.update({f"{which}_q": qw, f"{which}_s": s, f"{which}_z": z, f"{which}_g": None})
            elif q.scheme == "fp8_block":
                halves = (w[:, :I], w[:, I:]) if which == "w13" else (w,)
                parts = [[quantize_fp8_blocks(we, q.block_size) for we in half] for half in halves]
                out[f"{which}_q"] = torch.cat([torch.stack([p[0] for p in h]) for h in parts], 1)
                out[f"{which}_s"] = torch.cat([torch.stack([p[1] for p in h]) for h in parts], 1)
            else:
                wq, ws = quantize_per_channel(w.reshape(E * N, K), q.weight_dtype)
                out.update({f"{which}_q": wq.view(E, N, K), f"{which}_s": ws.view(E, N)})
        return out

    def set_kernel_tensors(self, tensors: dict[str, torch.Tensor | None]) -> None:
        for p in load_params(self.quant, self.dtype):
            for which in ("w13", "w2"):
                delattr(self, f"{which}_{p.suffix}")
        for which in ("w13", "w2"):
            for kind in "qszg":
                self.register_buffer(f"{which}_{kind}", tensors.get(f"{which}_{kind}"), persistent=False)
        self.finalized = True

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        if self.quant.scheme == "w4a16":
            return self.kernel(x, self.w13_q, self.w13_s, self.w13_z, self.w2_q, self.w2_s, self.w2_z,
                               topk_weights, topk_ids, self.quant.group_size, self.w13_g, self.w2_g)
        block = self.quant.block_size if self.quant.scheme == "fp8_block" else None
        return self.kernel(x, self.w13_q, self.w13_s, self.w2_q, self.w2_s, topk_weights, topk_ids, block)


# ----------------------------------------------------------------------------- format conversion


def _unpack_cols(packed: torch.Tensor, order: tuple[int, ...] = tuple(range(8))) -> torch.Tensor:
    """[R, C/8] int32 packed along columns -> [R, C] int32; slot i holds column order[i]."""
    slots = torch.stack([(packed >> (4 * i)) & 0xF for i in range(8)], dim=-1)      # [R, C/8, 8]
    cols = torch.empty_like(slots)
    cols[..., list(order)] = slots
    return cols.reshape(packed.shape[0], -1)


def _pack_rows(q: torch.Tensor) -> torch.Tensor:
    """[K, N] ints in [0, 15] -> [K/8, N] int32, row k at nibble k % 8 (the kernel layout)."""
    K, N = q.shape
    q = q.to(torch.int64).view(K // 8, 8, N)
    packed = sum(q[:, j, :] << (4 * j) for j in range(8))
    return (packed - ((packed >> 31) << 32)).to(torch.int32)


def awq_to_kernel(m: QuantLinear, quant: QuantConfig) -> dict[str, torch.Tensor]:
    q = _unpack_cols(m.qweight.data, AWQ_ORDER)                                       # [K, N]
    zeros = _unpack_cols(m.qzeros.data, AWQ_ORDER) + quant.zero_offset
    return {"qweight_k": _pack_rows(q), "scales_k": m.scales.data.contiguous(),
            "zeros_k": zeros.to(torch.uint8), "g_idx_k": None}


def gptq_to_kernel(m: QuantLinear, quant: QuantConfig) -> dict[str, torch.Tensor]:
    """Without act-order the groups are consecutive rows (``g_idx`` is not needed, and a
    row-parallel shard's ids would be the whole layer's); with it ``g_idx`` indexes the
    scales (every group's when replicated), unless it is the plain order on one rank."""
    zeros = _unpack_cols(m.qzeros.data) + quant.zero_offset
    g_idx = m.g_idx.data.to(torch.int32) if quant.desc_act else None
    if g_idx is not None and not m.groups_replicated:
        plain = torch.arange(g_idx.numel(), device=g_idx.device, dtype=torch.int32) // m.group_size
        g_idx = None if torch.equal(g_idx, plain) else g_idx
    return {"qweight_k": m.qweight.data.contiguous(), "scales_k": m.scales.data.contiguous(),
            "zeros_k": zeros.to(torch.uint8), "g_idx_k": g_idx}


def quantize_per_channel(w: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (8-bit weight [N, K], fp32 scale [N]): symmetric, one scale per output row."""
    w = w.float()
    qmax = 127.0 if dtype == torch.int8 else 448.0
    scale = w.abs().amax(dim=1).clamp_min(1e-12) / qmax
    v = w / scale[:, None]
    wq = torch.round(v).clamp(-128, 127).to(torch.int8) if dtype == torch.int8 else v.clamp(-448, 448).to(dtype)
    return wq, scale


def quantize_int4_groups(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """w [N, K] -> kernel tensors (qweight [K/8, N], scales [G, N], zeros [G, N] uint8):
    asymmetric 4-bit per group of input rows (dummy weights of a 4-bit format)."""
    wt = w.float().t()                                                                  # [K, N]
    K, N = wt.shape
    groups = wt.reshape(K // group_size, group_size, N)
    lo, hi = groups.amin(dim=1), groups.amax(dim=1)
    scales = ((hi - lo) / 15).clamp_min(1e-8)
    zeros = torch.round(-lo / scales).clamp(0, 15)
    q = torch.round(groups / scales[:, None] + zeros[:, None]).clamp(0, 15).reshape(K, N)
    return _pack_rows(q), scales.to(w.dtype), zeros.to(torch.uint8)


def quantize_fp8_blocks(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (fp8 [N, K], fp32 scale [ceil(N/bn), ceil(K/bk)]), one scale per block."""
    bn, bk = block
    N, K = w.shape
    gn, gk = -(-N // bn), -(-K // bk)
    blocks = nn.functional.pad(w.float(), (0, gk * bk - K, 0, gn * bn - N)).view(gn, bn, gk, bk)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
    wq = (blocks / scale[:, None, :, None]).view(gn * bn, gk * bk)[:N, :K]
    return wq.clamp(-448, 448).to(torch.float8_e4m3fn), scale


def set_from_dense(m: QuantLinear, w: torch.Tensor) -> None:
    """Quantize a 16-bit weight [N, K] straight into the kernel tensors (dummy weights)."""
    q = m.quant
    if q.scheme == "w4a16":
        qweight, scales, zeros = quantize_int4_groups(w, m.group_size)
        m.set_kernel_tensors({"qweight_k": qweight, "scales_k": scales, "zeros_k": zeros, "g_idx_k": None})
    elif q.scheme == "fp8_block":
        wq, ws = quantize_fp8_blocks(w, q.block_size)
        m.set_kernel_tensors({"weight_q": wq, "weight_scale_q": ws})
    else:
        wq, ws = quantize_per_channel(w, q.weight_dtype)
        m.set_kernel_tensors({"weight_q": wq, "weight_scale_q": ws})


# ----------------------------------------------------------------------------- model-wide steps


def quant_modules(model: nn.Module) -> dict[str, QuantLinear | QuantExperts]:
    """Every quantized module: projections (QuantLinear) and MoE experts (QuantExperts)."""
    return {name: m for name, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts))}


_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


def check_ignored(model: nn.Module, quant: QuantConfig | None) -> None:
    """A checkpoint that leaves one of our quantized projections in 16 bits is refused."""
    if quant is None or not quant.ignore:
        return
    patterns = [re.compile(p[3:]) for p in quant.ignore if p.startswith("re:")]
    names = {p for p in quant.ignore if not p.startswith("re:")}
    for name, m in quant_modules(model).items():
        prefix, _, leaf = name.rpartition(".")
        fulls = ([base for _, base in m.checkpoint_names(name)] if isinstance(m, QuantExperts)
                 else [f"{prefix}.{part}" for part in _FUSED.get(leaf, (leaf,))])
        for full in fulls:
            if full in names or any(p.fullmatch(full) for p in patterns):
                raise ModelConfigError(f"the checkpoint leaves {full} unquantized ({quant.method} ignore "
                                       "list); per-layer exceptions are not served yet")


def _as_pair(region: tuple) -> list[slice]:
    """A Shard region (``()``, rows, or rows + cols) as [rows, cols] slices."""
    pair = list(region) + [slice(None)] * (2 - len(region))
    return pair[:2]


def _scaled(sl: slice, unit: int, full: int, what: str) -> slice:
    if sl == slice(None) or unit == 0:
        return slice(None)
    start, stop = sl.start or 0, sl.stop
    if start % unit or (stop % unit and stop != full):
        raise ModelConfigError(f"{what}: rows [{start}, {stop}) do not align with its quantization "
                               f"block of {unit}")
    return slice(start // unit, -(-stop // unit))


def quantized_layout(model: nn.Module, layout: dict, dense_layout: Callable, config: Any, tp: Any) -> dict:
    """The checkpoint layout with each quantized projection's tensors: the 16-bit layout of a
    ``weight`` [N, K] of the same shape, each region rescaled to every checkpoint tensor's
    units and axes (``LoadParam``)."""
    modules = {n: m for n, m in quant_modules(model).items() if not m.finalized}
    if not modules:
        return layout
    out = {k: s for k, s in layout.items() if s.param.rpartition(".")[0] not in modules
           or s.param.endswith(".bias")}
    shard_type = type(next(iter(layout.values())))
    for name, m in modules.items():
        if isinstance(m, QuantExperts):
            out.update(m.layout(name, shard_type))
            continue
        probe = {f"{name}.weight": torch.empty(m.out_features, m.in_features, device="meta")}
        for ckpt_name, shard in dense_layout(probe, config, tp).items():
            base = ckpt_name.rpartition(".")[0]
            rows_i, cols_i = _as_pair(shard.index)
            rows_s, cols_s = _as_pair(shard.source)
            Nf, Kf = shard.shape
            for p in load_params(m.quant, m.dtype):
                index, source = [slice(None)] * p.ndim, [slice(None)] * p.ndim
                what = f"{base}.{p.suffix}"
                whole_k = m.groups_replicated and p.suffix in GROUP_TABLES
                if p.out_axis is not None and not p.broadcast:
                    index[p.out_axis] = _scaled(rows_i, p.out_unit, m.out_features, what)
                    source[p.out_axis] = _scaled(rows_s, p.out_unit, Nf, what)
                elif p.broadcast:
                    index[p.out_axis] = rows_i
                if p.in_axis is not None and not whole_k:
                    index[p.in_axis] = _scaled(cols_i, p.in_unit, m.in_features, what)
                    source[p.in_axis] = _scaled(cols_s, p.in_unit, Kf, what)
                shape = (1,) if p.broadcast else p.local_shape(Nf, m.full_groups_k if whole_k else Kf)
                out[what] = shard._replace(param=f"{name}.{p.suffix}", index=tuple(index),
                                           source=() if p.broadcast else tuple(source), shape=shape,
                                           broadcast=p.broadcast)
    return out


def finalize_quantized(model: nn.Module) -> None:
    """Every quantized projection: checkpoint tensors -> kernel tensors."""
    for m in quant_modules(model).values():
        m.finalize()


def init_dummy_quantized(model: nn.Module, seed: int, std: float) -> None:
    """Random 16-bit weights (normal(0, std), seeded per module) quantized into every projection."""
    import zlib

    for name, m in quant_modules(model).items():
        device = next(m.parameters()).device
        generator = torch.Generator(device=device).manual_seed((seed << 32) ^ zlib.crc32(name.encode()))
        if isinstance(m, QuantExperts):
            m.set_kernel_tensors(_dummy_experts(m, generator, std, device))
            continue
        w = torch.empty(m.out_features, m.in_features, dtype=m.dtype, device=device)
        w.normal_(0.0, std, generator=generator)
        set_from_dense(m, w)
        if m.bias is not None:
            m.bias.data.normal_(0.0, std, generator=generator)



def _dummy_experts(m: QuantExperts, generator: torch.Generator, std: float,
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Random 16-bit experts quantized into the kernel tensors; a shared expert's
    zero expert (slot 1) stays zero."""
    E, H, I = m.num_experts, m.hidden_size, m.inter_size
    w13 = torch.empty(E, 2 * I, H, dtype=m.dtype, device=device).normal_(0.0, std, generator=generator)
    w2 = torch.empty(E, H, I, dtype=m.dtype, device=device).normal_(0.0, std, generator=generator)
    if m.shared:
        w13[1:] = 0
        w2[1:] = 0
    return m.from_dense(w13, w2)

# ----------------------------------------------------------------------------- FP8 KV-cache scales

# Per-tensor K/V scales of an FP8 KV cache, as FP8 checkpoints store them: on the
# attention module or on k_proj / v_proj (``model.layers.3.self_attn.k_proj.k_scale``).
KV_SCALE = re.compile(r"(.*\.layers\.(\d+))\.self_attn\.(?:(?:k_proj|v_proj|attn)\.)?([kv])_scale")


def load_kv_scales(model: nn.Module, files: list) -> int:
    """Set each attention layer's ``k_scale`` / ``v_scale`` (Python floats the KV store
    and attention kernels take; 1.0 when absent, as SGLang) from the checkpoint's
    ``k_scale`` / ``v_scale`` tensors. Returns how many it found."""
    from safetensors import safe_open

    layers = {int(m.group(1)): module for name, module in model.named_modules()
              if (m := re.search(r"layers\.(\d+)\.self_attn$", name)) and hasattr(module, "k_scale")}
    found = 0
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                match = KV_SCALE.fullmatch(name)
                if match is None:
                    continue
                layer, which = int(match.group(2)), match.group(3)
                value = f.get_tensor(name).float()
                if layer not in layers or value.numel() != 1 or not float(value) > 0:
                    raise ModelConfigError(f"{path}: {name} must be one positive value of a layer "
                                           f"the model has, got shape {list(value.shape)}")
                setattr(layers[layer], f"{which}_scale", float(value))
                found += 1
    return found
