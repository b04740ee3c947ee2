"""Soak test: mixed traffic against ``stagewise serve`` for minutes; does memory stay flat, does KV come back?

::

    python perf/soak.py                       # 10 minutes, demo model, CPU, serving placement
    python perf/soak.py --duration-s 60 --output /tmp/soak.json

Starts ``stagewise serve`` (``--placement serving``: a front-end and an
engine process) on the bundled demo model, waits for ``/health``, then runs
``--concurrency`` clients for ``--duration-s`` seconds. Each client picks,
seeded, one of:

* plain completion; streamed chat completion; ``n`` > 1; a batch of prompts;
* a JSON-schema (``response_format``) or regex constrained request;
* a stream the client leaves after its first chunk (the server aborts it);
* a request aborted through ``/abort_request`` while it runs;
* a request the server must refuse (prompt past the context: a 400, found
  after encoding or from its bytes alone).

Every ``--sample-every-s`` seconds it reads the resident set size
(``/proc/<pid>/status`` VmRSS) of every server process (the one it started
and all its descendants). At the end it fits, per process and for the sum
over the processes alive throughout, a least-squares line of RSS against
time, in MB per minute, over the whole run and over its second half (the
first half holds warm-up: caches, allocator pools, compiled grammars); and,
once the server is idle, it reads the KV usage the engine
reports (``/get_server_info`` ``engine_stats.token_usage``) before and after
``/flush_cache``: with nothing running, tokens still held are the radix
cache's, and a flush must bring usage to 0.

One JSON object goes to ``--output`` (default
``perf/results/soak-demo-cpu.json``): the settings, the request counts by
kind and outcome, the RSS samples, the slopes, the final KV usage, and the
verdict against the stated bounds (``BOUNDS``); the exit code is 1 when a
bound is broken. ``--check FILE`` re-judges a recorded run.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench_serving import wait_ready

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "perf" / "results" / "soak-demo-cpu.json"
WORDS = ("the king my lord speak hear me what is this noble heart night day sweet love death sword crown "
         "good gentle fair brother father mother honour grace shall thou thee thy").split()
PERSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                                  "age": {"type": "integer"}}, "required": ["name", "age"]}
LIST_SCHEMA = {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}
REGEXES = ("(yes|no)", "[0-9]{1,4}", "(red|green|blue) (cat|dog)")
KINDS = ("plain", "chat_stream", "n_gt_1", "batch", "json_schema", "regex", "stream_leave", "abort", "too_long")


# --------------------------------------------------------------------------- the server and its processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(model_path: str, port: int, log_path: Path, extra: list[str]) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline.cli", "serve", "--model-path", model_path, "--port", str(port),
               "--placement", "serving", "--device", "cpu", "--enable-metrics", *extra]
    env = dict(os.environ, PYTHONPATH=str(REPO), CUDA_VISIBLE_DEVICES="")
    log = open(log_path, "w")
    return subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)


def process_tree(root_pid: int) -> list[int]:
    """``root_pid`` and every descendant, from /proc (parent pid is field 4 of /proc/<pid>/stat)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                parent = int(stat.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    tree, todo = [], [root_pid]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def rss_mb(pid: int) -> tuple[str, float] | None:
    """(command name, resident set size in MB) of one process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/status") as status:
            fields = dict(line.split(":", 1) for line in status if ":" in line)
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            argv = cmdline.read().split(b"\0")
    except OSError:
        return None
    name = " ".join(a.decode(errors="replace") for a in argv[:4] if a) or fields["Name"].strip()
    return name, int(fields.get("VmRSS", "0 kB").split()[0]) / 1024


async def sample_rss(root_pid: int, every_s: float, start_s: float, samples: list[dict], stop: asyncio.Event) -> None:
    while not stop.is_set():
        row: dict[str, Any] = {"t_s": round(time.monotonic() - start_s, 2), "rss_mb": {}}
        for pid in process_tree(root_pid):
            measured = rss_mb(pid)
            if measured is not None:
                row["rss_mb"][f"{pid} {measured[0]}"] = round(measured[1], 2)
        samples.append(row)
        try:
            await asyncio.wait_for(stop.wait(), every_s)
        except asyncio.TimeoutError:
            pass


def slope_mb_per_min(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MB) points, in MB per minute."""
    if len(points) < 3:
        return None
    n = len(points)
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var_t = sum((t - mean_t) ** 2 for t, _ in points)
    if var_t == 0:
        return None
    return 60 * sum((t - mean_t) * (y - mean_y) for t, y in points) / var_t


def rss_slopes(samples: list[dict]) -> dict[str, Any]:
    """Per process and total: slope over the second half of the run, first and last RSS."""
    end_s = samples[-1]["t_s"] if samples else 0.0
    second_half = [s for s in samples if s["t_s"] >= end_s / 2]
    names = sorted({name for s in samples for name in s["rss_mb"]})
    per_process = {}
    for name in names:
        series = [(s["t_s"], s["rss_mb"][name]) for s in samples if name in s["rss_mb"]]
        late = [(s["t_s"], s["rss_mb"][name]) for s in second_half if name in s["rss_mb"]]
        per_process[name] = {"first_mb": series[0][1], "last_mb": series[-1][1], "max_mb": max(y for _, y in series),
                             "slope_mb_per_min_second_half": _round(slope_mb_per_min(late)),
                             "slope_mb_per_min_whole_run": _round(slope_mb_per_min(series))}
    # The sum over the processes alive in every sample of the window: one that starts or ends midway
    # (a grammar worker) would otherwise read as growth or shrinkage.
    return {"per_process": per_process,
            "total_second_half": _total(second_half), "total_whole_run": _total(samples)}


def _total(window: list[dict]) -> dict[str, Any]:
    if not window:
        return {}
    steady = set.intersection(*(set(s["rss_mb"]) for s in window))
    totals = [(s["t_s"], sum(s["rss_mb"][name] for name in steady)) for s in window]
    return {"num_processes": len(steady), "first_mb": _round(totals[0][1]), "last_mb": _round(totals[-1][1]),
            "slope_mb_per_min": _round(slope_mb_per_min(totals))}


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


# --------------------------------------------------------------------------- traffic


def prompt(rng: random.Random, num_words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(num_words))


class Client:
    """One simulated user: picks a request kind, sends it, notes the outcome."""

    def __init__(self, url: str, session: aiohttp.ClientSession, rng: random.Random, counts: dict) -> None:
        self.url, self.session, self.rng, self.counts = url, session, rng, counts

    async def run_until(self, deadline_s: float) -> None:
        while time.monotonic() < deadline_s:
            kind = self.rng.choice(KINDS)
            try:
                outcome = await asyncio.wait_for(getattr(self, kind)(), 120)
            except asyncio.TimeoutError:
                outcome = "timeout"
            except aiohttp.ClientError as error:
                outcome = f"client_error {type(error).__name__}"
            key = f"{kind} {outcome}"
            self.counts[key] = self.counts.get(key, 0) + 1

    async def _post(self, path: str, body: dict) -> str:
        async with self.session.post(self.url + path, json=body) as response:
            await response.read()
            return str(response.status)

    async def plain(self) -> str:
        return await self._post("/v1/completions", {"model": "m", "prompt": prompt(self.rng, 20),
                                                    "max_tokens": self.rng.randint(4, 32), "temperature": 0.8})

    async def n_gt_1(self) -> str:
        return await self._post("/v1/completions", {"model": "m", "prompt": prompt(self.rng, 12), "n": 3,
                                                    "max_tokens": 12, "temperature": 1.0})

    async def batch(self) -> str:
        return await self._post("/generate", {"text": [prompt(self.rng, 8) for _ in range(3)],
                                              "sampling_params": {"max_new_tokens": 10}})

    async def json_schema(self) -> str:
        schema = self.rng.choice((PERSON_SCHEMA, LIST_SCHEMA))
        return await self._post("/v1/chat/completions", {
            "model": "m", "messages": [{"role": "user", "content": prompt(self.rng, 10)}], "max_tokens": 48,
            "response_format": {"type": "json_schema", "json_schema": {"name": "out", "schema": schema}}})

    async def regex(self) -> str:
        return await self._post("/v1/completions", {"model": "m", "prompt": prompt(self.rng, 10), "max_tokens": 12,
                                                    "regex": self.rng.choice(REGEXES)})

    async def too_long(self) -> str:
        num_words = self.rng.choice((3000, 30_000))  # past the context once encoded; by its bytes alone
        return await self._post("/v1/completions", {"model": "m", "prompt": prompt(self.rng, num_words),
                                                    "max_tokens": 8})

    async def chat_stream(self) -> str:
        body = {"model": "m", "messages": [{"role": "user", "content": prompt(self.rng, 15)}],
                "max_tokens": self.rng.randint(8, 40), "stream": True}
        async with self.session.post(self.url + "/v1/chat/completions", json=body) as response:
            async for _ in response.content:
                pass
            return str(response.status)

    async def stream_leave(self) -> str:
        body = {"model": "m", "prompt": prompt(self.rng, 10), "max_tokens": 300, "stream": True, "ignore_eos": True}
        async with self.session.post(self.url + "/v1/completions", json=body) as response:
            async for line in response.content:
                if line.startswith(b"data:"):
                    break  # hang up after the first chunk: the server aborts the request
            return f"{response.status} left"

    async def abort(self) -> str:
        rid = f"soak-{self.rng.getrandbits(48):x}"
        body = {"model": "m", "prompt": prompt(self.rng, 10), "max_tokens": 300, "ignore_eos": True, "rid": rid}
        request = asyncio.ensure_future(self._post("/v1/completions", body))
        await asyncio.sleep(self.rng.uniform(0.05, 0.5))
        aborted = await self._post("/abort_request", {"rid": rid})
        return f"{await request} abort={aborted}"


async def drive(url: str, concurrency: int, duration_s: float, seed: int, counts: dict) -> None:
    deadline_s = time.monotonic() + duration_s
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [Client(url, session, random.Random(seed * 1000 + i), counts) for i in range(concurrency)]
        await asyncio.gather(*(client.run_until(deadline_s) for client in clients))


async def idle_kv_usage(url: str) -> dict[str, Any]:
    """KV usage once idle: wait for a fresh EngineStats with nothing running, then flush and read again."""
    async with aiohttp.ClientSession() as session:
        before = await _settled_stats(session, url)
        async with session.post(url + "/flush_cache") as response:
            flush_status = response.status
        after = await _settled_stats(session, url)
    return {"before_flush": before, "flush_status": flush_status, "after_flush": after}


async def _settled_stats(session: aiohttp.ClientSession, url: str, timeout_s: float = 30.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    info: dict[str, Any] = {}
    while time.monotonic() < deadline:
        await asyncio.sleep(2.5)  # EngineStats arrive about once a second
        async with session.get(url + "/get_server_info") as response:
            info = await response.json()
        stats = info.get("engine_stats") or {}
        if info.get("num_requests_in_flight") == 0 and stats.get("num_running_reqs") == 0 \
                and stats.get("num_queue_reqs") == 0:
            break
    stats = info.get("engine_stats") or {}
    return {"token_usage": stats.get("token_usage"), "max_total_num_tokens": stats.get("max_total_num_tokens"),
            "num_running_reqs": stats.get("num_running_reqs"), "num_queue_reqs": stats.get("num_queue_reqs"),
            "num_requests_in_flight": info.get("num_requests_in_flight"),
            "num_sequences_in_flight": info.get("num_sequences_in_flight")}


# --------------------------------------------------------------------------- verdict

# What "memory stays flat, KV comes back" means here, stated before the run is judged.
BOUNDS = {
    "rss_slope_mb_per_min_second_half": 2.0,   # summed over the server's processes
    "rss_growth_fraction_whole_run": 0.10,     # last sample vs first, summed
    "idle_kv_usage_after_flush": 0.0,
    "server_log_tracebacks": 0,
}


def verdict(record: dict[str, Any]) -> dict[str, Any]:
    """Each bound with the measured value and whether it holds."""
    total = record["rss"]["total_second_half"]
    per_process = record["rss"]["per_process"].values()
    first = sum(p["first_mb"] for p in per_process)
    last = sum(p["last_mb"] for p in per_process)
    measured = {
        "rss_slope_mb_per_min_second_half": total["slope_mb_per_min"],
        "rss_growth_fraction_whole_run": round((last - first) / first, 4),
        "idle_kv_usage_after_flush": record["kv_usage_idle"]["after_flush"]["token_usage"],
        "server_log_tracebacks": record["server_log_tracebacks"],
    }
    checks = {name: {"bound": BOUNDS[name], "measured": value, "holds": value <= BOUNDS[name]}
              for name, value in measured.items()}
    return {"checks": checks, "all_hold": all(c["holds"] for c in checks.values())}


# --------------------------------------------------------------------------- main


async def soak(args: argparse.Namespace, server: subprocess.Popen, url: str) -> dict[str, Any]:
    await wait_ready(url, server, 300.0)
    counts: dict[str, int] = {}
    samples: list[dict] = []
    stop = asyncio.Event()
    start_s = time.monotonic()
    sampler = asyncio.ensure_future(sample_rss(server.pid, args.sample_every_s, start_s, samples, stop))
    await drive(url, args.concurrency, args.duration_s, args.seed, counts)
    traffic_s = time.monotonic() - start_s
    kv = await idle_kv_usage(url)
    stop.set()
    await sampler
    return {"traffic_s": round(traffic_s, 1), "requests": dict(sorted(counts.items())),
            "num_requests": sum(counts.values()), "rss": rss_slopes(samples), "kv_usage_idle": kv,
            "server_alive_at_end": server.poll() is None, "rss_samples": samples}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-path", default=str(REPO / "models" / "demo"))
    parser.add_argument("--duration-s", type=float, default=600.0)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--sample-every-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--server-log", type=Path, default=Path("/tmp/stagewise-soak-server.log"))
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for stagewise serve")
    parser.add_argument("--check", type=Path, default=None, help="re-judge a recorded result file and exit")
    args = parser.parse_args(argv)
    if args.check is not None:
        return check(args.check)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(args.model_path, port, args.server_log, args.server_arg)
    try:
        result = asyncio.run(soak(args, server, url))
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    log_text = args.server_log.read_text(errors="replace")
    record = {"benchmark": "soak", "model": Path(args.model_path).name, "device": "cpu",
              "placement": "serving", "host": platform.node(), "cpu_count": os.cpu_count(),
              "python": platform.python_version(), "duration_s": args.duration_s, "concurrency": args.concurrency,
              "seed": args.seed, "sample_every_s": args.sample_every_s, "server_exit_code": server.returncode,
              "server_log_tracebacks": log_text.count("Traceback"), "server_log_aclose_errors": log_text.count("aclose"),
              **result}
    record["verdict"] = verdict(record)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=1) + "\n")
    summary = {k: record[k] for k in ("num_requests", "server_exit_code", "server_log_tracebacks")}
    print(json.dumps({**summary, "rss_total_second_half": record["rss"]["total_second_half"],
                      "kv_usage_idle": record["kv_usage_idle"]}, indent=1))
    print(json.dumps(record["verdict"], indent=1))
    print(f"wrote {args.output}")
    return 0 if record["verdict"]["all_hold"] else 1


def check(path: Path) -> int:
    """Judge a recorded run against ``BOUNDS`` and store the verdict in it."""
    record = json.loads(path.read_text())
    record["verdict"] = verdict(record)
    path.write_text(json.dumps(record, indent=1) + "\n")
    print(json.dumps(record["verdict"], indent=1))
    return 0 if record["verdict"]["all_hold"] else 1


if __name__ == "__main__":
    sys.exit(main())
