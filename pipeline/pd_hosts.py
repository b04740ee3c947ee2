"""Prefill/decode disaggregation over several hosts: one command per engine, one router in front.

SGLang's shape, with its flag names::

    host P:  stagewise serve --model-path M --disaggregation-mode prefill \\
                 --host P --disaggregation-bootstrap-port 8998
    host D:  stagewise serve --model-path M --disaggregation-mode decode \\
                 --host D --disaggregation-bootstrap-port 8998
    host F:  stagewise router --pd-disaggregation --model-path M \\
                 --prefill http://P:30000 8998 --decode http://D:30000 8998 \\
                 --host 0.0.0.0 --port 8000 [--dist-init-addr P:8999]

Every process runs its part of the one pipeline description of
``--placement pd`` (``pipeline/assembly.py``, N prefill and M decode engines
as the router's command line lists them): the router command runs the front
end (ingest, tokenize, router, detokenize: the HTTP server), each engine
command runs one engine's stages. A channel whose ends are on two hosts is
carried over TCP (``pipeline/tcp_channel.py``): each process listens on one
port (an engine's ``--disaggregation-bootstrap-port``, the router's an
ephemeral one) and its producers connect to the consumer's.

Start-up: an engine command listens and waits. The router checks that
every engine answers (``--connect-timeout-s``; an unreachable address is an
error naming it, exit 1), then sends each a ``PDTopology``: its role and
index, every process's address, and the KV transfer group's rendezvous
(``--dist-init-addr``, by default the first prefill engine's host at its
bootstrap port + 1). The engine builds its stages (loading the model), joins
the transfer group (``torch.distributed``: gloo on CPU, NCCL between GPUs)
and serves until it is stopped (SIGTERM/SIGINT) or its router goes away.
The URL's own port in ``--prefill``/``--decode`` is not used: an engine
serves no HTTP of its own.

Liveness. The router and each engine send each other a heartbeat (an
empty frame a second, ``pipeline/tcp_channel.py``) on a connection of its
own, and each watches the other's. A process that ends in any way
(SIGKILL included) has its sockets closed by the kernel, so its peer sees
the connection close at once; a host that vanishes closes nothing, so
``LIVENESS_TIMEOUT_S`` without a heartbeat counts as gone too. Why not
watch the EngineStats an engine already sends each second: they come from
its schedule stage's loop, which a long step (a big prefill, a CUDA graph
capture) can hold for longer than a sensible timeout, and they do not
flow from the router to an engine at all; a heartbeat thread does neither.

* An engine that goes away: the router (``pipeline/pd_router.py``) does
  what ``--placement pd``'s launcher does for a dead engine process: an
  ``EngineDown`` to its router stage, which fails that engine's requests
  with an error naming it, routes new ones to the survivors and tells them
  to free what they hold for it; ``/get_server_info`` lists it in
  ``engines_down``. Once a role has no engine left, ``/health`` answers
  503 (and new requests 503 with the role named).
* The router goes away: an engine serves one router for its lifetime, so
  it logs which router went away and why, stops its stages and exits
  (code 1); its KV pool goes with the process. (SGLang's engines outlive
  a router; here a new router needs freshly started engines.)

Every channel producer here drops what it sends to a peer that went away
(the EngineDown that follows settles what was in flight with it) instead
of failing the stage that sent it.

This module is the shared part and the engine's side (``engine_main``); the
router's is ``pipeline/pd_router.py``.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import Any

import msgspec

from pipeline.assembly import pipeline_spec
from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.launch import ProcessRunner, _counters_channel, _own_thread
from pipeline.messages import PDTopology
from pipeline.placement import (MAIN, PipelineSpec, ends_of, make_channel, process_of, resolve_type, single,
                                transport_of, wire_process)
from pipeline.tcp_channel import ChannelHub, Heartbeat, TcpProducer

logger = logging.getLogger("stagewise.pd")

DEFAULT_BOOTSTRAP_PORT = 8998  # SGLang's --disaggregation-bootstrap-port default
BOOTSTRAP = "bootstrap"  # the hub channel an engine waits on for its PDTopology
ENGINE_CONNECT_TIMEOUT_S = 600.0  # an engine's producers wait this long for the front end (model loads)
LIVENESS = "liveness"  # heartbeat channels: "liveness.<sender's process>" on the receiver's hub
LIVENESS_TIMEOUT_S = 20.0  # a peer silent this long is gone (a closed connection is noticed at once)
EXIT_GRACE_S = 10.0  # an engine whose router went away exits at most this long after noticing


def liveness_channel(process: str) -> str:
    """The hub channel name of ``process``'s heartbeats."""
    return f"{LIVENESS}.{process}"


def engine_process(role: str, index: int) -> str:
    """The pd assembly's process name of an engine ("engine_prefill0")."""
    return f"engine_{role}{index}"


def host_channels(spec: PipelineSpec, placement: dict[str, list[str]], process: str, hub: ChannelHub,
                  addresses: dict[str, str], connect_timeout_s: float) -> dict[str, Channel]:
    """The channels of ``process`` whose ends are on other hosts: an inbox with a producer elsewhere is a
    hub inbox; a door to a consumer elsewhere is a TcpProducer to that consumer's hub; the rest (both
    ends here) are left to ``wire_process``."""
    where = process_of(placement)
    channels: dict[str, Channel] = {}
    for channel in spec.channels:
        processes, _ = ends_of(channel, where)
        if process not in processes:
            continue
        consumer = MAIN if channel.consumer is None else where[channel.consumer]
        if consumer != process:  # connected now: every hub listens before the router sends the topology
            channels[channel.name] = TcpProducer(channel.name, resolve_type(channel.message_type),
                                                 addresses[consumer], connect_timeout_s,
                                                 drop_when_closed=True).connect()
        elif len(processes) > 1:
            channels[channel.name] = hub.inbox(channel.name, resolve_type(channel.message_type), channel.capacity)
        elif transport_of(channel, spec, where) == "cross-process":  # only its caller end is elsewhere
            channels[channel.name] = make_channel(channel, "cross-thread")
    return channels


# --------------------------------------------------------------------------- an engine


def engine_main(args: ServerArgs) -> int:
    """``stagewise serve --disaggregation-mode prefill|decode``: one engine, until SIGTERM/SIGINT."""
    logging.basicConfig(level=args.log_level.upper(),
                        format=f"[{args.disaggregation_mode}] %(asctime)s %(levelname)s %(name)s: %(message)s")
    port = args.disaggregation_bootstrap_port or DEFAULT_BOOTSTRAP_PORT
    try:
        hub = ChannelHub(args.host, port)
    except OSError as error:
        print(f"stagewise serve: error: cannot listen on {args.host}:{port}: {error}", file=sys.stderr)
        return 1
    logger.info("%s engine waiting for a router at %s:%d", args.disaggregation_mode, args.host, hub.port)
    topology = hub.inbox(BOOTSTRAP, PDTopology).get()
    if topology.role != args.disaggregation_mode:
        logger.error("the router named this engine a %s engine, but it runs as %s", topology.role,
                     args.disaggregation_mode)
        return 1
    hosts = {address.rpartition(":")[0] for process, address in topology.addresses.items() if process != MAIN}
    backend = args.disaggregation_transfer_backend
    if backend == "auto":  # shared memory only when every engine is on one host
        backend = "shm" if len(hosts) == 1 else "torch"
    engine_args = msgspec.structs.replace(
        args, placement="pd", pd_prefill=topology.num_prefill, pd_decode=topology.num_decode,
        disaggregation_mode="null", dist_init_addr=topology.dist_init_addr,
        disaggregation_transfer_backend=backend)
    spec = pipeline_spec(engine_args)
    placement = single(spec)
    process = engine_process(topology.role, topology.index)
    router = topology.addresses[MAIN]
    heartbeat = Heartbeat(liveness_channel(process), router)  # from now on: a death while loading counts
    runner: ProcessRunner | None = None
    router_lost = threading.Event()

    def on_router_lost(reason: str) -> None:
        logger.error("the router at %s went away (%s): %s engine %d drops what it holds and exits", router,
                     reason, topology.role, topology.index)
        router_lost.set()
        if runner is None:  # still loading: nothing to stop
            logging.shutdown()
            os._exit(1)
        timer = threading.Timer(EXIT_GRACE_S, _exit_now, args=(f"its stages did not stop within {EXIT_GRACE_S:g} s",))
        timer.daemon = True  # a clean stop ends the process before it fires
        timer.start()
        runner.loop.stop()

    hub.watch(liveness_channel(MAIN), LIVENESS_TIMEOUT_S, on_router_lost)
    channels = host_channels(spec, placement, process, hub, topology.addresses, ENGINE_CONNECT_TIMEOUT_S)
    stages = wire_process(spec, placement, process, channels)
    runner = ProcessRunner(process, stages, None, _own_thread(spec), _counters_channel(spec, channels))
    runner.loop.poll = runner.publish_counters
    if router_lost.is_set():  # it went while the stages were being built
        _exit_now("the router went away during start-up")

    def stop(*_: Any) -> None:
        runner.loop.stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    logger.info("%s engine %d of %d+%d ready (KV transfer group at %s)", topology.role, topology.index,
                topology.num_prefill, topology.num_decode, topology.dist_init_addr)
    runner.start_threads()
    try:
        runner.loop.run()
    finally:
        heartbeat.close()
        runner.stop_threads()
        for stage in stages:
            stage.close()
        hub.close()
    return 1 if router_lost.is_set() else 0


def _exit_now(why: str) -> None:
    """End the engine process at once (its memory, KV pool included, goes with it)."""
    logger.error("exiting now: %s", why)
    logging.shutdown()
    os._exit(1)
