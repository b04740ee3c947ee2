"""Server configuration: one frozen ``ServerArgs`` struct, flags derived from it.

Config flows one way. ``parse_args(argv)`` builds the struct from the command
line (flag names follow SGLang: ``tp_size`` -> ``--tp-size``), then
``resolve(args)`` replaces every "auto" that can be known before any stage
starts (model path, dtype, context length, kernel backend) and returns a new
frozen struct. Each stage receives the struct at construction and reads only
its own fields; nothing mutates it afterwards. The KV capacity in tokens is
measured by the forward stage after the weights are loaded and logged once.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import os
import tokenize
from pathlib import Path
from typing import Any, Literal

import msgspec

DEMO_MODEL_PATH = str(Path(__file__).resolve().parent.parent / "models" / "demo")


class ConfigError(ValueError):
    """A flag value is invalid or contradicts the model; the message names the flag."""


class ServerArgs(msgspec.Struct, frozen=True, kw_only=True):
    """Every setting of a stagewise process. Field docs become ``--help`` text."""

    # model
    model_path: str = ""
    tokenizer_path: str = ""
    served_model_name: str = ""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    load_format: Literal["auto", "safetensors", "dummy"] = "auto"
    context_length: int = 0  # 0: from the model config
    trust_remote_code: bool = False
    # server
    host: str = "127.0.0.1"
    port: int = 30000
    api_key: str = ""  # also $STAGEWISE_API_KEY, or --api-key-file (either keeps it off the command line)
    api_key_file: str = ""  # a file whose first line is the API key
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_requests: bool = False  # one log line per finished request (rid, tokens, TTFT, latency, finish reason)
    shutdown_timeout: float = 30.0  # seconds SIGTERM lets running requests finish before aborting them
    watchdog_timeout: float = 300.0  # seconds without engine progress (work queued) before /health fails
    grammar_cache_size_mb: int = 256  # bytes the compiled-grammar cache may hold (emptied by /flush_cache)
    allow_request_chat_template: bool = False  # accept chat_template_kwargs.chat_template from clients
    enable_metrics: bool = False
    max_queued_requests: int = 4096
    tool_call_parser: Literal["", "qwen25", "qwen3", "llama3"] = ""
    reasoning_parser: Literal["", "qwen3", "deepseek-r1"] = ""
    # memory
    mem_fraction_static: float = 0.85
    max_total_tokens: int = 0  # 0: from memory (GPU) or a default (CPU)
    page_size: int = 1
    kv_cache_dtype: Literal["auto", "bfloat16", "float16", "float32", "fp8_e4m3"] = "auto"
    # scheduling
    max_running_requests: int = 0  # 0: from the KV capacity (SGLang's rule, see running_requests_limit)
    max_prefill_tokens: int = 16384
    chunked_prefill_size: int = 8192  # <= 0 disables chunking; a step stalls decodes for at most one chunk
    schedule_policy: Literal["fcfs", "lpm"] = "fcfs"
    disable_radix_cache: bool = False
    # forward
    cuda_graph_max_bs: int = 160
    disable_cuda_graph: bool = False
    random_seed: int = 0
    # parallelism
    tp_size: int = 1  # tensor parallel: one engine process per rank, each with a shard of the weights
    ep_size: int = 1  # expert parallel (MoE): experts split over this many of the TP ranks
    dp_size: int = 1  # data parallel: this many engine replicas behind one front end
    load_balance_method: Literal["round_robin", "shortest_queue", "cache_aware"] = "round_robin"
    dist_init_addr: str = ""  # host:port of the ranks' process group ("": a free local port)
    # ours
    kernel_backend: Literal["auto", "triton", "reference"] = "auto"
    disable_gemm_ws: bool = False  # no warp-specialised (Gluon) gemm tiles on Hopper (A/B measurements)
    disable_pdl: bool = False  # no programmatic dependent launch between kernels (A/B measurements)
    placement: Literal["single", "serving", "pd"] = "single"
    device: Literal["auto", "cuda", "cpu"] = "auto"
    record_path: str = ""  # record every channel's traffic to this file
    disable_overlap_schedule: bool = False  # plan each step only after the previous step's tokens reach the host
    # CORS (vLLM's flags): each list is comma-separated or a JSON list; "*" allows any
    allowed_origins: str = "*"  # origins whose web pages may call the API (narrow it on a desktop without a key)
    allowed_methods: str = "*"  # HTTP methods a cross-origin page may use
    allowed_headers: str = "*"  # request headers a cross-origin page may send
    allow_credentials: bool = False  # let cross-origin pages send cookies and HTTP auth
    file_store_max_mb: int = 512  # MiB that /v1/files may hold in all (uploads and batch results); one upload <= 64 MiB
    enable_mixed_chunk: bool = False  # decode rows ride along prefill chunks (off: a step is all prefill or all decode)
    allowed_local_media_path: str = ""  # images/videos may be read from files under this directory ("": none)
    # weights stored in fewer bits ("": as the checkpoint's quantization_config says;
    # fp8 / w8a8_int8: quantize a 16-bit checkpoint at load; see models/quantization.py)
    quantization: Literal["", "fp8", "w8a8_fp8", "w8a8_int8", "awq", "gptq", "compressed-tensors"] = ""
    mm_cache_size: int = 256  # MB of vision embeddings kept by image hash (LRU), so a repeated image is not re-encoded; 0: none
    # speculative decoding (SGLang's flags; see stages/schedule/speculative.py)
    speculative_algorithm: Literal["", "NGRAM", "EAGLE", "EAGLE3"] = ""  # "": off; NGRAM drafts from each request's own tokens, EAGLE/EAGLE3 from a draft head (stages/forward/speculative.py)
    speculative_draft_model_path: str = ""  # EAGLE / EAGLE3 draft head checkpoint
    speculative_num_steps: int = 0  # draft depth (0: --speculative-num-draft-tokens - 1)
    speculative_eagle_topk: int = 1  # branches per draft node (1: a chain; > 1: draft trees, EAGLE/EAGLE3 top-k or NGRAM's most frequent continuations)
    speculative_num_draft_tokens: int = 0  # draft tokens verified per step, the root included (0: 8)
    # prefill/decode disaggregation (SGLang's flag names; see stages/schedule/disagg.py)
    pd_prefill: int = 0  # --placement pd: this many prefill engines (0: 1; either count given implies --placement pd)
    pd_decode: int = 0  # --placement pd: this many decode engines (0: 1)
    disaggregation_mode: Literal["null", "prefill", "decode"] = "null"  # one engine of this role per command (joined by stagewise router)
    disaggregation_transfer_backend: Literal["auto", "shm", "torch"] = "auto"  # auto: shm (/dev/shm, CUDA IPC) on one host, torch across hosts; torch: torch.distributed p2p (gloo on CPU, NCCL on GPU)
    disaggregation_bootstrap_port: int = 0  # --placement pd: the KV transfer group's port (0: a rendezvous file); an engine command: where it listens for the router and its peers (0: 8998)
    disaggregation_transfer_timeout_s: float = 60.0  # a KV transfer not done after this long fails its request

    @property
    def model_dir(self) -> Path:
        return Path(self.model_path or DEMO_MODEL_PATH)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser(prog: str = "stagewise", description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per ServerArgs field; defaults come from the struct."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_server_args(parser)
    return parser


def add_server_args(parser: argparse.ArgumentParser) -> None:
    defaults = ServerArgs()
    docs = field_docs()
    for field in msgspec.structs.fields(ServerArgs):
        default = getattr(defaults, field.name)
        text = _help_text(field.name, docs.get(field.name, ""), default)
        if isinstance(default, bool):
            parser.add_argument(_flag(field.name), action="store_true", default=default, help=text)
            continue
        choices = _literal_choices(field.type)
        parser.add_argument(_flag(field.name), type=type(default), default=default, choices=choices, help=text)


def field_docs() -> dict[str, str]:
    """{field: its comment} from ServerArgs's source: a field's trailing comment is its ``--help`` text.

    ``FIELD_HELP`` gives the fields whose comment is missing or only says
    what a special value means a sentence first, so every flag says something.
    """
    source = Path(__file__).read_text(encoding="utf-8")
    body = next(node for node in ast.parse(source).body if isinstance(node, ast.ClassDef) and node.name == "ServerArgs")
    lines = {node.lineno: node.target.id for node in body.body
             if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
    docs = dict(FIELD_HELP)
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT and token.start[0] in lines:
            name, comment = lines[token.start[0]], token.string.lstrip("#").strip()
            docs[name] = f"{docs[name]}; {comment}" if name in docs else comment
    return docs


def _help_text(name: str, doc: str, default: Any) -> str:
    shown = "off" if default is False else repr(default) if default == "" else default
    return f"{doc} (default: {shown})".strip().replace("%", "%%")


FIELD_HELP = {  # flags whose ServerArgs line has no comment
    "model_path": "model directory (HF layout: config.json, *.safetensors, tokenizer); empty: the bundled demo",
    "tokenizer_path": "tokenizer directory; empty: --model-path",
    "served_model_name": "model name in the API (the 'model' field); empty: the model directory's name",
    "dtype": "weight and activation dtype; auto: the model's on a GPU, float32 on the CPU",
    "load_format": "how weights load; dummy: random weights of the right shapes (benchmarks)",
    "context_length": "longest sequence (prompt plus output) in tokens",
    "api_key": "the key clients must send (Authorization: Bearer KEY)",
    "max_total_tokens": "KV cache capacity in tokens",
    "chunked_prefill_size": "prompt tokens per prefill chunk",
    "trust_remote_code": "allow model/tokenizer code from the model directory",
    "host": "address to listen on",
    "port": "TCP port to listen on (0: any free port)",
    "log_level": "logging level",
    "enable_metrics": "serve Prometheus metrics at /metrics",
    "max_queued_requests": "requests that may wait for a running slot; more get 503",
    "tool_call_parser": "parse tool calls out of generated text in this model family's format",
    "reasoning_parser": "split reasoning ('thinking') text from the answer in this format",
    "mem_fraction_static": "fraction of GPU memory for weights plus KV cache",
    "page_size": "tokens per KV cache page",
    "kv_cache_dtype": "KV cache dtype; auto: --dtype; fp8_e4m3: FP8 pool with per-layer k/v scales (twice the tokens)",
    "quantization": "quantized weights: the checkpoint's format (awq, gptq, compressed-tensors, fp8) or "
                    "online quantization of a 16-bit checkpoint (fp8, w8a8_int8); default: as config.json says",
    "max_running_requests": "requests decoded together at most (the engine logs the figure it uses)",
    "max_prefill_tokens": "prompt tokens prefilled in one forward at most",
    "schedule_policy": "order of waiting requests: fcfs (arrival) or lpm (longest cached prefix first)",
    "disable_radix_cache": "no prefix sharing between requests",
    "cuda_graph_max_bs": "largest decode batch captured as a CUDA graph",
    "disable_cuda_graph": "run decode without CUDA graphs",
    "random_seed": "seed of sampling and dummy weights",
    "load_balance_method": "how --dp-size replicas share requests",
    "kernel_backend": "kernels: triton (GPU, or CPU with TRITON_INTERPRET=1), reference (PyTorch); auto: by device",
    "placement": "which stages share a process: single (one process), serving (front end + engine) or pd "
                 "(front end + --pd-prefill prefill engines + --pd-decode decode engines, KV moved between them)",
    "device": "where the model runs; auto: cuda if available, else cpu",
}


def _literal_choices(annotation: Any) -> list[Any] | None:
    args = getattr(annotation, "__args__", None)
    if getattr(annotation, "__origin__", None) is Literal and args:
        return list(args)
    return None


def args_from_namespace(namespace: argparse.Namespace) -> ServerArgs:
    names = {f.name for f in msgspec.structs.fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in vars(namespace).items() if k in names})


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    """Parse flags into a resolved ServerArgs (raises ConfigError on bad values)."""
    return resolve(args_from_namespace(build_parser().parse_args(argv)))


def resolve(args: ServerArgs) -> ServerArgs:
    """Replace every "auto" that is knowable before start-up; check ranges."""
    args = _pd_placement(args)
    _check_ranges(args)
    model_dir = args.model_dir
    config = _read_model_config(model_dir) if args.load_format != "dummy" or model_dir.exists() else {}
    device = args.device
    if device == "auto":
        device = "cuda" if _cuda_available() else "cpu"
    backend = args.kernel_backend
    if backend == "auto":
        backend = "triton" if device == "cuda" else "reference"
    dtype = args.dtype
    if dtype == "auto":
        dtype = _config_dtype(config) if device == "cuda" else "float32"
    context_length = args.context_length or int(config.get("max_position_embeddings", 4096))
    return msgspec.structs.replace(
        args,
        model_path=str(model_dir),
        tokenizer_path=args.tokenizer_path or str(model_dir),
        served_model_name=args.served_model_name or model_dir.name,
        device=device,
        kernel_backend=backend,
        dtype=dtype,
        kv_cache_dtype=dtype if args.kv_cache_dtype == "auto" else args.kv_cache_dtype,
        context_length=context_length,
        # A recording runs the synchronous loop: under overlap a step's input ids are
        # resolved on the device from the step before, so a stage replayed alone could
        # not see them.
        disable_overlap_schedule=args.disable_overlap_schedule or bool(args.record_path),
    )


def _check_ranges(args: ServerArgs) -> None:
    if not 0.0 < args.mem_fraction_static < 1.0:
        raise ConfigError(f"--mem-fraction-static must be in (0, 1), got {args.mem_fraction_static}")
    if args.page_size < 1:
        raise ConfigError(f"--page-size must be >= 1, got {args.page_size}")
    if args.max_running_requests < 0:
        raise ConfigError(f"--max-running-requests must be >= 1 (0: from the KV capacity), "
                          f"got {args.max_running_requests}")
    if not 0 < args.port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {args.port}")
    if args.tp_size < 1:
        raise ConfigError(f"--tp-size must be >= 1, got {args.tp_size}")
    if args.dp_size < 1:
        raise ConfigError(f"--dp-size must be >= 1, got {args.dp_size}")
    if args.ep_size < 1 or args.tp_size % args.ep_size:
        raise ConfigError(f"--ep-size must divide --tp-size ({args.tp_size}), got {args.ep_size}")
    if args.mm_cache_size < 0:
        raise ConfigError(f"--mm-cache-size must be >= 0 (MB; 0: no multimodal cache), got {args.mm_cache_size}")
    _check_speculative(args)
    _check_disaggregation(args)


def _check_speculative(args: ServerArgs) -> None:
    """Speculative decoding: NGRAM, EAGLE and EAGLE3 (chains, or trees with
    --speculative-eagle-topk > 1) are served; the rest is refused by name."""
    if not args.speculative_algorithm:
        return
    if args.speculative_algorithm in ("EAGLE", "EAGLE3"):
        if not args.speculative_draft_model_path:
            raise ConfigError(f"--speculative-algorithm {args.speculative_algorithm} needs --speculative-draft-model-path")
        if args.tp_size != 1:
            raise ConfigError(f"--speculative-algorithm {args.speculative_algorithm} runs with --tp-size 1")
    if args.speculative_eagle_topk < 1:
        raise ConfigError(f"--speculative-eagle-topk must be >= 1, got {args.speculative_eagle_topk}")
    if args.speculative_eagle_topk > 1:
        if args.kv_cache_dtype.startswith("fp8"):
            raise ConfigError("--speculative-eagle-topk > 1 (tree verification) needs a KV cache in the model "
                              "dtype, not --kv-cache-dtype " + args.kv_cache_dtype)
    if args.speculative_num_draft_tokens < 0 or args.speculative_num_steps < 0:
        raise ConfigError("--speculative-num-draft-tokens and --speculative-num-steps must be >= 0")
    if args.speculative_num_draft_tokens == 1:
        raise ConfigError("--speculative-num-draft-tokens must be >= 2 (the root and one draft)")



def _pd_placement(args: ServerArgs) -> ServerArgs:
    """``--placement pd`` with its engine counts (1 and 1 unless given); a count alone implies the placement."""
    if args.placement != "pd" and not (args.pd_prefill or args.pd_decode):
        return args
    if args.placement not in ("pd", "single"):
        raise ConfigError(f"--pd-prefill/--pd-decode start --placement pd, not --placement {args.placement}")
    return msgspec.structs.replace(args, placement="pd", pd_prefill=args.pd_prefill or 1,
                                   pd_decode=args.pd_decode or 1)


def _check_disaggregation(args: ServerArgs) -> None:
    """--pd-prefill N --pd-decode M on one host, or one engine per command (--disaggregation-mode prefill|decode,
    joined by ``stagewise router --pd-disaggregation``: pipeline/pd_hosts.py)."""
    if args.disaggregation_mode != "null" and (args.pd_prefill or args.pd_decode):
        raise ConfigError(f"--disaggregation-mode {args.disaggregation_mode} runs one engine; the router's "
                          f"--prefill/--decode list the engines, not --pd-prefill/--pd-decode")
    if args.disaggregation_mode != "null" and (args.tp_size != 1 or args.dp_size != 1):
        raise ConfigError("--disaggregation-mode engines run with --tp-size 1 and --dp-size 1")
    if not (args.pd_prefill or args.pd_decode):
        return
    if args.pd_prefill < 1 or args.pd_decode < 1:
        raise ConfigError(f"--pd-prefill and --pd-decode must both be >= 1, got {args.pd_prefill} and {args.pd_decode}")
    if args.tp_size != 1 or args.dp_size != 1:
        raise ConfigError("--pd-prefill/--pd-decode engines run with --tp-size 1 and --dp-size 1")
    if args.speculative_algorithm:
        raise ConfigError("--speculative-algorithm is not served with --pd-prefill/--pd-decode yet")
    if args.disaggregation_transfer_timeout_s <= 0:
        raise ConfigError(f"--disaggregation-transfer-timeout-s must be > 0, got {args.disaggregation_transfer_timeout_s}")

AUTO_RUNNING_REQUESTS_MIN = 2048  # the automatic --max-running-requests lies in this range,
AUTO_RUNNING_REQUESTS_MAX = 4096  # unless the KV pool is smaller than twice the bound


def running_requests_limit(requested: int, kv_tokens: int, context_len: int) -> int:
    """Requests that may run at once, from the KV capacity (SGLang's rule).

    ``requested`` 0: ``kv_tokens / context_len * 512`` clamped to
    [AUTO_RUNNING_REQUESTS_MIN, AUTO_RUNNING_REQUESTS_MAX]; an explicit
    ``--max-running-requests`` is taken as given. Either way at most half the
    KV tokens, since a running request holds at least its prompt and one
    generated token.
    """
    if requested > 0:
        wanted = requested
    else:
        wanted = int(kv_tokens / max(context_len, 1) * 512)
        wanted = min(max(wanted, AUTO_RUNNING_REQUESTS_MIN), AUTO_RUNNING_REQUESTS_MAX)
    return max(1, min(wanted, kv_tokens // 2))


def running_requests_bound(args: ServerArgs) -> int:
    """The most requests one engine may run: the flag, or the automatic rule's upper end
    (for processes, such as the front end, that never see the KV capacity)."""
    return args.max_running_requests or AUTO_RUNNING_REQUESTS_MAX


def _read_model_config(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "config.json"
    if not model_dir.is_dir():
        raise ConfigError(f"--model-path {str(model_dir)!r} is not a directory")
    if not path.is_file():
        raise ConfigError(f"--model-path {str(model_dir)!r} has no config.json")
    return json.loads(path.read_text())


def _config_dtype(config: dict[str, Any]) -> str:
    name = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return {"float16": "float16", "float32": "float32"}.get(name, "bfloat16")


def _cuda_available() -> bool:
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return False
    import torch

    return torch.cuda.is_available()
