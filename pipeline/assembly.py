"""The assembly: the eight stages and the channels between them, declared once.

Every entry point builds the pipeline from ``pipeline_spec(args)``: the
offline ``Engine`` (which plays the ingest stage itself), ``stagewise serve``
(under the ``single`` or ``serving`` placement), ``stagewise generate`` (the
Engine), ``stagewise replay`` (one stage rebuilt from a recording) and the
perf scripts. A placement (``pipeline/placement.py``) then says which process
runs which stage; the declaration below never changes with it.

::

    HTTP -> ingest -> tokenize -> multimodal -> schedule -> forward -> sample -> schedule
              ^          ^                      |   ^                  ^  |
              |          +------ abort ------+  |   +--- constrain ----+--+
              +------------------ detokenize <--+

Channels (``producer.door -> channel``, the channel named after its consumer)::

    ingest.out, detokenize.abort           -> tokenize     GenerateRequest | Abort | FlushCache
    tokenize.out                           -> multimodal   TokenizedRequest | Abort | FlushCache
    multimodal.out, sample.schedule,
      constrain.schedule                   -> schedule     + SampledTokens | GrammarReady
    schedule.forward                       -> forward      ForwardBatch
    schedule.constrain, sample.constrain   -> constrain    GrammarCompile | GrammarRelease | ForwardBatch | SampledTokens
    forward.sample, constrain.sample       -> sample       Logits | TokenMask
    schedule.detokenize, schedule.stats,
      tokenize.detokenize, multimodal.errors,
      every process's runner               -> detokenize   TokenOutputBatch | ErrorOutput | TokenizedRequest
                                                           | EngineStats | ProcessCounters
    detokenize.out, tokenize.errors        -> ingest       TextOutput | ErrorOutput | EngineStats | ProcessCounters

Every process's runner puts its stage counters on the detokenize channel,
which already crosses from the engine to the front end, so the text path
(detokenize -> ingest) stays inside the front-end process.

A stop string found by detokenize becomes an Abort on the request path
(tokenize -> multimodal -> schedule), so under the serving placement the
schedule inbox has producers in the engine process only.

What a stage needs beyond its doors comes from ``ProcessContext``, built once
in every process: the server arguments, the tokenizer (loaded once per
process), the vocabulary size, the server info for ``/get_server_info``, and
the ``ModelInfo`` that the forward stage measures after loading the weights
(stages are built in declaration order, so forward comes before constrain
and schedule). Its ``snapshot()`` is what a recording keeps to rebuild any
stage for a replay.
"""
from __future__ import annotations

import dataclasses
import datetime
import functools
import os
import tempfile
import uuid
from typing import Any

import msgspec

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (ConstrainInbox, DecodeScheduleInbox, DetokenizeInbox, EngineDown, ForwardInbox,
                               IngestInbox, ModelInfo, MultimodalInbox, PDRouterInbox, PrefillScheduleInbox,
                               RouterInbox, SampleInbox, ScheduleInbox, ServerInfo, TokenizeInbox, TransferInbox)
from pipeline.placement import ChannelSpec, PipelineSpec, StageSpec
from stages.constrain import ConstrainStage
from stages.detokenize import DetokenizeStage
from models.parallel import TPGroup
from stages.forward import ForwardRankStage, ForwardStage
from stages.forward.kv_shm import SharedMemoryTransport
from stages.forward.kv_transfer import KVTransfer, TorchP2P
from stages.forward.peers import BatchBroadcast
from stages.forward.transfer_stage import TransferStage
from stages.ingest import IngestStage
from stages.multimodal import MultimodalStage
from stages.router import RouterStage
from stages.sample import SampleStage
from stages.schedule import ScheduleStage
from stages.schedule.disagg import DecodeScheduleStage, PrefillScheduleStage
from stages.tokenize import TokenizeStage
from stages.tokenizer import load_tokenizer, model_vocab_size

CAPACITY = 1 << 14  # messages per channel
RANK_TIMEOUT_S = 120  # a collective waiting longer than this on a silent rank fails
TOKENIZE_WORKERS = 2  # threads tokenizing off the stage loop
GRAMMAR_WORKERS = 2  # threads waiting on grammar compiles


class ProcessContext:
    """What the stages of one process are built from; computed once, passed to constructors.

    ``replay=True`` builds stages that step deterministically (no worker
    threads), for ``stagewise replay``.
    """

    def __init__(self, args: ServerArgs | dict[str, Any], server_info: ServerInfo | dict | None = None,
                 model_info: ModelInfo | dict | None = None, replay: bool = False) -> None:
        self.args = args if isinstance(args, ServerArgs) else msgspec.convert(args, ServerArgs)
        self._server_info = _as(ServerInfo, server_info)
        self.model_info = _as(ModelInfo, model_info)  # set by build_forward in the engine's process
        self.kv_cache: Any = None  # the forward stage's KV pool (build_forward): a KV transfer stage moves pages of it
        self.replay = replay

    @functools.cached_property
    def tokenizer(self) -> Any:
        return load_tokenizer(self.args.tokenizer_path or self.args.model_path)

    @functools.cached_property
    def vocab_size(self) -> int:
        """Token ids a request may carry: the tokenizer's and the model's vocabulary, whichever is larger."""
        return max(len(self.tokenizer), model_vocab_size(self.args.model_path))

    @property
    def server_info(self) -> ServerInfo:
        if self._server_info is None:
            self._server_info = measure_server_info(self.args)
        return self._server_info

    @functools.cache
    def tensor_parallel(self, rank: int, dist_init_addr: str) -> tuple[TPGroup, BatchBroadcast | None]:
        """This process's rank in its replica's tensor-parallel group (joined once), and the batch broadcast."""
        args = self.args
        if args.tp_size == 1:
            return TPGroup(), None
        if self.replay:
            raise RuntimeError("a tensor-parallel forward stage runs with its other ranks; it cannot replay alone")
        import torch.distributed as dist

        backend = "nccl" if args.device == "cuda" else "gloo"
        init_method = dist_init_addr if "://" in dist_init_addr else f"tcp://{dist_init_addr}"
        dist.init_process_group(backend, init_method=init_method, rank=rank,
                                world_size=args.tp_size, timeout=datetime.timedelta(seconds=RANK_TIMEOUT_S))
        cpu_group = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
        tp = TPGroup(rank=rank, size=args.tp_size, group=dist.group.WORLD, ep_size=args.ep_size)
        rendezvous_file = init_method.removeprefix("file://") if init_method.startswith("file://") else None
        return tp, BatchBroadcast(cpu_group, rendezvous_file=rendezvous_file)

    def use_gpu(self, dp_rank: int, tp_rank: int) -> None:
        """Run this process's model on GPU ``dp_rank * tp_size + tp_rank`` (each rank and replica its own)."""
        if self.args.device == "cuda":
            import torch

            torch.cuda.set_device(dp_rank * self.args.tp_size + tp_rank)

    def require_model_info(self, stage: str) -> ModelInfo:
        if self.model_info is None:
            raise RuntimeError(f"the {stage} stage needs the model info of a forward stage built before it "
                               f"in the same process")
        return self.model_info

    def snapshot(self) -> dict[str, Any]:
        """JSON data that rebuilds this context: ``ProcessContext(**snapshot)`` (a recording keeps it,
        so the API key is left out: no stage's messages depend on it)."""
        args = msgspec.structs.replace(self.args, api_key="")
        return msgspec.to_builtins({"args": args, "server_info": self._server_info, "model_info": self.model_info})


def _as(struct: type, value: Any) -> Any:
    return msgspec.convert(value, struct) if isinstance(value, dict) else value


def measure_server_info(args: ServerArgs) -> ServerInfo:
    """Versions and device, for /get_server_info (benchmarks store them with their numbers)."""
    import torch
    import triton

    device_name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    return ServerInfo(torch_version=str(torch.__version__), triton_version=str(triton.__version__),
                      device_name=device_name)


# --------------------------------------------------------------------------- stage factories
# One per stage: the context in, the stage out. Nothing else reaches a constructor.


def build_ingest(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel]) -> IngestStage:
    return IngestStage(context.args, inbox, outboxes, tokenizer=context.tokenizer, server_info=context.server_info,
                       vocab_size=context.vocab_size)


def build_tokenize(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel]) -> TokenizeStage:
    return TokenizeStage(context.args, inbox, outboxes, tokenizer=context.tokenizer, vocab_size=context.vocab_size,
                         num_workers=0 if context.replay else TOKENIZE_WORKERS)


def build_multimodal(context: ProcessContext, inbox: Channel | None,
                     outboxes: dict[str, Channel]) -> MultimodalStage:
    return MultimodalStage(context.args, inbox, outboxes, tokenizer=context.tokenizer)


def build_forward(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel],
                  dist_init_addr: str = "", dp_rank: int = 0) -> ForwardStage:
    context.use_gpu(dp_rank, 0)
    tp, peers = context.tensor_parallel(0, dist_init_addr)
    stage = ForwardStage(context.args, inbox, outboxes, tp=tp, peers=peers)
    context.model_info = stage.model_info  # measured from the loaded weights and the KV pool
    context.kv_cache = stage.runner.kv_cache
    # The stages built after this one see the running-request limit the KV pool allows (0 meant "auto").
    context.args = msgspec.structs.replace(context.args, max_running_requests=stage.model_info.num_rows - 1)
    return stage


def build_forward_rank(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel],
                       tp_rank: int, dist_init_addr: str, dp_rank: int = 0) -> ForwardRankStage:
    context.use_gpu(dp_rank, tp_rank)
    tp, peers = context.tensor_parallel(tp_rank, dist_init_addr)
    return ForwardRankStage(context.args, inbox, outboxes, tp=tp, peers=peers)


def build_constrain(context: ProcessContext, inbox: Channel | None,
                    outboxes: dict[str, Channel]) -> ConstrainStage:
    return ConstrainStage(context.args, inbox, outboxes, tokenizer=context.tokenizer,
                          model_info=context.require_model_info("constrain"),
                          max_workers=0 if context.replay else GRAMMAR_WORKERS)


def build_sample(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel]) -> SampleStage:
    return SampleStage(context.args, inbox, outboxes)


def build_schedule(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel],
                   dp_rank: int = 0) -> ScheduleStage:
    return ScheduleStage(context.args, inbox, outboxes, model_info=context.require_model_info("schedule"),
                         dp_rank=dp_rank)


def build_router(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel]) -> RouterStage:
    return RouterStage(context.args, inbox, outboxes, dp_size=context.args.dp_size)


def build_detokenize(context: ProcessContext, inbox: Channel | None,
                     outboxes: dict[str, Channel]) -> DetokenizeStage:
    return DetokenizeStage(context.args, inbox, outboxes, tokenizer=context.tokenizer)


# --------------------------------------------------------------------------- the declaration

HERE = "pipeline.assembly:"

# Declaration order is build order (forward before constrain and schedule) and the
# order one stage loop steps them in: a ForwardBatch that schedule emits at the end of
# round i is run, sampled and taken back by schedule in round i + 1.
STAGES: tuple[StageSpec, ...] = (
    StageSpec("ingest", HERE + "build_ingest", own_thread=True),  # the HTTP server's event loop
    StageSpec("tokenize", HERE + "build_tokenize"),
    StageSpec("multimodal", HERE + "build_multimodal"),
    StageSpec("forward", HERE + "build_forward"),
    StageSpec("constrain", HERE + "build_constrain"),
    StageSpec("sample", HERE + "build_sample"),
    StageSpec("schedule", HERE + "build_schedule"),
    StageSpec("detokenize", HERE + "build_detokenize"),
)

CHANNELS: tuple[ChannelSpec, ...] = (
    ChannelSpec("tokenize", TokenizeInbox, ("ingest.out", "detokenize.abort"), "tokenize", CAPACITY),
    ChannelSpec("multimodal", MultimodalInbox, ("tokenize.out",), "multimodal", CAPACITY),
    ChannelSpec("schedule", ScheduleInbox, ("multimodal.out", "sample.schedule", "constrain.schedule"), "schedule",
                CAPACITY),
    ChannelSpec("forward", ForwardInbox, ("schedule.forward",), "forward", CAPACITY),
    ChannelSpec("constrain", ConstrainInbox, ("schedule.constrain", "sample.constrain"), "constrain", CAPACITY),
    ChannelSpec("sample", SampleInbox, ("forward.sample", "constrain.sample"), "sample", CAPACITY),
    ChannelSpec("detokenize", DetokenizeInbox, ("schedule.detokenize", "schedule.stats", "tokenize.detokenize",
                                                "multimodal.errors"), "detokenize", CAPACITY, counters=True),
    ChannelSpec("ingest", IngestInbox, ("detokenize.out", "tokenize.errors"), "ingest", CAPACITY),
)


def forward_and_sample(args: ServerArgs) -> tuple[ForwardStage, SampleStage]:
    """The forward and sample stages alone, their doors unwired: for scripts that drive one batch by hand."""
    context = ProcessContext(args)
    return (build_forward(context, None, {"sample": None}),
            build_sample(context, None, {"schedule": None, "constrain": None}))


ENGINE_STAGES = ("multimodal", "forward", "constrain", "sample", "schedule")  # one set per data-parallel replica


def pipeline_spec(args: ServerArgs) -> PipelineSpec:
    """The one pipeline description for a resolved ``ServerArgs``: ``STAGES`` and ``CHANNELS``,
    with ``--tp-size`` ranks and ``--dp-size`` replicas added by the two functions below."""
    if args.pd_prefill:
        stages, channels = prefill_decode(args, STAGES, CHANNELS, ENGINE_STAGES)
    elif args.dp_size == 1:
        ranks = tensor_parallel_ranks(args, "forward")
        stages = tuple(ranks[-1] if ranks and s.name == "forward" else s for s in STAGES) + ranks[:-1]
        channels = CHANNELS
    else:
        stages, channels = data_parallel(args)
    return PipelineSpec(stages, channels, context=HERE + "ProcessContext",
                        context_kwargs={"args": msgspec.to_builtins(args)},
                        on_process_exit=HERE + "pd_process_exit" if args.pd_prefill else None)


def tensor_parallel_ranks(args: ServerArgs, forward: str, replica: int = 0) -> tuple[StageSpec, ...]:
    """``--tp-size N`` beside the stage named ``forward``: ranks 1..N-1 (one doorless stage each, in a
    process of its own), then rank 0 (the forward stage itself), all given one process group's
    rendezvous: ``--dist-init-addr`` host:port (its port + the replica's index), or a fresh file in the
    temporary directory (one host; no port to race for)."""
    if args.tp_size == 1:
        return ()
    if args.dist_init_addr:
        host, _, port = args.dist_init_addr.rpartition(":")
        address = f"{host}:{int(port) + replica}"
    else:
        address = "file://" + os.path.join(tempfile.gettempdir(), f"stagewise-tp-{uuid.uuid4().hex}")
    suffix = f"_dp{replica}" if args.dp_size > 1 else ""
    ranks = tuple(StageSpec(f"{forward}_rank{rank}", HERE + "build_forward_rank",
                            {"tp_rank": rank, "dist_init_addr": address, "dp_rank": replica}, own_thread=True,
                            own_process=f"tp{rank}{suffix}") for rank in range(1, args.tp_size))
    return ranks + (StageSpec(forward, HERE + "build_forward", {"dist_init_addr": address, "dp_rank": replica}),)


def data_parallel(args: ServerArgs) -> tuple[tuple[StageSpec, ...], tuple[ChannelSpec, ...]]:
    """``--dp-size N``: the engine stages once per replica ("schedule@dp1"), each replica in a process
    of its own, and a router stage between tokenize and the replicas.

    Channel by channel: an engine stage's inbox is copied per replica with its producers renamed;
    tokenize feeds the router, whose door ``replicas.d`` feeds replica d's multimodal; each
    replica's schedule reports its load to the router, which relays the reports to detokenize.
    """
    def rename(end: str, replica: int) -> str:
        stage, dot, door = end.partition(".")
        return f"{stage}@dp{replica}{dot}{door}" if stage in ENGINE_STAGES else end

    replicas = range(args.dp_size)
    stages: list[StageSpec] = []
    for spec in STAGES:
        if spec.name == "multimodal":
            stages.append(StageSpec("router", HERE + "build_router"))
        if spec.name not in ENGINE_STAGES:
            stages.append(spec)
    for replica in replicas:
        engine = [dataclasses.replace(spec, name=rename(spec.name, replica), own_process=f"engine_dp{replica}",
                                      kwargs={**spec.kwargs, "dp_rank": replica}
                                      if spec.name in ("schedule", "forward") else spec.kwargs)
                  for spec in STAGES if spec.name in ENGINE_STAGES]
        ranks = tensor_parallel_ranks(args, f"forward@dp{replica}", replica)
        if ranks:  # rank 0 (the forward stage, with its process group's address) replaces the plain one
            engine = [dataclasses.replace(ranks[-1], own_process=f"engine_dp{replica}") if s.name == ranks[-1].name
                      else s for s in engine]
        stages += engine + list(ranks[:-1])
    channels: list[ChannelSpec] = [ChannelSpec("router", RouterInbox, ("tokenize.out",) + tuple(
        f"schedule@dp{replica}.stats" for replica in replicas), "router", CAPACITY)]
    for channel in CHANNELS:
        if channel.consumer in ENGINE_STAGES:
            for replica in replicas:
                producers = tuple(f"router.replicas.{replica}" if p == "tokenize.out" else rename(p, replica)
                                  for p in channel.producers)
                channels.append(dataclasses.replace(channel, name=rename(channel.name, replica),
                                                    producers=producers, consumer=rename(channel.consumer, replica)))
        else:
            producers: list[str] = []
            for producer in channel.producers:
                if producer == "schedule.stats":
                    producers.append("router.stats")
                elif producer.partition(".")[0] in ENGINE_STAGES:
                    producers += [rename(producer, replica) for replica in replicas]
                else:
                    producers.append(producer)
            channels.append(dataclasses.replace(channel, producers=tuple(producers)))
    return tuple(stages), tuple(channels)


# --------------------------------------------------------------------------- prefill/decode disaggregation
# ``--placement pd`` (``--pd-prefill N --pd-decode M``, 1 and 1 by default) on one host, built from
# STAGES and CHANNELS by prefill_decode()::
#
#     ingest ─► tokenize ─► router ─┬─► prefill engine k (multimodal, forward, constrain, sample,
#                                   │      schedule = PrefillScheduleStage, transfer)
#                                   │        │ KVHandoff ▲ KVAccept          one process each,
#                                   │        ▼           │                   "engine_prefill{k}"
#                                   └─► decode engine j (forward, constrain, sample,
#                                          schedule = DecodeScheduleStage, transfer)
#                                                                            "engine_decode{j}"
#
# * The router (``stages/router.py``, cache-aware or as ``--load-balance-method``
#   says) picks a prefill engine per request (``replicas.k``); every Abort and
#   FlushCache also goes to each decode engine (``decoders.j``).
# * A prefill engine's schedule hands each request, its first token sampled,
#   to a decode engine (``handoff.j``: the one with the fewest unfinished
#   handoffs from it); the decode engine answers ``accept.k`` when it has
#   allocated the pages (``stages/schedule/disagg.py``).
# * The transfer stages of all engines move the KV (``stages/forward/kv_transfer.py``;
#   prefill engines are ranks ``0..N-1``, decode engines ``N..N+M-1``): through
#   shared memory (``kv_shm.py``: /dev/shm, CUDA IPC on GPUs), the default since
#   every engine here is on one host, or ``--disaggregation-transfer-backend
#   torch``: one ``torch.distributed`` group (gloo on CPU, NCCL on GPU), the
#   transport of engines on several hosts (``pipeline/pd_hosts.py``).
# * Both roles' schedule stages report EngineStats with their role: prefill
#   engines through the router (their load feeds its policy), decode engines
#   to detokenize directly. Outputs flow from each engine to detokenize.
# * An engine process that dies does not end the server while its role has
#   another engine: ``pd_process_exit`` (the pipeline's ``on_process_exit``)
#   tells the router (``EngineDown``), which fails the requests that were on
#   it (``router.errors.0`` -> detokenize), routes around it and tells the
#   survivors (``router.peers.k`` -> prefill engine k's schedule,
#   ``router.decoders.j``); each prefill engine reports its handoffs to the
#   router (``schedule@pk.routes``) so it knows where every request is.
#
# Every engine runs on the same device (GPU 0 when on CUDA): the single-host,
# single-GPU layout of the tests and benchmarks.


PREFILL_STAGES = ("multimodal", "forward", "constrain", "sample", "schedule", "transfer")
DECODE_STAGES = ("forward", "constrain", "sample", "schedule", "transfer")


def build_pd_router(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel]) -> RouterStage:
    return RouterStage(context.args, inbox, outboxes, dp_size=context.args.pd_prefill)


def build_prefill_schedule(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel],
                           engine: int = 0) -> PrefillScheduleStage:
    return PrefillScheduleStage(context.args, inbox, outboxes, model_info=context.require_model_info("schedule"),
                                engine=engine)


def build_decode_schedule(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel],
                          engine: int = 0, rank: int = 0) -> DecodeScheduleStage:
    return DecodeScheduleStage(context.args, inbox, outboxes, model_info=context.require_model_info("schedule"),
                               engine=engine, rank=rank)


def build_transfer(context: ProcessContext, inbox: Channel | None, outboxes: dict[str, Channel], rank: int = 0,
                   world_size: int = 2, address: str = "") -> TransferStage:
    args = context.args
    if context.kv_cache is None:
        raise RuntimeError("the transfer stage needs the KV pool of a forward stage built before it")
    transport: SharedMemoryTransport | TorchP2P
    if args.disaggregation_transfer_backend in ("auto", "shm"):  # auto: every engine is on this host
        transport = SharedMemoryTransport(rank, address, args.device)
        if rank == 0:
            transport.clear()
    else:
        transport = TorchP2P(rank, world_size, address, "nccl" if args.device == "cuda" else "gloo")
    transfer = KVTransfer(context.kv_cache, transport, timeout_s=args.disaggregation_transfer_timeout_s)
    return TransferStage(args, inbox, outboxes, transfer=transfer)


def _address(args: ServerArgs) -> str:
    """The transfer group's rendezvous: ``--dist-init-addr`` (engines on several hosts: the router's
    choice), the bootstrap port on this host, or a fresh file."""
    if args.dist_init_addr:
        return f"tcp://{args.dist_init_addr}"
    if args.disaggregation_bootstrap_port:
        return f"tcp://127.0.0.1:{args.disaggregation_bootstrap_port}"
    return "file://" + os.path.join(tempfile.gettempdir(), f"stagewise-pd-{uuid.uuid4().hex}")


def prefill_decode(args: ServerArgs, stages: tuple[StageSpec, ...], channels: tuple[ChannelSpec, ...],
                   engine_stages: tuple[str, ...]) -> tuple[tuple[StageSpec, ...], tuple[ChannelSpec, ...]]:
    """The stages and channels of ``--pd-prefill N --pd-decode M`` (see the comment above)."""
    num_prefill, num_decode = args.pd_prefill, args.pd_decode
    world, address = num_prefill + num_decode, _address(args)
    by_name = {spec.name: spec for spec in stages}
    engines = [(f"p{k}", f"engine_prefill{k}", PREFILL_STAGES) for k in range(num_prefill)]
    engines += [(f"d{j}", f"engine_decode{j}", DECODE_STAGES) for j in range(num_decode)]

    out: list[StageSpec] = []
    for spec in stages:
        if spec.name == "multimodal":
            out.append(StageSpec("router", HERE + "build_pd_router"))
        if spec.name not in engine_stages:
            out.append(spec)
    for rank, (tag, process, names) in enumerate(engines):
        for name in names:
            out.append(_engine_stage(name, tag, process, rank, world, address, num_prefill, by_name))

    def rename(end: str, tag: str) -> str:
        stage, dot, door = end.partition(".")
        return f"{stage}@{tag}{dot}{door}"

    wired: list[ChannelSpec] = [ChannelSpec("router", PDRouterInbox, ("tokenize.out",) + tuple(
        f"schedule@p{k}.{door}" for k in range(num_prefill) for door in ("stats", "routes")), "router", CAPACITY)]
    for channel in channels:
        if channel.consumer not in engine_stages:
            producers: list[str] = ["router.errors.0"] if channel.consumer == "detokenize" else []
            for producer in channel.producers:
                stage = producer.partition(".")[0]
                if producer == "schedule.stats":
                    producers += ["router.stats"] + [rename(producer, f"d{j}") for j in range(num_decode)]
                elif stage in engine_stages:
                    producers += [rename(producer, tag) for tag, _, names in engines if stage in names]
                else:
                    producers.append(producer)
            wired.append(dataclasses.replace(channel, producers=tuple(producers)))
            continue
        for tag, _, names in engines:
            if channel.consumer not in names:
                continue
            producers = [rename(p, tag) for p in channel.producers if p.partition(".")[0] in names]
            message_type = channel.message_type
            if channel.consumer == "multimodal":
                producers = [f"router.replicas.{tag[1:]}"]
            elif channel.consumer == "schedule" and tag.startswith("p"):
                message_type = PrefillScheduleInbox
                producers += [f"schedule@d{j}.accept.{tag[1:]}" for j in range(num_decode)]
                producers += [f"transfer@{tag}.schedule", f"router.peers.{tag[1:]}"]
            elif channel.consumer == "schedule":
                message_type = DecodeScheduleInbox
                producers.append(f"router.decoders.{tag[1:]}")
                producers += [f"schedule@p{k}.handoff.{tag[1:]}" for k in range(num_prefill)]
                producers.append(f"transfer@{tag}.schedule")
            wired.append(dataclasses.replace(channel, name=f"{channel.name}@{tag}", message_type=message_type,
                                             producers=tuple(producers), consumer=f"{channel.consumer}@{tag}"))
        if channel.consumer == "forward":  # the transfer stage's inbox sits beside the forward stage's
            for tag, _, _ in engines:
                wired.append(ChannelSpec(f"transfer@{tag}", TransferInbox, (f"schedule@{tag}.transfer",),
                                         f"transfer@{tag}", CAPACITY))
    return tuple(out), tuple(wired)


def pd_process_exit(spec: PipelineSpec, process: str, lost: frozenset[str], channels: dict[str, Channel]) -> str:
    """The pipeline's ``on_process_exit`` under ``--placement pd``: "" (serve on) while each role has an engine
    left, after telling the router (``EngineDown``); else why the server cannot serve any more."""
    engines = {s.own_process for s in spec.stages if s.own_process and s.own_process.startswith("engine_")}
    name = process.removeprefix("engine_")
    role = "prefill" if name.startswith("prefill") else "decode"
    index = name.removeprefix(role)
    if process not in engines or not index.isdigit():
        return f"process {process!r} died"
    left = [e for e in engines - lost if e.startswith(f"engine_{role}")]
    if not left:
        return f"every {role} engine died (the last: {process!r})"
    num_prefill = sum(e.startswith("engine_prefill") for e in engines)
    rank = int(index) + (0 if role == "prefill" else num_prefill)
    channels["router"].put(EngineDown(role=role, index=int(index), rank=rank,
                                      reason=f"process {process!r} exited"))
    return ""


def _engine_stage(name: str, tag: str, process: str, rank: int, world: int, address: str, num_prefill: int,
                  by_name: dict[str, StageSpec]) -> StageSpec:
    """One stage of one engine: the assembly's, or its prefill/decode variant."""
    full = f"{name}@{tag}"
    if name == "transfer":
        return StageSpec(full, HERE + "build_transfer", {"rank": rank, "world_size": world, "address": address},
                         own_process=process)
    if name == "schedule" and tag.startswith("p"):
        return StageSpec(full, HERE + "build_prefill_schedule", {"engine": rank}, own_process=process)
    if name == "schedule":
        return StageSpec(full, HERE + "build_decode_schedule", {"engine": rank, "rank": rank},
                         own_process=process)
    return dataclasses.replace(by_name[name], name=full, own_process=process)
