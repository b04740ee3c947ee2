"""Prefill and decode roles of the schedule stage (``--placement pd --pd-prefill N --pd-decode M``).

A request's life under disaggregation::

    prefill engine                               decode engine
    --------------                               -------------
    chunked prefill (radix cache), sample token 1
    KVHandoff (state + first output)  ───────►   queue; when a row and pages are free:
                                                 allocate (cached prefix reused), post the receive
                                      ◄───────   KVAccept (transfer id, cached tokens to skip)
    KVSend -> transfer stage                     KVRecv -> transfer stage
         ... K and V of every layer move (stages/forward/kv_transfer.py) ...
    KVTransferDone: free (prompt stays cached)   KVTransferDone: emit the first output, decode on

A prompt of several chunks is handed off early, after its first chunk
(``KVHandoff`` without ``first``, with ``segment_tokens``): the decode
engine accepts and posts the receives of every segment (the prompt cut in
pieces of ``segment_tokens``) at once, and after each chunk the prefill
engine sends the segments now computed, so the transfer overlaps the rest
of the prefill (and the next requests'). When the prefill ends, its first
output follows in ``KVFirst`` with the last segments; every output of an
early handoff is the decode engine's to emit (one that ends at its first
token included), and the prefill engine counts the segments it sent while
their request was still prefilling (``pd_segments_overlapped``). Sends copy
the slots when the transfer stage takes them, which is before the next
batch runs (the transfer stage steps after schedule, forward before it).

``PrefillScheduleStage`` is the ordinary schedule stage (``stage.py``) with
one change: a request whose first token does not finish it leaves the
running set after that token and is handed to a decode engine; its output
(the token, its logprobs and the prompt logprobs) travels in the handoff
and the decode engine emits it. The prefill engine holds the request's
pages until its send ended, then releases them with the prompt cached.
Overlap scheduling is off on prefill engines: a decode step planned ahead
would run on the prefill engine for a request that leaves.

``DecodeScheduleStage`` takes ``KVHandoff`` instead of tokenized requests.
Backpressure: a handoff waits in ``accepting`` (first come, first served)
until a row, a running-request place and the prompt's pages are free; the
prefill engine keeps the KV meanwhile, nothing is dropped. On accept the
prompt's cached prefix (its own radix cache) is reused and only the rest is
transferred. When the KV has arrived the request joins the running set as
a decoding request with one generated token, so every count that follows
(the seeded sampler's step, ``min_new_tokens``, ``max_new_tokens``) goes on
from where the prefill engine left it.

A grammar-constrained request is handed off too: the decode engine asks
its constrain stage to compile the grammar with the prefill side's tokens
to replay (``GrammarCompile.replay_ids``) and accepts the handoff once the
grammar is ready, so its first mask follows the token sampled on the
prefill engine.

Both roles report what they moved in their EngineStats (``role``, handoffs,
queue lengths, transfers, bytes, seconds): ``/metrics`` (``stagewise:pd_*``)
and ``/get_server_info``.

Which decode engine: the prefill engine picks the one it has the fewest
unfinished handoffs with (ties: the lowest index).

Faults: a transfer that fails or times out ends its request with finish
reason ``abort`` and the error as its message (decode side); the prefill
side frees its pages either way. An abort reaches both roles (the router
sends every Abort to all engines): the prefill engine releases a handed-off
request once no send of it is in flight; the decode engine finishes it
(exactly one final output) and frees its pages once its receive ended. An
abort that reaches the decode engine before the handoff is remembered
(``aborted``, bounded), and the handoff is then finished at once.

Engines that die (``EngineDown``, from the launcher through the router):
a prefill engine stops handing off to a dead decode engine (it picks among
those still up) and releases the pages of every request it had handed
there (a send reads a copy taken when it started); a decode engine ends the
handoffs from a dead prefill engine that it had not accepted yet. Both pass
the notice to their transfer stage, which fails every transfer with the
dead peer at once (the transport may never report it: a gloo wait posted
before the peer died can hang until the group's timeout), so a receive
from a dead prefill engine ends its request now. Each prefill engine tells
the router where it handed every request (``HandedOff``), so the router can
fail the requests a dead engine took with it.

Every posted receive gets its send: a decode engine posts the receive
before it sends ``KVAccept``, and the prefill engine answers every accept
with a send, also for a request aborted meanwhile (its pages already
freed: the padding slot, repeated, stands in; the decode engine discards
what arrives). A receive left without a send would end in a transport
timeout, which under gloo closes the connection between the two engines.
"""
from __future__ import annotations

import collections
import dataclasses
from typing import Any

import msgspec

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (
    KV_MAX_SEGMENTS, Abort, DecodeScheduleInbox, EngineDown, FinishReason, GrammarCompile, GrammarReady,
    GrammarRelease, HandedOff, KVAccept, KVFirst, KVHandoff, KVRecv, KVSend, KVTransferDone, ModelInfo,
    PrefillScheduleInbox, RowWrite, SampledTokens, TokenOutput, kv_segments,
)
from pipeline.stage import Outbox
from stages.schedule.req_table import Phase, Req
from stages.schedule.stage import PROMPT_TAIL_LEN, ScheduleOutboxes, ScheduleStage, _grammar_of

MAX_ABORTED_RIDS = 1 << 12  # aborts remembered for handoffs (decode) and accepts (prefill) still on their way
PADDING_SLOT = 0  # the KV pool's padding slot: what an aborted request's send reads instead of freed pages


@dataclasses.dataclass
class TransferStats:
    """KV moved by one engine so far (its EngineStats and /metrics)."""

    num_transfers: int = 0
    num_failed: int = 0
    num_bytes: int = 0
    seconds: float = 0.0
    transport: str = ""

    def add(self, done: KVTransferDone, count: bool = True) -> None:
        """Bytes and seconds of one ended send or receive; ``count`` False: a segment of a transfer whose
        last segment is still to end (a transfer and its failure count once)."""
        self.transport = done.transport or self.transport
        self.num_transfers += count
        self.num_failed += 0 if done.ok or not count else 1
        self.num_bytes += done.num_bytes
        self.seconds += done.seconds

    def fields(self) -> dict[str, int | float]:
        """The EngineStats fields these totals fill."""
        return {"pd_transfers": self.num_transfers, "pd_transfer_failures": self.num_failed,
                "pd_transfer_bytes": self.num_bytes, "pd_transfer_seconds": self.seconds,
                "pd_transport": self.transport}


# ------------------------------------------------------------------------- prefill


@dataclasses.dataclass(frozen=True)
class PrefillOutboxes(ScheduleOutboxes):
    handoff: tuple[Outbox[KVHandoff | KVFirst], ...]  # -> decode engine j's schedule ("handoff.j")
    transfer: Outbox[KVSend | EngineDown]  # -> this engine's transfer stage
    routes: Outbox[HandedOff] | None = None  # -> the router: where each request went


@dataclasses.dataclass(eq=False)
class _Handing:
    """A request handed to a decode engine whose KV this engine still sends."""

    req: Req
    decode: int
    running: bool = False  # handed off early: still prefilling here (its first output follows in KVFirst)
    segment_tokens: int = 0  # the transfer's segment size (0: one segment)
    accept: KVAccept | None = None
    segments: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # prompt ranges, set on accept
    next_segment: int = 0  # segments sent so far
    in_flight: int = 0  # segment sends not ended yet
    released: bool = False  # its pages are gone (aborted, or it ended at its first token): sends pad
    aborted: bool = False

    @property
    def sending(self) -> bool:
        return self.accept is not None


class PrefillScheduleStage(ScheduleStage):
    """The schedule stage of a prefill engine: prefill, sample the first token, hand off."""

    Inbox = PrefillScheduleInbox
    Outboxes = PrefillOutboxes
    outboxes: PrefillOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: PrefillOutboxes | dict[str, Channel | None], *, model_info: ModelInfo,
                 engine: int = 0) -> None:
        super().__init__(args, inbox, outboxes, model_info=model_info, dp_rank=engine)
        self.engine = engine
        self.overlap = False  # see the module docstring
        self.handing: dict[str, _Handing] = {}  # rid -> handed off, pages still held here
        self.outstanding = [0] * len(self.outboxes.handoff)  # unfinished handoffs per decode engine
        self.transfers = TransferStats()
        self.num_handoffs = 0
        # aborted before their accept came, pages freed: rid -> (prompt tokens, segment size), to answer the
        # accept with its sends
        self.dropped: collections.OrderedDict[str, tuple[int, int]] = collections.OrderedDict()
        self.num_overlapped = 0  # segments sent while their request was still prefilling
        self._held: dict[str, TokenOutput] = {}  # rid -> an early handoff's output, kept for KVFirst
        self._captured: list[TokenOutput] | None = None
        self.decode_down: set[int] = set()  # decode engines that died
        if not self.outboxes.handoff:
            raise ValueError("a prefill schedule stage needs at least one decode engine (doors handoff.0 ..)")

    def handle(self, message: PrefillScheduleInbox) -> None:
        match message:
            case KVAccept():
                self._on_accept(message)
            case KVTransferDone():
                self._on_sent(message)
            case SampledTokens():
                self._on_sampled_handing_off(message)
            case EngineDown():
                self._on_engine_down(message)
            case _:
                super().handle(message)

    def has_work(self) -> bool:
        return super().has_work() or any(h.sending for h in self.handing.values())

    def telemetry(self) -> dict[str, float]:
        return {**super().telemetry(), "pd_segments_overlapped": float(self.num_overlapped)}

    # ------------------------------------------------------------ hand off
    def _emit_outputs(self, outputs: list[TokenOutput]) -> None:
        """Outputs of a request handed off early are the decode engine's to emit: its first one is held
        for KVFirst (an abort's is dropped: the decode engine answers the abort)."""
        for output in outputs:
            if output.rid in self.handing and self.handing[output.rid].running:
                self._held[output.rid] = output
        outputs = [o for o in outputs if o.rid not in self._held]
        if self._captured is not None:
            self._captured.extend(outputs)
        elif outputs:
            super()._emit_outputs(outputs)

    def _on_sampled_handing_off(self, msg: SampledTokens) -> None:
        """The ordinary step; then a request handed off early whose prefill ended sends its first output
        (KVFirst); every other request that got its first token (and goes on) is handed off now; a
        request whose prompt needs more chunks is handed off early; ready segments are sent."""
        early = {rid: h for rid, h in self.handing.items() if h.running}
        self._captured = []
        try:
            super()._on_sampled(msg)
        finally:
            outputs, self._captured = self._captured, None
        for handing in early.values():
            if handing.req.output_ids or handing.req.phase is Phase.DONE:
                self._first_of_early(handing)
        running = {req.rid: req for req in self.running_reqs}
        keep: list[TokenOutput] = []
        leaving: list[Req] = []
        for output in outputs:
            req = running.get(output.rid)
            if (req is not None and output.finish_reason is None and len(req.output_ids) == 1
                    and output.new_token_ids and not req.is_prefilling and self._any_decode_up()):
                leaving.append(req)
                self._hand_off(req, output)
            else:
                keep.append(output)
        leaving += [h.req for h in early.values() if not h.running]  # (already gone when it ended)
        if leaving:
            gone = set(map(id, leaving))
            self.running_reqs = [r for r in self.running_reqs if id(r) not in gone]
        for req in self.running_reqs:
            if (req.rid not in self.handing and req.is_prefilling and not req.output_ids and req.kv_len > 0
                    and not req.constrained and self._any_decode_up()):
                self._hand_off(req, None)
        for handing in list(self.handing.values()):
            if handing.running:
                self._pump(handing)
        super()._emit_outputs(keep)

    def _hand_off(self, req: Req, first: TokenOutput | None) -> None:
        """To the decode engine with the fewest unfinished handoffs; ``first`` None: early (still prefilling)."""
        up = [j for j in range(len(self.outstanding)) if j not in self.decode_down]
        decode = min(up, key=lambda j: (self.outstanding[j], j))
        self.outstanding[decode] += 1
        self.num_handoffs += 1
        segment_tokens = 0
        if first is None:
            chunk = self.args.chunked_prefill_size if self.args.chunked_prefill_size > 0 else len(req.input_ids)
            segment_tokens = max(chunk, -(-len(req.input_ids) // KV_MAX_SEGMENTS))
        self.handing[req.rid] = _Handing(req, decode, running=first is None, segment_tokens=segment_tokens)
        if self.outboxes.routes is not None:  # before the handoff: the router knows before decode can die of it
            self.outboxes.routes.put(HandedOff(rid=req.rid, parent_rid=req.parent_rid, decode=decode))
        self.outboxes.handoff[decode].put(KVHandoff(
            rid=req.rid, parent_rid=req.parent_rid, index=req.index, input_ids=req.input_ids,
            sampling=req.sampling, max_new_tokens=req.max_new_tokens, seed=req.seed, first=first,
            prefill_engine=self.engine, segment_tokens=segment_tokens))

    def _first_of_early(self, handing: _Handing) -> None:
        """An early handoff's prefill ended (its first token, maybe final) or it was finished here: the first
        output goes to the decode engine, and the rest of the KV after it."""
        req = handing.req
        handing.running = False
        handing.released = req.phase is Phase.DONE  # ended at its first token: its pages were released
        first = self._held.pop(req.rid, None) or self._token_output(req, list(req.output_ids), req.finish_reason,
                                                                     [], [], [])
        self.outboxes.handoff[handing.decode].put(KVFirst(rid=req.rid, first=first))
        self._pump(handing)
        self._maybe_done(handing)

    def _pump(self, handing: _Handing) -> None:
        """Send every accepted segment whose KV is computed (all of them once the prefill ended; padding once
        the pages are gone: every posted receive gets its send)."""
        if handing.accept is None:
            return
        req, accept = handing.req, handing.accept
        computed = min(req.kv_len, len(req.input_ids)) if handing.running else len(req.input_ids)
        while handing.next_segment < len(handing.segments):
            start, end = handing.segments[handing.next_segment]
            if not handing.released and end > computed:
                return
            slots = [PADDING_SLOT] * (end - start) if handing.released else req.slots[start:end]
            self.outboxes.transfer.put(KVSend(rid=req.rid, transfer_id=accept.transfer_id, peer=accept.decode_rank,
                                              slots=slots, segment=handing.next_segment))
            self.num_overlapped += handing.running
            handing.next_segment += 1
            handing.in_flight += 1

    def _maybe_done(self, handing: _Handing) -> None:
        """Every segment sent and ended, the prefill over: release the pages (the prompt stays cached)."""
        if (handing.accept is None or handing.running or handing.in_flight
                or handing.next_segment < len(handing.segments)):
            return
        self._drop(handing.req.rid)

    def _any_decode_up(self) -> bool:
        """False once every decode engine died: requests then decode here (the server is failing anyway)."""
        return len(self.decode_down) < len(self.outstanding)

    def _on_engine_down(self, msg: EngineDown) -> None:
        """A decode engine died: hand nothing more to it; free what waited for its accept (the router has
        failed those requests). A send in flight to it ends by itself: the transport sees the peer gone."""
        if msg.role != "decode":
            return
        self.decode_down.add(msg.index)
        self.outboxes.transfer.put(msg)  # its sends to the dead engine fail now (pages released below)
        for rid, handing in list(self.handing.items()):
            if handing.decode == msg.index:  # a send reads a copy of the pages: they can go at once
                self._drop(rid)

    def _role_stats(self) -> dict[str, Any]:
        sending = sum(h.sending for h in self.handing.values())
        return {"role": "prefill", "pd_handoffs": self.num_handoffs, "pd_queue_reqs": len(self.handing) - sending,
                "pd_transfer_reqs": sending, **self.transfers.fields()}

    def _on_accept(self, msg: KVAccept) -> None:
        handing = self.handing.get(msg.rid)
        if handing is None:  # aborted meanwhile: the receives are posted, so they get sends (module docstring)
            num_tokens, segment_tokens = self.dropped.pop(msg.rid, (msg.skip, 0))
            for segment, (start, end) in enumerate(kv_segments(msg.skip, num_tokens, segment_tokens)):
                self.outboxes.transfer.put(KVSend(rid=msg.rid, transfer_id=msg.transfer_id, peer=msg.decode_rank,
                                                  slots=[PADDING_SLOT] * (end - start), segment=segment))
            return
        handing.accept = msg
        handing.segments = kv_segments(msg.skip, len(handing.req.input_ids), handing.segment_tokens)
        self._pump(handing)

    def _on_sent(self, msg: KVTransferDone) -> None:
        handing = self.handing.get(msg.rid)
        if handing is not None:
            handing.in_flight -= 1
        last = handing is None or (not handing.in_flight and handing.next_segment == len(handing.segments)
                                   and not handing.running)
        self.transfers.add(msg, count=last)  # one transfer per request, however many segments
        if handing is not None:
            self._maybe_done(handing)

    def _drop(self, rid: str) -> None:
        """The request's pages are no longer needed here: release them (the prompt stays cached)."""
        handing = self.handing.pop(rid, None)
        if handing is None:
            return
        self.outstanding[handing.decode] -= 1
        if handing.running:  # handed off early, still prefilling here: it stops
            self.running_reqs = [r for r in self.running_reqs if r is not handing.req]
        if not handing.released:
            self._release(handing.req, keep_in_cache=True)

    def _on_abort(self, msg: Abort) -> None:
        super()._on_abort(msg)  # an early handoff still prefilling is finished there (its output dropped)
        for rid, handing in list(self.handing.items()):
            if rid == msg.rid or handing.req.parent_rid == msg.rid:
                handing.aborted = True
                self._held.pop(rid, None)
                if handing.running and handing.req.phase is Phase.DONE:
                    handing.running, handing.released = False, True
                if not handing.sending:
                    self._remember_dropped(rid, len(handing.req.input_ids), handing.segment_tokens)
                    self._drop(rid)
                else:
                    self._pump(handing)
                    self._maybe_done(handing)

    def _remember_dropped(self, rid: str, num_tokens: int, segment_tokens: int) -> None:
        self.dropped[rid] = (num_tokens, segment_tokens)
        while len(self.dropped) > MAX_ABORTED_RIDS:
            self.dropped.popitem(last=False)


# ------------------------------------------------------------------------- decode


@dataclasses.dataclass(frozen=True)
class DecodeOutboxes(ScheduleOutboxes):
    accept: tuple[Outbox[KVAccept], ...]  # -> prefill engine k's schedule ("accept.k")
    transfer: Outbox[KVRecv | EngineDown]  # -> this engine's transfer stage


class DecodeScheduleStage(ScheduleStage):
    """The schedule stage of a decode engine: accept handoffs as room allows, receive KV, decode."""

    Inbox = DecodeScheduleInbox
    Outboxes = DecodeOutboxes
    outboxes: DecodeOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: DecodeOutboxes | dict[str, Channel | None], *, model_info: ModelInfo,
                 engine: int = 0, rank: int = 0) -> None:
        super().__init__(args, inbox, outboxes, model_info=model_info, dp_rank=engine)
        self.rank = rank  # this engine's transport rank (prefill engines come first)
        self.accepting: collections.deque[KVHandoff] = collections.deque()
        self.receiving: dict[int, tuple[Req, KVHandoff]] = {}  # transfer id -> request, its handoff
        self.aborted: collections.OrderedDict[str, None] = collections.OrderedDict()
        self.next_transfer_id = 1
        self.transfers = TransferStats()
        self.num_taken_over = 0
        self.compiling: dict[str, KVHandoff] = {}  # rid -> constrained handoff whose grammar is compiling
        self.prefill_down: set[int] = set()  # prefill engines that died (their handoffs' KV is gone)
        self.arrived: dict[str, tuple[Req, KVHandoff]] = {}  # early handoffs whose KV is here, first output not yet

    def handle(self, message: DecodeScheduleInbox) -> None:
        match message:
            case KVHandoff():
                self._on_handoff(message)
            case KVTransferDone():
                self._on_received(message)
            case GrammarReady() if message.rid in self.compiling:
                self._on_handoff_grammar(message)
            case EngineDown():
                self._on_engine_down(message)
            case KVFirst():
                self._on_first(message)
            case _:
                super().handle(message)

    def _role_stats(self) -> dict[str, Any]:
        return {"role": "decode", "pd_handoffs": self.num_taken_over,
                "pd_queue_reqs": len(self.accepting) + len(self.compiling),
                "pd_transfer_reqs": len(self.receiving) + len(self.arrived), **self.transfers.fields()}

    def _on_first(self, msg: KVFirst) -> None:
        """An early handoff's first output: join now if its KV is here, else keep it with the handoff."""
        if msg.rid in self.arrived:
            req, _ = self.arrived.pop(msg.rid)
            self._join(req, msg.first)
            return
        for transfer_id, (req, handoff) in self.receiving.items():
            if req.rid == msg.rid:
                self.receiving[transfer_id] = (req, msgspec.structs.replace(handoff, first=msg.first))
                return
        for i, handoff in enumerate(self.accepting):
            if handoff.rid == msg.rid:
                self.accepting[i] = msgspec.structs.replace(handoff, first=msg.first)
                return
        # otherwise it ended here already (aborted, or its prefill engine's KV failed): nothing to do

    def _join(self, req: Req, first: TokenOutput) -> None:
        """The KV and the first output are both here: decode on (or, if the first output is final, emit it)."""
        req.cached_tokens = first.cached_tokens
        if first.finish_reason is not None:
            self.kv.release(req, keep_in_cache=False)
            req.phase = Phase.DONE
            self.live_rids.discard(req.rid)
            self._emit_outputs([first])
            return
        req.output_ids = list(first.new_token_ids)
        self.running_reqs.append(req)
        self.num_taken_over += 1  # num_generated counts only the tokens sampled here
        self._emit_outputs([first])

    def _on_handoff(self, handoff: KVHandoff) -> None:
        """Queue it for room; a constrained one first compiles its grammar, replaying the prefill's tokens."""
        if handoff.rid in self.aborted or handoff.parent_rid in self.aborted:
            self._emit_outputs([_final(handoff, FinishReason(type="abort", message="aborted"))])
            return
        if handoff.prefill_engine in self.prefill_down:
            message = f"prefill engine {handoff.prefill_engine} died"
            self._emit_outputs([_final(handoff, FinishReason(type="abort", message=message))])
            return
        grammar = _grammar_of(handoff.sampling)
        if grammar is None:
            self.accepting.append(handoff)
            return
        self.compiling[handoff.rid] = handoff
        after = handoff.sampling.grammar_after_reasoning
        self.outboxes.constrain.put(GrammarCompile(
            rid=handoff.rid, kind=grammar[0], spec=grammar[1], after_reasoning=after,
            prompt_tail_ids=handoff.input_ids[-PROMPT_TAIL_LEN:] if after else [],
            replay_ids=list(handoff.first.new_token_ids)))

    def _on_engine_down(self, msg: EngineDown) -> None:
        """A prefill engine died: the handoffs from it not accepted yet end here (their KV is gone).
        A receive from it in flight fails by itself (the transport sees the connection close)."""
        if msg.role != "prefill":
            return
        self.prefill_down.add(msg.index)
        self.outboxes.transfer.put(msg)  # its receives from the dead engine fail now (and end their requests)
        reason = FinishReason(type="abort", message=f"prefill engine {msg.index} died: {msg.reason}")
        outputs = []
        for handoff in [h for h in self.accepting if h.prefill_engine in self.prefill_down]:
            self.accepting.remove(handoff)
            outputs.append(_final(handoff, reason))
        for handoff in [h for h in self.compiling.values() if h.prefill_engine in self.prefill_down]:
            del self.compiling[handoff.rid]
            self.outboxes.constrain.put(GrammarRelease(rid=handoff.rid))
            outputs.append(_final(handoff, reason))
        outputs += self._end_arrived(lambda handoff: handoff.prefill_engine == msg.index, reason)
        self._emit_outputs(outputs)

    def _end_arrived(self, hit: Any, reason: FinishReason) -> list[TokenOutput]:
        """Early handoffs whose KV is here but whose first output will not come: free them, end them."""
        outputs = []
        for rid, (req, handoff) in list(self.arrived.items()):
            if hit(handoff):
                del self.arrived[rid]
                outputs.append(self._finish(req, reason, keep_in_cache=False))
        return outputs

    def _on_handoff_grammar(self, msg: GrammarReady) -> None:
        handoff = self.compiling.pop(msg.rid)
        if not msg.error:
            self.accepting.append(handoff)
            return
        self.outboxes.constrain.put(GrammarRelease(rid=msg.rid))
        self._emit_outputs([_final(handoff, FinishReason(type="abort", message=f"grammar: {msg.error}"))])

    def has_work(self) -> bool:
        return super().has_work() or bool(self.accepting)

    def tick(self) -> None:
        while self.accepting and self._accept(self.accepting[0]):
            self.accepting.popleft()
        super().tick()

    # ------------------------------------------------------------ accept
    def _room_for(self, num_tokens: int) -> bool:
        running = len(self.running_reqs) + len(self.receiving)
        reserve = self.kv.page_size * (len(self.running_reqs) + 1)  # each running request's next token
        return (running < self.max_running and self.kv.rows.num_free > 0
                and self.kv.available_tokens >= self.kv.tokens_to_grow_from(0, num_tokens) + reserve)

    def _accept(self, handoff: KVHandoff) -> bool:
        """Allocate the request's pages and post the receive; False (nothing taken) when there is no room."""
        num = len(handoff.input_ids)
        if num + 1 > self.kv.capacity_tokens or not self._room_for(num):
            return False
        req = Req(rid=handoff.rid, parent_rid=handoff.parent_rid, index=handoff.index,
                  input_ids=list(handoff.input_ids), sampling=handoff.sampling,
                  max_new_tokens=handoff.max_new_tokens, seed=handoff.seed, arrival_order=self.arrivals,
                  stop_ids=frozenset(handoff.sampling.stop_token_ids)
                  | (frozenset() if handoff.sampling.ignore_eos else self.eos_ids))
        self.arrivals += 1
        writes = self.kv.admit(req)
        if writes is None:
            return False
        cached = req.kv_len
        new_slots = self.kv.grow(req, num - cached)
        if new_slots is None:
            self.kv.release(req, keep_in_cache=False)
            return False
        req.admitted_once, req.prefill_target, req.phase = True, num, Phase.RUNNING
        req.constrained = _grammar_of(handoff.sampling) is not None
        self.pending_row_writes += writes + [RowWrite(row=req.row, start=cached, slots=list(new_slots))]
        self.live_rids.add(req.rid)
        transfer_id = self.next_transfer_id
        self.next_transfer_id += 1
        self.receiving[transfer_id] = (req, handoff)
        self.outboxes.transfer.put(KVRecv(rid=req.rid, transfer_id=transfer_id, peer=handoff.prefill_engine,
                                          slots=list(new_slots), segment_tokens=handoff.segment_tokens))
        self.outboxes.accept[handoff.prefill_engine].put(KVAccept(
            rid=req.rid, transfer_id=transfer_id, decode_rank=self.rank, skip=cached))
        return True

    def _on_received(self, msg: KVTransferDone) -> None:
        self.transfers.add(msg)
        entry = self.receiving.pop(msg.transfer_id, None)
        if entry is None:
            return
        req, handoff = entry
        if req.phase is Phase.DONE:  # aborted while its KV was on the way: its output went already
            self.kv.release(req, keep_in_cache=False)
            if req.constrained:
                self.outboxes.constrain.put(GrammarRelease(rid=req.rid))
            return
        if not msg.ok:
            self._emit_outputs([self._finish(req, FinishReason(type="abort", message=msg.error),
                                             keep_in_cache=False)])
            return
        if handoff.first is None:  # handed off early: the first output comes in KVFirst
            self.arrived[req.rid] = (req, handoff)
            return
        self._join(req, handoff.first)

    def _on_abort(self, msg: Abort) -> None:
        super()._on_abort(msg)
        self.aborted[msg.rid] = None
        while len(self.aborted) > MAX_ABORTED_RIDS:
            self.aborted.popitem(last=False)
        reason = FinishReason(type="abort", message=msg.reason)
        outputs = []
        for handoff in [h for h in self.accepting if msg.rid in (h.rid, h.parent_rid)]:
            self.accepting.remove(handoff)
            outputs.append(_final(handoff, reason))
            if _grammar_of(handoff.sampling) is not None:
                self.outboxes.constrain.put(GrammarRelease(rid=handoff.rid))
        for handoff in [h for h in self.compiling.values() if msg.rid in (h.rid, h.parent_rid)]:
            del self.compiling[handoff.rid]
            self.outboxes.constrain.put(GrammarRelease(rid=handoff.rid))  # cancels the compile
            outputs.append(_final(handoff, reason))
        for req, _ in self.receiving.values():
            if msg.rid in (req.rid, req.parent_rid) and req.phase is not Phase.DONE:
                req.phase = Phase.DONE  # pages freed when the receive ends (the wire may still write)
                self.live_rids.discard(req.rid)
                outputs.append(self._token_output(req, [], reason, [], [], []))
        outputs += self._end_arrived(lambda handoff: msg.rid in (handoff.rid, handoff.parent_rid), reason)
        self._emit_outputs(outputs)


def _final(handoff: KVHandoff, reason: FinishReason) -> TokenOutput:
    """The one final output of a handed-off request that never ran here."""
    return TokenOutput(rid=handoff.rid, parent_rid=handoff.parent_rid, index=handoff.index, new_token_ids=[],
                       finish_reason=reason, prompt_tokens=len(handoff.input_ids), completion_tokens=0)

