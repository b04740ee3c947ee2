"""``stagewise generate``: one prompt in, its continuation out (the Engine, from a shell).

::

    stagewise generate --prompt "To be, or not to be" --max-new-tokens 48 --temperature 0.8 --seed 1
    stagewise generate --model-path /models/Qwen3-0.6B --prompt "Hello" --temperature 0 --stream

Every server flag (``--model-path``, ``--max-total-tokens``, ...) is accepted;
sampling flags follow SGLang's names. Without ``--model-path`` the bundled
demo model runs. Prints the text (streamed with ``--stream``), then one line
of usage: prompt/completion/cached tokens, finish reason, latency.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from pipeline.config import ConfigError, add_server_args, args_from_namespace
from pipeline.messages import SamplingParamsError

SAMPLING_FLAGS: dict[str, type] = {
    "max_new_tokens": int, "min_new_tokens": int, "temperature": float, "top_p": float, "top_k": int,
    "min_p": float, "repetition_penalty": float, "frequency_penalty": float, "presence_penalty": float,
    "seed": int, "n": int, "top_logprobs_num": int, "json_schema": str, "regex": str,
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagewise generate", description=__doc__.split("\n")[0])
    parser.add_argument("--prompt", required=True, help="the prompt text")
    parser.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument("--return-logprob", action="store_true")
    parser.add_argument("--json", action="store_true", help="print the result dict as JSON")
    for name, kind in SAMPLING_FLAGS.items():
        parser.add_argument("--" + name.replace("_", "-"), type=kind, default=None)
    add_server_args(parser)
    return parser


def sampling_from(namespace: argparse.Namespace) -> dict:
    params = {name: getattr(namespace, name) for name in SAMPLING_FLAGS if getattr(namespace, name) is not None}
    if namespace.stop:
        params["stop"] = namespace.stop
    if namespace.ignore_eos:
        params["ignore_eos"] = True
    if namespace.return_logprob:
        params["return_logprob"] = True
    return params


def main(argv: list[str] | None = None) -> int:
    namespace = build_parser().parse_args(argv)
    from pipeline.engine import Engine, GenerateError

    server_args = args_from_namespace(namespace)
    fields = {f: getattr(server_args, f) for f in server_args.__struct_fields__}
    params = sampling_from(namespace)
    try:
        with Engine(fields.pop("model_path") or None, **fields) as engine:
            if namespace.stream and not namespace.json:
                return _stream(engine, namespace.prompt, params)
            start_s = time.perf_counter()
            result = engine.generate(namespace.prompt, params)
            results = result if isinstance(result, list) else [result]
            if namespace.json:
                print(json.dumps(result, indent=2))
                return 0
            for item in results:
                print(item["text"])
                _usage(item, time.perf_counter() - start_s)
            return 0
    except (SamplingParamsError, GenerateError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _stream(engine, prompt: str, params: dict) -> int:
    start_s = time.perf_counter()
    last = None
    for chunk in engine.generate_stream(prompt, params):
        print(chunk["text"], end="", flush=True)
        last = chunk
    print()
    if last is not None:
        _usage(last, time.perf_counter() - start_s)
    return 0


def _usage(item: dict, latency_s: float) -> None:
    meta = item["meta_info"]
    finish = item["finish_reason"] or {}
    print(f"[prompt {meta['prompt_tokens']} tokens, completion {meta['completion_tokens']}, "
          f"cached {meta['cached_tokens']}, finish {finish.get('type')}, {latency_s:.2f} s]", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
