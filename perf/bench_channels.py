"""Channel transports: messages per second and hop latency (printed, not asserted).

For each transport (in-thread, cross-thread, cross-process) this measures

* throughput: a producer puts ``--messages`` SampledTokens (8 rows, the
  engine's most frequent message) as fast as backpressure allows while the
  consumer drains them; messages/s = count / (last get - first put);
* hop latency: one message at a time through an echo (a thread, or a spawned
  process, on the other side), half the round trip, p50 and p99 over
  ``--pings`` trips. In-thread has no other side: put + get on one thread.

The anchor is the engine's budget: the DESIGN asks for a loop that costs
microseconds per step, so one hop should cost a few microseconds in-thread and
stay well under a decode step (~10 ms) across processes.

    python perf/bench_channels.py [--messages 50000] [--pings 2000] [--json perf/results/channels.jsonl]
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.channel import Channel, ChannelClosed, in_thread_channel  # noqa: E402
from pipeline.process_channel import process_channel  # noqa: E402
from pipeline.thread_channel import thread_channel  # noqa: E402
from pipeline.messages import SampledTokens  # noqa: E402

CAPACITY = 1024
ROWS = 8


def make_message(stamp_ns: int) -> SampledTokens:
    return SampledTokens(batch_id=stamp_ns, rids=[f"req-{i}" for i in range(ROWS)], token_ids=list(range(ROWS)))


def echo(inbox: Channel, outbox: Channel) -> None:
    """The other side of a ping: put back what arrives until the inbox closes."""
    try:
        for message in inbox:
            outbox.put(message)
    except ChannelClosed:
        pass
    outbox.close()


def drain_count(inbox: Channel, done: Channel, count: int) -> None:
    """The other side of a throughput run: take ``count`` messages, then report once."""
    taken = 0
    while taken < count:
        got = len(inbox.drain(CAPACITY))
        if not got:
            inbox.wait_readable(1.0)
        taken += got
    done.put(make_message(time.perf_counter_ns()))


def percentiles(samples_ns: list[int]) -> tuple[float, float]:
    ordered = sorted(samples_ns)
    return ordered[len(ordered) // 2] / 1e3, ordered[int(len(ordered) * 0.99)] / 1e3


def in_thread_run(num_messages: int, num_pings: int) -> dict:
    channel = in_thread_channel("bench", SampledTokens, CAPACITY)
    message = make_message(0)
    start = time.perf_counter_ns()
    sent = 0
    while sent < num_messages:
        for _ in range(min(CAPACITY, num_messages - sent)):
            channel.put(message)
        sent += len(channel.drain(CAPACITY))
    elapsed_s = (time.perf_counter_ns() - start) / 1e9
    hops = []
    for _ in range(num_pings):
        t0 = time.perf_counter_ns()
        channel.put(make_message(t0))
        channel.get()
        hops.append(time.perf_counter_ns() - t0)
    return summary("in-thread", num_messages / elapsed_s, hops)


def other_side_run(name: str, build: Callable[..., Channel], start_other: Callable, num_messages: int,
                   num_pings: int) -> dict:
    """Throughput and ping latency with the far end run by ``start_other(target, args)``."""
    inbox, done = build("bench", SampledTokens, CAPACITY), build("done", SampledTokens, 4)
    other = start_other(drain_count, (inbox, done, num_messages + 1))
    inbox.put(make_message(0))  # warm: wait until the far side is up before timing
    while len(inbox):
        time.sleep(0.01)
    message = make_message(0)
    start = time.perf_counter_ns()
    for _ in range(num_messages):
        inbox.put(message)
    finish = done.get(timeout=120).batch_id
    elapsed_s = (finish - start) / 1e9
    other.join()
    ping, pong = build("ping", SampledTokens, 4), build("pong", SampledTokens, 4)
    other = start_other(echo, (ping, pong))
    ping.put(make_message(0))
    pong.get(timeout=120)  # warm: the far side is up
    hops = []
    for _ in range(num_pings):
        t0 = time.perf_counter_ns()
        ping.put(make_message(t0))
        pong.get(timeout=10)
        hops.append((time.perf_counter_ns() - t0) // 2)
    ping.close()
    other.join()
    return summary(name, num_messages / elapsed_s, hops)


def start_thread(target: Callable, args: tuple) -> threading.Thread:
    thread = threading.Thread(target=target, args=args, daemon=True)
    thread.start()
    return thread


def start_process(target: Callable, args: tuple) -> multiprocessing.process.BaseProcess:
    process = multiprocessing.get_context("spawn").Process(target=target, args=args, daemon=True)
    process.start()
    return process


def summary(transport: str, messages_per_s: float, hops_ns: list[int]) -> dict:
    p50_us, p99_us = percentiles(hops_ns)
    return {"transport": transport, "messages_per_s": round(messages_per_s), "hop_p50_us": round(p50_us, 2),
            "hop_p99_us": round(p99_us, 2), "hop_mean_us": round(statistics.fmean(hops_ns) / 1e3, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--pings", type=int, default=2_000)
    parser.add_argument("--json", default="", help="append the results as JSON lines to this file")
    args = parser.parse_args()
    device = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"channel benchmark on {device}; message: SampledTokens with {ROWS} rows; capacity {CAPACITY}")
    rows = [in_thread_run(args.messages, args.pings),
            other_side_run("cross-thread", thread_channel, start_thread, args.messages, args.pings),
            other_side_run("cross-process", process_channel, start_process, args.messages, args.pings)]
    print(f"{'transport':<14} {'messages/s':>12} {'hop p50 us':>11} {'hop p99 us':>11}")
    for row in rows:
        print(f"{row['transport']:<14} {row['messages_per_s']:>12,} {row['hop_p50_us']:>11.2f} {row['hop_p99_us']:>11.2f}")
    if args.json:
        with open(args.json, "a") as file:
            for row in rows:
                file.write(json.dumps({"bench": "channels", "device": device, **row}) + "\n")


if __name__ == "__main__":
    main()
