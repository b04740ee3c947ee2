"""Online serving benchmark: a load generator for a running server (in the spirit of sglang.bench_serving).

::

    python perf/bench_serving.py --port 30000 --dataset-name random --random-input-len 1024 \\
        --random-output-len 256 --num-prompts 500 --request-rate 16

Workloads (seeded):

* ``random``: prompt lengths uniform in ``[input_len * range_ratio, input_len]``
  (the same for outputs), prompts made of random token ids sent as
  ``input_ids``, so the server tokenizes nothing and lengths are exact;
* ``generated-shared-prefix``: ``--gsp-num-groups`` groups of
  ``--gsp-prompts-per-group`` prompts; every prompt of a group starts with
  the group's ``--gsp-system-prompt-len``-token system prompt followed by a
  ``--gsp-question-len``-token question (the radix cache should hit).

Requests go to SGLang's native ``/generate`` (``--backend sglang``, default)
or to ``/v1/completions`` (``--backend openai``), streamed, with
``ignore_eos`` so every request produces exactly its output length. Arrivals
are a Poisson process at ``--request-rate`` requests/s (``inf``: all at once),
with at most ``--max-concurrency`` in flight.

Per request: TTFT (send -> first streamed token), ITL (gaps between streamed
chunks), TPOT ((e2e - TTFT) / (output tokens - 1)) and E2E. Printed: request
throughput, input and output tokens/s, mean/median/p99 of TTFT, TPOT, ITL and
E2E; one JSON line with everything (server args and device included) is
appended to ``--output-file``.

Recorded run (``results/bench_serving-llama-3.1-8b-dummy-nvidia-h200.jsonl``):
a directory with Llama-3.1-8B-Instruct's ``config.json`` and any tokenizer
(prompts are ids), served with ``stagewise serve --model-path DIR
--load-format dummy --context-length 4096 --placement serving``, then this
script with ``--random-input-len 1024 --random-output-len 256
--random-range-ratio 1.0`` at ``--request-rate`` 4, 16 and inf.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

DEFAULT_OUTPUT = Path(__file__).resolve().parent / "results" / "bench_serving.jsonl"


@dataclass
class Prompt:
    input_ids: list[int]
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft_s: float = 0.0
    e2e_s: float = 0.0
    itls_s: list[float] = field(default_factory=list)
    error: str = ""


# --------------------------------------------------------------------------- workloads


def random_lengths(rng: random.Random, full: int, ratio: float, count: int) -> list[int]:
    low = max(1, int(full * ratio))
    return [rng.randint(low, max(low, full)) for _ in range(count)]


def random_dataset(args: argparse.Namespace, vocab_size: int, rng: random.Random) -> list[Prompt]:
    input_lens = random_lengths(rng, args.random_input_len, args.random_range_ratio, args.num_prompts)
    output_lens = random_lengths(rng, args.random_output_len, args.random_range_ratio, args.num_prompts)
    return [Prompt([rng.randrange(4, vocab_size) for _ in range(n_in)], n_out)
            for n_in, n_out in zip(input_lens, output_lens)]


def shared_prefix_dataset(args: argparse.Namespace, vocab_size: int, rng: random.Random) -> list[Prompt]:
    prompts = []
    for _ in range(args.gsp_num_groups):
        system = [rng.randrange(4, vocab_size) for _ in range(args.gsp_system_prompt_len)]
        for _ in range(args.gsp_prompts_per_group):
            question = [rng.randrange(4, vocab_size) for _ in range(args.gsp_question_len)]
            prompts.append(Prompt(system + question, args.gsp_output_len))
    rng.shuffle(prompts)
    return prompts


# --------------------------------------------------------------------------- one request


def request_body(args: argparse.Namespace, prompt: Prompt) -> tuple[str, dict]:
    if args.backend == "openai":
        return "/v1/completions", {"model": args.model or "default", "prompt": prompt.input_ids, "stream": True,
                                   "max_tokens": prompt.output_len, "temperature": 0.0, "ignore_eos": True,
                                   "stream_options": {"include_usage": True}}
    return "/generate", {"input_ids": prompt.input_ids, "stream": True, "sampling_params": {
        "max_new_tokens": prompt.output_len, "temperature": 0.0, "ignore_eos": True}}


def tokens_in_event(args: argparse.Namespace, event: dict, seen: int) -> int:
    """Total output tokens so far according to one streamed event."""
    if args.backend == "openai":
        usage = event.get("usage")
        if usage:
            return usage["completion_tokens"]
        return seen + (1 if event.get("choices") and event["choices"][0].get("text") else 0)
    return len(event.get("output_ids", [])) or event.get("meta_info", {}).get("completion_tokens", seen)


async def send(session: aiohttp.ClientSession, args: argparse.Namespace, prompt: Prompt) -> RequestResult:
    path, body = request_body(args, prompt)
    return await post_stream(session, args.base_url + path, body, RequestResult(prompt_len=len(prompt.input_ids)),
                             lambda event, result: tokens_in_event(args, event, result.output_len))


async def post_stream(session: aiohttp.ClientSession, url: str, body: dict, result: RequestResult,
                      count_tokens: Callable[[dict, RequestResult], int]) -> RequestResult:
    """POST one streamed request and time it into ``result``: TTFT at the first event that brings
    output tokens, one gap per later event that brings more (``count_tokens(event, result)``: the
    total output tokens so far), end to end; an HTTP error or an error event is kept in
    ``result.error``."""
    start_s = last_s = time.perf_counter()
    try:
        async with session.post(url, json=body) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:300]}"
                return result
            async for line in response.content:
                if not line.startswith(b"data:") or line.strip() == b"data: [DONE]":
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    result.error = str(event["error"].get("message", "error event"))
                    return result
                num_tokens = count_tokens(event, result)
                if num_tokens > result.output_len:
                    now_s = time.perf_counter()
                    if result.output_len == 0:
                        result.ttft_s = now_s - start_s
                    else:
                        result.itls_s.append(now_s - last_s)
                    last_s, result.output_len = now_s, num_tokens
        result.e2e_s = time.perf_counter() - start_s
        result.ok = result.output_len > 0
    except (aiohttp.ClientError, asyncio.TimeoutError) as error:
        result.error = f"{type(error).__name__}: {error}"
    return result


async def wait_ready(base_url: str, process: subprocess.Popen | None, timeout_s: float) -> None:
    """Poll ``base_url``/health until it answers 200; fail early if the server ``process`` exited."""
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                raise RuntimeError(f"the server exited with {process.returncode}")
            try:
                async with session.get(base_url + "/health") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.5)
    raise TimeoutError(f"the server was not healthy within {timeout_s:.0f} s")


# --------------------------------------------------------------------------- the run


async def arrivals(prompts: list[Prompt], rate: float, rng: random.Random):
    """Yield prompts at Poisson arrival times (all at once when rate is inf)."""
    for prompt in prompts:
        yield prompt
        if rate != float("inf"):
            await asyncio.sleep(rng.expovariate(rate))


async def run_benchmark(args: argparse.Namespace, prompts: list[Prompt]) -> tuple[list[RequestResult], float]:
    limit = asyncio.Semaphore(args.max_concurrency or len(prompts) or 1)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=args.request_timeout_s)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        for prompt in prompts[:args.warmup_requests]:
            await send(session, args, Prompt(prompt.input_ids, min(prompt.output_len, 16)))

        async def limited(prompt: Prompt) -> RequestResult:
            async with limit:
                return await send(session, args, prompt)

        start_s = time.perf_counter()
        tasks = [asyncio.ensure_future(limited(p)) async for p in arrivals(prompts, args.request_rate,
                                                                           random.Random(args.seed + 1))]
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start_s


def summarize(results: list[RequestResult], duration_s: float) -> dict:
    done = [r for r in results if r.ok]
    ms = 1000.0

    def stats(values: list[float]) -> dict:
        if not values:
            return {"mean_ms": 0.0, "median_ms": 0.0, "p99_ms": 0.0}
        ordered = sorted(values)
        p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
        return {"mean_ms": statistics.fmean(values) * ms, "median_ms": statistics.median(values) * ms,
                "p99_ms": p99 * ms}

    input_tokens = sum(r.prompt_len for r in done)
    output_tokens = sum(r.output_len for r in done)
    tpots = [(r.e2e_s - r.ttft_s) / (r.output_len - 1) for r in done if r.output_len > 1]
    return {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration_s,
        "request_throughput": len(done) / duration_s, "input_throughput": input_tokens / duration_s,
        "output_throughput": output_tokens / duration_s, "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "ttft": stats([r.ttft_s for r in done]), "tpot": stats(tpots),
        "itl": stats([gap for r in done for gap in r.itls_s]), "e2e": stats([r.e2e_s for r in done]),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def print_summary(args: argparse.Namespace, summary: dict) -> None:
    line = "-" * 56
    print(f"{line}\n{'Serving benchmark':^56}\n{line}")
    print(f"{'Backend / dataset:':<36}{args.backend} / {args.dataset_name}")
    print(f"{'Request rate (req/s):':<36}{args.request_rate}")
    print(f"{'Max concurrency:':<36}{args.max_concurrency or 'unlimited'}")
    print(f"{'Successful / failed requests:':<36}{summary['completed']} / {summary['failed']}")
    print(f"{'Duration (s):':<36}{summary['duration_s']:.2f}")
    print(f"{'Request throughput (req/s):':<36}{summary['request_throughput']:.2f}")
    print(f"{'Input token throughput (tok/s):':<36}{summary['input_throughput']:.1f}")
    print(f"{'Output token throughput (tok/s):':<36}{summary['output_throughput']:.1f}")
    for name in ("ttft", "tpot", "itl", "e2e"):
        values = summary[name]
        print(f"{name.upper() + ' mean / median / p99 (ms):':<36}"
              f"{values['mean_ms']:.2f} / {values['median_ms']:.2f} / {values['p99_ms']:.2f}")
    for error in summary["errors"]:
        print(f"error: {error}")
    print(line)


async def server_info(base_url: str) -> tuple[dict, dict]:
    async with aiohttp.ClientSession() as session:
        async with session.get(base_url + "/get_model_info") as response:
            model = await response.json()
        async with session.get(base_url + "/get_server_info") as response:
            server = await response.json()
    return model, server


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=["sglang", "openai"], default="sglang")
    parser.add_argument("--base-url", default="")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=30000)
    parser.add_argument("--model", default="")
    parser.add_argument("--dataset-name", choices=["random", "generated-shared-prefix"], default="random")
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--random-input-len", type=int, default=1024)
    parser.add_argument("--random-output-len", type=int, default=1024)
    parser.add_argument("--random-range-ratio", type=float, default=0.0)
    parser.add_argument("--gsp-num-groups", type=int, default=16)
    parser.add_argument("--gsp-prompts-per-group", type=int, default=16)
    parser.add_argument("--gsp-system-prompt-len", type=int, default=2048)
    parser.add_argument("--gsp-question-len", type=int, default=128)
    parser.add_argument("--gsp-output-len", type=int, default=256)
    parser.add_argument("--request-rate", type=float, default=float("inf"))
    parser.add_argument("--max-concurrency", type=int, default=0)
    parser.add_argument("--warmup-requests", type=int, default=1)
    parser.add_argument("--request-timeout-s", type=float, default=600.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--output-file", default=str(DEFAULT_OUTPUT))
    parser.add_argument("--tag", default="", help="free text stored with the result")
    args = parser.parse_args(argv)
    args.base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    model_info, info = asyncio.run(server_info(args.base_url))
    rng = random.Random(args.seed)
    vocab_size = int(model_info.get("vocab_size") or 32000)
    build = random_dataset if args.dataset_name == "random" else shared_prefix_dataset
    prompts = build(args, vocab_size, rng)
    if args.gsp_num_groups and args.dataset_name == "generated-shared-prefix":
        args.num_prompts = len(prompts)
    results, duration_s = asyncio.run(run_benchmark(args, prompts))
    summary = summarize(results, duration_s)
    print_summary(args, summary)
    record = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "tag": args.tag,
              "config": {k: v for k, v in vars(args).items() if k != "output_file"},
              "server": {k: info.get(k) for k in ("model_path", "served_model_name", "dtype", "placement",
                                                  "kernel_backend", "device", "device_name", "torch_version",
                                                  "triton_version", "max_running_requests", "chunked_prefill_size",
                                                  "load_format", "context_length")},
              "kv_capacity_tokens": (info.get("engine_stats") or {}).get("max_total_num_tokens"),
              **summary}
    if args.request_rate == float("inf"):
        record["config"]["request_rate"] = "inf"
    output = Path(args.output_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    with output.open("a") as handle:
        handle.write(json.dumps(record) + "\n")
    return record


if __name__ == "__main__":
    main()
