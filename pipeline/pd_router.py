"""``stagewise router --pd-disaggregation``: the front end of prefill and decode engines started apart.

The whole picture (the three commands, what crosses between hosts, start-up)
is in ``pipeline/pd_hosts.py``; this is the router's side: check that every
engine answers, send each its ``PDTopology``, then run the front-end stages
(ingest, tokenize, router, detokenize) as ``stagewise serve`` does, their
channels to the engines over TCP.

An engine that goes away (its heartbeat connection closes, or it is silent
for ``LIVENESS_TIMEOUT_S``; why heartbeats: ``pipeline/pd_hosts.py``) is
handled as ``--placement pd``'s launcher handles a dead engine process
(``pipeline.assembly.pd_process_exit``): what is sent to it is dropped from
then on, the router stage gets ``EngineDown`` (it fails the requests that
were on that engine with an error naming it, routes around it and tells
the survivors to free what they hold for it), and once a role has no engine
left the pipeline's ``failure`` says so (``/health`` 503, running requests
failed).
"""
from __future__ import annotations

import argparse
import functools
import logging
import socket
import sys
import threading
import urllib.parse
from typing import Any

import msgspec

from pipeline.assembly import pipeline_spec
from pipeline.config import ConfigError, args_from_namespace, build_parser, resolve
from pipeline.launch import Pipeline, ProcessRunner, _counters_channel, _own_thread
from pipeline.messages import EngineDown, PDTopology
from pipeline.pd_hosts import (BOOTSTRAP, DEFAULT_BOOTSTRAP_PORT, LIVENESS_TIMEOUT_S, engine_process, host_channels,
                               liveness_channel)
from pipeline.placement import MAIN, PipelineSpec, single, wire_process
from pipeline.serve import Server, drain_on_signals, serve_until_stopped
from pipeline.tcp_channel import ChannelHub, Heartbeat, TcpProducer, reachable, split_address

logger = logging.getLogger("stagewise.router")



class HostsPipeline(Pipeline):
    """The front end's part of a pd pipeline whose engines run on other hosts (started by their own commands)."""

    def __init__(self, spec: PipelineSpec, engines: dict[str, str], dist_init_addr: str,
                 connect_timeout_s: float, on_failure: Any = None) -> None:
        super().__init__(spec, single(spec), on_failure=on_failure)
        self.engines = engines  # process name -> "host:bootstrap port"
        self.dist_init_addr = dist_init_addr
        self.connect_timeout_s = connect_timeout_s
        self.hub: ChannelHub | None = None
        self.heartbeats: list[Heartbeat] = []
        self.stopping = False
        self._lost_lock = threading.Lock()

    def start(self) -> "HostsPipeline":
        for process, address in self.engines.items():
            problem = reachable(address, self.connect_timeout_s)
            if problem:
                raise ConnectionError(f"{process.removeprefix('engine_')} engine: {problem}")
        self.hub = ChannelHub("0.0.0.0", 0)
        addresses = {process: address for process, address in self.engines.items()}
        for process, address in self.engines.items():
            self.hub.watch(liveness_channel(process), LIVENESS_TIMEOUT_S, functools.partial(self.engine_lost, process))
            addresses[MAIN] = f"{_own_ip_towards(address)}:{self.hub.port}"
            role, index = _role_index(process)
            _send_topology(address, PDTopology(
                role=role, index=index, num_prefill=self.spec_counts("prefill"),
                num_decode=self.spec_counts("decode"), addresses=dict(addresses),
                dist_init_addr=self.dist_init_addr))
            self.heartbeats.append(Heartbeat(liveness_channel(MAIN), address))
        self.channels.update(host_channels(self.spec, self.placement, MAIN, self.hub, addresses,
                                           self.connect_timeout_s))
        stages = wire_process(self.spec, self.placement, MAIN, self.channels)
        self._runner = ProcessRunner(MAIN, stages, None, _own_thread(self.spec),
                                     _counters_channel(self.spec, self.channels))
        self._runner.loop.poll = self._runner.publish_counters
        self.started = True
        self._runner.start_threads()
        self._runner.loop.start(name="stage-loop-main")
        return self

    def spec_counts(self, role: str) -> int:
        return sum(p.startswith(f"engine_{role}") for p in self.engines)

    def engine_lost(self, process: str, reason: str) -> None:
        """An engine went away (a hub thread calls this): see the module docstring."""
        with self._lost_lock:
            if self.stopping or process in self.lost:
                return
            self.lost.add(process)
        role, index = _role_index(process)
        why = f"{process!r} at {self.engines[process]} went away: {reason}"
        logger.error("%s engine %d (%s) is gone: %s", role, index, self.engines[process], reason)
        for channel in self.channels.values():  # nothing more reaches it; a put blocked on it returns
            if isinstance(channel, TcpProducer) and channel.address == self.engines[process]:
                channel.abandon()
        rank = index + (0 if role == "prefill" else self.spec_counts("prefill"))
        self.channels["router"].put(EngineDown(role=role, index=index, rank=rank, reason=why))
        if all(p in self.lost for p in self.engines if p.startswith(f"engine_{role}")) and self.failure is None:
            self.failure = f"every {role} engine is gone (the last: {why})"
            logger.error("pipeline failure: %s", self.failure)
            if self.on_failure is not None:
                self.on_failure(self.failure)

    def stop(self, timeout: float = 30.0) -> bool:
        self.stopping = True
        drained = super().stop(timeout)
        for heartbeat in self.heartbeats:
            heartbeat.close()
        if self.hub is not None:
            self.hub.close()
        return drained


def _role_index(process: str) -> tuple[str, int]:
    name = process.removeprefix("engine_")
    role = "prefill" if name.startswith("prefill") else "decode"
    return role, int(name.removeprefix(role))


def _own_ip_towards(address: str) -> str:
    """This host's address as seen from ``address`` (the interface a connection there leaves by)."""
    with socket.create_connection(split_address(address), timeout=5.0) as sock:
        return sock.getsockname()[0]


def _send_topology(address: str, topology: PDTopology) -> None:
    producer = TcpProducer(BOOTSTRAP, PDTopology, address, connect_timeout_s=5.0)
    producer.put(topology)
    producer.close()


def router_parser() -> argparse.ArgumentParser:
    """``stagewise router``'s own flags; every other flag is the server's (``stagewise serve --help``)."""
    parser = argparse.ArgumentParser(prog="stagewise router", add_help=False)
    parser.add_argument("--pd-disaggregation", action="store_true", required=True,
                        help="route over separate prefill and decode engines (the only mode served)")
    parser.add_argument("--prefill", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                        help="a prefill engine: http://host:port [bootstrap port, default 8998]; repeat per engine")
    parser.add_argument("--decode", nargs="+", action="append", default=[], metavar=("URL", "BOOTSTRAP_PORT"),
                        help="a decode engine: http://host:port [bootstrap port, default 8998]; repeat per engine")
    parser.add_argument("--connect-timeout-s", type=float, default=30.0,
                        help="how long to wait for each engine to answer at start-up")
    return parser


def engine_addresses(entries: list[list[str]], role: str) -> dict[str, str]:
    """``--prefill URL [PORT]`` entries -> {process name: "host:bootstrap port"}."""
    found = {}
    for index, entry in enumerate(entries):
        host = urllib.parse.urlsplit(entry[0] if "://" in entry[0] else f"http://{entry[0]}").hostname
        if not host or len(entry) > 2 or (len(entry) == 2 and not entry[1].isdigit()):
            raise ConfigError(f"--{role} takes a URL (http://host:port) and an optional bootstrap port, "
                              f"got {' '.join(entry)}")
        port = int(entry[1]) if len(entry) == 2 else DEFAULT_BOOTSTRAP_PORT
        found[engine_process(role, index)] = f"{host}:{port}"
    if not found:
        raise ConfigError(f"stagewise router --pd-disaggregation needs at least one --{role} engine")
    return found


def router_main(argv: list[str] | None = None) -> int:
    """``stagewise router --pd-disaggregation --prefill URL [PORT] ... --decode URL [PORT] ...``."""
    own, rest = router_parser().parse_known_args(argv)
    try:
        prefill = engine_addresses(own.prefill, "prefill")
        decode = engine_addresses(own.decode, "decode")
        namespace = build_parser().parse_args(rest)
        args = args_from_namespace(namespace)
        args = resolve(msgspec.structs.replace(args, placement="pd", pd_prefill=len(prefill),
                                               pd_decode=len(decode)))
    except ConfigError as error:
        print(f"stagewise router: error: {error}", file=sys.stderr)
        return 2
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    first_host, first_port = split_address(next(iter(prefill.values())))
    dist_init_addr = args.dist_init_addr or f"{first_host}:{first_port + 1}"
    server = Server(args)
    server.pipeline = HostsPipeline(pipeline_spec(args), {**prefill, **decode}, dist_init_addr,
                                    own.connect_timeout_s, on_failure=server.fail_requests)
    stop_requested = drain_on_signals(server)
    try:
        server.start()
    except Exception as error:
        logger.error("could not start the router: %s", error)
        print(f"stagewise router: error: {error}", file=sys.stderr)
        return 1
    problem = serve_until_stopped(server, stop_requested)
    clean = server.shutdown()
    return 1 if problem or not clean else 0
