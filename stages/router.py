"""RouterStage: data parallelism's front door, one request to one of N engine replicas.

With ``--dp-size N`` the server runs N engine replicas (each its own
multimodal, schedule, forward, constrain and sample stages, its own KV pool
and radix cache). The router sits between tokenize and them::

    tokenize ─► router ─┬─► replica 0 (multimodal ─► schedule ─► ...)
                 ▲      ├─► replica 1
                 │      └─► ...
                 └── EngineStats of each replica's schedule stage

Inbox ``RouterInbox`` (TokenizedRequest | Abort | FlushCache | EngineStats);
outboxes (``RouterOutboxes``):

* ``replicas`` -> each replica's multimodal stage: a door family wired as
  ``replicas.0`` .. ``replicas.N-1`` (their count must equal ``dp_size``);
* ``stats`` -> detokenize (-> ingest): every EngineStats, relayed unchanged
  (its ``dp_rank`` says which replica took it).

Choosing a replica (``--load-balance-method``, SGLang's names)
---------------------------------------------------------------

* ``round_robin``: replica 0, 1, ..., N-1, 0, ... Fair in counts, blind to
  both load and cache.
* ``shortest_queue``: the replica with the fewest requests. A replica's load
  is the ``num_running_reqs + num_queue_reqs`` of its last EngineStats (one a
  second) plus the requests this router has sent it since that snapshot, so
  a burst arriving between two snapshots still spreads out. Ties go to the
  lowest index.
* ``cache_aware`` (SGLang's router): the router keeps, per replica, an
  *approximate* prefix tree of the token ids it sent there. Approximate
  because the replica's own radix cache evicts on its own schedule; the
  router only guesses what is still cached. For each request:

  1. If the load is badly unbalanced (the busiest replica has more than
     ``BALANCE_ABS_THRESHOLD`` requests more than the idlest one, and more
     than ``BALANCE_REL_THRESHOLD`` times it), balance first: shortest queue.
  2. Otherwise match the prompt against every replica's tree. If the best
     match covers at least ``CACHE_THRESHOLD`` of the prompt (SGLang's
     default 0.5), send it there: that replica likely has the prefix's KV
     and prefills only the rest.
  3. Otherwise (no replica has much of it) the shortest queue.

  The prompt is then inserted into the chosen replica's tree. Each tree is
  bounded: past ``TREE_TOKEN_BUDGET`` tokens, least recently matched leaves
  are evicted. FlushCache empties every tree along with the replicas' caches.

The ``n > 1`` sequences of one request (rids ``parent.0``, ``parent.1``, ...,
one ``parent_rid``) all go to the replica chosen for the first (index 0), so
they share its cached prompt.

Aborts and flushes
------------------

An Abort goes to the replica that got that rid (a sequence's rid, or a parent
rid: all its sequences are on one replica); an rid the router does not know
(already forgotten, or never routed) goes to every replica, where an unknown
rid is a no-op. FlushCache goes to every replica.

State owned: the rid -> replica table (LRU-bounded at ``MAX_ROUTED_RIDS``:
finishes do not pass through the router, so nothing else would remove them;
an abort removes its entry), the round-robin cursor, each replica's last
reported load and the requests sent since, and the prefix trees.

The router never edits a message, never looks at outputs (they flow from
each replica's schedule stage to detokenize directly), and never blocks on
a replica's answer.

Prefill/decode disaggregation: engines that die
-----------------------------------------------

Under ``--placement pd`` the replicas are the prefill engines and the
``decoders`` doors reach the decode engines. Each prefill engine tells the
router where it handed a request (``HandedOff``: sequence rid -> decode
engine), so the router knows which engine answers for every sequence it
routed: its prefill engine until the handoff, its decode engine after.
When the launcher reports an engine process dead (``EngineDown``):

* the router marks it down: no request, abort or flush goes to it again,
  and every policy chooses among the prefill engines still up;
* every sequence that was on it ends with an ``ErrorOutput`` (500, naming
  the engine; ``errors`` door -> detokenize -> the client). A sequence in
  the middle of its KV transfer is the decode engine's: a dead prefill
  engine fails its receive, and the decode engine ends it;
* the notice goes on to every surviving engine (``peers.k`` to prefill
  engine k's schedule, ``decoders.j`` to decode engine j's), which frees
  what it held for the dead one;
* a request arriving while no prefill or no decode engine is up gets a 503.
  (The launcher fails the whole server once a role has no engine left;
  with engines on other hosts, ``pipeline/pd_router.py`` sends the same
  notice when an engine's heartbeat connection closes or goes quiet.)

``telemetry()`` publishes the engines up per role and which are down
(``/get_server_info``: ``engines_down``).
"""
from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import logging
from typing import Callable

from pipeline.channel import Channel
from pipeline.config import ServerArgs
from pipeline.messages import (Abort, EngineDown, EngineStats, ErrorOutput, FlushCache, HandedOff, PDRouterInbox,
                               TokenizedRequest)
from pipeline.stage import Outbox, Outboxes, Stage

logger = logging.getLogger(__name__)

CACHE_THRESHOLD = 0.5  # cache_aware: least matched fraction of the prompt that decides (SGLang's default)
BALANCE_ABS_THRESHOLD = 32  # cache_aware: load gap (requests) that counts as unbalanced (SGLang's default)
BALANCE_REL_THRESHOLD = 1.0001  # ... and the busiest must have this many times the idlest's load (SGLang's)
TREE_TOKEN_BUDGET = 1 << 20  # cache_aware: most tokens one replica's prefix tree keeps
TREE_EVICT_TO = 0.9  # an over-budget tree is trimmed to this fraction of the budget (amortises the walk)
MAX_ROUTED_RIDS = 1 << 16  # rid -> replica entries kept (least recently routed forgotten first)


@dataclasses.dataclass(frozen=True)
class RouterOutboxes(Outboxes):
    replicas: tuple[Outbox[TokenizedRequest | Abort | FlushCache], ...]  # -> replica k's multimodal ("replicas.k")
    stats: Outbox[EngineStats]  # -> detokenize (-> ingest), relayed unchanged
    # Prefill/decode disaggregation (stages/schedule/disagg.py): each decode engine's schedule gets every
    # Abort and FlushCache too ("decoders.j"; none wired otherwise), and every engine the EngineDown notices
    # ("peers.k" to prefill engine k's schedule); requests failed by a dead engine leave by "errors.0".
    decoders: tuple[Outbox[Abort | FlushCache | EngineDown], ...] = ()
    peers: tuple[Outbox[EngineDown], ...] = ()
    errors: tuple[Outbox[ErrorOutput], ...] = ()  # "errors.0" under pd placement


@dataclasses.dataclass
class _Sequence:
    """Where one routed sequence is: its prefill engine, and its decode engine once handed off."""

    parent_rid: str
    prefill: int
    decode: int | None = None


class RouterStage(Stage):
    """TokenizedRequest -> one replica (by policy); Abort -> its replica; FlushCache -> all; EngineStats relayed."""

    Inbox = PDRouterInbox  # RouterInbox (data parallel) plus the pd notices
    Outboxes = RouterOutboxes
    outboxes: RouterOutboxes

    def __init__(self, args: ServerArgs, inbox: Channel | None,
                 outboxes: RouterOutboxes | dict[str, Channel | None], *, dp_size: int) -> None:
        super().__init__("router", inbox, outboxes)
        num_doors = len(self.outboxes.replicas)
        if dp_size < 1 or num_doors != dp_size:
            raise ValueError(f"router: dp_size={dp_size} needs doors replicas.0 .. replicas.{dp_size - 1}, "
                             f"but {num_doors} replica door(s) are wired")
        self.dp_size = dp_size
        self.method = args.load_balance_method
        self.routes: collections.OrderedDict[str, int] = collections.OrderedDict()  # rid or parent rid -> replica
        self.next_replica = 0  # round robin
        self.reported_load = [0] * dp_size  # running + queued in each replica's last EngineStats
        self.sent_since_report = [0] * dp_size  # requests sent to each replica since that snapshot
        self.trees = [PrefixTree(TREE_TOKEN_BUDGET) for _ in range(dp_size)]
        self.down: dict[str, set[int]] = {"prefill": set(), "decode": set()}  # pd: dead engines by role
        self.sequences: collections.OrderedDict[str, _Sequence] = collections.OrderedDict()  # pd: rid -> where

    # ------------------------------------------------------------ messages
    def handle(self, message: PDRouterInbox) -> None:
        match message:
            case TokenizedRequest():
                self._route(message)
            case Abort():
                self._abort(message)
            case FlushCache():
                for tree in self.trees:
                    tree.reset()
                for door in self._live(self.outboxes.replicas, "prefill") + self._live_decoders():
                    door.put(message)
            case EngineStats():
                self._on_stats(message)
            case HandedOff():
                self._on_handed_off(message)
            case EngineDown():
                self._on_engine_down(message)
            case _:
                raise TypeError(f"router stage got an unexpected {type(message).__name__}")

    def _route(self, request: TokenizedRequest) -> None:
        missing = self._missing_role()
        if missing:
            self._fail(request.rid, 503, f"no {missing} engine is up (every one died)", "server_unavailable")
            return
        replica = self.routes.get(request.parent_rid) if request.index > 0 else None
        if replica is None or replica in self.down["prefill"]:  # the first sequence (or siblings' entry gone)
            replica = self.choose(request.input_ids)
        self._remember(request.parent_rid, replica)
        if request.rid != request.parent_rid:
            self._remember(request.rid, replica)
        if self.outboxes.decoders:
            self._remember_sequence(request.rid, _Sequence(request.parent_rid, replica))
        self.sent_since_report[replica] += 1
        self.outboxes.replicas[replica].put(request)

    def _abort(self, abort: Abort) -> None:
        replica = self.routes.pop(abort.rid, None)
        doors = self.outboxes.replicas if replica is None else (self.outboxes.replicas[replica],)
        doors = tuple(d for d in doors if _index(d) not in self.down["prefill"])
        for door in doors + self._live_decoders():
            door.put(abort)

    # ------------------------------------------------------------ pd: engines that die
    def _live(self, doors: tuple[Outbox, ...], role: str) -> tuple[Outbox, ...]:
        return tuple(door for door in doors if _index(door) not in self.down[role])

    def _live_decoders(self) -> tuple[Outbox, ...]:
        return self._live(self.outboxes.decoders, "decode")

    def _missing_role(self) -> str:
        """"prefill" or "decode" when every engine of that role is down ("" while each role has one up)."""
        if len(self.down["prefill"]) >= self.dp_size:
            return "prefill"
        if self.outboxes.decoders and len(self.down["decode"]) >= len(self.outboxes.decoders):
            return "decode"
        return ""

    def _remember_sequence(self, rid: str, sequence: _Sequence) -> None:
        self.sequences[rid] = sequence
        self.sequences.move_to_end(rid)
        while len(self.sequences) > MAX_ROUTED_RIDS:
            self.sequences.popitem(last=False)

    def _on_handed_off(self, message: HandedOff) -> None:
        sequence = self.sequences.get(message.rid)
        if sequence is not None:
            sequence.decode = message.decode
        if message.decode in self.down["decode"]:  # it died while the notice was on its way
            self._fail_sequences(lambda s: s.decode == message.decode, f"decode engine {message.decode} died")

    def _on_engine_down(self, message: EngineDown) -> None:
        """Mark the engine down, fail what was on it, tell the survivors (see the module docstring)."""
        if message.index in self.down[message.role]:
            return
        self.down[message.role].add(message.index)
        logger.error("router: %s engine %d is down (%s); %s", message.role, message.index, message.reason,
                     f"no {message.role} engine is left" if self._missing_role() else "serving on with the others")
        if message.role == "prefill":
            on_it = lambda s: s.decode is None and s.prefill == message.index  # noqa: E731
        else:
            on_it = lambda s: s.decode == message.index  # noqa: E731
        self._fail_sequences(on_it, f"{message.role} engine {message.index} died: {message.reason}")
        for door in self._live(self.outboxes.peers, "prefill") + self._live_decoders():
            door.put(message)

    def _fail_sequences(self, on_it: Callable[[_Sequence], bool], reason: str) -> None:
        failed = [rid for rid, sequence in self.sequences.items() if on_it(sequence)]
        parents = dict.fromkeys(self.sequences.pop(rid).parent_rid for rid in failed)
        for parent in parents:  # one error ends the whole request (all its sequences)
            self._fail(parent, 500, reason, "internal_error")

    def _fail(self, rid: str, status: int, message: str, error_type: str) -> None:
        if not self.outboxes.errors:
            raise RuntimeError(f"router: cannot fail request {rid} ({message}): no errors door is wired")
        self.outboxes.errors[0].put(ErrorOutput(rid=rid, status_code=status, message=message, error_type=error_type))

    def telemetry(self) -> dict[str, float]:
        if not self.outboxes.decoders:
            return {}
        counts = {"pd_prefill_engines_up": float(self.dp_size - len(self.down["prefill"])),
                  "pd_decode_engines_up": float(len(self.outboxes.decoders) - len(self.down["decode"]))}
        for role, down in self.down.items():
            counts.update({f"pd_down.{role}.{index}": 1.0 for index in sorted(down)})
        return counts

    def _on_stats(self, stats: EngineStats) -> None:
        if 0 <= stats.dp_rank < self.dp_size:
            self.reported_load[stats.dp_rank] = stats.num_running_reqs + stats.num_queue_reqs
            self.sent_since_report[stats.dp_rank] = 0
        else:
            logger.error("router: EngineStats from dp_rank %d, but dp_size is %d", stats.dp_rank, self.dp_size)
        self.outboxes.stats.put(stats)

    def _remember(self, rid: str, replica: int) -> None:
        self.routes[rid] = replica
        self.routes.move_to_end(rid)
        while len(self.routes) > MAX_ROUTED_RIDS:
            self.routes.popitem(last=False)

    # ------------------------------------------------------------ policies
    def loads(self) -> list[int]:
        """Each replica's estimated number of requests (last report + sent since)."""
        return [reported + sent for reported, sent in zip(self.reported_load, self.sent_since_report)]

    def choose(self, input_ids: list[int]) -> int:
        """The replica for a new request's prompt, by ``--load-balance-method``."""
        match self.method:
            case "round_robin":
                replica = self.next_replica
                while replica in self.down["prefill"]:
                    replica = (replica + 1) % self.dp_size
                self.next_replica = (replica + 1) % self.dp_size
                return replica
            case "shortest_queue":
                return self.shortest_queue()
            case "cache_aware":
                replica = self.cache_aware(input_ids)
                self.trees[replica].insert(input_ids)
                return replica
            case _:
                raise ValueError(f"router: unknown --load-balance-method {self.method!r}")

    def up(self) -> list[int]:
        """The replicas still up (all of them unless a pd engine died)."""
        return [k for k in range(self.dp_size) if k not in self.down["prefill"]]

    def shortest_queue(self) -> int:
        loads = self.loads()
        return min(self.up(), key=lambda k: (loads[k], k))  # ties go to the lowest index

    def cache_aware(self, input_ids: list[int]) -> int:
        loads, up = self.loads(), self.up()
        busiest, idlest = max(loads[k] for k in up), min(loads[k] for k in up)
        if busiest - idlest > BALANCE_ABS_THRESHOLD and busiest > idlest * BALANCE_REL_THRESHOLD:
            return self.shortest_queue()
        matched = [tree.match(input_ids) if k in up else -1 for k, tree in enumerate(self.trees)]
        best = max(up, key=lambda k: (matched[k], -loads[k], -k))
        if input_ids and matched[best] >= CACHE_THRESHOLD * len(input_ids):
            return best
        return self.shortest_queue()


# ---------------------------------------------------------------- prefix tree


class _Node:
    """One edge of a PrefixTree: a run of token ids, and when a match last walked it."""

    __slots__ = ("children", "parent", "key", "last_access")

    def __init__(self, parent: "_Node | None", key: list[int], tick: int) -> None:
        self.children: dict[int, _Node] = {}  # first token of the child's run -> child
        self.parent = parent
        self.key = key
        self.last_access = tick

    def __lt__(self, other: "_Node") -> bool:
        return self.last_access < other.last_access


class PrefixTree:
    """Token-id prefixes sent to one replica: a radix tree without KV, bounded by LRU leaf eviction.

    ``match`` returns how many leading tokens of a prompt the tree holds;
    ``insert`` adds a prompt. Both refresh the access time of the path they
    walk, so eviction drops the prefixes no recent request used.
    """

    def __init__(self, token_budget: int) -> None:
        self.token_budget = token_budget
        self._clock = itertools.count(1)
        self.reset()

    def reset(self) -> None:
        self.root = _Node(None, [], 0)
        self.num_tokens = 0

    def match(self, ids: list[int]) -> int:
        """Length of the longest prefix of ``ids`` in the tree."""
        node, pos, tick = self.root, 0, next(self._clock)
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                return pos
            child.last_access = tick
            run = _common_len(child.key, ids, pos)
            pos += run
            if run < len(child.key):
                return pos
            node = child
        return pos

    def insert(self, ids: list[int]) -> None:
        """Add ``ids`` (splitting the edge where it leaves the tree), then evict if over budget."""
        node, pos, tick = self.root, 0, next(self._clock)
        while pos < len(ids):
            child = node.children.get(ids[pos])
            if child is None:
                node.children[ids[pos]] = _Node(node, list(ids[pos:]), tick)
                self.num_tokens += len(ids) - pos
                break
            child.last_access = tick
            run = _common_len(child.key, ids, pos)
            if run < len(child.key):
                child = self._split(child, run)
            pos += run
            node = child
        if self.num_tokens > self.token_budget:
            self.evict(int(self.token_budget * TREE_EVICT_TO))

    def _split(self, child: _Node, at: int) -> _Node:
        """Cut ``child``'s run after ``at`` tokens; returns the new upper node (same access time)."""
        parent = child.parent
        assert parent is not None and 0 < at < len(child.key), (at, len(child.key))
        upper = _Node(parent, child.key[:at], child.last_access)
        parent.children[child.key[0]] = upper
        child.key = child.key[at:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def evict(self, target_tokens: int) -> None:
        """Drop least recently used leaves until at most ``target_tokens`` remain."""
        leaves = [node for node in self._nodes() if not node.children]
        heapq.heapify(leaves)
        while self.num_tokens > target_tokens and leaves:
            leaf = heapq.heappop(leaves)
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            self.num_tokens -= len(leaf.key)
            if parent is not self.root and not parent.children:
                heapq.heappush(leaves, parent)

    def _nodes(self) -> list[_Node]:
        found, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            found.append(node)
            stack.extend(node.children.values())
        return found


def _index(door: Outbox) -> int:
    """A family door's index ("replicas.2" -> 2)."""
    return int(door.name.rpartition(".")[2])


def _common_len(key: list[int], ids: list[int], start: int) -> int:
    """How many leading tokens of ``key`` equal ``ids[start:]``."""
    end = start + len(key)
    if ids[start:end] == key:  # the common case (a whole edge matches), compared in C
        return len(key)
    limit = min(len(key), len(ids) - start)
    n = 0
    while n < limit and key[n] == ids[start + n]:
        n += 1
    return n
